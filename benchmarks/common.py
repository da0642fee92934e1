"""Helpers the benchmarks share."""

from __future__ import annotations

from kvpool_connector.kv_pages import KVPages
from kvpool_connector.pool import PoolHandle


def warm_segment(pool: PoolHandle, pages: KVPages, segment_bytes: int, prefix: str) -> None:
    """Fill a Mooncake segment once and empty it again, from the KV pages.

    A serving pool's memory has been written before; the first write to fresh segment pages (page faults) runs at
    about a quarter of the steady-state put speed on this machine, which would make every save look slow.
    """
    count = int(segment_bytes * 0.9) // pages.block_bytes
    keys = [f"{prefix}/warm/{i}" for i in range(count)]
    for start in range(0, count, pages.num_blocks):
        chunk = keys[start : start + pages.num_blocks]
        addrs, sizes = pages.addresses(list(range(len(chunk))))
        pool.put(chunk, addrs, sizes)
    assert pool.remove_shards([f"{prefix}/warm/"]) == count, "the warm-up objects stayed in the pool"
