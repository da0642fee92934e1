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
from kvpool_connector.processes import free_port

pytestmark = pytest.mark.e2e


def test_kvpool_pool_starts_prints_its_config_serves_and_stops(tmp_path):
    assert shutil.which("kvpool-pool", path=str(Path(sys.executable).parent)), "the console script is installed"
    ports = [free_port() for _ in range(3)]
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
        backend = MooncakeBackend(config.mooncake, holds_data=True)
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
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest
        assert "KV pool stopped" in rest
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children:
            if child.is_running():
                child.kill()
