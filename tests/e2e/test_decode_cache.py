"""Decode-cache saves (``save_decode_cache``) on a real engine: a chat's second turn, served by a fresh engine, finds
the first turn's answer blocks in the pool.

The first engine holds a two-turn conversation: turn 1 saves its prompt blocks and, with the option, the block its
answer fills; turn 2 (turn 1's prompt + answer + a question) hits vLLM's own prefix cache on those blocks, which
makes its answer the oracle: a pool hit must answer exactly as vLLM's own prefix hit of the same (decode-computed)
KV. A fresh engine then gets turn 2's prompt and must take every full block from the pool.
"""

from __future__ import annotations

import pytest

from kvpool_testkit.engine import EngineSpec, run_engine
from kvpool_testkit.mooncake_pool import connector_config
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

BLOCK = 128
FIRST = distinct_prompts(1, 2 * BLOCK + 9, seed=81)[0]  # 2 full blocks and 9 tokens
QUESTION = distinct_prompts(1, BLOCK, seed=82)[0]
ANSWER_TOKENS = BLOCK - 8  # the answer fills the third block: 265 + 120 - 1 = 384 tokens computed


@pytest.fixture(scope="module")
def chat(tiny_model, pool, tmp_path_factory):
    """Turn 1 and turn 2 in one engine, then turn 2's prompt in a fresh one."""
    config = connector_config(pool.client_config(), save_decode_cache=True)
    root = tmp_path_factory.mktemp("decode-cache")
    spec = dict(model=tiny_model, max_tokens=ANSWER_TOKENS, kv_transfer_config=config, sequential=True)
    conversation = run_engine(EngineSpec(prompts=[FIRST], turns=[QUESTION], **spec), root / "conversation")
    second_prompt = FIRST + conversation.results[0].token_ids + QUESTION
    fresh = run_engine(EngineSpec(prompts=[second_prompt], **spec), root / "fresh")
    return conversation, fresh


def test_the_answers_block_is_saved_while_decoding(chat):
    conversation, _ = chat
    first, second = conversation.results
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 3 * BLOCK  # vLLM's own hit, answer included
    [totals] = conversation.worker_totals
    # turn 1: 2 prompt blocks + the answer's block; turn 2: its 4th prompt block. Its first 3 were in the pool already
    # (so the answer's block was saved while decoding, not as part of turn 2's prompt); no partial block ever.
    assert totals["saved_blocks"] == 4 and totals["save_skipped_present"] == 3, totals


def test_a_fresh_engine_serves_the_next_turn_from_the_pool_like_vllms_own_prefix_hit(chat):
    conversation, fresh = chat
    assert fresh.results[0].num_cached_tokens == 4 * BLOCK  # every full block of turn 2's prompt, answer included
    assert fresh.outputs[0] == conversation.outputs[1]
    assert fresh.loaded_blocks == 4
