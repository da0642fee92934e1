"""Batched block copy and the save path's forward-pass wait, measured in one run.

Part 1, copy GB/s gathering scattered KV pages into a contiguous staging area (the save path's copy-out), for 4 KiB,
64 KiB and 1 MiB pages: the native batched copy (1 and 2 threads) against the memcpy ceiling (one contiguous copy of
the same bytes), a Python loop of np.copyto per page, and torch.index_select / index_copy_.

Part 2, what the forward pass waits for a 2k-token prompt on the ``bench`` model geometry (8 layers, 4 KV heads x
64, fp32, 128-token blocks: 16 blocks of 2 MiB), on a real Mooncake Store started on loopback: ``wait_for_save`` with a
synchronous put from the KV pages against the staging path (batched copy-out, put in the background); and a load
straight into the KV pages against a load into staging followed by a batched scatter (which the worker uses is
decided by this measurement).

Run: ``python benchmarks/bench_copy.py [--total-mb 256] [--repeat 5] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import plots
import torch
from rich.console import Console
from rich.table import Table

from kvpool_connector.ops import copy_batch
from kvpool_testkit.inspection import wait_connected

PAGE_SIZES = {"4 KiB": 4 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20}


def _best_gbps(fn, nbytes: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def _page_case(page: int, total_bytes: int, rng: np.random.Generator) -> dict:
    """Scattered source pages (over twice the space, like KV blocks) and a contiguous staging destination."""
    n = total_bytes // page
    src = np.ones(2 * n * page, dtype=np.uint8)
    dst = np.zeros(n * page, dtype=np.uint8)
    order = rng.permutation(2 * n)[:n]
    return {
        "n": n,
        "src": src,
        "dst": dst,
        "order": order,
        "srcs": (src.ctypes.data + order * page).astype(np.uint64),
        "dsts": (dst.ctypes.data + np.arange(n) * page).astype(np.uint64),
        "sizes": np.full(n, page, dtype=np.uint64),
        "src_t": torch.from_numpy(src.reshape(2 * n, page)),
        "dst_t": torch.from_numpy(dst.reshape(n, page)),
        "idx": torch.from_numpy(order.astype(np.int64)),
        "back": torch.from_numpy(np.zeros((2 * n, page), dtype=np.uint8)),
    }


def _methods(c: dict) -> dict[str, Callable[[], object]]:
    n, page = c["n"], c["sizes"][0] if c["n"] else 0
    src_pages, dst_pages = c["src_t"].numpy(), c["dst_t"].numpy()
    return {
        "memcpy ceiling (one contiguous copy)": lambda: np.copyto(c["dst"], c["src"][: n * int(page)]),
        "native batched, 1 thread": lambda: copy_batch(c["dsts"], c["srcs"], c["sizes"], threads=1),
        "native batched, 2 threads": lambda: copy_batch(c["dsts"], c["srcs"], c["sizes"], threads=2),
        "python loop of np.copyto": lambda: [np.copyto(dst_pages[i], src_pages[j]) for i, j in enumerate(c["order"])],
        "torch.index_select": lambda: torch.index_select(c["src_t"], 0, c["idx"], out=c["dst_t"]),
        "torch.index_copy_": lambda: c["back"].index_copy_(0, c["idx"], c["dst_t"]),
    }


def bench_copies(total_bytes: int, repeat: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for label, page in PAGE_SIZES.items():
        case = _page_case(page, total_bytes, rng)
        nbytes = case["n"] * page
        for method, fn in _methods(case).items():
            rows.append(
                {"page": label, "pages": case["n"], "method": method, "GB/s": round(_best_gbps(fn, nbytes, repeat), 2)}
            )
    return rows


def bench_wait_for_save(repeat: int) -> list[dict]:
    from common import warm_segment

    from kvpool_connector.backends.mooncake import MooncakeBackend
    from kvpool_connector.backends.mooncake_settings import MooncakeSettings
    from kvpool_connector.counters import StatsCounter
    from kvpool_connector.devices import CpuRuntime
    from kvpool_connector.kv_pages import KVPages
    from kvpool_connector.pool import PoolHandle
    from kvpool_connector.saving import BlockSaver
    from kvpool_testkit.mooncake_pool import mooncake_pool

    layers, heads, block, dim, num_blocks, prompt_blocks = 8, 4, 128, 64, 64, 16
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(num_blocks, heads, block, 2 * dim) for i in range(layers)}
    pages = KVPages(caches, num_blocks, heads * block * 2 * dim * 4)
    rows = []
    # Where the objects go: the worker's own segment (same node, memcpy) or a pool node over TCP (another host).
    for where, segment in (("same-node segment", "1 GB"), ("pool node over TCP", 0)):
        with tempfile.TemporaryDirectory() as tmp, mooncake_pool(Path(tmp), segment_size="1 GB") as pool:
            settings = MooncakeSettings(**pool.client_config(global_segment_size=segment))
            handle = PoolHandle(lambda s=settings: MooncakeBackend(s, holds_data=True), 1.0, "bench")
            for ptr, size in pages.regions:
                handle.register_memory(ptr, size)
            savers = {
                mode: BlockSaver(handle, pages, ["bench"], CpuRuntime(), StatsCounter(), staging_blocks=staging)
                for mode, staging in (("sync", 0), ("staged", 4 * prompt_blocks))
            }
            handle.start()
            assert wait_connected(handle, 30), "Mooncake did not connect"
            warm_segment(handle, pages, settings.segment_bytes or (1 << 30), "bench")
            rows += _measure(handle, savers, pages, prompt_blocks, repeat, where)
            for saver in savers.values():
                saver.close()
            handle.close()
    return rows


def _measure(handle, savers: dict, pages, prompt_blocks: int, repeat: int, where: str) -> list[dict]:
    from kvpool_connector.keys import pool_key
    from kvpool_connector.metadata import BlockTransfer

    block_ids = list(range(prompt_blocks))
    waits: dict[str, list[float]] = {mode: [] for mode in savers}
    for r in range(repeat):
        for mode, saver in savers.items():
            hashes = [f"{mode}/{r}/{b}".encode() for b in block_ids]
            t0 = time.perf_counter()
            saver.save([BlockTransfer("bench", block_ids, hashes)])  # what wait_for_save waits for
            waits[mode].append((time.perf_counter() - t0) * 1e3)
            assert saver.drain(60)
    for mode, saver in savers.items():
        assert saver.stats.total().get("saved_blocks", 0) == repeat * prompt_blocks, (mode, saver.stats.total())
    sync_ms, staged_ms = waits["sync"], waits["staged"]
    # Loads: straight into the KV pages (zero-copy), or into a staging area then a batched scatter.
    stage = np.zeros(prompt_blocks * pages.block_bytes, dtype=np.uint8)
    handle.register_memory(stage.ctypes.data, stage.nbytes)
    keys = [pool_key("bench", f"sync/0/{b}".encode()) for b in block_ids]
    target = list(range(prompt_blocks, 2 * prompt_blocks))
    addrs, sizes = pages.addresses(target)
    run_offsets = np.concatenate([[0], np.cumsum(pages.run_sizes)[:-1]])
    stage_addrs = stage.ctypes.data + np.arange(prompt_blocks)[:, None] * pages.block_bytes + run_offsets[None, :]
    run_sizes = np.broadcast_to(np.asarray(pages.run_sizes, dtype=np.uint64), stage_addrs.shape)
    direct_ms, staged_load_ms = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        assert all(o.ok for o in handle.get(keys, addrs, sizes))
        direct_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        assert all(o.ok for o in handle.get(keys, stage_addrs.tolist(), sizes))
        dst = pages.address_array(target)
        copy_batch(dst.T.ravel(), stage_addrs.T.ravel().astype(np.uint64), run_sizes.T.ravel(), threads=2)
        staged_load_ms.append((time.perf_counter() - t0) * 1e3)
    mb = prompt_blocks * pages.block_bytes / 2**20
    rows = []
    for label, ms in (
        ("save: synchronous put", sync_ms),
        ("save: staging copy-out, background put", staged_ms),
        ("load: get into KV pages (zero-copy)", direct_ms),
        ("load: get into staging + batched scatter", staged_load_ms),
    ):
        rows.append(
            {
                "pool": where,
                "path": label,
                "MiB": round(mb, 1),
                "wait ms (median)": round(statistics.median(ms), 2),
                "wait ms (min)": round(min(ms), 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=int, default=256, help="bytes moved per copy measurement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=120)
    copies = bench_copies(args.total_mb << 20, args.repeat)
    table = Table(title=f"Gathering scattered pages into staging ({args.total_mb} MiB per run, best of {args.repeat})")
    for col in ("page", "pages", "method", "GB/s", "x ceiling"):
        table.add_column(col, justify="left" if col == "method" else "right")
    ceilings = {r["page"]: r["GB/s"] for r in copies if r["method"].startswith("memcpy ceiling")}
    for r in copies:
        r["x ceiling"] = round(r["GB/s"] / ceilings[r["page"]], 2)
        table.add_row(r["page"], str(r["pages"]), r["method"], f"{r['GB/s']:.2f}", f"{r['x ceiling']:.2f}")
    console.print(table)
    waits = bench_wait_for_save(args.repeat)
    table = Table(title="Forward-pass wait for a 2k-token prompt (16 blocks x 2 MiB), Mooncake Store on loopback")
    for col in waits[0]:
        table.add_column(col, justify="right" if col not in ("pool", "path") else "left")
    for r in waits:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)
    by = {(r["page"], r["method"]): r["GB/s"] for r in copies}
    ratios = {
        "native 2 threads / ceiling @64 KiB": by[("64 KiB", "native batched, 2 threads")] / ceilings["64 KiB"],
        "native 1 thread / ceiling @64 KiB": by[("64 KiB", "native batched, 1 thread")] / ceilings["64 KiB"],
        "native 2 threads / python loop @4 KiB": by[("4 KiB", "native batched, 2 threads")]
        / by[("4 KiB", "python loop of np.copyto")],
        "sync put wait / staging wait, same-node segment": waits[0]["wait ms (median)"] / waits[1]["wait ms (median)"],
        "sync put wait / staging wait, pool node over TCP": waits[4]["wait ms (median)"] / waits[5]["wait ms (median)"],
        "staged load / zero-copy load, same-node segment": waits[3]["wait ms (median)"] / waits[2]["wait ms (median)"],
        "staged load / zero-copy load, pool node over TCP": waits[7]["wait ms (median)"] / waits[6]["wait ms (median)"],
    }
    for name, value in ratios.items():
        console.print(f"{name}: [bold]{value:.2f}x[/]")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bench_copy.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": torch.get_num_threads(),
                "copies": copies,
                "wait_for_save": waits,
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
            },
            indent=2,
        )
    )
    title = f"Gathering scattered KV pages: GB/s by method ({args.total_mb} MiB, best of {args.repeat})\n"
    plots.copy_bandwidth(copies, title + plots.run_label(), args.out / "bench_copy.png")
    console.print(f"results: {out}, plot: {args.out / 'bench_copy.png'}")


if __name__ == "__main__":
    main()
