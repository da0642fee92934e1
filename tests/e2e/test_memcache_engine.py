"""``backend: "memcache"`` (the default) end to end on a real vLLM CPU engine, with the real meta service and the
pymmc test double standing in for memcache's data path (which needs Ascend): save in one engine, a fresh engine
loads, identical greedy outputs; a code in the middle of a batch; the meta service down; TP 1 (scheduler and worker
in one process, one pymmc client) and TP 2 (a client per process, pool memory in the workers only).

The double shadows ``memcache_hybrid`` in the engine processes through PYTHONPATH; it keeps objects in files, so a
fresh engine process reads what an earlier one stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvpool_testkit.engine import EngineRun, EngineSpec, engine_env, run_engine
from kvpool_testkit.inspection import prompt_block_keys, worker_shards
from kvpool_testkit.workloads import expected_pool_hits, standard_prompts

pytestmark = pytest.mark.e2e

DOUBLE_DIR = Path(__file__).parents[1] / "doubles" / "pymmc"
PROMPTS = standard_prompts()
EXPECTED_HITS = expected_pool_hits(PROMPTS)  # [256, 384, 255, 0]
GUIDE_CONFIG = {  # the deployment guide's kv_transfer_config, as written there: it must keep working
    "kv_connector": "MemcacheConnectorStoreV1",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"use_layerwise": False, "memcache_rpc_port": "0"},
}
LAYOUTS = {1: {"distributed_executor_backend": "uni"}, 2: {"tensor_parallel_size": 2}}


def double_env(meta, store: Path, faults: dict | None = None, tp: int = 1) -> dict[str, str]:
    env = plain_env(tp)
    env.update(
        {
            "MMC_LOCAL_CONFIG_PATH": str(meta.local_config),
            "MMC_DOUBLE_STORE": str(store),
            "MMC_DOUBLE_FAULTS": json.dumps(faults or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(DOUBLE_DIR), os.environ.get("PYTHONPATH")])),
        }
    )
    return env


def plain_env(tp: int = 1) -> dict[str, str]:
    if tp > 1:
        return engine_env(tp=tp)
    # TP 1 in one process, scheduler and worker together, as vllm-ascend runs it (vLLM's CPU platform keeps the
    # in-process executor only without engine multiprocessing)
    return engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def run(model: str, workdir: Path, env: dict[str, str], connector: bool, tp: int = 1, sequential: bool = False):
    spec = EngineSpec(
        model=model,
        prompts=PROMPTS,
        kv_transfer_config=GUIDE_CONFIG if connector else None,
        enable_prefix_caching=False,  # every cached token is then the pool's
        sequential=sequential,
        extra_llm_args=LAYOUTS[tp],
    )
    return run_engine(spec, workdir, env=env)


def transferred(store: Path, op: str) -> tuple[int, int]:
    """(objects done, objects failed) by every engine process's ``op`` ("put" or "get") so far, from the double."""
    done = failed = 0
    log = store / "ops.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        _, logged_op, ok, bad = line.split()
        if logged_op == op:
            done, failed = done + int(ok), failed + int(bad)
    return done, failed


def inits_by_process(store: Path) -> dict[str, list[str]]:
    by_pid: dict[str, list[str]] = defaultdict(list)
    for line in (store / "inits.log").read_text().splitlines():
        pid, what = line.split(" ", 1)
        by_pid[pid].append(what)
    return dict(by_pid)


@dataclass
class Run:
    engine: EngineRun
    puts: tuple[int, int]  # (objects stored, failed) during this run
    gets: tuple[int, int]


def run_counted(store: Path, *args, **kwargs) -> Run:
    puts, gets = transferred(store, "put"), transferred(store, "get")
    engine = run(*args, **kwargs)
    after_puts, after_gets = transferred(store, "put"), transferred(store, "get")
    return Run(
        engine,
        (after_puts[0] - puts[0], after_puts[1] - puts[1]),
        (after_gets[0] - gets[0], after_gets[1] - gets[1]),
    )


# -- TP 1: scheduler and worker in one process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp1(tiny_model, meta, standard_baseline, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmc-tp1")
    store = root / "pool"
    baseline = standard_baseline
    env = double_env(meta, store)
    saved = run_counted(store, tiny_model, root / "save", env, connector=True, sequential=True)
    inits_after_save = inits_by_process(store)
    loaded = run_counted(store, tiny_model, root / "load", double_env(meta, store), connector=True)
    return baseline, saved, loaded, inits_after_save, store, root


def test_tp1_saves_through_memcache_and_a_fresh_engine_loads_identical_outputs(tp1):
    baseline, saved, loaded, _, _, _ = tp1
    assert saved.engine.outputs == baseline.outputs and loaded.engine.outputs == baseline.outputs
    assert saved.puts == (5, 0)  # 2 + 3 (2 of them shared with the first prompt, stored once) + 2
    assert [r.num_cached_tokens for r in loaded.engine.results] == EXPECTED_HITS
    assert loaded.gets == (7, 0) and loaded.puts == (0, 0)
    for done in (saved, loaded):
        assert "Traceback" not in done.engine.log and "unreachable" not in done.engine.log


def test_tp1_scheduler_and_worker_share_one_pymmc_init_with_pool_memory(tp1):
    *_, inits, _, _ = tp1
    assert list(inits.values()) == [["device=0 init_bm=True initialised"]], inits


def test_a_code_in_the_middle_of_a_batch_costs_that_block_only(tp1, tiny_model, meta):
    baseline, *_, store, root = tp1
    env = double_env(meta, store, faults={"get_code_at": [1, -3007]})
    faulty = run_counted(store, tiny_model, root / "midbatch", env, connector=True)
    assert faulty.engine.outputs == baseline.outputs
    # the second block of each of the three loads is missing: recomputed; the others still load
    assert faulty.gets == (4, 3)
    assert "failed (missing); vLLM recomputes them" in faulty.engine.log


def test_meta_service_down_during_serving_opens_the_back_off(tp1, tiny_model, meta):
    baseline, *_, store, root = tp1
    env = double_env(meta, store, faults={"down_after_calls": 2, "down_for_s": 30})
    down = run_counted(store, tiny_model, root / "metadown", env, connector=True, sequential=True)
    assert down.engine.outputs == baseline.outputs
    assert "unreachable during" in down.engine.log and "serving without it" in down.engine.log
    # one call met the lost meta service; the back-off window kept the rest from calling it
    assert (down.gets[1] + down.puts[1]) >= 1 and down.gets[0] < 7, (down.gets, down.puts)


# -- TP 2: one pymmc client per process --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp2(tiny_model, meta, tmp_path_factory):
    """A no-connector TP 2 engine is the oracle: it computes every block itself with the same shapes (each rank's
    heads, the same all-reduce), so its greedy outputs are what the pool engines must answer. The storing engine
    cannot be the oracle: it takes the second prompt's shared prefix from the pool itself."""
    root = tmp_path_factory.mktemp("mmc-tp2")
    baseline = run(tiny_model, root / "baseline", plain_env(tp=2), False, tp=2)
    store = root / "pool"
    env = double_env(meta, store, tp=2)
    saved = run_counted(store, tiny_model, root / "save", env, True, tp=2, sequential=True)
    # One head shard's object of the second prompt's last block goes missing: the fresh engine must recompute that
    # block and load every other one.
    shards = worker_shards(saved.engine.log)
    assert len(shards) == 2, "each rank logs its own shard"
    for key in prompt_block_keys(shards[1], PROMPTS[1])[2:]:
        (store / hashlib.sha256(key.encode()).hexdigest()).unlink()
    loaded = run_counted(store, tiny_model, root / "load", double_env(meta, store, tp=2), True, tp=2)
    return baseline, saved, loaded, store


@pytest.mark.vllm_engines
def test_tp2_saves_both_head_shards_and_a_fresh_engine_loads_identical_outputs(tp2):
    baseline, saved, loaded, _ = tp2
    assert saved.engine.outputs == baseline.outputs and loaded.engine.outputs == baseline.outputs
    assert saved.puts == (10, 0)  # each rank stores its own heads: 5 objects each
    assert saved.gets == (4, 0)  # the second prompt's 2 shared blocks, each rank its own shard


@pytest.mark.vllm_engines
def test_tp2_a_block_missing_one_head_shard_is_recomputed(tp2):
    _, _, loaded, _ = tp2
    # a lookup hits only where both shards are there: the second prompt's third block is not (EXPECTED_HITS[1]: 384)
    assert [r.num_cached_tokens for r in loaded.engine.results] == [256, 256, 255, 0]
    assert loaded.gets == (12, 0)  # per rank 2 + 2 + 2: the block one shard lacks is loaded by neither


@pytest.mark.vllm_engines
def test_tp2_each_process_inits_once_and_only_workers_hold_pool_memory(tp2):
    *_, store = tp2
    inits = inits_by_process(store)
    assert all(len(v) == 1 for v in inits.values()), inits
    # two engines (save, load), each: a lookup client in the engine core, a worker per rank with its device
    assert sorted(line for per_process in inits.values() for line in per_process) == sorted(
        ["device=0 init_bm=False initialised", "device=0 init_bm=True initialised", "device=1 init_bm=True initialised"]
        * 2
    )
