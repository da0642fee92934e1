"""Pool-tier KV events: a block is published once every object of it is in the pool, with its parent and tokens from
the save plan; the ranks' reports merge the way vLLM's output aggregator merges them."""

from __future__ import annotations

import functools

from vllm.distributed.kv_events import AllBlocksCleared, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvpool_connector.keys import pool_key
from kvpool_connector.kv_events import MEDIUM, PoolEvents, StoredInPool, WorkerStoredLog

H0, H1 = b"\x01" * 32, b"\x02" * 32
SHARD0, SHARD1 = "00000000000000a0", "00000000000000a1"  # two ranks' head shards (GQA at TP 2)


def merged(*logs: WorkerStoredLog) -> StoredInPool:
    """What vLLM's output aggregator hands the scheduler: the first rank's report aggregating the others'."""
    reports = [r for r in (log.take() for log in logs) if r is not None]
    return functools.reduce(lambda a, b: a.aggregate(b), reports)


def objects(block_hash: bytes, *shards: str) -> list[str]:
    return [pool_key(shard, block_hash) for shard in shards]


def test_a_block_is_published_once_every_shard_of_it_is_in():
    events = PoolEvents(block_size=4)
    events.planned([H0, H1], [None, H0], [[1, 2, 3, 4], [5, 6, 7, 8]], [objects(h, SHARD0, SHARD1) for h in (H0, H1)])
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note(objects(H0, SHARD0) + objects(H1, SHARD0))
    rank1.note(objects(H0, SHARD1))
    events.stored(merged(rank0, rank1))
    [published] = events.take()
    assert isinstance(published, BlockStored) and published.medium == MEDIUM
    assert published.block_hashes == [maybe_convert_block_hash(H0)] and published.parent_block_hash is None
    assert published.token_ids == [1, 2, 3, 4]
    rank1.note(objects(H1, SHARD1))  # rank 1's save of the second block lands a step later
    events.stored(merged(rank1))
    [second] = events.take()
    assert second.parent_block_hash == maybe_convert_block_hash(H0) and second.token_ids == [5, 6, 7, 8]
    assert events.take() == []


def test_two_requests_saving_one_block_wait_for_every_shard_and_publish_it_once():
    """Both requests' saves report rank 0's object (put, then found there): that is one object, not two."""
    events = PoolEvents(block_size=4)
    for _ in range(2):
        events.planned([H0], [None], [[1, 2, 3, 4]], [objects(H0, SHARD0, SHARD1)])
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note(objects(H0, SHARD0) * 2)
    events.stored(merged(rank0))
    assert events.take() == []  # rank 1's object is not in yet
    rank1.note(objects(H0, SHARD1) * 2)
    events.stored(merged(rank1))
    assert len(events.take()) == 1
    rank0.note(objects(H0, SHARD0))  # a late report of a published block
    events.stored(merged(rank0))
    assert events.take() == []


def test_striped_ranks_store_each_block_once_and_a_reset_clears():
    events = PoolEvents(block_size=4)  # MLA at TP 2: one shard, one rank puts each block
    events.planned([H0, H1], [None, H0], [[1, 2, 3, 4], [5, 6, 7, 8]], [objects(h, SHARD0) for h in (H0, H1)])
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note(objects(H0, SHARD0))
    rank1.note(objects(H1, SHARD0))
    events.stored(merged(rank0, rank1))
    assert len(events.take()) == 2
    events.planned([H0], [None], [[1, 2, 3, 4]], [objects(H0, SHARD0)])
    events.cleared()
    assert [type(e) for e in events.take()] == [AllBlocksCleared]
    rank0.note(objects(H0, SHARD0))  # a save the reset dropped may still report: its plan went with the reset
    events.stored(merged(rank0))
    assert events.take() == []
    assert WorkerStoredLog().take() is None  # no saves: no container
