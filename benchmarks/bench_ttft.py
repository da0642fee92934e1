"""End-to-end TTFT and all-miss throughput on the vLLM CPU engine, every phase in its own fresh engine process.

Model: the ``bench`` preset of ``kvpool_connector.testing.tiny_model`` (random-weight Llama, hidden 1024, 8 layers,
16 heads / 4 KV heads x 64, fp32: 16 KiB of KV per token), large enough that prefill dominates on a CPU.
Prompts are k*128 + 1 tokens, so a full hit leaves exactly one token to compute and TTFT shows the load cost.

Phases (each a fresh engine; vLLM's own prefix cache stays on, prompts differ unless a phase repeats them):
1. ``recompute`` and ``local prefix hit``: no connector; each prompt twice, the second served by vLLM's own cache;
2. ``pool miss (saving)`` then ``pool hit``: MemcacheConnectorStoreV1 on a local Mooncake Store; the second engine
   is new, so whatever it does not compute came from the pool;
3. ``ExampleConnector miss`` then ``ExampleConnector hit``: vLLM's reference connector (safetensors files);
4. throughput: a batch of distinct prompts, all misses, with and without our connector.

Run: ``python benchmarks/bench_ttft.py [--lengths 513 1025 2049 4097] [--reps 2] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvpool_connector.testing.engine import EngineRun, EngineSpec, engine_env, run_engine
from kvpool_connector.testing.mooncake_pool import mooncake_pool
from kvpool_connector.testing.tiny_model import build_model


def _prompts(lengths: list[int], reps: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 8000) for _ in range(n)] for n in lengths for _ in range(reps)]


def _cores(run: EngineRun) -> str:
    found = re.findall(r"core ids=\[([0-9, ]+)\]", run.log)
    return ";".join(sorted(set(found))) or "?"


def _by_length(run: EngineRun, pick: slice | None = None) -> dict[int, float]:
    results = run.results if pick is None else run.results[pick]
    out: dict[int, list[float]] = {}
    for r in results:
        out.setdefault(r.prompt_tokens, []).append(r.ttft_s)
    return {n: statistics.median(v) for n, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[513, 1025, 2049, 4097])
    parser.add_argument("--reps", type=int, default=2, help="distinct prompts per length (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the all-miss throughput batch")
    parser.add_argument("--batch-tokens", type=int, default=2049)
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=130)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / f"{args.preset}-llama", preset=args.preset))
        env = engine_env(work / "vllm-cache", {"VLLM_CPU_KVCACHE_SPACE": "3"})
        prompts = _prompts(args.lengths, args.reps, seed=1)
        max_len = max(max(args.lengths), args.batch_tokens) + 64

        def spec(kv: dict | None, ps: list[list[int]], sequential: bool = True) -> EngineSpec:
            return EngineSpec(
                model=model,
                prompts=ps,
                max_tokens=1,
                kv_transfer_config=kv,
                sequential=sequential,
                max_model_len=max_len,
            )

        def engine(label: str, s: EngineSpec) -> EngineRun:
            console.print(f"[bold]{label}[/]: {len(s.prompts)} prompts ...")
            run = run_engine(s, work / "engines", env=env, timeout_s=3000)
            console.print(f"  done in {run.wall_s:.0f} s, cores {_cores(run)}")
            return run

        runs: dict[str, EngineRun] = {}
        twice = [p for p in prompts for _ in range(2)]
        runs["no connector"] = engine("recompute + local prefix hit", spec(None, twice))
        with mooncake_pool(work / "mooncake", segment_size="4 GB") as pool:
            kv = {
                "kv_connector": "MemcacheConnectorStoreV1",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"backend": "mooncake", "mooncake": pool.client_config()},
            }
            runs["pool miss"] = engine("pool miss (saving)", spec(kv, prompts))
            runs["pool hit"] = engine("pool hit (fresh engine)", spec(kv, prompts))
            batch = _prompts([args.batch_tokens], args.batch, seed=2)
            runs["throughput, connector"] = engine("all-miss batch, connector", spec(kv, batch, sequential=False))
        example = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(work / "example")},
        }
        runs["example miss"] = engine("ExampleConnector miss", spec(example, prompts))
        runs["example hit"] = engine("ExampleConnector hit (fresh engine)", spec(example, prompts))
        runs["throughput, none"] = engine("all-miss batch, no connector", spec(None, batch, sequential=False))

    ttft = {
        "recompute": _by_length(runs["no connector"], slice(0, None, 2)),
        "local prefix hit": _by_length(runs["no connector"], slice(1, None, 2)),
        "pool hit": _by_length(runs["pool hit"]),
        "ExampleConnector hit": _by_length(runs["example hit"]),
        "pool miss (saving)": _by_length(runs["pool miss"]),
    }
    hits = {
        n: statistics.median(r.num_cached_tokens for r in runs["pool hit"].results if r.prompt_tokens == n)
        for n in args.lengths
    }
    table = Table(title=f"TTFT (median of {args.reps}), vLLM CPU, {args.preset} model, fresh engine per phase")
    table.add_column("prompt tokens", justify="right")
    for name in ttft:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("pool hit tokens", justify="right")
    for n in args.lengths:
        table.add_row(str(n), *(f"{ttft[name][n] * 1e3:.1f}" for name in ttft), str(int(hits[n])))
    console.print(table)

    def tput(run: EngineRun) -> float:
        return sum(r.prompt_tokens for r in run.results) / run.results[-1].ttft_s if run.results else 0.0

    longest = max(args.lengths)
    ratios = {
        f"pool hit / local prefix hit @ {longest}": ttft["pool hit"][longest] / ttft["local prefix hit"][longest],
        f"recompute / pool hit @ {longest}": ttft["recompute"][longest] / ttft["pool hit"][longest],
        f"pool hit / ExampleConnector hit @ {longest}": ttft["pool hit"][longest]
        / ttft["ExampleConnector hit"][longest],
        f"pool miss (saving) / recompute @ {longest}": ttft["pool miss (saving)"][longest] / ttft["recompute"][longest],
        "all-miss batch wall time, no connector / connector": runs["throughput, none"].wall_s
        / runs["throughput, connector"].wall_s,
    }
    batch_rows = {
        name: {
            "prompts": len(runs[name].results),
            "tokens": sum(r.prompt_tokens for r in runs[name].results),
            "engine wall s": round(runs[name].wall_s, 1),
            "prefill tokens/s (last first token)": round(tput(runs[name]), 1),
        }
        for name in ("throughput, none", "throughput, connector")
    }
    for name, row in batch_rows.items():
        console.print(f"{name}: {row}")
    for name, value in ratios.items():
        console.print(f"{name}: [bold]{value:.2f}x[/]")
    outputs_same = runs["pool hit"].outputs == runs["pool miss"].outputs
    console.print("first tokens identical between pool miss and pool hit:", outputs_same)
    result = {
        "model": args.preset,
        "lengths": args.lengths,
        "reps": args.reps,
        "cores": {k: _cores(v) for k, v in runs.items()},
        "ttft_ms": {k: {str(n): round(v * 1e3, 2) for n, v in d.items()} for k, d in ttft.items()},
        "pool_hit_tokens": {str(n): hits[n] for n in args.lengths},
        "throughput": batch_rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "first_tokens_identical": outputs_same,
    }
    (args.out / "bench_ttft.json").write_text(json.dumps(result, indent=2))
    _plot(ttft, args.lengths, args.out / "bench_ttft.png")
    console.print(f"results: {args.out / 'bench_ttft.json'}, plot: {args.out / 'bench_ttft.png'}")


def _plot(ttft: dict[str, dict[int, float]], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in zip(ttft, ("o-", "s-", "^-", "v--", "x:"), strict=False):
        ax.plot(lengths, [ttft[name][n] * 1e3 for n in lengths], style, label=name)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="prompt tokens",
        ylabel="TTFT ms",
        title="TTFT on vLLM CPU: recompute vs cache hits",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
