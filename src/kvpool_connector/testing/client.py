"""Small clients for the OpenAI-compatible servers under test: completions, their usage fields, /metrics samples."""

from __future__ import annotations

from typing import Any

import httpx


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
