"""What a per-block checksum would cost: hash throughput beside the memcpy ceiling, on KV-block-sized buffers.

A checksum would be computed over every block on save and again on every load (after the zero-copy transfer, as a
second pass over the pages). The table shows the extra time per block, as a fraction of the block's copy time.

Usage: ``python benchmarks/bench_checksum.py [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

BLOCK_SIZES = {"512 KiB (tiny test model)": 512 << 10, "2 MiB": 2 << 20, "16 MiB (bench model)": 16 << 20}


def throughput(fn: Callable[[np.ndarray], object], blocks: list[np.ndarray]) -> float:
    """GB/s of ``fn`` over every block, best of three passes."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for block in blocks:
            fn(block)
        best = min(best, time.perf_counter() - start)
    return sum(b.nbytes for b in blocks) / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--total-mb", type=int, default=256, help="bytes hashed per block size and pass")
    args = parser.parse_args()
    import blake3  # shipped with vLLM

    hashes: dict[str, Callable[[np.ndarray], object]] = {
        "crc32 (zlib)": zlib.crc32,
        "blake3": lambda b: blake3.blake3(b).digest(),
        "sha256": lambda b: hashlib.sha256(b).digest(),
    }
    rng = np.random.default_rng(0)
    rows = []
    for label, size in BLOCK_SIZES.items():
        blocks = [rng.integers(0, 255, size, dtype=np.uint8) for _ in range(max(1, (args.total_mb << 20) // size))]
        dst = np.empty(size, dtype=np.uint8)
        memcpy = throughput(lambda b, dst=dst: np.copyto(dst, b), blocks)
        row = {"block": label, "block_bytes": size, "memcpy_GBps": round(memcpy, 2)}
        for name, fn in hashes.items():
            rate = throughput(fn, blocks)
            row[f"{name}_GBps"] = round(rate, 2)
            row[f"{name}_x_copy_time"] = round(memcpy / rate, 2)
        rows.append(row)
    table = Table(title="Checksum cost per KV block, 1 thread: GB/s (time as a multiple of copying the block)")
    for col in ["block", "memcpy", *hashes]:
        table.add_column(col, justify="right")
    for row in rows:
        cells = [f"{row[f'{n}_GBps']:.1f} ({row[f'{n}_x_copy_time']:.1f}x)" for n in hashes]
        table.add_row(row["block"], f"{row['memcpy_GBps']:.1f}", *cells)
    Console(width=120).print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checksum.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
