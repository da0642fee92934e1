"""Where a pool hit over TCP spends its time, next to vLLM's own prefix hit and the wire, in one sitting.

One prompt length (default 4,098 tokens of the ``bench`` Llama: 32 full blocks, 64 MiB of KV), ``--reps`` distinct
prompts, each alone in one step, in fresh engines:
1. no connector, each prompt twice: recompute, then vLLM's local prefix hit (``local``);
2. a pool miss that saves every block to a ``mooncake_client`` pool node over loopback TCP;
3. fresh engines hitting the pool in each load mode: ``async`` (the default: the load runs beside the batch and the
   hit waits for the step after it), ``auto`` (on an idle engine: synchronous), ``sync``, and ``sync, lookup inline``
   (the lookup asked inside the step instead of on the lookup thread, answered a step later);
4. the wire: the same bytes loaded through the connector's worker outside vLLM (``bench_store``'s data path at this
   model's page size and block count): ``wire`` = bytes / that load GB/s.

For each mode: TTFT, its excess over ``local``, the transfer the workers timed (``load_seconds`` per prompt), and the
rest (excess - transfer: lookup, the waiting steps, scheduling). Goal (issue 26): TTFT <= 1.2 x (local + wire).

Run: ``python benchmarks/bench_hit_breakdown.py [--tokens 4098] [--reps 4] [--out benchmarks/results]`` (3 minutes on
the 2-core machine, BENCHMARKS.md section 7) -> a table, ``bench_hit_breakdown.json`` and ``bench_hit_breakdown.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import plots
from bench_store import BLOCK, LAYERS, bench_data_path
from bench_ttft import Engines, random_prompts
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from kvpool_testkit.engine import EngineRun, engine_env
from kvpool_testkit.mooncake_pool import mooncake_pool
from kvpool_testkit.tiny_model import PRESETS, build_model

MODES = {
    "async": {"load_async": True},
    "auto": {"load_async": "auto"},
    "sync": {"load_async": False},
    "sync, lookup inline": {"load_async": False, "lookup_async": False},
}
GOAL = 1.2


def _median_ms(run: EngineRun, pick: slice = slice(None)) -> float:
    return statistics.median(r.ttft_s for r in run.results[pick]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4098, help="prompt length (k*128 + 2: a full hit)")
    parser.add_argument("--reps", type=int, default=4, help="distinct prompts (median reported)")
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=130)
    args.out.mkdir(parents=True, exist_ok=True)
    spec_of = PRESETS[args.preset]
    head_dim = spec_of.hidden_size // spec_of.num_attention_heads
    page_kib = spec_of.num_key_value_heads * head_dim * BLOCK * 2 * 4 // 1024  # one layer's fp32 K+V of a block
    wire_page_kib = page_kib * spec_of.num_hidden_layers // LAYERS  # same bytes per object in bench_store
    blocks = args.tokens // BLOCK
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / f"{args.preset}-llama", preset=args.preset))
        env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "3"})
        prompts = random_prompts([args.tokens], args.reps, seed=7, vocab=spec_of.vocab_size)
        bench = Engines(console, model, work, env, args.tokens + 64)
        local = bench.run("recompute + local prefix hit", bench.spec(None, [p for p in prompts for _ in range(2)]))
        runs: dict[str, EngineRun] = {}
        with mooncake_pool(work / "mooncake", segment_size="4 GB") as pool:
            bench.run("pool miss (saving)", bench.spec(pool.connector_config(), prompts))
            for mode, keys in MODES.items():
                kv = pool.connector_config(**keys)
                runs[mode] = bench.run(f"pool hit over TCP, {mode} (fresh engine)", bench.spec(kv, prompts))
            with tqdm(total=2 * args.reps, desc="wire: the same bytes loaded outside vLLM") as bar:
                wire_rows = bench_data_path(pool.client_config(), 2 << 30, [wire_page_kib], [blocks], args.reps, bar)
    wire = next(r for r in wire_rows if r["op"] == "load")
    nbytes = blocks * spec_of.num_hidden_layers * page_kib * 1024
    wire_ms = nbytes / (wire["GB/s"] * 1e9) * 1e3
    local_ms = _median_ms(local, slice(1, None, 2))
    rows = []
    for mode, run in runs.items():
        ttft = _median_ms(run)
        transfer = sum(t.get("load_seconds", 0.0) for t in run.worker_totals) / len(run.worker_totals) / args.reps * 1e3
        assert run.loaded_blocks == blocks * args.reps, f"{mode}: not every block came from the pool"
        rows.append(
            {
                "mode": mode,
                "TTFT ms": round(ttft, 1),
                "over local ms": round(ttft - local_ms, 1),
                "transfer ms": round(transfer, 1),
                "rest ms": round(ttft - local_ms - transfer, 1),
                "x (local + wire)": round(ttft / (local_ms + wire_ms), 2),
            }
        )
    result = {
        "tokens": args.tokens,
        "reps": args.reps,
        "MiB": round(nbytes / 2**20, 1),
        "recompute ms": round(_median_ms(local, slice(0, None, 2)), 1),
        "local prefix hit ms": round(local_ms, 1),
        "wire GB/s": wire["GB/s"],
        "wire ms": round(wire_ms, 1),
        "goal": f"TTFT <= {GOAL} x (local + wire)",
        "modes": rows,
    }
    table = Table(
        title=f"A {result['MiB']} MiB pool hit over TCP, {args.tokens} tokens: local prefix hit {local_ms:.1f} ms, "
        f"wire {wire_ms:.1f} ms ({wire['GB/s']} GB/s)"
    )
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    (args.out / "bench_hit_breakdown.json").write_text(json.dumps(result, indent=2))
    title = (
        f"Where a {result['MiB']} MiB pool hit over TCP spends its time\n"
        f"{args.preset} Llama, fp32, {args.tokens} tokens, median of {args.reps} prompts; {plots.run_label()}"
    )
    plots.hit_breakdown(result, title, args.out / "bench_hit_breakdown.png")


if __name__ == "__main__":
    main()
