"""Pipeline parallelism (PP 2, one layer half per worker process) with the pool, on real vLLM CPU engines.

Each stage saves and loads its own layers under its own keys (the pipeline rank is part of every key), so a PP 2
engine's second pass takes every full block from the pool with the no-connector answers, and a PP 1 engine on the
same pool, whose objects would hold every layer, finds none of those half-model objects: it computes, never loading
half a model's layers as a hit.
"""

from __future__ import annotations

import pytest

from kvpool_testkit.engine import EngineSpec, engine_env, passes, run_engine, run_twice
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e]

BLOCK = 128
PROMPTS = distinct_prompts(2, 3 * BLOCK + 5, seed=36)
MAX_TOKENS = 12


def test_each_stage_saves_and_loads_its_own_layers_and_pp1_misses_cleanly(tiny_model, pool, baseline_outputs, tmp_path):
    config = pool.connector_config()
    spec = EngineSpec(tiny_model, PROMPTS, MAX_TOKENS, kv_transfer_config=config)
    pp2 = run_twice(
        # vLLM CPU 0.32 allocates the tensors a later stage receives in the warm-up that compiling runs: eager
        # (the tests' default) fails its first step with or without a connector
        EngineSpec(**{**spec.__dict__, "extra_llm_args": {"pipeline_parallel_size": 2, "enforce_eager": False}}),
        tmp_path / "pp2",
        env=engine_env(tp=2),  # one OpenMP thread per stage on its own core, as at TP 2
    )
    assert passes(pp2) == ([0, 0], [3 * BLOCK, 3 * BLOCK])
    assert pp2.outputs == baseline_outputs * 2
    stages = [t for t in pp2.worker_totals if t.get("loaded_blocks")]
    assert len(pp2.worker_totals) == 2 and len(stages) == 2  # both stages loaded, each its own objects
    assert [t["loaded_blocks"] for t in stages] == [6, 6]
    assert stages[0]["loaded_bytes"] == stages[1]["loaded_bytes"]  # two layers of four each

    pp1 = run_engine(EngineSpec(**{**spec.__dict__, "sequential": True}), tmp_path / "pp1")
    assert [r.num_cached_tokens for r in pp1.results] == [0, 0]
    assert pp1.outputs == baseline_outputs
