"""Pool-tier KV events: a block is published once every object of it is in the pool, as the event vLLM's own KV
cache publishes for it (medium aside); the ranks' reports merge the way vLLM's output aggregator merges them."""

from __future__ import annotations

import functools

import pytest
from vllm.distributed.kv_events import AllBlocksCleared, BlockStored
from vllm.lora.request import LoRARequest
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvpool_connector.keys import pool_key
from kvpool_connector.kv_events import MEDIUM, PoolEvents, StoredInPool, WorkerStoredLog, pool_block_stored
from kvpool_testkit.scheduler_side import BLOCK, Requests

pytestmark = pytest.mark.vllm_api

SHARD0, SHARD1 = "00000000000000a0", "00000000000000a1"  # two ranks' head shards (GQA at TP 2)
TOKENS = list(range(3, 3 + 2 * BLOCK + 5))  # two full blocks
REQUESTS = Requests()


def merged(*logs: WorkerStoredLog) -> StoredInPool:
    """What vLLM's output aggregator hands the scheduler: the first rank's report aggregating the others'."""
    reports = [r for r in (log.take() for log in logs) if r is not None]
    return functools.reduce(lambda a, b: a.aggregate(b), reports)


def objects(block_hash: bytes, *shards: str) -> list[str]:
    return [pool_key(shard, block_hash) for shard in shards]


def plan(events: PoolEvents, request, *shards: str) -> list[bytes]:
    """Plan the saves of the request's full blocks, as the scheduler does; their hashes."""
    hashes = [bytes(h) for h in request.block_hashes]
    for i, block_hash in enumerate(hashes):
        event = pool_block_stored(request, i, block_hash, hashes[i - 1] if i else None, BLOCK)
        events.planned(block_hash, event, objects(block_hash, *shards))
    return hashes


def test_a_block_is_published_once_every_shard_of_it_is_in():
    events = PoolEvents()
    h0, h1 = plan(events, REQUESTS.make("r", TOKENS), SHARD0, SHARD1)
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note(objects(h0, SHARD0) + objects(h1, SHARD0))
    rank1.note(objects(h0, SHARD1))
    events.stored(merged(rank0, rank1))
    [published] = events.take()
    assert isinstance(published, BlockStored) and published.medium == MEDIUM
    assert published.block_hashes == [maybe_convert_block_hash(h0)] and published.parent_block_hash is None
    assert published.token_ids == TOKENS[:BLOCK] and published.extra_keys == [None]  # as vLLM: one entry per block
    rank1.note(objects(h1, SHARD1))  # rank 1's save of the second block lands a step later
    events.stored(merged(rank1))
    [second] = events.take()
    assert second.parent_block_hash == maybe_convert_block_hash(h0) and second.token_ids == TOKENS[BLOCK : 2 * BLOCK]
    assert events.take() == []


def test_two_requests_saving_one_block_wait_for_every_shard_and_publish_it_once():
    """Both requests' saves report rank 0's object (put, then found there): that is one object, not two."""
    events = PoolEvents()
    h0, _ = plan(events, REQUESTS.make("a", TOKENS), SHARD0, SHARD1)
    plan(events, REQUESTS.make("b", TOKENS), SHARD0, SHARD1)
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note(objects(h0, SHARD0) * 2)
    events.stored(merged(rank0))
    assert events.take() == []  # rank 1's object is not in yet
    rank1.note(objects(h0, SHARD1) * 2)
    events.stored(merged(rank1))
    assert len(events.take()) == 1
    rank0.note(objects(h0, SHARD0))  # a late report of a published block
    events.stored(merged(rank0))
    assert events.take() == []


def test_striped_ranks_store_each_block_once_and_a_reset_clears():
    events = PoolEvents()  # MLA at TP 2: one shard, one rank puts each block
    h0, h1 = plan(events, REQUESTS.make("r", TOKENS), SHARD0)
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note(objects(h0, SHARD0))
    rank1.note(objects(h1, SHARD0))
    events.stored(merged(rank0, rank1))
    assert len(events.take()) == 2
    plan(events, REQUESTS.make("again", TOKENS), SHARD0)
    events.cleared()
    assert [type(e) for e in events.take()] == [AllBlocksCleared]
    rank0.note(objects(h0, SHARD0))  # a save the reset dropped may still report: its plan went with the reset
    events.stored(merged(rank0))
    assert events.take() == []
    assert WorkerStoredLog().take() is None  # no saves: no container


def test_the_event_carries_what_vllms_own_event_carries_for_the_block():
    """The extra keys vLLM's block hash covers (cache salt on the first block, the LoRA adapter on every block), the
    adapter's id and name, and the session, so a router can match the pool tier to a request as it matches vLLM's."""
    lora = LoRARequest("adapter-a", 7, "/adapters/a")
    sessions = "session_id" in BlockStored.__struct_fields__  # vLLM 0.32+; 0.23's events carry none
    request = REQUESTS.make(
        "r", TOKENS, cache_salt="tenant-a", lora_request=lora, **({"session_id": "chat-1"} if sessions else {})
    )
    hashes = [bytes(h) for h in request.block_hashes]
    first, second = (pool_block_stored(request, i, hashes[i], hashes[i - 1] if i else None, BLOCK) for i in (0, 1))
    assert first.extra_keys == [("adapter-a", "tenant-a")]
    assert second.extra_keys == [("adapter-a",)]
    assert (first.lora_id, first.lora_name) == (7, "adapter-a")
    assert getattr(first, "session_id", None) == ("chat-1" if sessions else None)
