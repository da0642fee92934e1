"""Quickstart: vLLM with MemcacheConnectorStoreV1 on a local Mooncake Store, showing pool hits and identical outputs.

Builds a small random-weight Llama locally, starts ``mooncake_master`` and a ``mooncake_client`` pool node on
127.0.0.1, and runs the same prompts (several sharing a long prefix) three times, each in a fresh engine process:
1. without the connector (the reference outputs),
2. with the connector on an empty pool (saves; later prompts already hit what earlier ones saved),
3. with the connector in a new engine process (everything that is a full block comes from the pool).
vLLM's own prefix cache is off in all three, so every cached token in the table was loaded from the pool.

Run: ``python examples/quickstart.py [--workdir .work/quickstart]`` (``bash scripts/demo.sh`` sets up and runs it).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvpool_testkit.engine import EngineRun, EngineSpec, run_engine
from kvpool_testkit.mooncake_pool import mooncake_pool
from kvpool_testkit.tiny_model import build_model


def demo_prompts(seed: int = 7) -> list[list[int]]:
    """Eight prompts: a 1,000-token shared prefix (think: system prompt + document) with different questions,
    plus prompts of their own; lengths are not multiples of the 128-token block."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, 2000) for _ in range(n)]

    shared = tokens(1000)
    return [shared + tokens(n) for n in (40, 90, 150, 333)] + [tokens(n) for n in (700, 129, 60, 1500)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".work/quickstart"))
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    console = Console(width=120)
    workdir = args.workdir.resolve()

    console.print("[bold]1/4[/] building the local random-weight model")
    model = str(build_model(workdir / "tiny-llama", preset="tiny", seed=0))
    prompts = demo_prompts()

    def spec(kv: dict | None) -> EngineSpec:
        return EngineSpec(
            model=model,
            prompts=prompts,
            max_tokens=args.max_tokens,
            kv_transfer_config=kv,
            sequential=True,
            enable_prefix_caching=False,
        )

    console.print("[bold]2/4[/] starting mooncake_master and a mooncake_client pool node on 127.0.0.1")
    with mooncake_pool(workdir / "mooncake", segment_size="1 GB") as pool:
        console.print(f"      master {pool.master_address} (pid {pool.master.pid}), pool node pid {pool.node.pid}")
        kv = {
            "kv_connector": "MemcacheConnectorStoreV1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"backend": "mooncake", "mooncake": pool.client_config()},
        }
        console.print("[bold]3/4[/] running three fresh engine processes (about a minute each)")
        runs: list[tuple[str, EngineRun]] = []
        for label, config in [("no connector", None), ("pool, first engine", kv), ("pool, fresh engine", kv)]:
            runs.append((label, run_engine(spec(config), workdir / "engines")))
            console.print(f"      {label}: done in {runs[-1][1].wall_s:.0f} s")
    console.print("[bold]4/4[/] mooncake_master and pool node stopped")

    reference = runs[0][1].outputs
    table = Table(title="MemcacheConnectorStoreV1 on Mooncake Store (vLLM CPU, prefix cache off)")
    for column in ("run", "prompts", "prompt tokens", "tokens from pool", "prefill time", "outputs = no-connector"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for label, run in runs:
        total = sum(r.prompt_tokens for r in run.results)
        hits = sum(r.num_cached_tokens for r in run.results)
        prefill = sum(r.ttft_s for r in run.results)
        same = sum(o == ref for o, ref in zip(run.outputs, reference, strict=True))
        table.add_row(
            label,
            str(len(run.results)),
            str(total),
            f"{hits} ({hits / total:.0%})",
            f"{prefill * 1e3:.0f} ms",
            f"{same}/{len(reference)}",
        )
    console.print(table)
    identical = all(run.outputs == reference for _, run in runs)
    console.print("outputs identical with and without pool hits:", "[green]yes[/]" if identical else "[red]NO[/]")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
