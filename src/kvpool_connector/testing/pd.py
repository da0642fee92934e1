"""A 1P1D deployment on loopback: Mooncake Store, a producer and a consumer vLLM server, and the P/D proxy.

The producer (kv_producer) computes prompts and saves their full blocks to the pool; the consumer (kv_consumer,
vLLM's own prefix cache off, as in the seed's decode node) loads them and decodes. The producer saves synchronously
(``async_save: false``) so the prefill answer returns only once its KV is in the pool, and the decode request that
follows finds it. Everything is stopped by PID on exit.
"""

from __future__ import annotations

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


def _pool_connector(role: str, mooncake: dict, **extra: object) -> dict:
    return {
        "kv_connector": "MemcacheConnectorStoreV1",
        "kv_role": role,
        "kv_connector_extra_config": {"backend": "mooncake", "mooncake": mooncake, **extra},
    }


@contextmanager
def pd_deployment(model: str, workdir: Path) -> Iterator[PDDeployment]:
    with ExitStack() as stack:
        pool = stack.enter_context(mooncake_pool(workdir / "mooncake", segment_size="1 GB"))
        env = engine_env(workdir / "vllm-cache")
        producer = stack.enter_context(
            vllm_server(
                model,
                workdir / "producer",
                _pool_connector("kv_producer", pool.client_config(), async_save=False),
                env=env,
            )
        )
        consumer = stack.enter_context(
            vllm_server(
                model,
                workdir / "consumer",
                _pool_connector("kv_consumer", pool.client_config()),
                ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"],
                env=env,
            )
        )
        port = free_port()
        log = workdir / "proxy.log"
        proxy = spawn(
            [
                sys.executable,
                "-m",
                "kvpool_connector.proxy",
                "--port",
                str(port),
                "--prefill",
                producer.url,
                "--decode",
                consumer.url,
            ],
            log,
        )
        stack.callback(stop_process, proxy)
        wait_port(port, proxy, 30, "proxy", log)
        yield PDDeployment(producer.url, consumer.url, f"http://127.0.0.1:{port}")
