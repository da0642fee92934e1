"""Asynchronous loads on a real vLLM CPU server with a real Mooncake Store: a hit's request waits in vLLM's
``WAITING_FOR_REMOTE_KVS`` while its blocks load on the worker's loader thread, and the rest of the batch runs.

One server (vLLM's own prefix cache off, so every cached token is the pool's; a 12-block KV cache, so requests
compete for blocks) lives through the phases, in file order. Every answer is compared token for token with a
no-connector engine's. Loads are held in flight by stopping the pool node (SIGSTOP): the lookup (the master) answers,
the transfer (the node) waits. Checked: hits and partial hits; preemption of running requests while loads are in
flight, and while their blocks are being saved; a request aborted mid-load (its blocks stay reserved until the load
is over, then the server serves on); an object removed between the lookup and its load (that block and the rest are
recomputed); and the node killed mid-load (the load fails, the prompt is recomputed). Synchronous loads
(``load_async: false``) are checked in test_engine_pool.py.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

from kvpool_connector.processes import stop_process
from kvpool_testkit.client import CheckedClient, server_metrics, wait_for
from kvpool_testkit.engine import engine_env
from kvpool_testkit.inspection import prompt_block_keys, worker_shard
from kvpool_testkit.mooncake_pool import connector_config
from kvpool_testkit.server import vllm_server
from kvpool_testkit.workloads import distinct_prompts

pytestmark = pytest.mark.e2e

BLOCK = 128
PROMPTS = distinct_prompts(12, 3 * BLOCK + 120, seed=31)  # 504 tokens: 4 blocks, a 5th from the 9th token decoded
# 620 tokens: 5 blocks, a 6th from the 21st token decoded. Two such requests fill the 11 usable blocks and then
# outgrow them, so a burst of them preempts for sure (504-token ones may or may not, depending on arrival timing).
LOADED, SAVED = list(range(12, 20)), list(range(20, 28))
PROMPTS += distinct_prompts(len(LOADED) + len(SAVED), 4 * BLOCK + 108, seed=33)
MAX_TOKENS = 64
FULL_HIT = 3 * BLOCK
KV_BLOCKS = 12  # three such requests fill the KV cache, and each needs a fifth block as it decodes
SERVER_ARGS = [
    "--no-enable-prefix-caching",
    "--enable-prompt-tokens-details",
    "--num-gpu-blocks-override",
    str(KV_BLOCKS),
    "--max-model-len",
    "1024",
]
HELD_S = 2.0  # how long a phase keeps a load in flight before acting on it


@pytest.fixture(scope="module")
def pool(patient_pool):
    """Phases stop the pool node for seconds to hold loads in flight: ``patient_pool``."""
    return patient_pool


@pytest.fixture(scope="module")
def server(tiny_model, pool, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("async-server")
    # load_async: true (these phases hold asynchronous loads in flight); lookup_async: the default. Eight requests
    # decoding on a 2-core host can starve the lookup thread past the default 500-ms deadline (a miss: correct, but
    # not the hit these phases need). The phases hold loads by stopping the node for seconds: Mooncake's stall
    # timeout (5 s by default here) must not end them first, which it can on a loaded host (the loads would fail as
    # stalls, not as the missing object).
    mooncake = {**pool.client_config(), "transfer_stall_timeout_s": 60}
    config = connector_config(mooncake, reconnect_interval_s=1.0, lookup_timeout_ms=5000, load_async=True)
    with vllm_server(tiny_model, workdir, config, SERVER_ARGS, env=engine_env()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server, tiny_model, baseline_outputs) -> CheckedClient:
    return CheckedClient(server.url, tiny_model, PROMPTS, baseline_outputs, MAX_TOKENS, FULL_HIT)


@pytest.fixture(scope="module")
def longer(server, tiny_model, baseline_outputs) -> CheckedClient:
    """The same prompts, for the 5-block ones: their full hit is 4 blocks."""
    return CheckedClient(server.url, tiny_model, PROMPTS, baseline_outputs, MAX_TOKENS, 4 * BLOCK)


@pytest.fixture(scope="module")
def keys_of(server):
    return lambda i: prompt_block_keys(worker_shard(server.log_text()), PROMPTS[i])


def metric(server, name: str) -> float:
    return server_metrics(server.url).get(name, 0.0)


class NodeStopped:
    """The pool node stopped: lookups (the master) answer, transfers (the node) wait until it continues."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def __enter__(self) -> NodeStopped:
        self.pool.node.send_signal(signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool.node.poll() is None:
            self.pool.node.send_signal(signal.SIGCONT)


def test_hits_and_partial_hits_load_asynchronously(client, server, mooncake_client, keys_of):
    for i in range(4):
        client.until_hit(i, 20)
    assert mooncake_client.remove(keys_of(1)[2], True) == 0  # prompt 1 keeps its first two blocks only
    assert client.ask(1)[0] == 2 * BLOCK
    assert client.ask(0)[0] == FULL_HIT
    assert metric(server, "vllm:kvpool_async_loads_total") >= 2 and metric(server, "vllm:kvpool_sync_loads_total") == 0
    log = server.log_text()
    assert "Traceback" not in log


def test_running_requests_are_preempted_while_loads_are_in_flight(client, longer, server):
    for i in range(4, 12):
        client.until_hit(i, 20)  # in the pool for the phases after this one
    for i in LOADED:
        longer.until_hit(i, 20)
    preempted = metric(server, "vllm:num_preemptions_total")
    with concurrent.futures.ThreadPoolExecutor(len(LOADED)) as threads:
        cached = list(threads.map(lambda i: longer.ask(i)[0], LOADED))  # each answer checked against the baseline
    assert cached == [4 * BLOCK] * len(LOADED)
    # loading requests hold their blocks while running ones outgrow the rest
    assert metric(server, "vllm:num_preemptions_total") > preempted


def test_requests_preempted_while_their_blocks_are_saved_store_what_later_loads(longer, server):
    """Eight new 5-block prompts at once: two fit the 11 usable blocks, and each needs a 6th as it decodes, so
    running requests are preempted (blocks freed, recomputed on resumption) while the saves of their blocks are
    planned and in flight. Every answer equals the baseline; a resumed request takes the blocks it saved from the
    pool (vLLM asks again); each block is stored once; and each prompt asked again alone is a full hit with the
    baseline's answer, so what the preempted requests stored is their own KV. (With 504-token prompts and 64 tokens
    two requests never outgrow the cache: no preemption.)"""
    before = server_metrics(server.url)
    with concurrent.futures.ThreadPoolExecutor(len(SAVED)) as threads:
        list(threads.map(longer.ask, SAVED))  # each answer checked against the baseline
    after = server_metrics(server.url)
    grew = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert grew["vllm:num_preemptions_total"] > 0
    assert grew["vllm:kvpool_saved_blocks_total"] == 4 * len(SAVED)  # 4 full prompt blocks each, none twice
    assert grew["vllm:kvpool_hit_tokens_total"] > 0  # resumed requests loaded their own saved blocks
    for i in SAVED:
        assert longer.ask(i)[0] == 4 * BLOCK  # and the baseline's answer


def test_a_request_aborted_mid_load_releases_its_blocks_once_the_load_is_over(client, server, pool, tiny_model):
    with NodeStopped(pool), pytest.raises(httpx.TimeoutException):
        body = {"model": tiny_model, "prompt": PROMPTS[4], "max_tokens": MAX_TOKENS, "temperature": 0.0}
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=HELD_S)  # the client gives up: vLLM aborts
    wait_for(lambda: metric(server, "vllm:num_requests_waiting") == 0, 30, "the aborted request gone")
    # its blocks went back to vLLM only after the load ended; every block is usable again
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        assert list(threads.map(lambda i: client.ask(i)[0], range(4, 8))) == [FULL_HIT] * 4
    assert "Traceback" not in server.log_text()


def test_an_object_removed_between_lookup_and_load_is_recomputed(client, server, pool, mooncake_client, keys_of):
    """The second request's lookup finds all three blocks; its load, queued behind the first's, finds one gone.
    (A request's ``cached_tokens`` is what vLLM admitted it with, so the recompute shows in the counters.)"""
    missing = metric(server, "vllm:kvpool_load_failed_total[missing]")
    lookups = metric(server, "vllm:kvpool_lookups_total")

    def looked_up(count: int) -> None:
        wait_for(lambda: metric(server, "vllm:kvpool_lookups_total") >= lookups + count, 30, f"{count} lookups")

    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        with NodeStopped(pool):
            first = threads.submit(client.ask, 0)  # its load holds the loader thread
            looked_up(1)
            second = threads.submit(client.ask, 2)  # looked up (a hit), its load queued behind the first
            looked_up(2)
            assert mooncake_client.remove(keys_of(2)[1], True) == 0
        for answer in (first, second):
            answer.result(timeout=60)  # each checked against the baseline
    assert metric(server, "vllm:kvpool_load_failed_total[missing]") == missing + 1


def test_the_pool_node_killed_mid_load_costs_the_hit_only(client, server, pool):
    failed = metric(server, "vllm:kvpool_load_failed_total")
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        with NodeStopped(pool):
            asked = threads.submit(client.ask, 3)
            time.sleep(HELD_S)
            stop_process(pool.node, signal.SIGKILL)
        asked.result(timeout=60)  # every block failed to load: recomputed, the same answer
    assert metric(server, "vllm:kvpool_load_failed_total") == failed + 3
    pool.start_node()
