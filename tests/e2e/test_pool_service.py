"""``kvpool-pool``: a standalone pool in one command. Started as a user starts it, it prints the connector settings
(and writes them as a ``MOONCAKE_CONFIG_PATH`` file), the pool it started stores and serves objects through the
connector's own backend with those settings, it reports its health, and SIGTERM stops it and both processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.config import parse_config
from kvpool_testkit.ports import reserve_port

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]


def test_kvpool_pool_starts_prints_its_config_serves_and_stops(tmp_path):
    assert shutil.which("kvpool-pool", path=str(Path(sys.executable).parent)), "the console script is installed"
    ports = [reserve_port() for _ in range(3)]
    args = [sys.executable, "-m", "kvpool_connector.backends.mooncake_service", "--master-port", str(ports[0])]
    args += ["--node-port", str(ports[1]), "--metrics-port", str(ports[2]), "--segment-size", "64MB"]
    args += ["--workdir", str(tmp_path / "pool"), "--config-out", str(tmp_path / "mooncake.json")]
    args += ["--health-interval", "0.5"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[psutil.Process] = []
    try:
        lines = []
        while not (line := proc.stdout.readline()).startswith("{"):
            assert line, "kvpool-pool exited before printing its config:\n" + "".join(lines)
            lines.append(line)
        extra = json.loads(line)
        children = psutil.Process(proc.pid).children()
        assert sorted(c.name() for c in children) == ["mooncake_client", "mooncake_master"]
        assert json.loads((tmp_path / "mooncake.json").read_text()) == extra["mooncake"]

        config = parse_config(extra, env={})  # the printed settings are a valid connector config as they stand
        backend = MooncakeBackend(config.backend_settings, holds_data=True)
        backend.connect()
        data = np.arange(4096, dtype=np.uint8)
        out = np.zeros_like(data)
        for buf in (data, out):
            backend.register_memory(buf.ctypes.data, buf.nbytes)
        assert [o.ok for o in backend.put(["k"], [[data.ctypes.data]], [[data.nbytes]])] == [True]
        assert [o.ok for o in backend.get(["k"], [[out.ctypes.data]], [[out.nbytes]])] == [True]
        assert np.array_equal(data, out)
        backend.close()

        while not (line := proc.stdout.readline()).startswith("health:"):
            assert line, "no health line"
        assert line.startswith("health: 1 objects"), line
        _stops_cleanly(proc, signal.SIGTERM)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        _kill(proc, children)


def _stops_cleanly(proc: subprocess.Popen, sig: int) -> None:
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "KV pool stopped" in rest


def _kill(proc: subprocess.Popen, children: list[psutil.Process]) -> None:
    """Whatever a failed test left running."""
    if proc.poll() is None:
        proc.kill()
    for child in children:
        if child.is_running():
            child.kill()


def _read_until(proc: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    while not (line := proc.stdout.readline()).startswith(prefix):
        assert line, f"kvpool-pool exited before a line starting {prefix!r}:\n" + "".join(seen)
        seen.append(line)
    seen.append(line)
    return line


def test_listen_advertise_ttl_and_a_failing_health_line_keeps_the_pool(tmp_path):
    """``--listen 0.0.0.0 --advertise ADDR``: the master binds every interface, engines are given ADDR. The master
    stopped (SIGSTOP) makes health lines fail: reported, and the pool keeps serving once it answers again."""
    ports = [reserve_port() for _ in range(3)]
    args = [sys.executable, "-m", "kvpool_connector.backends.mooncake_service", "--listen", "0.0.0.0"]
    args += ["--advertise", "127.0.0.1", "--client-ttl", "30", "--master-port", str(ports[0])]
    args += ["--node-port", str(ports[1]), "--metrics-port", str(ports[2]), "--segment-size", "64MB"]
    args += ["--workdir", str(tmp_path / "pool"), "--health-interval", "0.5"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[psutil.Process] = []
    seen: list[str] = []
    try:
        extra = json.loads(_read_until(proc, "{", seen))
        assert extra["mooncake"]["master_server_address"] == f"127.0.0.1:{ports[0]}"
        children = psutil.Process(proc.pid).children()
        master = next(c for c in children if c.name() == "mooncake_master")
        assert {"--rpc_address=0.0.0.0", "--metrics_host=0.0.0.0", "--client_ttl=30"} <= set(master.cmdline())
        assert any(c.laddr.ip == "0.0.0.0" and c.laddr.port == ports[0] for c in master.net_connections("tcp"))
        _read_until(proc, "health: 0 objects", seen)
        master.suspend()
        try:
            _read_until(proc, "health: not available", seen)
        finally:
            master.resume()
        _read_until(proc, "health: 0 objects", seen)
        assert all(c.is_running() for c in children)
        _stops_cleanly(proc, signal.SIGINT)
    finally:
        _kill(proc, children)


def test_a_wildcard_address_is_never_handed_to_engines():
    for flags in (["--host", "0.0.0.0"], ["--listen", "0.0.0.0", "--advertise", "0.0.0.0"]):
        args = [sys.executable, "-m", "kvpool_connector.backends.mooncake_service", *flags]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "give --advertise ADDRESS" in done.stderr
