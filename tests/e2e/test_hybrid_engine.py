"""A hybrid-attention model (Gemma 3: sliding-window layers between full-attention ones) through the pool.

vLLM's hybrid KV cache manager gives such a model two KV cache groups; the connector says it supports them
(``SupportsHMA``), so vLLM keeps the manager on, as it does without a connector. Each group's blocks are their own
pool objects. One engine with vLLM's own prefix cache off (so every cached token is the pool's) answers the prompts
twice: a load fills every full-attention block of a hit and only the window's sliding-window blocks (vLLM hands the
group its null block elsewhere), and every answer equals the no-connector engine's. With vLLM's KV events on, each
saved block is published as the pool tier once, after both groups' objects are in. A lookup asks the sliding-window
group only for its window: a fresh engine still takes a whole hit after the pool lost that group's older blocks.
"""

from __future__ import annotations

import re

import pytest

from kvpool_testkit.client import KVEventSubscriber, wait_for
from kvpool_testkit.engine import EngineSpec, run_engine
from kvpool_testkit.inspection import prompt_block_keys
from kvpool_testkit.mooncake_pool import connector_config
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.tiny_model import PRESETS, build_model
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

BLOCK = 128
WINDOW_BLOCKS = -(-PRESETS["tiny-sliding"].sliding_window // BLOCK)  # 256 tokens: the window reaches into 2 blocks
LONG = distinct_prompts(1, 5 * BLOCK + 40, seed=61)[0]  # 5 full blocks
BRANCH = LONG[: 3 * BLOCK + 50] + distinct_prompts(1, 150, seed=62)[0]  # shares 3 blocks with LONG; 4 full blocks
PROMPTS = [LONG, BRANCH]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hybrid_model(session_dir) -> str:
    return str(build_model(session_dir / "tiny-sliding", preset="tiny-sliding"))


@pytest.fixture(scope="module")
def runs(hybrid_model, pool, tmp_path_factory):
    """No connector; then the connector on an empty pool, each prompt twice, one at a time."""
    root = tmp_path_factory.mktemp("hybrid")
    spec = dict(model=hybrid_model, max_tokens=MAX_TOKENS, sequential=True, enable_prefix_caching=False)
    baseline = run_engine(EngineSpec(prompts=PROMPTS, **spec), root / "baseline")
    config = connector_config(pool.client_config())
    subscriber = KVEventSubscriber(f"tcp://127.0.0.1:{reserve_port()}")
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": subscriber.endpoint}
    try:
        pooled = run_engine(
            EngineSpec(
                prompts=PROMPTS * 2, kv_transfer_config=config, extra_llm_args={"kv_events_config": events}, **spec
            ),
            root / "pool",
        )
        wait_for(lambda: len(subscriber.pool_tier()) >= 6, 10, "the pool tier's BlockStored events")
    finally:
        subscriber.close()
    return baseline, pooled, subscriber.pool_tier()


def test_vllm_keeps_its_hybrid_kv_cache_manager_with_the_connector(runs):
    baseline, pooled, _ = runs
    for run in (baseline, pooled):
        assert "kv cache group sizes (128, 128)" in run.log  # two KV cache groups, as without a connector
    assert "Turning off hybrid kv cache manager" not in pooled.log
    assert "KV cache group 0 of 2" in pooled.log  # the worker keys each group's blocks apart
    assert len(re.findall(r"[0-9a-f]{16} (FullAttentionSpec|SlidingWindowSpec)", pooled.log)) == 2


def test_hits_load_each_group_only_what_it_needs_and_answer_the_same(runs):
    baseline, pooled, _ = runs
    # first pass: LONG computes; BRANCH finds LONG's first 3 blocks; second pass: every full block of both
    assert [r.num_cached_tokens for r in pooled.results] == [0, 3 * BLOCK, 5 * BLOCK, 4 * BLOCK]
    assert pooled.outputs == baseline.outputs * 2
    # A hit of n blocks loads n full-attention blocks and, of the sliding-window group, only the blocks its window
    # reaches back into from the first token computed (e.g. LONG: tokens 385-639, blocks 3-4).
    hits = [3, 5, 4]
    [totals] = pooled.worker_totals
    assert totals["loaded_blocks"] == sum(n + WINDOW_BLOCKS for n in hits)
    assert totals["saved_blocks"] == 2 * 5 + 2 * 1  # each block once per group: LONG's 5, BRANCH's own 4th
    assert not any(k.startswith(("load_failed", "save_failed")) for k in totals), totals


def test_each_saved_block_is_published_once_with_its_tokens(runs):
    """One event per logical block (not per group), after both groups' objects are in: LONG's 5, BRANCH's 4th."""
    *_, stored = runs
    assert [e.token_ids for e in stored] == [LONG[i * BLOCK : (i + 1) * BLOCK] for i in range(5)] + [
        BRANCH[3 * BLOCK : 4 * BLOCK]
    ]
    assert stored[0].parent_block_hash is None
    assert [e.parent_block_hash for e in stored[1:5]] == [e.block_hashes[0] for e in stored[:4]]
    assert stored[5].parent_block_hash == stored[2].block_hashes[0]  # BRANCH's 4th block follows the shared 3rd


def test_a_hit_needs_only_the_sliding_groups_window(runs, hybrid_model, pool, mooncake_client, tmp_path):
    """The pool loses the sliding-window objects of LONG's first 3 blocks (as an eviction would): vLLM never reads
    them for a 5-block hit, so a fresh engine still takes the whole hit, loads the 5 full-attention blocks and the 2
    window blocks, and answers like the no-connector engine."""
    baseline, pooled, _ = runs
    [sliding] = re.findall(r"([0-9a-f]{16}) SlidingWindowSpec", pooled.log)
    assert mooncake_client.batch_remove(prompt_block_keys(sliding, LONG)[:3], True) == [0] * 3
    spec = EngineSpec(
        model=hybrid_model,
        prompts=[LONG],
        max_tokens=MAX_TOKENS,
        enable_prefix_caching=False,
        kv_transfer_config=connector_config(pool.client_config()),
    )
    fresh = run_engine(spec, tmp_path)
    assert [r.num_cached_tokens for r in fresh.results] == [5 * BLOCK]
    assert fresh.outputs == baseline.outputs[:1]
    assert fresh.loaded_blocks == 5 + WINDOW_BLOCKS
