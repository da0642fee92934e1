"""The OpenAI server with the connector answers the field's validation requests; a repeat is served from the pool, and
the connector's counters on /metrics show it. The Ascend example's requests.sh (bash and curl) sends the same requests
and gets the same answers.

vLLM's own prefix cache is off here, so any cached prompt tokens on the repeat can only have come from the pool."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kvpool_testkit.client import cached_tokens, complete, server_metrics
from kvpool_testkit.engine import engine_env
from kvpool_testkit.server import vllm_server
from kvpool_testkit.workloads import SEED_REQUESTS

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

REQUESTS_SH = Path(__file__).parents[2] / "examples" / "ascend" / "requests.sh"


def test_seed_requests_through_openai_server(tiny_model, pool, tmp_path):
    config = pool.connector_config(load_async="auto")
    args = ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]
    env = engine_env({"VLLM_LOG_STATS_INTERVAL": "1"})
    with vllm_server(tiny_model, tmp_path, config, args, env=env) as server:
        first = [complete(server.url, tiny_model, prompt, n) for prompt, n in SEED_REQUESTS]
        repeat = [complete(server.url, tiny_model, prompt, n) for prompt, n in SEED_REQUESTS]
        metrics = server_metrics(server.url)
        deadline = time.monotonic() + 15
        while "KV Transfer metrics: pool_lookups=" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        serving_log = server.log_text()
        env = {k: v for k, v in os.environ.items() if k != "HERE"}
        env.update(REQUESTS_URL=server.url, MODEL_PATH=tiny_model)
        script = subprocess.run(["bash", str(REQUESTS_SH)], env=env, capture_output=True, text=True, timeout=300)
    long_prompt_tokens = first[1]["usage"]["prompt_tokens"]
    assert long_prompt_tokens > 128, "the long seed prompt should span at least one full block"
    for a, b in zip(first, repeat, strict=True):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert a["usage"]["completion_tokens"] > 0
    assert cached_tokens(first[1]) == 0
    assert script.returncode == 0, script.stderr
    by_script = [json.loads(line) for line in script.stdout.splitlines()]
    assert [a["choices"][0]["text"] for a in by_script] == [a["choices"][0]["text"] for a in first]
    assert cached_tokens(repeat[1]) == long_prompt_tokens // 128 * 128
    assert "Traceback" not in serving_log
    # The connector's counters on the server's /metrics moved with the hit.
    assert metrics.get("vllm:kvpool_hit_tokens_total", 0) >= 128
    assert metrics.get("vllm:kvpool_loaded_bytes_total", 0) > 0
    assert metrics.get("vllm:kvpool_saved_blocks_total", 0) >= long_prompt_tokens // 128
    assert "KV Transfer metrics: pool_lookups=" in serving_log  # vLLM's periodic log line carries ours
    assert metrics.get("vllm:kvpool_lookups_total", 0) == 2  # the long prompt twice; the short one has no full block
    # load_async: auto, one request at a time: nothing else runs, so the hit loads before the forward pass
    assert metrics.get("vllm:kvpool_sync_loads_total", 0) == 1 and metrics.get("vllm:kvpool_async_loads_total", 0) == 0
