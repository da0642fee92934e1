"""A real Mooncake Store on loopback: ``mooncake_master`` plus a ``mooncake_client`` pool node holding DRAM.

The pool node keeps objects alive across engine restarts (a segment vanishes with the process that mounted it), so
an engine can save, exit, and a fresh engine can load. Both binaries ship inside the ``mooncake`` Python package.
Processes are started in their own process group and stopped by PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvpool_connector.testing.processes import free_port, spawn, stop_process, wait_port

__all__ = ["MooncakePool", "connector_config", "free_port", "mooncake_bin", "mooncake_pool"]


def mooncake_bin(name: str) -> Path:
    import mooncake

    path = Path(mooncake.__file__).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the mooncake package at {path.parent}")
    return path


def connector_config(mooncake: dict, role: str = "kv_both", **extra: object) -> dict:
    """A ``--kv-transfer-config`` naming MemcacheConnectorStoreV1 with inline Mooncake settings."""
    return {
        "kv_connector": "MemcacheConnectorStoreV1",
        "kv_role": role,
        "kv_connector_extra_config": {"backend": "mooncake", "mooncake": mooncake, **extra},
    }


@dataclass
class MooncakePool:
    """Handles to a running master and pool node; ``client_config`` is what the connector needs."""

    workdir: Path
    segment_size: str = "1 GB"
    client_ttl_s: int = 10  # the master's --client_ttl: a node silent that long is dropped with its objects
    master_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    node_port: int = field(default_factory=free_port)
    master: subprocess.Popen | None = None
    node: subprocess.Popen | None = None

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.master_port}"

    def client_config(self, global_segment_size: int | str = 0, shared_memory: bool = False) -> dict:
        """Inline ``"mooncake"`` settings: by default engines contribute no memory, objects live on the pool node.

        ``shared_memory`` attaches workers to the pool node through shared memory instead of loopback TCP.
        """
        config: dict[str, object] = {
            "master_server_address": self.master_address,
            "local_hostname": "127.0.0.1",
            "metadata_server": "P2PHANDSHAKE",
            "protocol": "tcp",
            "global_segment_size": global_segment_size,
            "local_buffer_size": 0,
        }
        if shared_memory:
            config["real_client_address"] = f"127.0.0.1:{self.node_port}"
        return config

    def connector_config(
        self, role: str = "kv_both", global_segment_size: int | str = 0, shared_memory: bool = False, **extra: object
    ) -> dict:
        """A ``--kv-transfer-config`` naming MemcacheConnectorStoreV1 on this pool; ``extra`` goes to its keys."""
        return connector_config(self.client_config(global_segment_size, shared_memory), role, **extra)

    def write_config_file(self, path: Path) -> Path:
        """The same settings as a ``MOONCAKE_CONFIG_PATH`` JSON file, the way the seed deploys them."""
        path.write_text(json.dumps(self.client_config(), indent=2))
        return path

    def start_master(self) -> None:
        log = self.workdir / "mooncake_master.log"
        self.master = spawn(
            [
                str(mooncake_bin("mooncake_master")),
                "--rpc_address=127.0.0.1",
                f"--rpc_port={self.master_port}",
                "--metrics_host=127.0.0.1",
                f"--metrics_port={self.metrics_port}",
                "--enable_http_metadata_server=false",
                "--default_kv_lease_ttl=5000",
                f"--client_ttl={self.client_ttl_s}",
                "--logtostderr=true",
            ],
            log,
        )
        wait_port(self.master_port, self.master, 30, "mooncake_master", log)

    def start_node(self) -> None:
        log = self.workdir / "mooncake_client.log"
        self.node = spawn(
            [
                str(mooncake_bin("mooncake_client")),
                "--host=127.0.0.1",
                f"--port={self.node_port}",
                f"--master_server_address={self.master_address}",
                "--metadata_server=P2PHANDSHAKE",
                f"--global_segment_size={self.segment_size}",
                "--local_buffer_size=16 MB",
                "--protocol=tcp",
            ],
            log,
        )
        wait_port(self.node_port, self.node, 30, "mooncake_client", log)

    def segments(self) -> list[str]:
        """Segments the master places objects on. A killed node's stays listed until its heartbeat TTL runs out
        (``--client_ttl``, 10 s): meanwhile puts placed on it fail with -800."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/get_all_segments", timeout=5) as answer:
            return answer.read().decode().split()

    def stop_master(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.master, sig)

    def stop(self) -> None:
        stop_process(self.node)
        stop_process(self.master)


@contextmanager
def mooncake_pool(workdir: str | Path, segment_size: str = "1 GB", client_ttl_s: int = 10) -> Iterator[MooncakePool]:
    """Start master and pool node on free loopback ports; stop both on exit."""
    pool = MooncakePool(Path(workdir), segment_size=segment_size, client_ttl_s=client_ttl_s)
    pool.workdir.mkdir(parents=True, exist_ok=True)
    try:
        pool.start_master()
        pool.start_node()
        yield pool
    finally:
        pool.stop()
