"""1P1D with real processes: answers through the proxy equal a single instance's, and the decode node took the
prompt's KV from the pool (its /metrics show the hit).

Two deployments: the seed's GQA Llama at TP 1 (fp32), and the field's model class, a DeepSeek-V2 (MLA + MoE, bf16)
with the producer and one consumer at TP 2 and a second consumer at TP 1. "A single instance's answer" is the
producer's own answer to the same prompt sent straight to it after the P/D request: its prompt then hits its own
prefix cache for the same full blocks the consumer took from the pool, so the computation matches the consumer's
shape for shape, the condition for bf16 greedy tokens to match (see test_mla_engine). A TP 1 consumer computes with
other shapes than the TP 2 producer, and this random bf16 model's tokens follow the shapes, so for it the test checks
the load (every full block, on its one rank) and not the tokens.
"""

from __future__ import annotations

import pytest

from kvpool_connector.testing.client import cached_tokens, complete, server_metrics
from kvpool_connector.testing.engine import mla_keeps_prefix_cache
from kvpool_connector.testing.pd import Instance, pd_deployment
from kvpool_connector.testing.workloads import SEED_REQUESTS

pytestmark = pytest.mark.e2e

BLOCK = 128


def text(answer: dict) -> str:
    return answer["choices"][0]["text"]


def full_blocks(answer: dict) -> int:
    return answer["usage"]["prompt_tokens"] // BLOCK * BLOCK


def test_1p1d_through_the_pool(tiny_model, tmp_path):
    prompt, max_tokens = SEED_REQUESTS[1]  # the long seed request: several full blocks
    with pd_deployment(tiny_model, tmp_path) as pd:
        via = complete(pd.proxy_url, tiny_model, prompt, max_tokens)
        single = complete(pd.producer_url, tiny_model, prompt, max_tokens)
        metrics = server_metrics(pd.consumer_url)
    assert text(via) == text(single)
    cached = cached_tokens(via)
    assert cached == full_blocks(via) > 0  # every full block came from the pool
    assert metrics.get("vllm:kvpool_hit_tokens_total") == cached


@pytest.mark.skipif(not mla_keeps_prefix_cache(), reason="vLLM's CPU MLA turns its prefix cache, the oracle, off")
def test_1p1d_mla_moe_at_tp2_with_decode_at_tp2_and_tp1(mla_model, tmp_path):
    prompt, max_tokens = SEED_REQUESTS[1]  # 608 tokens: 4 full blocks and 96 tokens computed after the hit
    mla = Instance(tp=2, dtype="bfloat16")
    with pd_deployment(mla_model, tmp_path, producer=mla, consumers=(mla, Instance(tp=1, dtype="bfloat16"))) as pd:
        to_tp2, to_tp1 = pd.routes
        via_tp2 = complete(to_tp2.proxy_url, mla_model, prompt, max_tokens)
        single = complete(pd.producer_url, mla_model, prompt, max_tokens)
        via_tp1 = complete(to_tp1.proxy_url, mla_model, prompt, max_tokens)
        metrics = [server_metrics(route.consumer_url) for route in pd.routes]
    assert cached_tokens(single) == full_blocks(single) > 0  # the producer's own prefix hit: the same blocks
    assert text(via_tp2) == text(single)
    for via, consumer, ranks in zip((via_tp2, via_tp1), metrics, (2, 1), strict=True):
        assert cached_tokens(via) == full_blocks(via)
        assert consumer.get("vllm:kvpool_hit_tokens_total") == full_blocks(via)
        assert consumer.get("vllm:kvpool_loaded_blocks_total") == full_blocks(via) // BLOCK * ranks  # whole, per rank
        assert not consumer.get("vllm:kvpool_load_failed_total")
    assert via_tp1["usage"]["completion_tokens"] == max_tokens
