"""A GQA prefix stored at one TP size is a full hit at the other: the tiny Llama (2 KV heads) at TP 1 and TP 2 on real
vLLM CPU engines and a real Mooncake Store.

A TP 2 rank holds one KV head, a TP 1 rank both, so a block is two objects at TP 2 and one at TP 1, under different
keys. Phases, in order:
1. a TP 1 engine computes and stores prompts P and Q, then serves them again from vLLM's own prefix cache: the TP 1
   reference (vLLM's own prefix hit at TP 1);
2. a TP 2 engine (``kv_producer``: it looks nothing up) does the same: the TP 2 reference, and both prompts stored
   at TP 2 too;
3. P's TP 1 objects and Q's TP 2 objects are removed, so only the other TP size holds each;
4. a fresh TP 1 engine serves P: every full block from the TP 2 head shards (two objects a block, one head each);
5. a fresh TP 2 engine serves Q: every full block from the TP 1 objects (a part of one object a rank).
The fresh engines run without vLLM's own prefix cache, so every cached token is the pool's, and must answer token
for token like vLLM's own prefix hit at their TP size.
"""

from __future__ import annotations

import pytest

from kvpool_testkit.engine import EngineSpec, engine_env, run_engine
from kvpool_testkit.inspection import prompt_block_keys, worker_shard, worker_shards
from kvpool_testkit.mooncake_pool import connector_config, plain_client
from kvpool_testkit.workloads import expected_pool_hits, standard_prompts

pytestmark = pytest.mark.e2e

P, Q = standard_prompts()[:2], standard_prompts()[2:3]  # two prompts sharing 2 blocks; a 2-block one
BLOCKS = {"P": 2 + 3, "Q": 2}  # full blocks each set loads (without vLLM's own prefix cache, shared ones twice)


def run(model: str, workdir, pool, tp: int, prompts: list[list[int]], role: str, reference: bool):
    """``reference``: the prompts twice, one at a time: stored (``role`` allowing), then hits in vLLM's own prefix
    cache. Otherwise once, without vLLM's own prefix cache: hits from the pool only."""
    spec = EngineSpec(
        model=model,
        prompts=prompts * (2 if reference else 1),
        # patient lookups, as test_mla_engine's: a TP 2 engine on 2 cores can starve the lookup thread past 500 ms
        kv_transfer_config=connector_config(
            pool.client_config(), role, reconnect_interval_s=1.0, lookup_timeout_ms=10_000
        ),
        sequential=True,
        enable_prefix_caching=reference,
        extra_llm_args={"tensor_parallel_size": tp} if tp > 1 else {},
    )
    return run_engine(spec, workdir, env=engine_env(tp=tp))


@pytest.fixture(scope="module")
def pool(patient_pool):
    return patient_pool  # engines start one after another on a 2-core host: ``patient_pool``


@pytest.fixture(scope="module")
def phases(tiny_model, pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-tp")
    store1 = run(tiny_model, root / "store1", pool, 1, P + Q, "kv_both", reference=True)
    store2 = run(tiny_model, root / "store2", pool, 2, P + Q, "kv_producer", reference=True)
    shards2 = worker_shards(store2.log)
    gone = [key for prompt in P for key in prompt_block_keys(worker_shard(store1.log), prompt)]
    gone += [key for prompt in Q for shard in shards2 for key in prompt_block_keys(shard, prompt)]
    with plain_client(pool) as client:
        assert all(client.remove(key, True) == 0 for key in sorted(set(gone)))
    load1 = run(tiny_model, root / "load1", pool, 1, P, "kv_consumer", reference=False)
    load2 = run(tiny_model, root / "load2", pool, 2, Q, "kv_consumer", reference=False)
    return dict(store1=store1, store2=store2, load1=load1, load2=load2, shards2=shards2)


def reference(run_, prompts: list[list[int]], of: list[list[int]]) -> list[list[int]]:
    """The second pass's answers (vLLM's own prefix hits) to ``of``, out of a reference run of ``prompts``."""
    second = run_.results[len(prompts) :]
    return [second[prompts.index(p)].token_ids for p in of]


def test_a_tp2_store_is_two_head_shards_a_block_under_other_keys_than_tp1s(phases):
    assert len(phases["shards2"]) == 2 and worker_shard(phases["store1"].log) not in phases["shards2"]
    saved = [s["saved_blocks"] for s in phases["store2"].worker_totals]
    assert saved == [5, 5], saved  # each rank its own head of every distinct block: P's 3 and Q's 2


@pytest.mark.parametrize(
    ("phase", "ranks", "prompts", "reference_run", "blocks"),
    [("load1", 1, P, "store1", BLOCKS["P"]), ("load2", 2, Q, "store2", BLOCKS["Q"])],
    ids=["tp1-from-tp2", "tp2-from-tp1"],
)
def test_every_full_block_loads_from_the_other_tp_size_and_answers_like_vllms_own_prefix_hit(
    phases, phase, ranks, prompts, reference_run, blocks
):
    run_ = phases[phase]
    assert [r.num_cached_tokens for r in run_.results] == expected_pool_hits(prompts)
    assert run_.outputs == reference(phases[reference_run], P + Q, prompts)
    stats = run_.worker_totals
    assert len(stats) == ranks, stats
    assert [(s.get("loaded_blocks"), s.get("loaded_other_tp_blocks")) for s in stats] == [(blocks, blocks)] * ranks
    assert not any(k.startswith("load_failed") for s in stats for k in s), stats
    assert "Traceback" not in run_.log and "blocks stored at TP sizes" in run_.log
