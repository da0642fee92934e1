"""1P1D with real processes: answers through the proxy equal a single instance's, and the decode node took the
prompt's KV from the pool (its /metrics show the hit)."""

from __future__ import annotations

import pytest

from kvpool_connector.testing.client import cached_tokens, complete, server_metrics
from kvpool_connector.testing.pd import pd_deployment
from kvpool_connector.testing.workloads import SEED_REQUESTS

pytestmark = pytest.mark.e2e


def test_1p1d_through_the_pool(tiny_model, tmp_path):
    prompt, max_tokens = SEED_REQUESTS[1]  # the long seed request: several full blocks
    with pd_deployment(tiny_model, tmp_path) as pd:
        via = complete(pd.proxy_url, tiny_model, prompt, max_tokens)
        single = complete(pd.producer_url, tiny_model, prompt, max_tokens)
        metrics = server_metrics(pd.consumer_url)
    assert via["choices"][0]["text"] == single["choices"][0]["text"]
    cached = cached_tokens(via)
    assert cached == via["usage"]["prompt_tokens"] // 128 * 128 > 0  # every full block came from the pool
    assert metrics.get("vllm:kvpool_hit_tokens_total") == cached
