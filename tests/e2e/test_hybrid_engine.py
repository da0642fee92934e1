"""A hybrid-attention model (Gemma 3: sliding-window layers between full-attention ones) through the pool.

vLLM's hybrid KV cache manager gives such a model two KV cache groups; the connector says it supports them
(``SupportsHMA``), so vLLM keeps the manager on, as it does without a connector. Each group's blocks are their own
pool objects. A fresh engine loads a prompt's full-attention blocks all, its sliding-window blocks only inside the
window (vLLM hands the group its null block elsewhere), and answers exactly as the no-connector engine.
"""

from __future__ import annotations

import pytest

from kvpool_connector.testing.engine import EngineSpec, run_engine
from kvpool_connector.testing.mooncake_pool import connector_config
from kvpool_connector.testing.tiny_model import PRESETS, build_model
from kvpool_connector.testing.workloads import distinct_prompts

pytestmark = pytest.mark.e2e

BLOCK = 128
WINDOW = PRESETS["tiny-sliding"].sliding_window  # 256 tokens: two blocks
LONG = distinct_prompts(1, 5 * BLOCK + 40, seed=61)[0]  # 5 full blocks
BRANCH = LONG[: 3 * BLOCK + 50] + distinct_prompts(1, 150, seed=62)[0]  # shares 3 blocks with LONG; 4 full blocks
PROMPTS = [LONG, BRANCH]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hybrid_model(session_dir) -> str:
    return str(build_model(session_dir / "tiny-sliding", preset="tiny-sliding"))


@pytest.fixture(scope="module")
def runs(hybrid_model, pool, tmp_path_factory):
    """No connector; the connector on an empty pool (stores); a fresh engine on the warm pool (loads)."""
    root = tmp_path_factory.mktemp("hybrid")
    spec = dict(model=hybrid_model, prompts=PROMPTS, max_tokens=MAX_TOKENS, sequential=True)
    config = connector_config(pool.client_config())
    baseline = run_engine(EngineSpec(**spec), root / "baseline")
    stored = run_engine(EngineSpec(**spec, kv_transfer_config=config), root / "store")
    loaded = run_engine(EngineSpec(**spec, kv_transfer_config=config), root / "load")
    return baseline, stored, loaded


def test_vllm_keeps_its_hybrid_kv_cache_manager_with_the_connector(runs):
    baseline, stored, _ = runs
    for run in (baseline, stored):
        assert "kv cache group sizes (128, 128)" in run.log  # two KV cache groups, as without a connector
    assert "Turning off hybrid kv cache manager" not in stored.log
    assert stored.outputs == baseline.outputs
    assert "KV cache group 0 of 2" in stored.log  # the worker keys each group's blocks apart


def test_a_fresh_engine_loads_each_group_only_what_it_needs_and_answers_the_same(runs):
    baseline, stored, loaded = runs
    assert [r.num_cached_tokens for r in loaded.results] == [5 * BLOCK, 4 * BLOCK]
    assert loaded.outputs == baseline.outputs
    # Each prompt: every full-attention block, and of the sliding-window group only the blocks its window reaches
    # back into from the first token computed (LONG: tokens 385-639, blocks 3-4; BRANCH: 257-511, blocks 2-3).
    # BRANCH comes wholly from the pool: vLLM's own cache holds LONG's first blocks for the full-attention group only
    # (the sliding group never loaded them), which is no local hit for a hybrid model.
    window_blocks = -(-WINDOW // BLOCK)
    assert loaded.worker_totals[0]["loaded_blocks"] == (5 + window_blocks) + (4 + window_blocks)
    [totals] = stored.worker_totals
    assert totals["saved_blocks"] == 2 * 5 + 2 * 1  # each full block once per group: LONG's 5, BRANCH's own 4th
