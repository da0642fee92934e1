"""Multi-turn chat through the pool: what ``save_decode_cache`` buys a conversation's next turn, and what it costs.

Workload: ``--conversations`` chats of ``--turns`` turns on the ``bench`` model (random-weight Llama, 16 KiB of fp32
KV per token). Turn 1's prompt is ``--first`` tokens; every answer is ``--answer`` greedy tokens; turn k+1's prompt is
turn k's prompt + its answer + a ``--question``-token follow-up. All conversations of a turn arrive together.

Three ways to serve them, each with a pool of its own:
1. ``prompt blocks`` (the default connector): every turn in a fresh engine, as if another instance served it; the
   pool holds prompt blocks only, so turn k+1 recomputes turn k's answer;
2. ``decode cache`` (``save_decode_cache: true``): the same, with the answers' full blocks saved as they fill;
3. ``vLLM prefix cache``: no connector, all turns in one engine: the best a single instance can do (vLLM keeps its
   decode blocks).

Per turn: prompt tokens, tokens not computed (the pool's, or vLLM's own in 3), median and p90 TTFT. Per mode: blocks
and bytes saved, save bandwidth, pool objects and bytes at the end. Outputs must agree across modes (checked).

Run: ``python benchmarks/bench_multiturn.py [--conversations 16] [--turns 4] [--first 600] [--answer 128]
[--question 100] [--preset bench|tiny] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import plots
from rich.console import Console
from rich.table import Table

from kvpool_testkit.engine import EngineRun, EngineSpec, engine_env, run_engine
from kvpool_testkit.mooncake_pool import mooncake_pool
from kvpool_testkit.tiny_model import PRESETS, build_model

MODES = ("prompt blocks", "decode cache", "vLLM prefix cache")


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _turn_stats(results: list, prompts: list[list[int]]) -> dict:
    ttfts = sorted(r.ttft_s * 1e3 for r in results)
    return {
        "prompt_tokens": sum(len(p) for p in prompts),
        "cached_tokens": sum(r.num_cached_tokens for r in results),
        "ttft_ms_median": round(statistics.median(ttfts), 1),
        "ttft_ms_p90": round(ttfts[int(0.9 * (len(ttfts) - 1))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--first", type=int, default=600, help="tokens of turn 1's prompt")
    parser.add_argument("--answer", type=int, default=128, help="tokens of every answer")
    parser.add_argument("--question", type=int, default=100, help="tokens of every follow-up")
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=130)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    vocab = PRESETS[args.preset].vocab_size
    firsts = [_tokens(rng, args.first, vocab) for _ in range(args.conversations)]
    questions = [_tokens(rng, args.question, vocab) for _ in range(args.turns - 1)]
    max_len = args.first + args.turns * (args.answer + args.question) + 64

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / f"{args.preset}-llama", preset=args.preset))
        env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "4"})

        def spec(prompts: list[list[int]], kv: dict | None, turns: list[list[int]] | None = None) -> EngineSpec:
            return EngineSpec(
                model=model,
                prompts=prompts,
                max_tokens=args.answer,
                kv_transfer_config=kv,
                max_model_len=max_len,
                turns=turns or [],
            )

        report: dict[str, dict] = {}
        outputs: dict[str, list[list[int]]] = {}
        for mode in MODES[:2]:
            with mooncake_pool(work / mode.replace(" ", "-"), segment_size="8 GB") as pool:
                kv = pool.connector_config(save_decode_cache=mode == "decode cache")
                prompts, turns, saved, answers = firsts, [], {"blocks": 0, "bytes": 0, "seconds": 0.0}, []
                for turn in range(args.turns):
                    if turn:
                        prompts = [p + a + questions[turn - 1] for p, a in zip(prompts, answers, strict=True)]
                    console.print(f"[bold]{mode}[/], turn {turn + 1}: fresh engine, {len(prompts)} prompts ...")
                    run = run_engine(spec(prompts, kv), work / "engines", env=env, timeout_s=3000)
                    answers = run.outputs
                    outputs.setdefault(mode, []).extend(answers)
                    turns.append(_turn_stats(run.results, prompts))
                    for totals in run.worker_totals:
                        saved["blocks"] += int(totals.get("saved_blocks", 0))
                        saved["bytes"] += int(totals.get("saved_bytes", 0))
                        saved["seconds"] += totals.get("save_seconds", 0.0)
                health = pool.health()
            report[mode] = {
                "turns": turns,
                "saved_blocks": saved["blocks"],
                "saved_mib": round(saved["bytes"] / 2**20, 1),
                "save_gb_per_s": round(saved["bytes"] / saved["seconds"] / 1e9, 2) if saved["seconds"] else None,
                "pool_objects": int(health["objects"]),
                "pool_mib": round(float(health["used_bytes"]) / 2**20, 1),
            }
        console.print(f"[bold]{MODES[2]}[/]: one engine, every turn ...")
        run: EngineRun = run_engine(spec(firsts, None, questions), work / "engines", env=env, timeout_s=3000)
        n = args.conversations
        prompts, turns = firsts, []
        for turn in range(args.turns):
            results = run.results[turn * n : (turn + 1) * n]
            if turn:
                prompts = [p + a + questions[turn - 1] for p, a in zip(prompts, answers, strict=True)]
            answers = [r.token_ids for r in results]
            turns.append(_turn_stats(results, prompts))
        outputs[MODES[2]] = run.outputs
        report[MODES[2]] = {"turns": turns}

    agree = all(outputs[m] == outputs[MODES[0]] for m in MODES)
    table = Table(title=f"{args.conversations} conversations x {args.turns} turns ({args.preset} model)")
    table.add_column("turn")
    for mode in MODES:
        table.add_column(f"{mode}: not computed / prompt", justify="right")
        table.add_column("TTFT ms p50 / p90", justify="right")
    for turn in range(args.turns):
        row = [str(turn + 1)]
        for mode in MODES:
            t = report[mode]["turns"][turn]
            row += [f"{t['cached_tokens']} / {t['prompt_tokens']}", f"{t['ttft_ms_median']} / {t['ttft_ms_p90']}"]
        table.add_row(*row)
    console.print(table)
    for mode in MODES[:2]:
        r = report[mode]
        console.print(
            f"{mode}: saved {r['saved_blocks']} blocks ({r['saved_mib']} MiB) at {r['save_gb_per_s']} GB/s; "
            f"pool at the end: {r['pool_objects']} objects, {r['pool_mib']} MiB"
        )
    console.print(f"outputs agree across modes: {agree}")
    out = args.out / "bench_multiturn.json"
    out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "modes": report, "agree": agree}, indent=2))
    title = (
        f"Multi-turn chats: each turn in a fresh engine (pool) or one engine\n"
        f"{args.preset} Llama, fp32, {args.conversations} chats x {args.turns} turns; {plots.run_label()}"
    )
    plots.multiturn(report, title, args.out / "bench_multiturn.png")
    console.print(f"written: {out} and {args.out / 'bench_multiturn.png'}")


if __name__ == "__main__":
    main()
