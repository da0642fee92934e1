"""End-to-end TTFT and all-miss throughput on the vLLM CPU engine, every phase in its own fresh engine process.

Model: the ``bench`` preset of ``kvpool_testkit.tiny_model`` (random-weight Llama, hidden 1024, 8 layers,
16 heads / 4 KV heads x 64, fp32: 16 KiB of KV per token), large enough that prefill dominates on a CPU.
Prompts are k*128 + 2 tokens, so a full hit leaves two tokens to compute and TTFT shows the load cost. (Not
k*128 + 1: vLLM's ExampleConnector stores a prompt under its first align(n) tokens but looks it up under align(n - 1),
which differ exactly when n = k*128 + 1, so it would never hit.)

Phases (each a fresh engine; vLLM's own prefix cache stays on, prompts differ unless a phase repeats them):
1. ``recompute`` and ``local prefix hit``: no connector; each prompt twice, the second served by vLLM's own cache;
2. ``pool miss (saving)`` then ``pool hit``: MemcacheConnectorStoreV1 on a local Mooncake Store (objects on a
   ``mooncake_client`` pool node, reached over loopback TCP); the second engine is new, so whatever it does not compute
   came from the pool; then ``pool hit (shared memory)``: another fresh engine attached to the same pool node through
   shared memory (``real_client_address``), its KV cache placed in memory the node maps (one copy per load), and
   ``pool hit (shm, private KV)``: the same with ``kv_cache_in_shared_memory`` false (loads copy through the shared
   load area: two copies);
3. ``ExampleConnector miss`` then ``ExampleConnector hit``: vLLM's reference connector (safetensors files). The
   two closest contenders, ``pool hit (shared memory)`` and ``ExampleConnector hit``, each get ``--hit-engines``
   fresh engines, alternated (shm, Example, shm, Example, ...), so one run shows their spread and who is faster in
   how many engine pairs; the table reports the median over all their prompts;
4. throughput: a batch of distinct prompts, all misses, without the connector, with it (lookups + saves), with it
   as ``kv_consumer`` (lookups only) and with it through shared memory, alternated ``--throughput-reps`` times to show
   the run-to-run spread.

Every phase schedules a whole prompt in one step (``max_num_batched_tokens`` = the longest prompt): ExampleConnector
only stores what the first step of a request computed, so chunked prefill would leave it nothing to hit.

``--model mla``: the ``bench-mla`` DeepSeek-V2 (MLA + MoE, bf16: vLLM's CPU MLA and MoE kernels take no float32)
in four phases: recompute and vLLM's own prefix hit (no connector, each prompt twice; on CPUs without AMX vLLM turns
its prefix cache off for MLA and that column is then a recompute too), pool miss (saving), and fresh-engine pool hits
over loopback TCP and through shared memory. Results in ``bench_ttft_mla.json`` and ``bench_ttft_mla.png``.

Run: ``python benchmarks/bench_ttft.py [--model llama|mla] [--lengths 514 1026 2050 4098] [--reps 4]
[--hit-engines 3] [--out benchmarks/results]``;
``--throughput-reps 0`` measures TTFT only. The JSON lists every prompt's TTFT in run order (``ttft_each_ms``): a hit
engine's first requests show what a fresh engine's first hits cost.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import plots
from rich.console import Console
from rich.table import Table

from kvpool_testkit.engine import EngineRun, EngineSpec, engine_env, run_engine
from kvpool_testkit.mooncake_pool import connector_config, mooncake_pool
from kvpool_testkit.tiny_model import PRESETS, build_model

THROUGHPUT_PHASES = ("no connector", "connector", "connector, lookups only", "connector, shared memory")


def random_prompts(lengths: list[int], reps: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths for _ in range(reps)]


def _cores(run: EngineRun) -> str:
    found = re.findall(r"core ids=\[([0-9, ]+)\]", run.log)
    return ";".join(sorted(set(found))) or "?"


def _by_length(*runs: EngineRun, pick: slice | None = None) -> dict[int, float]:
    """Median TTFT per prompt length over the prompts of ``runs`` (``pick``: a slice of each run's prompts)."""
    out: dict[int, list[float]] = {}
    for r in (r for run in runs for r in (run.results if pick is None else run.results[pick])):
        out.setdefault(r.prompt_tokens, []).append(r.ttft_s)
    return {n: statistics.median(v) for n, v in out.items()}


def _each_ms(run: EngineRun) -> list[tuple[int, float]]:
    return [(r.prompt_tokens, round(r.ttft_s * 1e3, 2)) for r in run.results]


@dataclass
class Engines:
    """Fresh engine processes of one benchmark: every prompt alone in one step (``max_num_batched_tokens`` = the
    longest), one output token; each run announced, and the cores it ran on reported."""

    console: Console
    model: str
    work: Path
    env: dict[str, str]
    max_len: int
    llm_args: dict = field(default_factory=dict)

    def spec(self, kv: dict | None, prompts: list[list[int]], sequential: bool = True) -> EngineSpec:
        return EngineSpec(
            model=self.model,
            prompts=prompts,
            max_tokens=1,
            kv_transfer_config=kv,
            sequential=sequential,
            max_model_len=self.max_len,
            max_num_batched_tokens=self.max_len,
            extra_llm_args=dict(self.llm_args),
        )

    def run(self, label: str, spec: EngineSpec) -> EngineRun:
        self.console.print(f"[bold]{label}[/]: {len(spec.prompts)} prompts ...")
        run = run_engine(spec, self.work / "engines", env=self.env, timeout_s=3000)
        self.console.print(f"  done in {run.wall_s:.0f} s, cores {_cores(run)}")
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[514, 1026, 2050, 4098])
    parser.add_argument("--reps", type=int, default=4, help="distinct prompts per length (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the all-miss throughput batch")
    parser.add_argument("--batch-tokens", type=int, default=2049)
    parser.add_argument(
        "--throughput-reps", type=int, default=2, help="alternated runs of each throughput phase (0: TTFT only)"
    )
    parser.add_argument(
        "--hit-engines", type=int, default=3, help="alternated fresh engines for the shm and ExampleConnector hits"
    )
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--model", default="llama", choices=["llama", "mla"], help="GQA Llama or MLA DeepSeek-V2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.hit_engines < 1:
        parser.error("--hit-engines must be at least 1")
    console = Console(width=130)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "mla":
        _mla(args, console)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / f"{args.preset}-llama", preset=args.preset))
        env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "3"})
        vocab = PRESETS[args.preset].vocab_size
        prompts = random_prompts(args.lengths, args.reps, seed=1, vocab=vocab)
        max_len = max(max(args.lengths), args.batch_tokens) + 64

        bench = Engines(console, model, work, env, max_len)
        spec, engine = bench.spec, bench.run

        runs: dict[str, EngineRun] = {}
        hit_engines: dict[str, list[EngineRun]] = {"pool hit shm": [], "example hit": []}
        twice = [p for p in prompts for _ in range(2)]
        runs["no connector"] = engine("recompute + local prefix hit", spec(None, twice))
        throughput_runs: dict[str, list[EngineRun]] = {name: [] for name in THROUGHPUT_PHASES}
        with mooncake_pool(work / "mooncake", segment_size="4 GB") as pool:
            kv = pool.connector_config()
            runs["pool miss"] = engine("pool miss (saving)", spec(kv, prompts))
            runs["pool hit"] = engine("pool hit (fresh engine)", spec(kv, prompts))
            kv_shm = pool.connector_config(shared_memory=True)
            private = connector_config({**pool.client_config(shared_memory=True), "kv_cache_in_shared_memory": False})
            runs["pool hit shm private"] = engine(
                "pool hit through shared memory, KV cache kept private (fresh engine)", spec(private, prompts)
            )
            example = {
                "kv_connector": "ExampleConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": str(work / "example")},
            }
            runs["example miss"] = engine("ExampleConnector miss", spec(example, prompts))
            for i in range(args.hit_engines):
                of = f"({i + 1}/{args.hit_engines})"
                hit_engines["pool hit shm"].append(
                    engine(f"pool hit through shared memory, fresh engine {of}", spec(kv_shm, prompts))
                )
                hit_engines["example hit"].append(
                    engine(f"ExampleConnector hit, fresh engine {of}", spec(example, prompts))
                )
            configs = {
                "no connector": None,
                "connector": kv,
                "connector, lookups only": pool.connector_config("kv_consumer"),
                "connector, shared memory": kv_shm,
            }
            for rep in range(args.throughput_reps):
                for i, name in enumerate(THROUGHPUT_PHASES):
                    # new prompts for every run: a batch saved by one run must not hit in the next
                    batch = random_prompts([args.batch_tokens], args.batch, seed=100 + 10 * rep + i, vocab=vocab)
                    label = f"all-miss batch, {name} ({rep + 1}/{args.throughput_reps})"
                    throughput_runs[name].append(engine(label, spec(configs[name], batch, sequential=False)))

    ttft = {
        "recompute": _by_length(runs["no connector"], pick=slice(0, None, 2)),
        "local prefix hit": _by_length(runs["no connector"], pick=slice(1, None, 2)),
        "pool hit": _by_length(runs["pool hit"]),
        "pool hit (shared memory)": _by_length(*hit_engines["pool hit shm"]),
        "pool hit (shm, private KV)": _by_length(runs["pool hit shm private"]),
        "ExampleConnector hit": _by_length(*hit_engines["example hit"]),
        "pool miss (saving)": _by_length(runs["pool miss"]),
    }

    def cached_tokens(*phase_runs: EngineRun) -> dict[int, float]:
        return {
            n: statistics.median(r.num_cached_tokens for run in phase_runs for r in run.results if r.prompt_tokens == n)
            for n in args.lengths
        }

    tcp_hits, shm_hits = cached_tokens(runs["pool hit"]), cached_tokens(*hit_engines["pool hit shm"])
    hits = {n: [tcp_hits[n], shm_hits[n]] for n in args.lengths}
    table = Table(
        title=f"TTFT (median of {args.reps} prompts; shm and ExampleConnector hits: of {args.hit_engines} engines x "
        f"{args.reps}), vLLM CPU, {args.preset} model, fresh engine per phase"
    )
    table.add_column("prompt tokens", justify="right")
    for name in ttft:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("pool hit tokens (TCP / shm)", justify="right")
    for n in args.lengths:
        hit_tokens = " / ".join(str(int(h)) for h in hits[n])
        table.add_row(str(n), *(f"{ttft[name][n] * 1e3:.1f}" for name in ttft), hit_tokens)
    console.print(table)

    def prefill_s(run: EngineRun) -> float:
        """Time of the batch's generate() call (max_tokens=1: the prefill of every prompt)."""
        return run.generate_s

    batch_rows = {
        name: {
            "prompts": len(rs[0].results),
            "tokens": sum(r.prompt_tokens for r in rs[0].results),
            "batch prefill s (each run)": [round(prefill_s(r), 2) for r in rs],
            "pool hit tokens": sum(r.num_cached_tokens for run in rs for r in run.results),
            "engine wall s (each run)": [round(r.wall_s, 1) for r in rs],
        }
        for name, rs in throughput_runs.items()
        if rs
    }
    longest = max(args.lengths)
    ratios = {}
    at = {name: ttft[name][longest] for name in ttft}
    for hit in ("pool hit", "pool hit (shared memory)", "pool hit (shm, private KV)"):
        ratios[f"{hit} / local prefix hit @ {longest}"] = at[hit] / at["local prefix hit"]
        ratios[f"recompute / {hit} @ {longest}"] = at["recompute"] / at[hit]
        ratios[f"{hit} / ExampleConnector hit @ {longest}"] = at[hit] / at["ExampleConnector hit"]
    ratios[f"pool miss (saving) / recompute @ {longest}"] = at["pool miss (saving)"] / at["recompute"]
    if batch_rows:
        base = statistics.median(prefill_s(r) for r in throughput_runs["no connector"])
        for name in THROUGHPUT_PHASES[1:]:
            ratios[f"all-miss throughput, {name} / no connector"] = base / statistics.median(
                prefill_s(r) for r in throughput_runs[name]
            )
    # the two closest contenders, engine by engine (alternated fresh engines): who is faster at the longest prompt
    pairs = [
        {
            "pool hit (shm) ms": round(_by_length(shm)[longest] * 1e3, 2),
            "ExampleConnector hit ms": round(_by_length(ex)[longest] * 1e3, 2),
        }
        for shm, ex in zip(hit_engines["pool hit shm"], hit_engines["example hit"], strict=True)
    ]
    faster = sum(p["pool hit (shm) ms"] < p["ExampleConnector hit ms"] for p in pairs)
    console.print(f"engine pairs @ {longest} tokens (shm vs ExampleConnector): {pairs}")
    console.print(f"pool hit (shm) faster than ExampleConnector in [bold]{faster} of {len(pairs)}[/] engine pairs")
    for name, row in batch_rows.items():
        console.print(f"{name}: {row}")
    for name, value in ratios.items():
        console.print(f"{name}: [bold]{value:.2f}x[/]")
    outputs_same = all(
        run.outputs == runs["pool miss"].outputs
        for run in (runs["pool hit"], runs["pool hit shm private"], *hit_engines["pool hit shm"])
    )
    console.print("first tokens identical between pool miss and every pool hit:", outputs_same)
    result = {
        "model": args.preset,
        "lengths": args.lengths,
        "reps": args.reps,
        "cores": {
            **{k: _cores(v) for k, v in runs.items()},
            **{f"{k} {i + 1}": _cores(r) for k, rs in hit_engines.items() for i, r in enumerate(rs)},
        },
        "hit_engines": args.hit_engines,
        "example_hit_tokens": {str(n): v for n, v in cached_tokens(*hit_engines["example hit"]).items()},
        "ttft_ms": {k: {str(n): round(v * 1e3, 2) for n, v in d.items()} for k, d in ttft.items()},
        # every prompt in run order: a hit engine's first requests show what a fresh engine's first hits cost
        "ttft_each_ms": {
            "pool hit": _each_ms(runs["pool hit"]),
            **{phase: [_each_ms(run) for run in phase_runs] for phase, phase_runs in hit_engines.items()},
        },
        "engine_pairs_at_longest": pairs,
        "shm_faster_than_example_pairs": f"{faster} of {len(pairs)}",
        "pool_hit_tokens": {str(n): hits[n] for n in args.lengths},
        "throughput": batch_rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "first_tokens_identical": outputs_same,
    }
    (args.out / "bench_ttft.json").write_text(json.dumps(result, indent=2))
    plots.ttft_by_length(
        result["ttft_ms"],
        f"TTFT by prompt length (from the engine's queue), each phase a fresh engine\n"
        f"{args.preset} Llama, fp32; {plots.run_label()}",
        args.out / "bench_ttft.png",
    )
    console.print(f"results: {args.out / 'bench_ttft.json'}, plot: {args.out / 'bench_ttft.png'}")


def _mla(args: argparse.Namespace, console: Console) -> None:
    """Pool hit vs recompute (and vLLM's own prefix hit) for the MLA + MoE model; see the module docstring."""
    preset = f"{args.preset}-mla"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / preset, preset=preset))
        env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "3"})
        prompts = random_prompts(args.lengths, args.reps, seed=1, vocab=PRESETS[preset].vocab_size)
        max_len = max(args.lengths) + 64

        bench = Engines(console, model, work, env, max_len, {"dtype": "bfloat16"})

        def engine(label: str, kv: dict | None, ps: list[list[int]]) -> EngineRun:
            return bench.run(label, bench.spec(kv, ps))

        runs = {"no connector": engine("recompute + local prefix hit", None, [p for p in prompts for _ in range(2)])}
        with mooncake_pool(work / "mooncake", segment_size="4 GB") as pool:
            runs["pool miss"] = engine("pool miss (saving)", pool.connector_config(), prompts)
            runs["pool hit"] = engine("pool hit (fresh engine)", pool.connector_config(), prompts)
            kv_shm = pool.connector_config(shared_memory=True)
            runs["pool hit shm"] = engine("pool hit through shared memory (fresh engine)", kv_shm, prompts)
    ttft = {
        "recompute": _by_length(runs["no connector"], pick=slice(0, None, 2)),
        "local prefix hit": _by_length(runs["no connector"], pick=slice(1, None, 2)),
        "pool miss (saving)": _by_length(runs["pool miss"]),
        "pool hit": _by_length(runs["pool hit"]),
        "pool hit (shared memory)": _by_length(runs["pool hit shm"]),
    }
    local_hits = runs["no connector"].results[1::2]
    table = Table(title=f"TTFT, MLA + MoE ({preset}, bf16), median of {args.reps} prompts, fresh engine per phase")
    table.add_column("prompt tokens", justify="right")
    for name in ttft:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("hit tokens (local / pool TCP / pool shm)", justify="right")
    hit_tokens = {}
    for n in args.lengths:
        hit_tokens[n] = [
            statistics.median(r.num_cached_tokens for r in results if r.prompt_tokens == n)
            for results in (local_hits, runs["pool hit"].results, runs["pool hit shm"].results)
        ]
        table.add_row(str(n), *(f"{ttft[k][n] * 1e3:.1f}" for k in ttft), " / ".join(f"{h:.0f}" for h in hit_tokens[n]))
    console.print(table)
    longest = max(args.lengths)
    ratios = {
        f"recompute / pool hit @ {longest}": ttft["recompute"][longest] / ttft["pool hit"][longest],
        f"recompute / pool hit (shared memory) @ {longest}": ttft["recompute"][longest]
        / ttft["pool hit (shared memory)"][longest],
        f"pool hit (shared memory) / local prefix hit @ {longest}": ttft["pool hit (shared memory)"][longest]
        / ttft["local prefix hit"][longest],
    }
    for name, value in ratios.items():
        console.print(f"{name}: [bold]{value:.2f}x[/]")
    result = {
        "model": preset,
        "lengths": args.lengths,
        "reps": args.reps,
        "cores": {k: _cores(v) for k, v in runs.items()},
        "ttft_ms": {k: {str(n): round(v * 1e3, 2) for n, v in d.items()} for k, d in ttft.items()},
        "hit_tokens_local_tcp_shm": {str(n): v for n, v in hit_tokens.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    (args.out / "bench_ttft_mla.json").write_text(json.dumps(result, indent=2))
    plots.ttft_by_length(
        result["ttft_ms"],
        f"TTFT by prompt length (from the engine's queue), MLA + MoE\n{preset} DeepSeek-V2, bf16; {plots.run_label()}",
        args.out / "bench_ttft_mla.png",
    )
    console.print(f"results: {args.out / 'bench_ttft_mla.json'}, plot: {args.out / 'bench_ttft_mla.png'}")


if __name__ == "__main__":
    main()
