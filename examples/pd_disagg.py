"""1P1D prefill/decode disaggregation through the pool, on this machine: everything on 127.0.0.1.

Starts mooncake_master + a pool node, a producer and a consumer vLLM server (tiny local model, CPU), and the P/D
proxy; sends the seed's short and long requests through the proxy and directly to the producer (a single instance),
prints both answers, whether they match, and how many prompt tokens the consumer took from the pool; stops it all.

Run: ``python examples/pd_disagg.py [--workdir .work/pd]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from kvpool_connector.testing.pd import pd_deployment
from kvpool_connector.testing.tiny_model import build_model
from kvpool_connector.testing.workloads import SEED_REQUESTS


def complete(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()


def pool_hit_tokens(consumer_url: str) -> float:
    text = httpx.get(f"{consumer_url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:kvpool_hit_tokens_total")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".work/pd"))
    args = parser.parse_args()
    console = Console(width=120)
    workdir = args.workdir.resolve()
    model = str(build_model(workdir / "tiny-llama"))
    console.print("starting mooncake_master, pool node, producer, consumer and proxy (a couple of minutes) ...")
    with pd_deployment(model, workdir) as pd:
        table = Table(title="1P1D through the pool: proxy (P -> pool -> D) vs a single instance")
        for col in ("request", "prompt tokens", "consumer pool hit tokens", "answers equal", "answer (proxy)"):
            table.add_column(col)
        for name, (prompt, max_tokens) in zip(("short", "long"), SEED_REQUESTS, strict=True):
            before = pool_hit_tokens(pd.consumer_url)
            via = complete(pd.proxy_url, model, prompt, max_tokens)
            single = complete(pd.producer_url, model, prompt, max_tokens)
            hits = pool_hit_tokens(pd.consumer_url) - before
            same = via["choices"][0]["text"] == single["choices"][0]["text"]
            table.add_row(
                name,
                str(via["usage"]["prompt_tokens"]),
                f"{hits:.0f}",
                "yes" if same else "NO",
                repr(via["choices"][0]["text"][:60]) + "...",
            )
    console.print(table)
    console.print("all processes stopped")


if __name__ == "__main__":
    main()
