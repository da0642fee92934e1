"""1P1D with real processes: answers through the proxy equal a single instance's, and the decode node took the prompt's
KV from the pool (its /metrics show the hit). The producer saves asynchronously (the default): its answer carries a
notice of the blocks it is saving, and a consumer request waits for them (up to ``producer_wait_ms``). The late put is
made by hand: the producer's objects are read, removed, and put back while the consumer waits.

Two deployments: the field's validation model class, a GQA Llama at TP 1 (fp32), and the field's model class, a
DeepSeek-V2 (MLA + MoE, bf16) with the producer and one consumer at TP 2 and a second consumer at TP 1. "A single
instance's answer" is the producer's own answer to the same prompt sent straight to it after the P/D request: its prompt
then hits its own prefix cache for the same full blocks the consumer took from the pool, so the computation matches the
consumer's shape for shape, the condition for bf16 greedy tokens to match (see test_mla_engine). A TP 1 consumer
computes with other shapes than the TP 2 producer, and this random bf16 model's tokens follow the shapes, so for it the
test checks the load (every full block, on its one rank) and not the tokens."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest

from kvpool_testkit.client import cached_tokens, complete, server_metrics
from kvpool_testkit.engine import mla_block_size
from kvpool_testkit.inspection import prompt_block_keys, worker_shard
from kvpool_testkit.pd import Instance, pd_deployment
from kvpool_testkit.workloads import SEED_REQUESTS, distinct_prompts

pytestmark = pytest.mark.e2e

BLOCK = 128
WAIT_MS = 4000  # the consumers' producer_wait_ms
PROMPTS = distinct_prompts(2, 3 * BLOCK + 20, seed=21)
REMOTE_DECODE = {"kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}


def text(answer: dict) -> str:
    return answer["choices"][0]["text"]


def full_blocks(answer: dict, block: int = BLOCK) -> int:
    """Tokens of the prompt's full blocks, the pool's hit (a prompt of whole blocks keeps its last token to compute)."""
    tokens = answer["usage"]["prompt_tokens"]
    return min(tokens // block * block, tokens - 1)


@pytest.fixture(scope="module")
def gqa(tiny_model, tmp_path_factory):
    with pd_deployment(
        tiny_model, tmp_path_factory.mktemp("pd"), consumer_config={"producer_wait_ms": WAIT_MS}
    ) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def store(gqa):
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    assert client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 << 20, "tcp", "", gqa.pool.master_address) == 0
    yield client
    client.close()


@pytest.mark.vllm_engines
def test_1p1d_through_the_pool(gqa, tiny_model):
    prompt, max_tokens = SEED_REQUESTS[1]  # the long seed request: several full blocks
    via = complete(gqa.proxy_url, tiny_model, prompt, max_tokens)
    single = complete(gqa.producer_url, tiny_model, prompt, max_tokens)
    metrics = server_metrics(gqa.consumer_url)
    assert text(via) == text(single)
    cached = cached_tokens(via)
    assert cached == full_blocks(via) > 0  # every full block came from the pool
    assert metrics.get("vllm:kvpool_hit_tokens_total") == cached
    assert not metrics.get("vllm:kvpool_producer_wait_expired_total")


def prefill_then_take_back(gqa, store, model: str, prompt: list[int]) -> tuple[dict, dict[str, np.ndarray]]:
    """The producer's prefill answer (with its saving notice) and its saved objects, removed from the pool again: as
    if its puts had not landed yet."""
    answer = complete(gqa.producer_url, model, prompt, 1, **REMOTE_DECODE)
    shard = worker_shard(gqa.producer_log.read_text())
    keys = prompt_block_keys(shard, prompt)
    deadline = time.monotonic() + 20
    while store.batch_is_exist(keys) != [1] * len(keys):
        assert time.monotonic() < deadline, "the producer's saves did not land"
        time.sleep(0.2)
    objects = {key: np.frombuffer(store.get(key), dtype=np.uint8).copy() for key in keys}
    assert store.batch_remove(keys, True) == [0] * len(keys)
    return answer, objects


@pytest.mark.vllm_engines
def test_a_consumer_waits_for_the_producers_puts_then_loads_them(gqa, store, tiny_model):
    notice, objects = prefill_then_take_back(gqa, store, tiny_model, PROMPTS[0])
    assert notice["kv_transfer_params"]["kvpool_saving"]["blocks"] == 3
    params = {"kv_transfer_params": notice["kv_transfer_params"], "return_token_ids": True}
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        decoding = background.submit(complete, gqa.consumer_url, tiny_model, PROMPTS[0], 8, **params)
        time.sleep(1.0)
        assert not decoding.done(), "the consumer did not wait for the producer's blocks"
        for key, data in objects.items():
            assert store.put(key, data.tobytes()) == 0
        answer = decoding.result(timeout=60)
    assert cached_tokens(answer) == 3 * BLOCK  # every promised block, loaded once it landed
    single = complete(gqa.producer_url, tiny_model, PROMPTS[0], 8, return_token_ids=True)
    assert answer["choices"][0]["token_ids"] == single["choices"][0]["token_ids"]


@pytest.mark.vllm_engines
def test_a_consumer_computes_the_prompt_when_the_producers_puts_never_land(gqa, store, tiny_model):
    expired = server_metrics(gqa.consumer_url).get("vllm:kvpool_producer_wait_expired_total", 0)
    notice, _ = prefill_then_take_back(gqa, store, tiny_model, PROMPTS[1])
    start = time.monotonic()
    params = {"kv_transfer_params": notice["kv_transfer_params"], "return_token_ids": True}
    answer = complete(gqa.consumer_url, tiny_model, PROMPTS[1], 8, **params)
    waited = time.monotonic() - start
    assert cached_tokens(answer) == 0
    assert WAIT_MS / 1e3 <= waited < WAIT_MS / 1e3 + 10, waited
    assert server_metrics(gqa.consumer_url)["vllm:kvpool_producer_wait_expired_total"] == expired + 1
    single = complete(gqa.producer_url, tiny_model, PROMPTS[1], 8, return_token_ids=True)
    assert answer["choices"][0]["token_ids"] == single["choices"][0]["token_ids"]


def test_1p1d_mla_moe_at_tp2_with_decode_at_tp2_and_tp1(mla_model, tmp_path):
    """Both consumers take every full block from the pool, whole on every rank. Their tokens are not compared here: in
    bf16 no other engine computes the consumer's shapes for free (test_mla_engine compares MLA pool hits at TP 1 and
    2 with vLLM's reference connector's hits)."""
    block = mla_block_size()
    prompt, max_tokens = SEED_REQUESTS[1]  # 608 tokens: 4 full blocks and 96 tokens computed after the hit
    mla = Instance(tp=2, dtype="bfloat16")
    consumers = (mla, Instance(tp=1, dtype="bfloat16"))
    # Three servers, five ranks busy-polling, on two cores: a consumer's lookup thread can wait seconds for a core (a
    # miss after the 500-ms lookup timeout, then the producer wait runs out). This test is about the P/D path, not
    # the machine's latency.
    patient = {"lookup_timeout_ms": 10_000, "producer_wait_ms": 20_000}
    with pd_deployment(mla_model, tmp_path, producer=mla, consumers=consumers, consumer_config=patient) as pd:
        to_tp2, to_tp1 = pd.routes
        via_tp2 = complete(to_tp2.proxy_url, mla_model, prompt, max_tokens)
        via_tp1 = complete(to_tp1.proxy_url, mla_model, prompt, max_tokens)
        metrics = [server_metrics(route.consumer_url) for route in pd.routes]
    for via, consumer, ranks in zip((via_tp2, via_tp1), metrics, (2, 1), strict=True):
        assert cached_tokens(via) == full_blocks(via, block) > 0, consumer
        assert consumer.get("vllm:kvpool_hit_tokens_total") == full_blocks(via, block)
        assert consumer.get("vllm:kvpool_loaded_blocks_total") == -(-full_blocks(via, block) // block) * ranks
        assert not consumer.get("vllm:kvpool_load_failed_total")
    assert via_tp1["usage"]["completion_tokens"] == max_tokens
