"""A real Mooncake Store on loopback for tests, the demo and benchmarks: ``kvpool-pool``'s master and pool node
(:mod:`kvpool_connector.backends.mooncake_service`) on free ports, started and stopped around a block.

The pool node keeps objects alive across engine restarts (a segment vanishes with the process that mounted it), so
an engine can save, exit, and a fresh engine can load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpool_connector.backends import mooncake_service
from kvpool_connector.backends.mooncake_service import connector_config, mooncake_bin
from kvpool_testkit.ports import reserve_port

__all__ = [
    "PoolOnFreePorts",
    "connector_config",
    "mooncake_bin",
    "mooncake_pool",
    "plain_client",
    "pool_handle",
    "reserve_port",
    "vllm_store_connector",
]


@dataclass
class PoolOnFreePorts(mooncake_service.MooncakePool):
    """The pool service on free ports (on 127.0.0.1 unless told another host), so any number of tests and benchmarks
    can run side by side."""

    master_port: int = field(default_factory=reserve_port)
    metrics_port: int = field(default_factory=reserve_port)
    node_port: int = field(default_factory=reserve_port)


@contextmanager
def mooncake_pool(
    workdir: str | Path,
    segment_size: str = "1 GB",
    client_ttl_s: int = 10,
    disk: mooncake_service.DiskTier | None = None,
) -> Iterator[PoolOnFreePorts]:
    """Start master and pool node on free loopback ports (with ``disk``, a disk tier under the node's DRAM); stop
    both on exit."""
    pool = PoolOnFreePorts(Path(workdir), segment_size=segment_size, client_ttl_s=client_ttl_s, disk=disk)
    with mooncake_service.running(pool):
        yield pool


@contextmanager
def plain_client(pool: mooncake_service.MooncakePool) -> Iterator[Any]:
    """A Mooncake client of ``pool`` that contributes no memory, for tests that inspect or tamper with the pool."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    assert store.setup(pool.host, "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", pool.master_address) == 0
    try:
        yield store
    finally:
        store.close()


@contextmanager
def pool_handle(pool: mooncake_service.MooncakePool, reconnect_interval_s: float = 1.0) -> Iterator[Any]:
    """A connected ``PoolHandle`` over a data client of ``pool``, as a worker holds one; closed on exit."""
    from kvpool_connector.backends.mooncake import MooncakeBackend
    from kvpool_connector.backends.mooncake_settings import MooncakeSettings
    from kvpool_connector.pool import PoolHandle
    from kvpool_testkit.inspection import wait_connected

    settings = MooncakeSettings(**pool.client_config())
    handle = PoolHandle(lambda: MooncakeBackend(settings, holds_data=True), reconnect_interval_s, "test")
    handle.start()
    try:
        assert wait_connected(handle, 10), "the test's pool client did not connect"
        yield handle
    finally:
        handle.close()


def vllm_store_connector(pool: mooncake_service.MooncakePool, workdir: Path) -> tuple[dict, dict[str, str]]:
    """vLLM's own MooncakeStoreConnector on ``pool``, objects on the pool node as ours over TCP: its
    ``--kv-transfer-config`` and the environment naming its settings file. Its client keeps a local buffer, which a
    TCP client needs to read objects from the node's disk tier."""
    settings = {
        "metadata_server": "P2PHANDSHAKE",
        "master_server_address": pool.master_address,
        "protocol": "tcp",
        "device_name": "",
        "mode": "standalone-store",
        "global_segment_size": 0,
        "local_buffer_size": "256MB",
    }
    path = workdir / "mooncake-store.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))
    return {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both"}, {"MOONCAKE_CONFIG_PATH": str(path)}
