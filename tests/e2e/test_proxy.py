"""The proxy in front of two real vLLM servers sharing a Mooncake pool (``kv_both``, vLLM's own prefix cache off, so
every cached token is a pool hit): as a fleet router (round robin: a repeat on the other server comes from the pool)
and as a P/D proxy (prefill on one, decode on the other; a prompt the pool holds skips prefill). Answers equal the
server's own, streaming relays chunks, upstream errors keep their status and body, a dead instance is a quick 502."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest

from kvpool_connector.processes import spawn, stop_process, wait_port
from kvpool_testkit.client import cached_tokens, complete, server_metrics
from kvpool_testkit.engine import engine_env
from kvpool_testkit.pd import start_proxy
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.server import start_vllm_server, stop_server, wait_healthy
from kvpool_testkit.workloads import SEED_LONG_PROMPT

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

SERVER_ARGS = ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]


@pytest.fixture(scope="module")
def servers(tiny_model, pool, tmp_path_factory):
    """Two kv_both servers on one pool, started side by side."""
    config = pool.connector_config()
    with ExitStack() as stack:
        started = []
        for name in ("a", "b"):
            workdir = tmp_path_factory.mktemp(f"proxy-server-{name}")
            server = start_vllm_server(tiny_model, workdir, config, SERVER_ARGS, env=engine_env())
            stack.callback(stop_server, server)
            started.append(server)
        for server in started:
            wait_healthy(server)
        yield started


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def _proxy(tmp_path_factory, *args: str):
    port = reserve_port()
    workdir = tmp_path_factory.mktemp("router")
    log = workdir / "proxy.log"
    proc = spawn([sys.executable, "-m", "kvpool_connector.proxy", "--port", str(port), *args], log)
    wait_port(port, proc, 30, "proxy", log)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxy(servers, tmp_path_factory):
    """P/D: prefill on server a, decode on server b."""
    proc, url = start_proxy(tmp_path_factory.mktemp("proxy"), servers[0].url, servers[1].url, "--health-interval", "1")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def fleet_proxy(servers, tmp_path_factory):
    proc, url = _proxy(tmp_path_factory, "--instances", *(s.url for s in servers), "--health-interval", "1")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def dead_decode_proxy(server, tmp_path_factory):
    proc, url = start_proxy(
        tmp_path_factory.mktemp("proxy-dead"),
        server.url,
        f"http://127.0.0.1:{reserve_port()}",
        "--health-interval",
        "1",
    )
    yield url
    stop_process(proc)


def _body(tiny_model, **extra):
    return {"model": tiny_model, "prompt": SEED_LONG_PROMPT, "max_tokens": 16, "temperature": 0.0, **extra}


def _finished(url: str) -> float:
    return server_metrics(url).get("vllm:request_success_total", 0.0)


def test_answer_through_proxy_equals_direct(server, proxy, tiny_model):
    direct = httpx.post(f"{server.url}/v1/completions", json=_body(tiny_model), timeout=120)
    via = httpx.post(f"{proxy}/v1/completions", json=_body(tiny_model), headers={"X-Request-Id": "t-1"}, timeout=120)
    assert direct.status_code == via.status_code == 200
    assert via.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]


def test_fleet_router_sends_a_repeat_to_the_other_server_which_loads_it_from_the_pool(servers, fleet_proxy, tiny_model):
    prompt = f"fleet {SEED_LONG_PROMPT}"
    before = [_finished(s.url) for s in servers]
    first = complete(fleet_proxy, tiny_model, prompt, 16)
    repeat = complete(fleet_proxy, tiny_model, prompt, 16)
    after = [_finished(s.url) for s in servers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1], "round robin: one request on each server"
    full_blocks = first["usage"]["prompt_tokens"] // 128 * 128
    assert full_blocks > 0 and cached_tokens(first) == 0
    assert cached_tokens(repeat) == full_blocks  # prefix caching is off: every one of them came from the pool
    assert repeat["choices"][0]["text"] == first["choices"][0]["text"]
    health = httpx.get(f"{fleet_proxy}/healthcheck", timeout=5).json()
    assert health["status"] == "ok" and [i["url"] for i in health["instances"]] == [s.url for s in servers]


def test_pd_prompt_the_pool_holds_skips_prefill(servers, proxy, tiny_model):
    prefill = servers[0]
    prompt = f"held {SEED_LONG_PROMPT}"
    first = complete(proxy, tiny_model, prompt, 16)
    prefilled = _finished(prefill.url)
    skipped = httpx.get(f"{proxy}/healthcheck", timeout=5).json()["counts"]["prefill_skipped"]
    again = complete(proxy, tiny_model, prompt, 16, seed=7)  # sampling fields do not change what is held
    assert _finished(prefill.url) == prefilled, "the held prompt went to the prefill instance"
    assert httpx.get(f"{proxy}/healthcheck", timeout=5).json()["counts"]["prefill_skipped"] == skipped + 1
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert cached_tokens(again) == first["usage"]["prompt_tokens"] // 128 * 128  # all from the pool
    other = complete(proxy, tiny_model, f"other {SEED_LONG_PROMPT}", 16)  # a new prompt is prefilled as before
    assert _finished(prefill.url) == prefilled + 1 and other["usage"]["completion_tokens"] == 16


def test_streaming_relays_chunks(proxy, tiny_model):
    events = []
    with httpx.stream("POST", f"{proxy}/v1/completions", json=_body(tiny_model, stream=True), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    full = httpx.post(f"{proxy}/v1/completions", json=_body(tiny_model), timeout=120).json()["choices"][0]["text"]
    assert len(events) > 3 and text == full


def test_upstream_error_keeps_status_and_body(server, proxy, tiny_model):
    bad = _body(tiny_model, max_tokens=-1)
    direct = httpx.post(f"{server.url}/v1/completions", json=bad, timeout=60)
    via = httpx.post(f"{proxy}/v1/completions", json=bad, timeout=60)
    assert direct.status_code == 400
    assert via.status_code == 400
    assert via.json()["error"]["message"] == direct.json()["error"]["message"]
    assert httpx.post(f"{proxy}/v1/completions", content=b"{not json", timeout=10).status_code == 400


def test_models_come_from_an_instance(fleet_proxy, tiny_model):
    assert [m["id"] for m in httpx.get(f"{fleet_proxy}/v1/models", timeout=10).json()["data"]] == [tiny_model]


def test_a_proxy_given_both_modes_or_neither_refuses_to_start():
    for args in (["--instances", "http://a:1", "--prefill", "http://b:1"], ["--prefill", "http://b:1"]):
        result = subprocess.run(
            [sys.executable, "-m", "kvpool_connector.proxy", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and "--instances" in result.stderr, result.stderr


def test_dead_decode_instance_is_a_quick_502(dead_decode_proxy, tiny_model):
    start = time.monotonic()
    response = httpx.post(f"{dead_decode_proxy}/v1/completions", json=_body(tiny_model), timeout=60)
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]["message"]
    assert time.monotonic() - start < 15  # prefill runs first; the dead decode instance itself fails at once
    deadline = time.monotonic() + 10
    while httpx.get(f"{dead_decode_proxy}/healthcheck", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "healthcheck never reported the dead decode instance"
        time.sleep(0.5)


def test_healthcheck_and_32_concurrent_requests(proxy, tiny_model):
    assert httpx.get(f"{proxy}/healthcheck", timeout=5).json()["status"] == "ok"

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        f"{proxy}/v1/completions",
                        json=_body(tiny_model, max_tokens=4, prompt=f"{i} {SEED_LONG_PROMPT}"),
                    )
                    for i in range(32)
                )
            )
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 32


def test_chat_completions_pass_through(server, proxy, tiny_model):
    """The tiny model has no chat template: whatever vLLM answers directly, the proxy answers the same."""
    body = {"model": tiny_model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    direct = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    via = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=60)
    assert via.status_code == direct.status_code
    if direct.status_code >= 400:
        assert via.json()["error"]["message"] == direct.json()["error"]["message"]
