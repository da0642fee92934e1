"""A real memcache meta service on loopback, and the local-service config file clients read.

The meta service runs without Ascend hardware; clients can talk to it in client-only mode. What needs the Ascend
driver (a local service holding pool memory, the data path) cannot run on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from kvpool_connector.processes import spawn, stop_process, wait_port
from kvpool_testkit.ports import reserve_port


@dataclass
class MemcacheMeta:
    meta_port: int
    config_store_port: int
    local_config: Path
    proc: subprocess.Popen


def write_local_config(path: Path, meta_port: int, config_store_port: int, dram: str = "64MB") -> Path:
    path.write_text(
        "\n".join(
            [
                f"ock.mmc.meta_service_url = tcp://127.0.0.1:{meta_port}",
                f"ock.mmc.local_service.config_store_url = tcp://127.0.0.1:{config_store_port}",
                "ock.mmc.log_level = info",
                "ock.mmc.local_service.world_size = 4",
                "ock.mmc.local_service.protocol = host_rdma",
                f"ock.mmc.local_service.dram.size = {dram}",
                "ock.mmc.client.retry_milliseconds = 0",
                "ock.mmc.client.timeout.seconds = 5",
                "",
            ]
        )
    )
    return path


def start_meta_service(workdir: str | Path, ports: tuple[int, int] | None = None) -> MemcacheMeta:
    """Start a meta service on loopback (the caller stops ``proc``); ``ports`` (meta, config store) restarts one
    where an earlier one listened. memcache runs one meta service per machine at a time (a process lock)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    meta_port, store_port = ports or (reserve_port(), reserve_port())
    metrics_port = reserve_port()
    meta_conf = workdir / "mmc-meta.conf"
    meta_conf.write_text(
        "\n".join(
            [
                f"ock.mmc.meta_service_url = tcp://127.0.0.1:{meta_port}",
                f"ock.mmc.meta_service.config_store_url = tcp://127.0.0.1:{store_port}",
                f"ock.mmc.meta_service.metrics_url = http://127.0.0.1:{metrics_port}",
                "ock.mmc.log_level = info",
                f"ock.mmc.log_path = {workdir}",
                "",
            ]
        )
    )
    log = workdir / "mmc_meta_service.log"
    proc = spawn(
        [sys.executable, "-c", "from memcache_hybrid import MetaService; MetaService.main()"],
        log,
        env={**os.environ, "MMC_META_CONFIG_PATH": str(meta_conf)},
    )
    try:
        wait_port(meta_port, proc, 30, "memcache meta service", log)
    except BaseException:
        stop_process(proc)
        raise
    local = write_local_config(workdir / "mmc-local.conf", meta_port, store_port)
    return MemcacheMeta(meta_port, store_port, local, proc)


@contextmanager
def memcache_meta_service(workdir: str | Path) -> Iterator[MemcacheMeta]:
    """A meta service for the ``with`` block; test workers running side by side take turns (one per machine)."""
    with FileLock(Path(tempfile.gettempdir()) / "kvpool-memcache-meta.lock"):
        running = start_meta_service(workdir)
        try:
            yield running
        finally:
            stop_process(running.proc)
