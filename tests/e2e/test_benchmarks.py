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


# The engine benchmarks at toy size: the tiny model, the shortest prompts, one repetition, every part and mode run.


def test_bench_ttft_llama_and_mla_toy(tmp_path):
    common = ["--preset", "tiny", "--lengths", "258", "--reps", "1", "--hit-engines", "1"]
    throughput = ["--batch", "2", "--batch-tokens", "258", "--throughput-reps", "1"]
    _run(["benchmarks/bench_ttft.py", *common, *throughput], tmp_path)
    llama = json.loads((tmp_path / "bench_ttft.json").read_text())
    assert llama["ttft_ms"]["pool hit"]["258"] > 0
    _run(["benchmarks/bench_ttft.py", *common, "--model", "mla"], tmp_path)
    assert (tmp_path / "bench_ttft_mla.json").stat().st_size > 0


def test_bench_multiturn_toy(tmp_path):
    args = ["--preset", "tiny", "--conversations", "2", "--turns", "2", "--first", "260", "--answer", "8"]
    _run(["benchmarks/bench_multiturn.py", *args, "--question", "20"], tmp_path)
    result = json.loads((tmp_path / "bench_multiturn.json").read_text())
    assert result["agree"] and len(result["modes"]["decode cache"]["turns"]) == 2


def test_bench_async_itl_idle_pd_toy(tmp_path):
    args = ["--parts", "itl", "idle", "pd", "--preset", "tiny", "--hits", "1", "--hit-tokens", "258", "--streams", "1"]
    args += ["--gap-s", "0.2", "--warmup-s", "0.5", "--pd-reps", "1", "--load-modes", "auto", "--where", "TCP"]
    _run(["benchmarks/bench_async.py", *args, "--no-reference"], tmp_path)
    result = json.loads((tmp_path / "bench_async.json").read_text())
    assert [r["mode"] for r in result["itl"]] == [r["mode"] for r in result["idle"]] == ["auto loads, TCP"]
    assert result["itl"][0]["pool hit tokens"] == 256 and result["pd"]


def test_bench_fleet_toy(tmp_path):
    args = ["--preset", "tiny", "--modes", "pool over TCP", "--prefixes", "2", "--prefix-len", "256"]
    args += ["--suffix-len", "16", "--prompts", "4", "--conversations", "2", "--turns", "2", "--chat-first", "150"]
    _run(["benchmarks/bench_fleet.py", *args, "--chat-question", "20", "--output-len", "4"], tmp_path)
    result = json.loads((tmp_path / "bench_fleet.json").read_text())
    assert "did not run" not in result
    for workload in ("prefix", "chat"):
        phases = {r["phase"]: r for r in result[workload]}
        assert list(phases) == ["first server", "second server", "own repeat", "fleet"]
        assert phases["second server"]["pool hit %"] > 0, "the second server took nothing from the pool"
