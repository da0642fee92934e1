"""Small clients for the OpenAI-compatible servers under test: completions, their usage fields, /metrics samples."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import zmq


def complete(url: str, model: str, prompt: str | list[int], max_tokens: int, **extra: Any) -> dict:
    """A greedy /v1/completions answer; fails with the server's body if the status is not 200."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def cached_tokens(answer: dict) -> int:
    """Prompt tokens the server did not compute (needs ``--enable-prompt-tokens-details``)."""
    return ((answer["usage"] or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def prometheus_samples(text: str) -> dict[str, float]:
    """Sum of each sample name over its labels, from a Prometheus text exposition; samples with a ``reason`` label
    are also summed under ``name[reason]``."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if "reason" in sample.labels:
                key = f"{sample.name}[{sample.labels['reason']}]"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def server_metrics(url: str) -> dict[str, float]:
    return prometheus_samples(httpx.get(f"{url}/metrics", timeout=30).text)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout_s} s"
        time.sleep(0.5)


class CheckedClient:
    """Greedy requests for ``prompts[i]`` against one server, each answer checked token for token against
    ``baseline[i]`` (a no-connector run's output for the same prompt)."""

    def __init__(
        self, url: str, model: str, prompts: list[list[int]], baseline: list[list[int]], max_tokens: int, full_hit: int
    ) -> None:
        self.url, self.model, self.prompts, self.baseline = url, model, prompts, baseline
        self.max_tokens, self.full_hit = max_tokens, full_hit

    def ask(self, i: int, **extra: Any) -> tuple[int, float]:
        """(cached tokens, seconds) of one request; its tokens must equal the baseline's. Like the baseline engine run,
        it ignores the end-of-sequence token: a random model emits one now and then, and a server answer stopping
        there would differ from the baseline's ``max_tokens`` tokens for no fault of the connector."""
        start = time.monotonic()
        answer = complete(
            self.url, self.model, self.prompts[i], self.max_tokens, return_token_ids=True, ignore_eos=True, **extra
        )
        took = time.monotonic() - start
        assert answer["choices"][0]["token_ids"] == self.baseline[i], f"prompt {i}: output differs from baseline"
        return cached_tokens(answer), took

    def until_hit(self, i: int, timeout_s: float) -> float:
        """Ask for ``prompts[i]`` until the pool serves all its full blocks; seconds it took."""
        start = time.monotonic()
        while self.ask(i)[0] != self.full_hit:
            assert time.monotonic() - start < timeout_s, f"prompt {i}: no pool hit within {timeout_s} s"
            time.sleep(0.5)
        return time.monotonic() - start


class KVEventSubscriber:
    """Collects the KV events a vLLM engine publishes (``--kv-events-config`` with the ZMQ publisher) on a thread.

    It binds ``endpoint``: vLLM's publisher binds only a wildcard (``tcp://*:port``) and connects to an address with a
    host, so a subscriber on loopback binds and the engine, configured with the same endpoint, connects to it."""

    def __init__(self, endpoint: str) -> None:
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.RCVTIMEO, 200)
        self._socket.bind(endpoint)
        self.endpoint = endpoint
        self.events: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            try:
                _topic, _seq, payload = self._socket.recv_multipart()
            except zmq.Again:
                continue
            self.events.extend(decoder.decode(payload).events)

    def pool_tier(self) -> list[Any]:
        """The ``BlockStored`` events of the pool tier (medium ``KVPOOL``), in order."""
        from vllm.distributed.kv_events import BlockStored

        from kvpool_connector.kv_events import MEDIUM

        return [e for e in list(self.events) if isinstance(e, BlockStored) and e.medium == MEDIUM]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
