"""Pool-tier KV events: a block is published once every shard of it is in the pool, with its parent and tokens from
the save plan; the ranks' reports merge the way vLLM's output aggregator merges them."""

from __future__ import annotations

import functools

from vllm.distributed.kv_events import AllBlocksCleared, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvpool_connector.kv_events import MEDIUM, PoolEvents, StoredInPool, WorkerStoredLog

H0, H1 = b"\x01" * 32, b"\x02" * 32


def merged(*logs: WorkerStoredLog) -> StoredInPool:
    """What vLLM's output aggregator hands the scheduler: the first rank's report aggregating the others'."""
    reports = [r for r in (log.take() for log in logs) if r is not None]
    return functools.reduce(lambda a, b: a.aggregate(b), reports)


def test_a_block_is_published_once_every_shard_of_it_is_in():
    events = PoolEvents(block_size=4)  # GQA at TP 2: each rank stores its own object
    events.planned([H0, H1], [None, H0], [[1, 2, 3, 4], [5, 6, 7, 8]], objects=[2, 2])
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note([H0, H1])
    rank1.note([H0])
    events.stored(merged(rank0, rank1))
    [published] = events.take()
    assert isinstance(published, BlockStored) and published.medium == MEDIUM
    assert published.block_hashes == [maybe_convert_block_hash(H0)] and published.parent_block_hash is None
    assert published.token_ids == [1, 2, 3, 4]
    rank1.note([H1])  # rank 1's save of the second block lands a step later
    events.stored(merged(rank1))
    [second] = events.take()
    assert second.parent_block_hash == maybe_convert_block_hash(H0) and second.token_ids == [5, 6, 7, 8]
    assert events.take() == []


def test_striped_ranks_store_each_block_once_and_a_reset_clears():
    events = PoolEvents(block_size=4)  # MLA at TP 2: one rank puts each block
    events.planned([H0, H1], [None, H0], [[1, 2, 3, 4], [5, 6, 7, 8]], objects=[1, 1])
    rank0, rank1 = WorkerStoredLog(), WorkerStoredLog()
    rank0.note([H0])
    rank1.note([H1])
    events.stored(merged(rank0, rank1))
    assert len(events.take()) == 2
    events.cleared()
    assert [type(e) for e in events.take()] == [AllBlocksCleared]
    assert WorkerStoredLog().take() is None  # no saves: no container
