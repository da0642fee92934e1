"""A pool at capacity for as long as you like: steady lookups and saves against a pool many times too small.

One OpenAI server (our connector over TCP, vLLM's own prefix cache off so every cached token is the pool's) on a
Mooncake pool node of ``--pool-mb``; ``--concurrency`` clients send, for ``--minutes``, an even mix of
- hot requests: one of ``--hot`` fixed prompts (together about half the pool), each seen again every few seconds;
- cold requests: a new prompt each time, whose saves fill the pool over and over.
Per window of ``--window-s``: requests, the hot requests' pool hit rate (cached / full-block prompt tokens), blocks
saved and refused (by reason), the pool's objects and bytes (its master's metrics), and the resident memory of the
server's processes and of the pool node. Healthy is: saves keep landing window after window (the pool evicts cold
objects), refusals stay a small share, the hot hit rate stays level, memory stays flat.

Run: ``python benchmarks/soak_capacity.py [--minutes 10] [--pool-mb 256] [--preset bench|tiny]
[--save-admission all|second_sight] [--disk-size 2GB] [--out benchmarks/results]`` -> a table,
``soak_capacity.json`` and ``soak_capacity.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
import plots
import psutil
from rich.console import Console
from rich.table import Table

from kvpool_connector.backends.mooncake_service import DiskTier
from kvpool_testkit.client import server_metrics
from kvpool_testkit.engine import engine_env
from kvpool_testkit.mooncake_pool import mooncake_pool
from kvpool_testkit.server import vllm_server
from kvpool_testkit.tiny_model import PRESETS, build_model

BLOCK = 128
SERVER_ARGS = ["--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--max-model-len", "4096"]
REFUSED = ("pool_full", "failed", "unavailable")  # save_failed reasons


def _rss_mib(proc: psutil.Process) -> float:
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


class Traffic:
    """``concurrency`` threads alternating hot and cold requests until stopped; each answer recorded by window."""

    def __init__(self, url: str, model: str, args: argparse.Namespace, vocab: int) -> None:
        self.url, self.model, self.args, self.vocab = url, model, args, vocab
        rng = random.Random(7)
        self.hot = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.hot)]
        self.cold_seeds = itertools.count(1000)
        self.lock = threading.Lock()
        self.window: dict[str, float] = {}
        self.stop = threading.Event()
        self.errors: list[str] = []

    def _cold(self) -> list[int]:
        with self.lock:
            rng = random.Random(next(self.cold_seeds))
        return [rng.randrange(3, self.vocab) for _ in range(self.args.prompt_tokens)]

    def _note(self, **counts: float) -> None:
        with self.lock:
            for name, value in counts.items():
                self.window[name] = self.window.get(name, 0) + value

    def take(self) -> dict[str, float]:
        with self.lock:
            window, self.window = self.window, {}
        return window

    def run(self, worker: int) -> None:
        turn = itertools.cycle([True, False])
        hot_order = itertools.cycle(range(worker, worker + self.args.hot))
        with httpx.Client(timeout=600) as http:
            while not self.stop.is_set():
                hot = next(turn)
                prompt = self.hot[next(hot_order) % self.args.hot] if hot else self._cold()
                body = {"model": self.model, "prompt": prompt, "max_tokens": self.args.output_tokens, "temperature": 0}
                try:
                    answer = http.post(f"{self.url}/v1/completions", json=body)
                    answer.raise_for_status()
                except httpx.HTTPError as exc:
                    self._note(errors=1)
                    self.errors.append(repr(exc))
                    continue
                details = answer.json()["usage"].get("prompt_tokens_details") or {}
                kind = "hot" if hot else "cold"
                self._note(
                    requests=1,
                    **{
                        f"{kind}_requests": 1,
                        f"{kind}_full_tokens": len(prompt) // BLOCK * BLOCK,
                        f"{kind}_cached_tokens": details.get("cached_tokens") or 0,
                    },
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--pool-mb", type=int, default=256, help="the pool node's DRAM")
    parser.add_argument("--hot", type=int, default=8, help="prompts asked again and again")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"], help="tiny: check the soak runs")
    parser.add_argument(
        "--save-admission", default="all", choices=["all", "second_sight"], help="the connector's save_admission"
    )
    parser.add_argument("--disk-size", help="a disk tier of this size under the node's DRAM (kvpool-pool --disk-size)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=160)
    args.out.mkdir(parents=True, exist_ok=True)
    windows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / args.preset, preset=args.preset))
        disk = DiskTier.plan(work / "disk", args.disk_size, f"{args.pool_mb} MB") if args.disk_size else None
        with mooncake_pool(work / "pool", segment_size=f"{args.pool_mb} MB", disk=disk) as pool:
            env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "2"})
            config = pool.connector_config(load_async="auto", save_admission=args.save_admission)
            with vllm_server(model, work / "server", config, SERVER_ARGS, env=env) as server:
                traffic = Traffic(server.url, model, args, PRESETS[args.preset].vocab_size)
                threads = [
                    threading.Thread(target=traffic.run, args=(i,), daemon=True) for i in range(args.concurrency)
                ]
                for thread in threads:
                    thread.start()
                start = time.monotonic()
                before = server_metrics(server.url)
                server_proc, node_proc = psutil.Process(server.proc.pid), psutil.Process(pool.node.pid)
                while time.monotonic() - start < args.minutes * 60:
                    time.sleep(args.window_s)
                    after = server_metrics(server.url)
                    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    before = after
                    counts = traffic.take()
                    health = pool.health()
                    master = pool.master_metrics()
                    window = {
                        "minute": round((time.monotonic() - start) / 60, 1),
                        "requests": int(counts.get("requests", 0)),
                        "errors": int(counts.get("errors", 0)),
                        "hot hit %": round(100 * counts.get("hot_cached_tokens", 0) / counts["hot_full_tokens"], 1)
                        if counts.get("hot_full_tokens")
                        else None,
                        "cold hit %": round(100 * counts.get("cold_cached_tokens", 0) / counts["cold_full_tokens"], 1)
                        if counts.get("cold_full_tokens")
                        else None,
                        "saved blocks": int(grew.get("vllm:kvpool_saved_blocks_total", 0)),
                        "refused blocks": int(sum(grew.get(f"vllm:kvpool_save_failed_total[{r}]", 0) for r in REFUSED)),
                        "dropped blocks": int(grew.get("vllm:kvpool_save_dropped_total", 0)),
                        "not admitted blocks": int(grew.get("vllm:kvpool_save_not_admitted_total[first_sight]", 0)),
                        "pool objects": int(health["objects"]),
                        "pool MiB": round(float(health["used_bytes"]) / 2**20, 1),
                        "disk MiB": round(float(health["disk_used_bytes"]) / 2**20, 1),
                        "put refusals (master)": int(master.get("master_put_start_alloc_failures_total", 0)),
                        "server RSS MiB": _rss_mib(server_proc),
                        "pool node RSS MiB": _rss_mib(node_proc),
                    }
                    windows.append(window)
                    console.print(window)
                traffic.stop.set()
                for thread in threads:
                    thread.join(timeout=600)
                capacity_mib = float(pool.health()["capacity_bytes"]) / 2**20
                totals = server_metrics(server.url)
                saved_blocks = totals.get("vllm:kvpool_saved_blocks_total", 0)
                saved_bytes = totals.get("vllm:kvpool_saved_bytes_total", 0)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "pool capacity MiB": capacity_mib,
        "block MiB": round(saved_bytes / saved_blocks / 2**20, 2) if saved_blocks else None,
        "windows": windows,
        "errors": traffic.errors[:20],
    }
    table = Table(
        title=f"Pool at capacity: {args.pool_mb} MB node, {args.minutes} min, {args.preset} model, "
        f"save_admission {args.save_admission}{f', disk tier {args.disk_size}' if args.disk_size else ''}"
    )
    for col in windows[0]:
        table.add_column(col, justify="right")
    for w in windows:
        table.add_row(*("-" if v is None else str(v) for v in w.values()))
    console.print(table)
    (args.out / "soak_capacity.json").write_text(json.dumps(report, indent=2))
    title = (
        f"A pool at capacity: {args.pool_mb} MB pool node, {args.minutes} min, {args.preset} model, "
        f"save_admission {args.save_admission}{f', disk tier {args.disk_size}' if args.disk_size else ''}\n"
        f"{plots.run_label()}"
    )
    plots.capacity_soak(windows, title, args.out / "soak_capacity.png")
    console.print(f"wrote {args.out / 'soak_capacity.json'} and soak_capacity.png")


if __name__ == "__main__":
    main()
