"""1P1D with real processes: answers through the proxy equal a single instance's, and the decode node took the
prompt's KV from the pool (its /metrics show the hit)."""

from __future__ import annotations

import httpx
import pytest

from kvpool_connector.testing.pd import pd_deployment
from kvpool_connector.testing.workloads import SEED_REQUESTS

pytestmark = pytest.mark.e2e


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_1p1d_through_the_pool(tiny_model, tmp_path):
    prompt, max_tokens = SEED_REQUESTS[1]  # the long seed request: several full blocks
    with pd_deployment(tiny_model, tmp_path) as pd:
        via = _complete(pd.proxy_url, tiny_model, prompt, max_tokens)
        single = _complete(pd.producer_url, tiny_model, prompt, max_tokens)
        metrics = httpx.get(f"{pd.consumer_url}/metrics", timeout=30).text
    assert via["choices"][0]["text"] == single["choices"][0]["text"]
    cached = via["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == via["usage"]["prompt_tokens"] // 128 * 128 > 0  # every full block came from the pool
    hit_lines = [line for line in metrics.splitlines() if line.startswith("vllm:kvpool_hit_tokens_total")]
    assert hit_lines and float(hit_lines[0].rsplit(" ", 1)[1]) == cached
