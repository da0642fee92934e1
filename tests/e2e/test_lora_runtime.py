"""LoRA adapters loaded and unloaded at runtime through the OpenAI server (``/v1/load_lora_adapter``), as a serving
fleet swaps tenants' adapters: each adapter's blocks hit only requests of the same weights.

One server with the connector and vLLM's own prefix cache off (every cached prompt token comes from the pool), one
adapter slot (``--max-loras 1``: the worker drops an adapter to take the next), one name, ``tenant``, for:
1. adapter A: computed, then a pool hit with the same answer;
2. A unloaded, adapter B (other weights, another folder) loaded under the same name: a miss, another answer; then
   B's own hit;
3. A loaded again: a hit on A's blocks with A's answer;
4. A's folder rewritten with other weights and reloaded in place (``load_inplace``): a miss, another answer (vLLM's
   block hash names only the adapter's name and path; the connector adds the weights' digest).
"""

from __future__ import annotations

import httpx
import pytest

from kvpool_testkit.client import cached_tokens, complete
from kvpool_testkit.engine import engine_env
from kvpool_testkit.server import vllm_server
from kvpool_testkit.tiny_model import build_lora
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

BLOCK = 128
PROMPT = distinct_prompts(1, 3 * BLOCK + 5, seed=36)[0]
FULL_HIT = 3 * BLOCK
MAX_TOKENS = 8


def adapter_call(url: str, action: str, **body: object) -> None:
    response = httpx.post(f"{url}/v1/{action}_lora_adapter", json={"lora_name": "tenant", **body}, timeout=120)
    assert response.status_code == 200, response.text


def ask(url: str) -> tuple[int, str]:
    answer = complete(url, "tenant", PROMPT, MAX_TOKENS)
    return cached_tokens(answer), answer["choices"][0]["text"]


def test_adapters_swapped_at_runtime_hit_only_their_own_weights_blocks(tiny_model, pool, tmp_path):
    adapter_a = str(build_lora(tmp_path / "adapter-a", tiny_model, seed=11))
    adapter_b = str(build_lora(tmp_path / "adapter-b", tiny_model, seed=12))
    args = [
        "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
    ]  # fmt: skip
    env = engine_env({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    with vllm_server(tiny_model, tmp_path / "server", pool.connector_config(), args, env=env) as server:
        adapter_call(server.url, "load", lora_path=adapter_a)
        a_first, a_again = ask(server.url), ask(server.url)

        adapter_call(server.url, "unload")
        adapter_call(server.url, "load", lora_path=adapter_b)
        b_first, b_again = ask(server.url), ask(server.url)

        adapter_call(server.url, "unload")
        adapter_call(server.url, "load", lora_path=adapter_a)
        a_back = ask(server.url)

        build_lora(adapter_a, tiny_model, seed=13)
        adapter_call(server.url, "load", lora_path=adapter_a, load_inplace=True)
        a_rewritten, a_rewritten_again = ask(server.url), ask(server.url)
        log = server.log_text()

    assert (a_first[0], a_again[0]) == (0, FULL_HIT)
    assert a_again[1] == a_first[1]
    assert (b_first[0], b_again[0]) == (0, FULL_HIT), "another adapter under the same name shares no block"
    assert b_first[1] != a_first[1] and b_again[1] == b_first[1]
    assert a_back == (FULL_HIT, a_first[1]), "A's blocks serve A again after a swap"
    assert (a_rewritten[0], a_rewritten_again[0]) == (0, FULL_HIT), "new weights under the same name and path"
    assert a_rewritten[1] != a_first[1] and a_rewritten_again[1] == a_rewritten[1]
    assert "Traceback" not in log
