"""The P/D proxy in front of a real vLLM server (prefill and decode roles on one instance here): answers equal the
server's own, streaming relays chunks, upstream errors keep their status and body, a dead instance is a quick 502."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from kvpool_connector.processes import free_port, stop_process
from kvpool_testkit.engine import engine_env
from kvpool_testkit.pd import start_proxy
from kvpool_testkit.server import vllm_server
from kvpool_testkit.workloads import SEED_LONG_PROMPT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_model, pool, tmp_path_factory):
    config = pool.connector_config()
    workdir = tmp_path_factory.mktemp("proxy-server")
    with vllm_server(tiny_model, workdir, config, env=engine_env(workdir / "cache")) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    proc, url = start_proxy(tmp_path_factory.mktemp("proxy"), server.url, server.url, "--health-interval", "1")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def dead_decode_proxy(server, tmp_path_factory):
    proc, url = start_proxy(
        tmp_path_factory.mktemp("proxy-dead"), server.url, f"http://127.0.0.1:{free_port()}", "--health-interval", "1"
    )
    yield url
    stop_process(proc)


def _body(tiny_model, **extra):
    return {"model": tiny_model, "prompt": SEED_LONG_PROMPT, "max_tokens": 16, "temperature": 0.0, **extra}


def test_answer_through_proxy_equals_direct(server, proxy, tiny_model):
    direct = httpx.post(f"{server.url}/v1/completions", json=_body(tiny_model), timeout=120)
    via = httpx.post(f"{proxy}/v1/completions", json=_body(tiny_model), headers={"X-Request-Id": "t-1"}, timeout=120)
    assert direct.status_code == via.status_code == 200
    assert via.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]


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
