"""Helpers the benchmarks share."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from kvpool_connector.kv_pages import KVPages
from kvpool_connector.pool import PoolHandle
from kvpool_connector.processes import spawn, stop_process, wait_port
from kvpool_testkit.ports import reserve_port


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


def start_router(urls: list[str], work: Path, stack: ExitStack) -> str:
    """``kvpool-proxy`` round robin over the servers at ``urls``, stopped with ``stack``; its URL."""
    port = reserve_port()
    log = work / "router.log"
    args = ["--port", str(port), "--instances", *urls, "--health-interval", "2"]
    proc = spawn([sys.executable, "-m", "kvpool_connector.proxy", *args], log)
    stack.callback(stop_process, proc)
    wait_port(port, proc, 30, "router", log)
    return f"http://127.0.0.1:{port}"
