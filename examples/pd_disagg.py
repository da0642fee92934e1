"""1P1D prefill/decode disaggregation through the pool, on this machine: everything on 127.0.0.1.

Starts mooncake_master + a pool node, a producer and decode consumers (vLLM servers, a tiny local model, CPU), one
P/D proxy per consumer; sends the seed's short and long requests through each proxy and straight to the producer (a
single instance: its second answer hits its own prefix cache for the blocks the consumer took from the pool), prints
whether the answers match and how many prompt tokens each consumer took from the pool; stops it all.

``--model mla`` (the default) is the field's layout: a DeepSeek-V2 (MLA + MoE, bf16) with the producer and one
consumer at TP 2 and a second consumer at TP 1 (MLA blocks are the same at every TP size). Its bf16 greedy tokens
follow the shapes of the computation, so only a consumer at the producer's TP size is expected to answer token for
token like it; the TP 1 consumer's answer is shown for what it is. ``--model llama``: the seed's GQA Llama, fp32, TP 1.

Each server runs MemcacheConnectorStoreV1 alone (not under MultiConnector), so the connector itself switches vLLM's
``kv_load_failure_policy`` to ``recompute``; the Ascend example's MultiConnector JSON carries the key. Every server gets
``PYTHONHASHSEED=0``: one seed for the whole fleet (vLLM 0.23 needs one to hash blocks alike across processes).

Run: ``python examples/pd_disagg.py [--model mla|llama] [--workdir .work/pd]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvpool_testkit.client import cached_tokens, complete, server_metrics
from kvpool_testkit.pd import Instance, pd_deployment
from kvpool_testkit.tiny_model import build_model
from kvpool_testkit.workloads import SEED_REQUESTS

LAYOUTS = {  # model -> (preset, producer, consumers)
    "mla": ("tiny-mla", Instance(tp=2, dtype="bfloat16"), (Instance(tp=2, dtype="bfloat16"), Instance(1, "bfloat16"))),
    "llama": ("tiny", Instance(), (Instance(),)),
}


def pool_hit_tokens(consumer_url: str) -> float:
    return server_metrics(consumer_url).get("vllm:kvpool_hit_tokens_total", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(LAYOUTS), default="mla")
    parser.add_argument("--workdir", type=Path, default=Path(".work/pd"))
    args = parser.parse_args()
    console = Console(width=140)
    workdir = args.workdir.resolve()
    preset, producer, consumers = LAYOUTS[args.model]
    model = str(build_model(workdir / preset, preset=preset))
    console.print(f"starting mooncake_master, pool node, producer, {len(consumers)} consumer(s), proxies (minutes) ...")
    table = Table(title=f"1P1D through the pool ({args.model}, producer at TP {producer.tp}): proxy vs single instance")
    for col in ("request", "decode at", "prompt tokens", "pool hit tokens", "equals producer", "answer (proxy)"):
        table.add_column(col)
    with pd_deployment(model, workdir, producer, consumers, env_extra={"PYTHONHASHSEED": "0"}) as pd:
        for name, (prompt, max_tokens) in zip(("short", "long"), SEED_REQUESTS, strict=True):
            for consumer, route in zip(consumers, pd.routes, strict=True):
                before = pool_hit_tokens(route.consumer_url)
                via = complete(route.proxy_url, model, prompt, max_tokens)
                hits = pool_hit_tokens(route.consumer_url) - before
                single = complete(pd.producer_url, model, prompt, max_tokens)
                same = via["choices"][0]["text"] == single["choices"][0]["text"]
                table.add_row(
                    name,
                    f"TP {consumer.tp}",
                    str(via["usage"]["prompt_tokens"]),
                    f"{hits:.0f} (cached {cached_tokens(via)})",
                    "yes" if same else ("NO" if consumer.tp == producer.tp else "no (other TP size, bf16)"),
                    repr(via["choices"][0]["text"][:50]) + "...",
                )
    console.print(table)
    console.print("all processes stopped")


if __name__ == "__main__":
    main()
