"""Pipeline parallelism with tensor parallelism (PP 2 x TP 2: four worker processes, each one layer half and one
head half) with the pool, on real vLLM CPU engines.

Each worker saves and loads its own layers' and heads' part under its own keys (pipeline and tensor ranks are part of
every key), so the engine's second pass takes every full block from the pool with the no-connector answers, and a
PP 1 engine on the same pool, whose objects would hold every layer, finds none of those partial objects: it computes,
never loading part of a model's layers as a hit.
"""

from __future__ import annotations

import pytest

from kvpool_testkit.engine import EngineSpec, engine_env, passes, run_engine, run_twice
from kvpool_testkit.inspection import worker_shards
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e]

BLOCK = 128
PROMPTS = distinct_prompts(2, 3 * BLOCK + 5, seed=36)
MAX_TOKENS = 12


def test_each_stage_and_rank_saves_and_loads_its_own_part_and_pp1_misses_cleanly(
    tiny_model, pool, baseline_outputs, tmp_path
):
    config = pool.connector_config()
    spec = EngineSpec(tiny_model, PROMPTS, MAX_TOKENS, kv_transfer_config=config)
    parallel = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}
    pp2 = run_twice(
        # vLLM CPU 0.32 allocates the tensors a later stage receives in the warm-up that compiling runs: eager
        # (the tests' default) fails its first step with or without a connector
        EngineSpec(**{**spec.__dict__, "extra_llm_args": {**parallel, "enforce_eager": False}}),
        tmp_path / "pp2-tp2",
        env=engine_env(tp=4),  # one OpenMP thread per worker, two workers a core
    )
    assert passes(pp2) == ([0, 0], [3 * BLOCK, 3 * BLOCK])
    assert pp2.outputs == baseline_outputs * 2
    assert len(pp2.worker_totals) == 4
    assert [t.get("loaded_blocks") for t in pp2.worker_totals] == [6] * 4  # every worker loaded, its own objects
    assert len({t["loaded_bytes"] for t in pp2.worker_totals}) == 1  # a quarter of the KV each
    assert len(worker_shards(pp2.log)) == 4

    pp1 = run_engine(EngineSpec(**{**spec.__dict__, "sequential": True}), tmp_path / "pp1")
    assert [r.num_cached_tokens for r in pp1.results] == [0, 0]
    assert pp1.outputs == baseline_outputs
