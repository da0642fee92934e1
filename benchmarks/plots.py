"""The benchmarks' figures: one drawing function per figure, shared by the benchmark that measures its data and by
``figures.py``, which draws the committed figures in ``docs/figures/`` from the measured numbers in
``benchmarks/measured.json``.

Each function takes the data in the shape its benchmark writes to its JSON, a title (what, model, hardware, date)
and the PNG's path. ``run_label()`` is the "machine, date, commit" part of a title for a run made now.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

DPI = 110
# the benchmarks' JSON names, spelled out where a figure's reader needs more
LABELS = {
    "local prefix hit": "vLLM's own prefix cache hit",
    "pool hit": "pool hit (over TCP)",
    "pool hit (shm, private KV)": "pool hit (shared memory, KV cache private: two copies)",
    "pool miss (saving)": "pool miss (computes and saves)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_label() -> str:
    """This machine's CPU and core count, today's date (UTC) and the checkout's commit, for a figure's title."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "no commit"
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return f"{cpu}, {os.cpu_count()} cores; run {today} at {commit}"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def ttft_by_length(series: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """TTFT (ms) against prompt tokens, one line per path; ``series`` maps a path to {prompt tokens: ms}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ("o-", "s-", "^-", "D-", "P-", "v--", "x:", "*-")
    for (name, by_length), style in zip(series.items(), styles, strict=False):
        lengths = sorted(by_length, key=int)
        ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], style, label=LABELS.get(name, name))
    ticks = sorted({int(n) for by_length in series.values() for n in by_length})
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens (log scale)", ylabel="TTFT, ms (log scale)")
    ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
    values = [v for by_length in series.values() for v in by_length.values()]
    yticks = [y for y in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if min(values) / 2 <= y]
    yticks = [y for y in yticks if y <= max(values) * 2]
    ax.set_yticks(yticks, [f"{y:,}" for y in yticks])
    ax.minorticks_off()
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def fleet_phases(workloads: dict[str, list[dict]], title: str, path: Path) -> None:
    """TTFT p50 and request throughput per phase and mode; ``workloads`` maps a workload to bench_fleet's rows."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(workloads), figsize=(6.5 * len(workloads), 8.5), squeeze=False)
    modes: list[str] = []
    for col, (workload, rows) in enumerate(workloads.items()):
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        phases = list(dict.fromkeys(r["phase"] for r in rows))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            by_phase = {r["phase"]: r for r in rows if r["mode"] == mode}
            xs = [p + (i - (len(modes) - 1) / 2) * width for p in range(len(phases))]
            for row, key in ((0, "TTFT p50 ms"), (1, "req/s")):
                values = [by_phase[p][key] if p in by_phase else 0 for p in phases]
                axes[row][col].bar(xs, values, width, label=mode, color=f"C{i}")
        for row, ylabel in enumerate(("TTFT p50, ms (lower is better)", "requests per second (higher is better)")):
            ax = axes[row][col]
            ax.set_xticks(range(len(phases)), phases)
            ax.set(ylabel=ylabel, title=f"{workload} workload: {ylabel.split(',')[0].split(' (')[0]}")
            ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(modes), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def copy_bandwidth(copies: list[dict], title: str, path: Path) -> None:
    """GB/s of each copy method per page size; ``copies`` are bench_copy's rows (page, method, GB/s)."""
    plt = _pyplot()
    pages = list(dict.fromkeys(r["page"] for r in copies))
    methods = list(dict.fromkeys(r["method"] for r in copies))
    by = {(r["page"], r["method"]): r["GB/s"] for r in copies}
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [p + (i - (len(methods) - 1) / 2) * width for p in range(len(pages))]
        ax.bar(xs, [by.get((page, method), 0) for page in pages], width, label=method, color=f"C{i}")
    ax.set_xticks(range(len(pages)), [f"{page} pages" for page in pages])
    ax.set(ylabel="GB/s (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def data_path(data_rows: list[dict], lookup_rows: list[dict], title: str, path: Path) -> None:
    """bench_store's rows: save/load GB/s per batch (left) and the scheduler's lookup latency (right)."""
    import statistics

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {
        ("save", "async"): "o-",
        ("save", "sync"): "s--",
        ("load", "zero-copy"): "^-",
        ("load", "shm, one copy"): "^-",
        ("load", "shm, via area"): "v-",
    }
    for (op, mode), style in styles.items():
        for kib in sorted({r["page KiB"] for r in data_rows}):
            pts = [r for r in data_rows if r["op"] == op and r["mode"] == mode and r["page KiB"] == kib]
            if pts:
                ax1.plot(
                    [r["blocks"] for r in pts], [r["GB/s"] for r in pts], style, label=f"{op} ({mode}), {kib} KiB pages"
                )
    ceiling = statistics.median(r["memcpy GB/s"] for r in data_rows)
    ax1.axhline(ceiling, color="grey", linestyle=":", label=f"memcpy ceiling, median ~{ceiling:.1f} GB/s")
    ax1.set(
        xscale="log",
        xlabel="blocks per request (log scale)",
        ylabel="GB/s",
        title="Pool data path (Mooncake, loopback)",
    )
    blocks = sorted({r["blocks"] for r in data_rows})
    ax1.set_xticks(blocks, [str(b) for b in blocks])
    ax1.minorticks_off()
    ax1.set_ylim(bottom=0)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for case, style in (("all-hit", "o-"), ("all-miss", "s--")):
        pts = [r for r in lookup_rows if r["case"] == case]
        ax2.plot([r["prompt tokens"] for r in pts], [r["p99 ms"] for r in pts], style, label=f"{case} p99")
        ax2.plot([r["prompt tokens"] for r in pts], [r["p50 ms"] for r in pts], style, alpha=0.4, label=f"{case} p50")
    ax2.axhline(5, color="red", linestyle=":", label="goal: p99 <= 5 ms at 32k tokens")
    ax2.set(
        xscale="log", xlabel="prompt tokens (log scale)", ylabel="lookup latency, ms", title="Scheduler lookup latency"
    )
    tokens = sorted({r["prompt tokens"] for r in lookup_rows})
    ax2.set_xticks(tokens, [f"{n:,}" for n in tokens])
    ax2.minorticks_off()
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def hit_breakdown(result: dict, title: str, path: Path) -> None:
    """bench_hit_breakdown's result: each mode's TTFT split into vLLM's local hit, the transfer and the rest."""
    plt = _pyplot()
    rows = result["modes"]
    local = result["local prefix hit ms"]
    fig, ax = plt.subplots(figsize=(9, 5))
    names = ["vLLM local prefix hit", *(r["mode"] for r in rows)]
    ys = range(len(names))
    ax.barh(ys, [local] * len(names), color="C0", label="vLLM local prefix hit")
    transfer = [0, *(r["transfer ms"] for r in rows)]
    rest = [0, *(r["rest ms"] for r in rows)]
    ax.barh(ys, transfer, left=local, color="C1", label="pool transfer (workers' get)")
    ax.barh(ys, rest, left=[local + t for t in transfer], color="C2", label="the rest (steps, lookup)")
    bound = local + result["wire ms"]
    ax.axvline(bound, color="grey", linestyle=":", label=f"local hit + bytes at loopback speed ({bound:.0f} ms)")
    ax.axvline(bound * 1.2, color="red", linestyle="--", label=f"goal: 1.2x that ({bound * 1.2:.0f} ms)")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set(xlabel="TTFT, ms (from the engine's queue)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    _save(fig, path)


def multiturn(modes: dict[str, dict], title: str, path: Path) -> None:
    """bench_multiturn's modes: per turn, the share of prompt tokens not computed and the TTFT p50."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (mode, report) in enumerate(modes.items()):
        turns = report["turns"]
        xs = range(1, len(turns) + 1)
        ax1.plot(xs, [100 * t["cached_tokens"] / t["prompt_tokens"] for t in turns], "o-", color=f"C{i}", label=mode)
        ax2.plot(xs, [t["ttft_ms_median"] for t in turns], "o-", color=f"C{i}", label=mode)
    ax1.set(xlabel="turn", ylabel="prompt tokens not computed, %", title="Tokens served from a cache")
    ax2.set(xlabel="turn", ylabel="TTFT p50, ms", title="Time to first token")
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def decode_under_hits(rows: list[dict], title: str, path: Path) -> None:
    """bench_async's decode rows: running streams' ITL p99 and the arrivals' TTFT per load mode.

    A bar beyond 3x the median (the recomputed arrivals, seconds against milliseconds) is cut at that and labelled
    with its value, so the load modes' differences stay visible on a linear axis."""
    import statistics

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [r["mode"] for r in rows]
    ys = list(range(len(names)))
    for ax, key, color, label in (
        (axes[0], "ITL p99 ms", "C0", "running streams' ITL p99, ms"),
        (axes[1], "arrival TTFT median ms", "C1", "arriving hits' TTFT median, ms"),
    ):
        values = [r.get(key) for r in rows]
        values = [None if v is None or v != v else v for v in values]  # a row without arrivals has none (NaN)
        cap = 3 * statistics.median(v for v in values if v is not None)
        ax.barh(ys, [min(v, cap) if v is not None else 0 for v in values], color=color)
        for y, v in zip(ys, values, strict=True):
            if v is None:
                ax.text(cap * 0.01, y, "-", va="center", fontsize=8)
            elif v > cap:
                ax.text(cap * 0.98, y, f"{v:,.0f} (cut)", va="center", ha="right", color="white", fontsize=8)
            else:
                ax.text(v + cap * 0.01, y, f"{v:,.0f}", va="center", fontsize=8)
        ax.set_xlim(0, cap * 1.05)
        ax.set(xlabel=label)
        ax.set_yticks(ys, names)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_title("Decode while hits arrive", fontsize=10)
    axes[1].set_title("The hits' own TTFT", fontsize=10)
    axes[1].set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def worker_rss(series: dict[str, list[float]], title: str, path: Path) -> None:
    """RSS (MiB) after each soak round, one line per server configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, values) in enumerate(series.items()):
        ax.plot(range(1, len(values) + 1), values, "o-", color=f"C{i}", label=name)
    ax.set(xlabel="soak round (20 s each)", ylabel="worker-process RSS, MiB")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def capacity_soak(windows: list[dict], title: str, path: Path) -> None:
    """soak_capacity's windows: hot prompts' hit rate, blocks saved and refused, memory, per window."""
    plt = _pyplot()
    minutes = [w["minute"] for w in windows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(minutes, [w["hot hit %"] or 0 for w in windows], "o-", label="hot prompts' pool hit %")
    axes[0].set(ylim=(0, 105), ylabel="hot prompts' pool hit, %")
    axes[1].plot(minutes, [w["saved blocks"] for w in windows], "o-", label="blocks saved")
    axes[1].plot(minutes, [w["refused blocks"] for w in windows], "s-", label="blocks refused")
    axes[1].set(ylabel="blocks per window")
    axes[2].plot(minutes, [w["server RSS MiB"] for w in windows], "o-", label="server RSS")
    axes[2].plot(minutes, [w["pool node RSS MiB"] for w in windows], "s-", label="pool node RSS")
    axes[2].plot(minutes, [w["pool MiB"] for w in windows], "^-", label="pool used")
    axes[2].set(xlabel="minutes since start", ylabel="MiB")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(title, fontsize=9)
    _save(fig, path)


def capacity_hit_rate(rows: list[dict], title: str, path: Path) -> None:
    """bench_capacity's traffic rows: the prefix hit rate of each setup against working set / DRAM, the unbounded
    pool's as a ceiling line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sized = [r for r in rows if r["working set / DRAM"] != "unbounded"]
    ratios = sorted({int(r["working set / DRAM"].rstrip("x")) for r in sized})
    for i, setup in enumerate(dict.fromkeys(r["setup"] for r in sized)):
        points = {int(r["working set / DRAM"].rstrip("x")): r["prefix hit %"] for r in sized if r["setup"] == setup}
        xs = [x for x in ratios if x in points]
        style = "s--" if setup.startswith("vLLM") else "o-"
        ax.plot(xs, [points[x] for x in xs], style, color=f"C{i}", label=setup)
    for r in rows:
        if r["working set / DRAM"] == "unbounded" and r["setup"] == "DRAM only":
            ax.axhline(r["prefix hit %"], color="black", linestyle=":", label="unbounded pool (ceiling)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{x}x" for x in ratios])
    ax.set(xlabel="working set / pool DRAM", ylabel="prefix requests' pool hit, % of full-block tokens", ylim=(0, 105))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
