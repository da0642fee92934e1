"""The benchmarks run (on tiny sizes) and write their results; their numbers are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.e2e


def _run(args: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_bench_copy_quick(tmp_path):
    _run(["benchmarks/bench_copy.py", "--total-mb", "8", "--repeat", "1"], tmp_path)
    data = json.loads((tmp_path / "bench_copy.json").read_text())
    assert {r["page"] for r in data["copies"]} == {"4 KiB", "64 KiB", "1 MiB"}
    assert len(data["wait_for_save"]) == 8


@pytest.mark.parametrize(("flags", "name"), [([], "bench_store_quick"), (["--shared-memory"], "bench_store_shm_quick")])
def test_bench_store_quick(tmp_path, flags, name):
    _run(["benchmarks/bench_store.py", "--quick", *flags], tmp_path)
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert {r["op"] for r in data["data_path"]} == {"save", "load"}
    assert all(r["GB/s"] > 0 for r in data["data_path"])
    assert {r["case"] for r in data["lookup"]} == {"all-hit", "all-miss"}
    assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_bench_checksum_quick(tmp_path):
    _run(["benchmarks/bench_checksum.py", "--total-mb", "16"], tmp_path)
    rows = json.loads((tmp_path / "checksum.json").read_text())
    assert len(rows) == 3 and all(r["crc32 (zlib)_GBps"] > 0 for r in rows)


def test_bench_async_lookup_part_quick(tmp_path):
    args = ["--parts", "lookup", "--preset", "tiny", "--arrivals", "8", "--lookup-reps", "2", "--hit-tokens", "258"]
    _run(["benchmarks/bench_async.py", *args], tmp_path)
    rows = json.loads((tmp_path / "bench_async.json").read_text())["lookup"]
    assert [r["arrivals"] for r in rows] == [8, 8] and all(r["step that asks, median ms"] > 0 for r in rows)
