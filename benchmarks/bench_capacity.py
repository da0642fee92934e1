"""Hit rate beyond DRAM: the pool's tiers and save admission on traffic whose working set is many times the DRAM.

Three parts (``--parts``):

``traffic``: one OpenAI server (``--servers 2``: two behind ``kvpool-proxy``, round robin), vLLM's own prefix cache
off so every cached token is the pool's; one fixed request sequence for every row: ``--prefixes`` shared prefixes of
1-4k tokens (whole blocks) asked with Zipf-like popularity (``--zipf``), each with a new 16-64-token suffix, and a
share ``--one-off`` of prompts never seen again. The working set is the distinct prefixes' blocks; the pool node's
DRAM is that divided by each of ``--ratios`` (1x, 4x, 16x), and, as the ceiling, larger than everything the traffic
saves (``unbounded``). Per DRAM size, each setup of ``--setups``: our connector saving everything or admitting by
``second_sight``, with or without the disk tier (``kvpool-pool --disk-dir``), and vLLM's MooncakeStoreConnector on
the same pool with and without it. Per row: the prefix requests' hit rate (cached / full-block prompt tokens, whole
run and second half), TTFT p50/p99 (one output token, at the client), requests/s, blocks saved / not admitted /
dropped / refused (ours), the reads the master served from DRAM and from disk, DRAM and disk used.

``disk-hit``: the ``bench`` model, one server, a pool with a disk tier: each of ``--disk-hit-prompts`` 4,098-token
prompts computed (recompute), asked again (a DRAM hit over TCP), then pushed to disk by filler objects and asked a
third time (a disk hit; the master's disk-read counter must move).

``save-cost``: a stream of new prompts (every block a miss and a save) into a pool whose DRAM and disk tier are both
full, against the same stream with no connector, alternated twice: the requests/s the saving costs.

Run: ``python benchmarks/bench_capacity.py [--parts traffic disk-hit save-cost] [--ratios 1 4 16]
[--requests 320] [--out benchmarks/results]`` -> tables, ``bench_capacity.json`` and ``capacity_hit_rate.png``.
``--preset tiny --requests 12 --ratios 4`` checks it runs in a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import plots
import psutil
from common import start_router
from rich.console import Console
from rich.table import Table

from kvpool_connector.backends.mooncake_service import DiskTier
from kvpool_testkit.client import server_metrics, wait_for
from kvpool_testkit.engine import engine_env
from kvpool_testkit.inspection import prompt_block_keys, worker_shard
from kvpool_testkit.mooncake_pool import PoolOnFreePorts, mooncake_pool, plain_client, vllm_store_connector
from kvpool_testkit.server import Server, start_vllm_server, stop_server, wait_healthy
from kvpool_testkit.tiny_model import PRESETS, build_model

BLOCK = 128
MIN_DRAM_MB = 64  # the least a node with a disk tier takes (DiskTier.plan)
SERVER_ARGS = ["--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--max-model-len", "4608"]


@dataclass(frozen=True)
class Setup:
    connector: str  # "ours" or "vllm" (MooncakeStoreConnector)
    admission: str  # ours: save_admission; vllm: "-"
    disk: bool


SETUPS = {
    "DRAM only": Setup("ours", "all", False),
    "admission": Setup("ours", "second_sight", False),
    "disk tier": Setup("ours", "all", True),
    "admission + disk tier": Setup("ours", "second_sight", True),
    "vLLM MooncakeStoreConnector": Setup("vllm", "-", False),
    "vLLM MooncakeStoreConnector + disk tier": Setup("vllm", "-", True),
}


@dataclass(frozen=True)
class Request:
    kind: str  # "prefix" or "one-off"
    tokens: list[int]
    full_tokens: int  # prompt tokens in whole blocks: what a hit can serve


def make_traffic(args: argparse.Namespace, vocab: int) -> tuple[list[Request], int, int]:
    """The request sequence every row replays; the working set (distinct requested prefixes) and all saved blocks."""
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    prefixes = [tokens(BLOCK * rng.randint(args.min_blocks, args.max_blocks)) for _ in range(args.prefixes)]
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.prefixes)]
    requests, asked, one_off_blocks = [], set(), 0
    for _ in range(args.requests):
        suffix = tokens(rng.randint(16, 64))
        if rng.random() < args.one_off:
            body = tokens(BLOCK * rng.randint(args.min_blocks, args.max_blocks))
            requests.append(Request("one-off", body + suffix, len(body)))
            one_off_blocks += len(body) // BLOCK
        else:
            i = rng.choices(range(args.prefixes), weights)[0]
            asked.add(i)
            requests.append(Request("prefix", prefixes[i] + suffix, len(prefixes[i])))
    working_set = sum(len(prefixes[i]) // BLOCK for i in asked)
    return requests, working_set, working_set + one_off_blocks


def replay(url: str, model: str, requests: list[Request], concurrency: int) -> list[dict]:
    """Send ``requests`` in order to ``url`` from ``concurrency`` threads;
    each answer's cached tokens and latency (one output token: the time to first token, at the client)."""
    results: list[dict] = [{} for _ in requests]
    order = iter(range(len(requests)))
    lock = threading.Lock()

    def work() -> None:
        with httpx.Client(timeout=900) as http:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                body = {"model": model, "prompt": requests[i].tokens, "max_tokens": 1, "temperature": 0}
                start = time.perf_counter()
                answer = http.post(f"{url}/v1/completions", json=body)
                answer.raise_for_status()
                details = answer.json()["usage"].get("prompt_tokens_details") or {}
                results[i] = {"ttft_s": time.perf_counter() - start, "cached": details.get("cached_tokens") or 0}

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _hit_pct(requests: list[Request], results: list[dict], kind: str | None = "prefix") -> float:
    pairs = [(q, r) for q, r in zip(requests, results, strict=True) if kind is None or q.kind == kind]
    full = sum(q.full_tokens for q, _ in pairs)
    return round(100 * sum(min(r["cached"], q.full_tokens) for q, r in pairs) / full, 1) if full else 0.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Fleet:
    url: str  # where requests go: the server, or the router in front of several
    servers: list[Server]


def _start_servers(
    setup: Setup | None, model: str, pool: PoolOnFreePorts, work: Path, args: argparse.Namespace, stack: ExitStack
) -> Fleet:
    """``args.servers`` servers for ``setup`` (None: no connector) on ``pool``, behind the router if several."""
    servers: list[Server] = []
    for n in range(args.servers):
        extra_env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
        if args.servers > 1:
            extra_env["VLLM_CPU_OMP_THREADS_BIND"] = str(n % (os.cpu_count() or 1))
        if setup is None:
            kv = None
        elif setup.connector == "vllm":
            kv, store_env = vllm_store_connector(pool, work / f"server-{n}")
            extra_env |= store_env
        else:
            kv = pool.connector_config(load_async="auto", save_admission=setup.admission)
        server = start_vllm_server(model, work / f"server-{n}", kv, SERVER_ARGS, env=engine_env(extra_env))
        stack.callback(stop_server, server)
        servers.append(server)
    for server in servers:
        wait_healthy(server, 600)
    if len(servers) == 1:
        return Fleet(servers[0].url, servers)
    return Fleet(start_router([s.url for s in servers], work, stack), servers)


def _server_counters(fleet: Fleet) -> dict[str, float]:
    totals: dict[str, float] = {}
    for server in fleet.servers:
        for name, value in server_metrics(server.url).items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def traffic_row(
    name: str, dram_mb: int, ratio: str, model: str, traffic: list[Request], work: Path, args: argparse.Namespace
) -> dict:
    setup = SETUPS[name]
    disk = DiskTier.plan(work / "disk", args.disk_size, f"{dram_mb} MB") if setup.disk else None
    with ExitStack() as stack:
        pool = stack.enter_context(mooncake_pool(work / "pool", segment_size=f"{dram_mb} MB", disk=disk))
        fleet = _start_servers(setup, model, pool, work, args, stack)
        start = time.monotonic()
        results = replay(fleet.url, model, traffic, args.concurrency)
        elapsed = time.monotonic() - start
        counters = _server_counters(fleet)
        health = pool.health()
    half = len(traffic) // 2
    ttfts = [r["ttft_s"] * 1000 for r in results]

    def ours(metric: str) -> int | str:
        return int(counters.get(f"vllm:kvpool_{metric}", 0)) if setup.connector == "ours" else "-"

    return {
        "working set / DRAM": ratio,
        "setup": name,
        "DRAM MB": dram_mb,
        "prefix hit %": _hit_pct(traffic, results),
        "prefix hit %, 2nd half": _hit_pct(traffic[half:], results[half:]),
        "all hit %": _hit_pct(traffic, results, None),
        "TTFT p50 ms": round(statistics.median(ttfts), 1),
        "TTFT p99 ms": round(_percentile(ttfts, 0.99), 1),
        "req/s": round(len(traffic) / elapsed, 3),
        "saved": ours("saved_blocks_total"),
        "not admitted": ours("save_not_admitted_total[first_sight]"),
        "dropped": ours("save_dropped_total"),
        "refused": ours("save_failed_total[pool_full]"),
        "DRAM reads": int(health["dram_hits"]),
        "disk reads": int(health["disk_hits"]),
        "DRAM MiB used": round(float(health["used_bytes"]) / 2**20),
        "disk MiB used": round(float(health["disk_used_bytes"]) / 2**20),
    }


def run_traffic(work: Path, args: argparse.Namespace, console: Console) -> dict:
    model = str(build_model(work / args.preset, preset=args.preset))
    traffic, working_set_blocks, saved_blocks = make_traffic(args, PRESETS[args.preset].vocab_size)
    block_mib = _block_mib(args.preset)
    working_set_mb = round(working_set_blocks * block_mib)
    console.print(
        f"{len(traffic)} requests, working set {working_set_blocks} blocks ({working_set_mb} MiB), "
        f"{saved_blocks} distinct blocks in all"
    )
    drams = {r: max(MIN_DRAM_MB, round(working_set_mb / r)) for r in args.ratios if r > 1}
    # labelled by the ratio run: a DRAM held at the disk tier's least is a smaller ratio than asked for
    sizes = [(f"{round(working_set_mb / mb)}x", mb, args.setups) for mb in drams.values()]
    if 1 in args.ratios:  # the working set fits the DRAM: a disk tier has nothing to hold
        sizes.insert(0, ("1x", max(MIN_DRAM_MB, working_set_mb), [n for n in args.setups if not SETUPS[n].disk]))
    ceiling = max(MIN_DRAM_MB, round(1.25 * saved_blocks * block_mib))  # DRAM for every block the traffic saves
    sizes.append(("unbounded", ceiling, [n for n in ("DRAM only", "admission") if n in args.setups]))
    rows = []
    for ratio, dram_mb, setups in sizes:
        for name in setups:
            console.print(f"[bold]{ratio}[/] ({dram_mb} MB DRAM): {name} ...")
            row = traffic_row(name, dram_mb, ratio, model, traffic, work / f"{ratio}-{name}".replace(" ", "_"), args)
            console.print(row)
            rows.append(row)
    return {"working set MiB": working_set_mb, "requests": len(traffic), "rows": rows}


def _block_mib(preset: str) -> float:
    spec = PRESETS[preset]
    head_dim = spec.hidden_size // spec.num_attention_heads
    return spec.num_hidden_layers * 2 * spec.num_key_value_heads * head_dim * 4 * BLOCK / 2**20  # fp32


def _ask(url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    answer = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0},
        timeout=900,
    )
    answer.raise_for_status()
    details = answer.json()["usage"].get("prompt_tokens_details") or {}
    return (time.perf_counter() - start) * 1000, details.get("cached_tokens") or 0


def run_disk_hit(work: Path, args: argparse.Namespace, console: Console) -> dict:
    """Recompute, DRAM hit over TCP and disk hit of the same 4,098-token prompts on one server."""
    model = str(build_model(work / "bench", preset="bench"))
    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(3, 8192) for _ in range(4098)] for _ in range(args.disk_hit_prompts)]
    dram = "256 MB"
    rows = []
    with ExitStack() as stack:
        pool = stack.enter_context(mooncake_pool(work / "pool", dram, disk=DiskTier.plan(work / "disk", "4 GB", dram)))
        env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "2"})
        server = start_vllm_server(model, work / "server", pool.connector_config(), SERVER_ARGS, env=env)
        stack.callback(stop_server, server)
        wait_healthy(server, 600)
        url, shard = server.url, worker_shard(server.log_text())
        store = stack.enter_context(plain_client(pool))
        recompute, dram_hit = [], []
        for prompt in prompts:  # each computed and saved (3 x 64 MiB fit the 256 MB node), then a DRAM hit
            recompute.append(_ask(url, model, prompt))
            keys = prompt_block_keys(shard, prompt)  # the server's counters move only with its steps: ask the pool
            wait_for(lambda keys=keys: all(store.is_exist(k) == 1 for k in keys), 60, "the prompt's saves")
            dram_hit.append(_ask(url, model, prompt))
        filler = bytes(2 << 20)
        for i in range(192):  # 384 MB through the 256 MB node: every earlier object is evicted to disk
            wait_for(lambda key=f"filler/{i}": store.put(key, filler) == 0, 120, f"the pool to take filler {i}")
        for n, prompt in enumerate(prompts):
            disk_reads = pool.health()["disk_hits"]
            disk_hit, disk_cached = _ask(url, model, prompt)
            row = {
                "prompt": n,
                "recompute ms": round(recompute[n][0], 1),
                "DRAM hit ms": round(dram_hit[n][0], 1),
                "disk hit ms": round(disk_hit, 1),
                "cached tokens (DRAM, disk)": f"{dram_hit[n][1]}, {disk_cached}",
                "objects read from disk": int(pool.health()["disk_hits"] - disk_reads),
            }
            console.print(row)
            rows.append(row)
    median = {k: statistics.median(r[k] for r in rows) for k in ("recompute ms", "DRAM hit ms", "disk hit ms")}
    return {
        "rows": rows,
        "median": median,
        "recompute / disk hit": round(median["recompute ms"] / median["disk hit ms"], 1),
        "disk hit / DRAM hit": round(median["disk hit ms"] / median["DRAM hit ms"], 2),
    }


def _one_server(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "servers": 1})


SAVE_COST_MODES = {  # mode: (pool DRAM, disk tier, the connector saving)
    "no connector": ("64 MB", False, False),
    "saving, room in DRAM": ("2 GB", False, True),
    "saving into a full pool": ("64 MB", True, True),
}


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = p.cpu_times()
                total += times.user + times.system
    return total


def run_save_cost(work: Path, args: argparse.Namespace, console: Console) -> dict:
    """Requests/s of all-miss traffic with no connector, with ours saving into a pool with room, and with ours saving
    into a pool whose DRAM and disk tier are full; the CPU seconds the server and the pool spent meanwhile (they
    share this host's cores)."""
    model = str(build_model(work / args.preset, preset=args.preset))
    vocab = PRESETS[args.preset].vocab_size
    rows = []
    for rep in range(2):
        for mode, (dram, with_disk, saving) in SAVE_COST_MODES.items():
            rng = random.Random(args.seed + 100 + rep)
            prompts = [
                Request("one-off", [rng.randrange(3, vocab) for _ in range(BLOCK * 16 + 32)], BLOCK * 16)
                for _ in range(args.save_cost_requests)
            ]
            name = f"{rep}-{mode}".replace(" ", "_").replace(",", "")
            with ExitStack() as stack:
                disk = DiskTier.plan(work / f"disk-{name}", "128 MB", dram) if with_disk else None
                pool = stack.enter_context(mooncake_pool(work / f"pool-{name}", dram, disk=disk))
                setup = Setup("ours", "all", False) if saving else None
                fleet = _start_servers(setup, model, pool, work / f"save-{name}", _one_server(args), stack)
                # fill DRAM and disk first (with the tier: 256 blocks through a 64 MB node and a 128 MB tier)
                replay(fleet.url, model, prompts[: args.save_cost_fill], args.concurrency)
                server = psutil.Process(fleet.servers[0].proc.pid)
                pool_procs = [psutil.Process(pool.master.pid), psutil.Process(pool.node.pid)]
                cpu_before = (_cpu_s([server]), _cpu_s(pool_procs))
                start = time.monotonic()
                replay(fleet.url, model, prompts[args.save_cost_fill :], args.concurrency)
                elapsed = time.monotonic() - start
                server_cpu, pool_cpu = _cpu_s([server]) - cpu_before[0], _cpu_s(pool_procs) - cpu_before[1]
                counters = _server_counters(fleet)
                health = pool.health()
            row = {
                "run": rep + 1,
                "mode": mode,
                "req/s": round((len(prompts) - args.save_cost_fill) / elapsed, 3),
                "saved": int(counters.get("vllm:kvpool_saved_blocks_total", 0)),
                "dropped": int(counters.get("vllm:kvpool_save_dropped_total", 0)),
                "refused": int(counters.get("vllm:kvpool_save_failed_total[pool_full]", 0)),
                "disk MiB used": round(float(health["disk_used_bytes"]) / 2**20),
                "server CPU s": round(server_cpu, 1),
                "pool CPU s": round(pool_cpu, 1),
                "seconds": round(elapsed, 1),
            }
            console.print(row)
            rows.append(row)
    by_mode = {m: statistics.median(r["req/s"] for r in rows if r["mode"] == m) for m in SAVE_COST_MODES}
    ratios = {m: round(v / by_mode["no connector"], 3) for m, v in by_mode.items()}
    return {"rows": rows, "req/s x no connector": ratios}


def _table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["traffic", "disk-hit", "save-cost"])
    parser.add_argument("--preset", default="capacity", choices=["capacity", "tiny"])
    parser.add_argument("--ratios", type=int, nargs="+", default=[1, 4, 16], help="working set / DRAM")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--servers", type=int, default=1, choices=[1, 2])
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--prefixes", type=int, default=72)
    parser.add_argument("--min-blocks", type=int, default=8, help="a prefix's or one-off's least whole blocks")
    parser.add_argument("--max-blocks", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.0, help="prefix of popularity rank r asked ~ 1 / r^zipf")
    parser.add_argument("--one-off", type=float, default=0.25, help="share of prompts never asked again")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--disk-size", default="4 GB")
    parser.add_argument("--disk-hit-prompts", type=int, default=3, help="at most 3: they share 256 MB")
    parser.add_argument("--save-cost-requests", type=int, default=96)
    parser.add_argument("--save-cost-fill", type=int, default=32, help="requests that fill the pool first")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=200)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "run": plots.run_label()}
    parts = {"traffic": run_traffic, "disk-hit": run_disk_hit, "save-cost": run_save_cost}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            report[part] = parts[part](Path(tmp) / part, args, console)
            (args.out / "bench_capacity.json").write_text(json.dumps(report, indent=2))
    if "traffic" in report:
        console.print(_table("Hit rate beyond DRAM", report["traffic"]["rows"]))
        plots.capacity_hit_rate(
            report["traffic"]["rows"],
            f"Prefix hit rate against working set / DRAM ({report['traffic']['requests']} requests, "
            f"{report['traffic']['working set MiB']} MiB working set)\n{report['run']}",
            args.out / "capacity_hit_rate.png",
        )
    if "disk-hit" in report:
        console.print(_table("A 4,098-token hit from disk", report["disk-hit"]["rows"]))
        console.print({k: v for k, v in report["disk-hit"].items() if k != "rows"})
    if "save-cost" in report:
        console.print(_table("Saving into a full pool", report["save-cost"]["rows"]))
        console.print(f"req/s x no connector: {report['save-cost']['req/s x no connector']}")
    console.print(f"wrote {args.out / 'bench_capacity.json'}")


if __name__ == "__main__":
    main()
