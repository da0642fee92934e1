"""A 1P1D deployment on loopback: Mooncake Store, a producer and a consumer vLLM server, and the P/D proxy.

The producer (kv_producer) computes prompts and saves their full blocks to the pool; the consumer (kv_consumer,
vLLM's own prefix cache off, as in the seed's decode node) loads them and decodes. The producer saves synchronously
(``async_save: false``) so the prefill answer returns only once its KV is in the pool, and the decode request that
follows finds it. Everything is stopped by PID on exit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvpool_connector.testing.engine import engine_env
from kvpool_connector.testing.mooncake_pool import mooncake_pool
from kvpool_connector.testing.processes import free_port, spawn, stop_process, wait_port
from kvpool_connector.testing.server import vllm_server


@dataclass
class PDDeployment:
    producer_url: str
    consumer_url: str
    proxy_url: str


def start_proxy(workdir: Path, prefill: str, decode: str, *extra_args: str) -> tuple[subprocess.Popen, str]:
    """The P/D proxy on a free loopback port, started and listening; returns its process and URL."""
    port = free_port()
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
def pd_deployment(model: str, workdir: Path) -> Iterator[PDDeployment]:
    with ExitStack() as stack:
        pool = stack.enter_context(mooncake_pool(workdir / "mooncake", segment_size="1 GB"))
        env = engine_env(workdir / "vllm-cache")
        producer = stack.enter_context(
            vllm_server(
                model,
                workdir / "producer",
                pool.connector_config("kv_producer", async_save=False),
                env=env,
            )
        )
        consumer = stack.enter_context(
            vllm_server(
                model,
                workdir / "consumer",
                pool.connector_config("kv_consumer"),
                ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"],
                env=env,
            )
        )
        proxy, proxy_url = start_proxy(workdir, producer.url, consumer.url)
        stack.callback(stop_process, proxy)
        yield PDDeployment(producer.url, consumer.url, proxy_url)
