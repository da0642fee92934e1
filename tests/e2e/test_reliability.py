"""Faults during serving: the OpenAI server with the connector, a real Mooncake Store, and faults made with signals.

One server lives through the module's phases, in file order: a concurrent streaming soak on a healthy pool, tenant
isolation by ``cache_salt``, the master killed and restarted, the master hung, the pool node killed under stored
objects, the pool full, and finally a shutdown with saves in flight. Every answer of the fault phases is compared token
for token with a no-connector engine over the same prompts; vLLM's own prefix cache is off, so each cached token came
from the pool.

Two more servers of two different models start at the same moment on one pool (ports, isolation).
The CI soak serves a fixed number of streams (its memory bound then does not depend on the machine's speed);
``KVPOOL_SOAK_S=300`` runs the long soak for that many seconds instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import psutil
import pytest

from kvpool_connector.keys import block_hash_of
from kvpool_connector.processes import stop_process
from kvpool_testkit.client import (
    CheckedClient,
    KVEventSubscriber,
    cached_tokens,
    complete,
    server_metrics,
    wait_for,
)
from kvpool_testkit.engine import engine_env
from kvpool_testkit.inspection import prompt_block_keys, worker_block_bytes, worker_shard
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.server import start_vllm_server, stop_server, vllm_server, wait_healthy
from kvpool_testkit.tiny_model import build_model
from kvpool_testkit.workloads import distinct_prompts, shared_prefix_prompts

pytestmark = pytest.mark.e2e

BLOCK = 128
PROMPTS = distinct_prompts(24, 3 * BLOCK + 20, seed=11)  # 3 full blocks each, no block shared between prompts
FULL_HIT = 3 * BLOCK
MAX_TOKENS = 8
SERVER_ARGS = ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]
# vLLM's default shutdown (timeout 0) force-kills the engine: queued saves are lost (later misses, never partial
# objects). With a drain timeout the engine shuts down in order and the connector flushes its queued saves.
DRAINING_SHUTDOWN = ["--shutdown-timeout", "20"]
SOAK_S = float(os.environ.get("KVPOOL_SOAK_S", "0"))  # 0: the CI soak, CI_SOAK_STREAMS streams
SOAK_CONCURRENCY = 64
WARM_UP_STREAMS, CI_SOAK_STREAMS = 1024, 1024


@pytest.fixture(scope="module")
def kv_events() -> Iterator[KVEventSubscriber]:
    """Bound before the server starts; the server's publisher connects to it."""
    subscriber = KVEventSubscriber(f"tcp://127.0.0.1:{reserve_port()}")
    yield subscriber
    subscriber.close()


@pytest.fixture(scope="module")
def server(tiny_model, pool, kv_events, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reliability-server")
    config = pool.connector_config(reconnect_interval_s=1.0)
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": kv_events.endpoint}
    args = [*SERVER_ARGS, *DRAINING_SHUTDOWN, "--kv-events-config", json.dumps(events)]
    # dev mode: vLLM's /reset_prefix_cache, which the reset test calls
    env = engine_env({"VLLM_LOG_STATS_INTERVAL": "1", "VLLM_SERVER_DEV_MODE": "1"})
    with vllm_server(tiny_model, workdir, config, args, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def client(server, tiny_model, baseline_outputs) -> CheckedClient:
    return CheckedClient(server.url, tiny_model, PROMPTS, baseline_outputs, MAX_TOKENS, FULL_HIT)


def metric(server, name: str) -> float:
    return server_metrics(server.url).get(name, 0.0)


def wait_for_one_segment(pool) -> None:
    """Wait until the master has dropped a killed node's segment, so new objects land on live nodes only."""
    wait_for(lambda: len(pool.segments()) == 1, 30, "one segment listed by the master")


@contextmanager
def pool_held_full(mooncake_client, object_bytes: int) -> Iterator[int]:
    """Fill the pool with objects that stay in use; yields how many.

    Mooncake evicts objects to make room, so a pool that is merely full accepts new puts. A lookup grants an object a
    lease (the master runs with a 5 s lease) and leased objects are never evicted: renewed every second, they leave no
    room and every new put is refused with -200.
    """
    buf = np.zeros(object_bytes, dtype=np.uint8)
    assert mooncake_client.register_buffer(buf.ctypes.data, buf.nbytes) == 0
    keys: list[str] = []
    while (code := mooncake_client.put_from(f"held/{len(keys)}", buf.ctypes.data, buf.nbytes)) == 0:
        keys.append(f"held/{len(keys)}")
        mooncake_client.batch_is_exist(keys)
    assert code == -200, f"filling the pool ended with {code}, not -200 (no space)"
    stop = threading.Event()

    def renew_leases() -> None:
        while not stop.wait(1.0):
            mooncake_client.batch_is_exist(keys)

    renewer = threading.Thread(target=renew_leases, daemon=True)
    renewer.start()
    try:
        yield len(keys)
    finally:
        stop.set()
        renewer.join()
        mooncake_client.unregister_buffer(buf.ctypes.data)


def tree_rss_mib(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


async def _soak(
    url: str, model: str, prompts: list[list[int]], duration_s: float = float("inf"), streams: int | None = None
) -> tuple[list[float], list[str]]:
    """SOAK_CONCURRENCY streaming clients in a loop for ``duration_s`` or until ``streams`` have started; latencies of
    complete answers, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration_s
    started = 0

    async def one_client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal started
        n = worker
        while time.monotonic() < deadline and (streams is None or started < streams):
            started += 1
            body = {"model": model, "prompt": prompts[n % len(prompts)], "max_tokens": MAX_TOKENS, "stream": True}
            n += SOAK_CONCURRENCY
            start = time.monotonic()
            chunks = 0
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body | {"temperature": 0.0}) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks += json.loads(line[6:])["choices"][0]["text"] is not None
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            if chunks == 0:
                errors.append("stream ended without a token")
            latencies.append(time.monotonic() - start)

    # A new connection per stream: reusing a kept-alive one races uvicorn closing it (an empty ReadError on the
    # client) under httpx's defaults in a long soak and, on a loaded 2-core host, with a 2-s client expiry too.
    limits = httpx.Limits(max_connections=SOAK_CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(one_client(w, http) for w in range(SOAK_CONCURRENCY)))
    return latencies, errors


def test_concurrent_streaming_soak(server, tiny_model):
    """64 concurrent streams over shared prefixes: no errors, p50/p99 and the memory series reported; memory growth
    bounded over CI's fixed number of streams and, in the long soak (20-s rounds), no faster in its second half than
    vLLM's own drift."""
    prompts = shared_prefix_prompts(prefixes=8, per_prefix=16, prefix_len=2 * BLOCK + 10, suffix_len=40)
    _, errors = asyncio.run(_soak(server.url, tiny_model, prompts, streams=WARM_UP_STREAMS))
    assert not errors, errors[:5]
    rounds = max(1, round(SOAK_S / 20))
    rss = [tree_rss_mib(server.proc.pid)]
    latencies: list[float] = []
    start = time.monotonic()
    for _ in range(rounds):
        if SOAK_S:
            done, errors = asyncio.run(_soak(server.url, tiny_model, prompts, duration_s=SOAK_S / rounds))
        else:
            done, errors = asyncio.run(_soak(server.url, tiny_model, prompts, streams=CI_SOAK_STREAMS))
        assert not errors, errors[:5]
        latencies += done
        rss.append(tree_rss_mib(server.proc.pid))
    elapsed = time.monotonic() - start
    p50, p99 = np.percentile(latencies, [50, 99])
    hits = metric(server, "vllm:kvpool_hit_tokens_total")
    print(
        f"\nsoak: {len(latencies)} streams in {elapsed:.0f} s at concurrency {SOAK_CONCURRENCY}: "
        f"latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, mean {statistics.fmean(latencies) * 1e3:.0f} ms; "
        f"server RSS MiB after each of {rounds} rounds: {' '.join(f'{r:.0f}' for r in rss)}; "
        f"pool hit tokens {hits:.0f}"
    )
    assert len(latencies) >= SOAK_CONCURRENCY
    assert hits > 0, "shared prefixes should have come from the pool"
    if rounds < 6:
        # The connector allocates its memory up front; the early growth (RELIABILITY.md: ~170 MiB over the first
        # 1,300 streams after the warm-up, with or without KV events) is vLLM's KV pages and allocator arenas, and
        # grows with the streams served, not with time.
        assert rss[-1] - rss[0] < 256, f"server memory grew {rss[-1] - rss[0]:.0f} MiB during the soak"
    else:
        # Measured (RELIABILITY.md): ~43 MiB/min late in a 300-s soak with the connector, ~45 without it.
        half = len(rss) // 2
        per_min = (rss[-1] - rss[half]) / ((len(rss) - 1 - half) * SOAK_S / rounds / 60)
        assert per_min < 64, f"server memory still growing {per_min:.0f} MiB/min in the soak's second half"


def test_cache_salt_isolates_tenants(client):
    assert client.ask(1, cache_salt="tenant-a")[0] == 0
    wait_for(lambda: client.ask(1, cache_salt="tenant-a")[0] == FULL_HIT, 20, "tenant-a's own hit")
    assert client.ask(1, cache_salt="tenant-b")[0] == 0
    assert client.ask(1)[0] == 0  # no salt is a tenant of its own


def test_blocks_saved_to_the_pool_are_published_as_kv_events(client, server, kv_events):
    """vLLM's KV events carry the pool tier: a ``BlockStored`` (medium ``KVPOOL``) for each block once it is in the
    pool, with vLLM's block hash, its parent and its tokens, as vLLM's own events for its GPU/CPU tiers."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    client.until_hit(16, 20)
    shard = worker_shard(server.log_text())
    hashes = [maybe_convert_block_hash(block_hash_of(k)) for k in prompt_block_keys(shard, PROMPTS[16])]

    def stored() -> dict:
        return {e.block_hashes[0]: e for e in kv_events.pool_tier()}

    wait_for(lambda: set(hashes) <= set(stored()), 20, "BlockStored events for the prompt's 3 blocks")
    for i, block_hash in enumerate(hashes):
        event = stored()[block_hash]
        assert event.token_ids == PROMPTS[16][i * BLOCK : (i + 1) * BLOCK] and event.block_size == BLOCK
        assert event.parent_block_hash == (hashes[i - 1] if i else None)


def test_reset_prefix_cache_removes_this_layouts_entries_and_no_others(client, server, mooncake_client, kv_events):
    """``POST /reset_prefix_cache?reset_external=true`` resets the pool too (``reset_cache: layout``): every object of
    this deployment's layout goes, another model's stay; the next request computes, and saves and hits resume."""
    for i in (14, 15):
        client.until_hit(i, 20)
    foreign = "kvp1/0123456789abcdef/another-models-block"
    assert mooncake_client.put(foreign, b"x" * 64) == 0
    shard = worker_shard(server.log_text())
    stored = [key for i in (14, 15) for key in prompt_block_keys(shard, PROMPTS[i])]
    assert mooncake_client.batch_is_exist(stored) == [1] * 6
    answer = httpx.post(f"{server.url}/reset_prefix_cache", params={"reset_external": "true"}, timeout=60)
    assert answer.json() == {"success": True}
    assert mooncake_client.batch_is_exist(stored) == [0] * 6
    assert mooncake_client.is_exist(foreign) == 1
    assert client.ask(14)[0] == 0  # computed again, same answer
    client.until_hit(15, 20)  # saved again, then served from the pool
    log = server.log_text()
    removed = re.search(r"KV pool cache reset: (\d+) objects of this layout removed \(1 shards\)", log)
    assert removed is not None and int(removed.group(1)) >= 6  # 14's and 15's, and what earlier tests stored
    assert "queued block saves dropped" in log  # the worker's second pass, at the next step
    assert any(type(e).__name__ == "AllBlocksCleared" for e in kv_events.events)  # routers drop the pool tier


def test_master_killed_then_restarted(client, server, pool):
    assert client.until_hit(0, 20) < 20  # healthy pool: a repeat is served from it
    stop_process(pool.master, signal.SIGKILL)
    durations = []
    for i in (2, 3, 0, 2):
        cached, took = client.ask(i)
        assert cached == 0
        durations.append(took)
    print(f"\nrequests with the master dead: {', '.join(f'{d * 1e3:.0f} ms' for d in durations)}")
    assert max(durations) < 10, "an outage must not make every request wait out the client's RPC retries"

    pool.start_master()
    restarted = time.monotonic()
    client.until_hit(4, 30)
    print(f"pool hits resumed {time.monotonic() - restarted:.1f} s after the master restarted")
    log = server.log_text()
    assert "unreachable during" in log and "reachable again" in log
    assert log.count("unreachable during") <= 4, "the outage warning must be rate-limited"


def test_hung_master_costs_lookup_timeouts_only(client, server, pool):
    client.until_hit(5, 20)
    timeouts_before = metric(server, "vllm:kvpool_lookup_timeouts_total")
    pool.master.send_signal(signal.SIGSTOP)
    try:
        durations = [client.ask(i)[1] for i in (5, 6, 5)]
    finally:
        pool.master.send_signal(signal.SIGCONT)
    print(f"\nrequests with the master hung: {', '.join(f'{d * 1e3:.0f} ms' for d in durations)}")
    assert max(durations) < 5, "lookups must give up at lookup_timeout_ms and the scheduler keep stepping"
    counted = "vllm:kvpool_lookup_timeouts_total"
    wait_for(lambda: metric(server, counted) >= timeouts_before + 3, 10, "each request's timed-out lookup counted")
    client.until_hit(6, 60)  # once it answers again (the stuck client call returns first), hits come back


def test_pool_node_killed_under_stored_objects(client, server, pool):
    """The process holding the objects dies: the master still lists them for a few seconds, so lookups hit and
    the loads fail: vLLM recomputes those blocks and the output is unchanged."""
    client.until_hit(7, 20)
    failed_before = metric(server, "vllm:kvpool_load_failed_total")
    stop_process(pool.node, signal.SIGKILL)
    client.ask(7)
    wait_for(lambda: metric(server, "vllm:kvpool_load_failed_total") > failed_before, 20, "a counted failed load")
    for i in (7, 8):
        client.ask(i)


def test_pool_full_saves_fail_and_are_counted(client, server, pool, mooncake_client):
    """Every byte of the pool held by objects in use: the connector's saves are refused, counted, and lose nothing."""
    pool.segment_size = "16 MB"
    pool.start_node()
    wait_for_one_segment(pool)
    refused_before = metric(server, "vllm:kvpool_save_failed_total[pool_full]")
    with pool_held_full(mooncake_client, worker_block_bytes(server.log_text())) as held:
        for i in range(9, 13):
            assert client.ask(i)[0] == 0
        wait_for(
            lambda: metric(server, "vllm:kvpool_save_failed_total[pool_full]") - refused_before >= 3 * 4,
            30,
            "every block of 4 prompts refused as pool full",
        )
    print(f"\npool full ({held} objects held): {3 * 4} blocks refused and counted, answers unchanged")


def test_shutdown_with_saves_in_flight(client, server, pool, mooncake_client):
    """SIGTERM right after answers whose saves are still queued: the server drains and exits on its own, the
    connector flushes its queue, and every object in the pool is whole."""
    stop_process(pool.node)
    pool.segment_size = "512 MB"
    pool.start_node()
    wait_for_one_segment(pool)
    client.until_hit(21, 30)  # a working pool again
    block_bytes = worker_block_bytes(server.log_text())
    buf = np.zeros(block_bytes, dtype=np.uint8)
    assert mooncake_client.register_buffer(buf.ctypes.data, buf.nbytes) == 0

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            bodies = [{"model": client.model, "prompt": PROMPTS[i], "max_tokens": 1} for i in (22, 23)]
            await asyncio.gather(*(http.post(f"{server.url}/v1/completions", json=b) for b in bodies))

    asyncio.run(burst())
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)
    print(f"\nserver exited {time.monotonic() - start:.1f} s after SIGTERM with saves in flight")
    log = server.log_text()
    assert "MemcacheConnectorStoreV1 worker stats" in log, "the worker did not run its shutdown"
    keys = [key for i in (22, 23) for key in prompt_block_keys(worker_shard(log), PROMPTS[i])]
    assert mooncake_client.batch_is_exist(keys) == [1] * len(keys), "queued saves were not flushed at shutdown"
    for key in keys:
        assert mooncake_client.get_size(key) == block_bytes
        assert mooncake_client.get_into(key, buf.ctypes.data, buf.nbytes) == block_bytes


def test_two_models_start_together_and_never_cross_hit(tiny_model, pool, session_dir, tmp_path):
    """Two instances (two models of identical shape, each contributing a segment) start at the same moment on one
    pool: no port clash; each finds its own entries and never the other model's."""
    model_b = str(build_model(session_dir / "tiny-llama-b", preset="tiny", seed=1))
    config = pool.connector_config(global_segment_size="64 MB", reconnect_interval_s=1.0)
    servers = [
        start_vllm_server(model, tmp_path / name, config, SERVER_ARGS, env=engine_env())
        for name, model in (("a", tiny_model), ("b", model_b))
    ]
    try:
        for s in servers:
            wait_healthy(s)
        prompt = PROMPTS[0]
        a1, b1 = (complete(s.url, m, prompt, MAX_TOKENS) for s, m in zip(servers, (tiny_model, model_b), strict=True))
        time.sleep(2)  # let both background saves land
        b2 = complete(servers[1].url, model_b, prompt, MAX_TOKENS)
        a2 = complete(servers[0].url, tiny_model, prompt, MAX_TOKENS)
    finally:
        for s in servers:
            stop_server(s)
    assert cached_tokens(a1) == 0 and cached_tokens(b1) == 0  # b did not take a's fresh entries
    assert cached_tokens(a2) == FULL_HIT and cached_tokens(b2) == FULL_HIT  # each took its own
    assert a1["choices"][0]["text"] == a2["choices"][0]["text"]
    assert b1["choices"][0]["text"] == b2["choices"][0]["text"]
    assert a1["choices"][0]["text"] != b1["choices"][0]["text"]
