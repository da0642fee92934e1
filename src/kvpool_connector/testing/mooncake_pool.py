"""A real Mooncake Store on loopback for tests, the demo and benchmarks: ``kvpool-pool``'s master and pool node
(:mod:`kvpool_connector.pool_service`) on free ports, started and stopped around a block.

The pool node keeps objects alive across engine restarts (a segment vanishes with the process that mounted it), so
an engine can save, exit, and a fresh engine can load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvpool_connector import pool_service
from kvpool_connector.pool_service import connector_config, mooncake_bin
from kvpool_connector.processes import free_port

__all__ = ["MooncakePool", "connector_config", "free_port", "mooncake_bin", "mooncake_pool"]


@dataclass
class MooncakePool(pool_service.MooncakePool):
    """The pool service on 127.0.0.1 and free ports, so any number of tests and benchmarks can run side by side."""

    master_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    node_port: int = field(default_factory=free_port)


@contextmanager
def mooncake_pool(workdir: str | Path, segment_size: str = "1 GB", client_ttl_s: int = 10) -> Iterator[MooncakePool]:
    """Start master and pool node on free loopback ports; stop both on exit."""
    pool = MooncakePool(Path(workdir), segment_size=segment_size, client_ttl_s=client_ttl_s)
    with pool_service.running(pool):
        yield pool
