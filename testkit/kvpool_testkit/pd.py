"""A 1P1D deployment on loopback: Mooncake Store, a producer and a consumer vLLM server, and the P/D proxy; with
several consumers (at other TP sizes, say), one proxy per consumer, all sharing the producer and the pool.

The producer (kv_producer) computes prompts and saves their full blocks to the pool in the background; its answer
carries a notice of the blocks it is saving, which the proxy hands to the consumer (kv_consumer, vLLM's own prefix
cache off, as in the field's decode node), so the consumer waits for puts still in flight, then loads and decodes.
Everything is stopped by PID on exit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvpool_connector.processes import spawn, stop_process, wait_port
from kvpool_testkit.engine import engine_env
from kvpool_testkit.mooncake_pool import PoolOnFreePorts, mooncake_pool
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.server import start_vllm_server, stop_server, wait_healthy


@dataclass(frozen=True)
class Instance:
    """How one vLLM server of the deployment runs: its tensor-parallel size and weight dtype (vLLM's CPU MLA and MoE
    take bf16 only)."""

    tp: int = 1
    dtype: str = "float32"

    def server_args(self) -> list[str]:
        return ["--tensor-parallel-size", str(self.tp), "--dtype", self.dtype]


@dataclass
class Route:
    """One decode instance and the proxy that sends prefill to the producer and decode to it."""

    consumer_url: str
    proxy_url: str


@dataclass
class PDDeployment:
    producer_url: str
    routes: list[Route]
    pool: PoolOnFreePorts
    producer_log: Path

    @property
    def consumer_url(self) -> str:
        return self.routes[0].consumer_url

    @property
    def proxy_url(self) -> str:
        return self.routes[0].proxy_url


def start_proxy(workdir: Path, prefill: str, decode: str, *extra_args: str) -> tuple[subprocess.Popen, str]:
    """The P/D proxy on a free loopback port, started and listening; returns its process and URL."""
    port = reserve_port()
    log = workdir / f"proxy-{port}.log"
    args = ["--port", str(port), "--prefill", prefill, "--decode", decode, *extra_args]
    proc = spawn([sys.executable, "-m", "kvpool_connector.proxy", *args], log)
    try:
        wait_port(port, proc, 30, "proxy", log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


@contextmanager
def pd_deployment(
    model: str,
    workdir: Path,
    producer: Instance = Instance(),
    consumers: tuple[Instance, ...] = (Instance(),),
    consumer_config: dict | None = None,
    producer_config: dict | None = None,
    server_args: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    startup_timeout_s: float = 600,
) -> Iterator[PDDeployment]:
    """The pool, one producer, each consumer with its own proxy; the servers start side by side. ``consumer_config`` /
    ``producer_config``: more connector keys (``producer_wait_ms``, ``async_save``); ``server_args`` and
    ``env_extra`` go to every server."""
    with ExitStack() as stack:
        # The master drops a node silent for client_ttl with its objects. A busy 2-core host can stop every process
        # for 20 s and more: at the default 10 s the master, waking first, would drop the live pool node and the
        # producer's puts with it. 60 s outlasts such a stall.
        pool = stack.enter_context(mooncake_pool(workdir / "mooncake", segment_size="1 GB", client_ttl_s=60))
        servers = [
            start_vllm_server(
                model,
                workdir / "producer",
                pool.connector_config("kv_producer", **(producer_config or {})),
                [*producer.server_args(), "--enable-prompt-tokens-details", *server_args],
                env=engine_env(env_extra, tp=producer.tp),
            )
        ]
        stack.callback(stop_server, servers[0])
        for index, consumer in enumerate(consumers):
            server = start_vllm_server(
                model,
                workdir / f"consumer-{index}",
                pool.connector_config("kv_consumer", **(consumer_config or {})),
                [*consumer.server_args(), "--no-enable-prefix-caching", "--enable-prompt-tokens-details", *server_args],
                env=engine_env(env_extra, tp=consumer.tp),
            )
            stack.callback(stop_server, server)
            servers.append(server)
        for server in servers:
            wait_healthy(server, startup_timeout_s)
        routes = []
        for server in servers[1:]:
            proxy, proxy_url = start_proxy(workdir, servers[0].url, server.url)
            stack.callback(stop_process, proxy)
            routes.append(Route(server.url, proxy_url))
        yield PDDeployment(servers[0].url, routes, pool, servers[0].log)
