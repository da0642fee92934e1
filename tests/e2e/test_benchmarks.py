"""The benchmarks run (on tiny sizes) and write their results; their numbers are not judged here."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.processes  # the store benchmarks start a pool; the engine toys below are e2e too


def _run(args: list[str], tmp_path: Path, timeout_s: float = 600) -> None:
    result = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
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
    cross = {r["mode"]: r for r in data["cross_tp_load"]}
    assert set(cross) == {"TP 1 -> TP 1", "TP 2 -> TP 1", "TP 1 -> TP 2"} and all(r["GB/s"] > 0 for r in cross.values())
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


# The engine benchmarks at toy size: the tiny model, the shortest prompts, one repetition, every part and mode. Each
# is a chain of engine start-ups that keeps about one core busy, so they run two at a time; together about 11 minutes,
# so they run on demand (marker benchmark_toys: KVPOOL_BENCH_TOYS=1 bash scripts/test.sh), before benchmark figures
# are published. Every run of the suite starts each of them far enough to parse its arguments (its imports included).
ENGINE_TOYS = {
    "ttft": ["benchmarks/bench_ttft.py", "--preset", "tiny", "--lengths", "258", "--reps", "1", "--hit-engines", "1",
             "--batch", "2", "--batch-tokens", "258", "--throughput-reps", "1"],
    "async": ["benchmarks/bench_async.py", "--parts", "itl", "idle", "pd", "--preset", "tiny", "--hits", "1",
              "--hit-tokens", "258", "--streams", "1", "--gap-s", "0.2", "--warmup-s", "0.5", "--pd-reps", "1",
              "--load-modes", "auto", "--where", "TCP", "--no-reference"],
    "fleet": ["benchmarks/bench_fleet.py", "--preset", "tiny", "--modes", "pool over TCP", "--prefixes", "2",
              "--prefix-len", "256", "--suffix-len", "16", "--prompts", "4", "--conversations", "2", "--turns", "2",
              "--chat-first", "150", "--chat-question", "20", "--output-len", "4", "--kv-cache-gib", "1"],
    "ttft_mla": ["benchmarks/bench_ttft.py", "--preset", "tiny", "--lengths", "258", "--reps", "1",
                 "--hit-engines", "1", "--model", "mla"],
    "soak": ["benchmarks/soak_capacity.py", "--preset", "tiny", "--minutes", "0.25", "--window-s", "5",
             "--pool-mb", "64", "--prompt-tokens", "300"],
    "capacity": ["benchmarks/bench_capacity.py", "--preset", "tiny", "--requests", "12", "--prefixes", "6",
                 "--ratios", "4", "--setups", "admission + disk tier", "vLLM MooncakeStoreConnector + disk tier",
                 "--disk-hit-prompts", "1", "--save-cost-requests", "8", "--save-cost-fill", "4"],
    "hit_breakdown": ["benchmarks/bench_hit_breakdown.py", "--preset", "tiny", "--tokens", "258", "--reps", "1"],
    "multiturn": ["benchmarks/bench_multiturn.py", "--preset", "tiny", "--conversations", "2", "--turns", "2",
                  "--first", "260", "--answer", "8", "--question", "20"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted({args[0] for args in ENGINE_TOYS.values()}))
def test_engine_benchmark_starts(name):
    result = subprocess.run([sys.executable, name, "--help"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> dict[str, Path | AssertionError]:
    """Every engine benchmark run once at toy size: the folder each wrote its results to, or how it failed."""
    root = tmp_path_factory.mktemp("toys")

    def run(name: str) -> Path | AssertionError:
        try:
            _run(ENGINE_TOYS[name], root / name, timeout_s=1200)
        except AssertionError as failed:
            return failed
        return root / name

    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        return dict(zip(ENGINE_TOYS, threads.map(run, ENGINE_TOYS), strict=True))


def _result(toys: dict[str, Path | AssertionError], name: str, file: str) -> dict:
    out = toys[name]
    if isinstance(out, AssertionError):
        raise out
    return json.loads((out / file).read_text())


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_bench_ttft_toy(toys):
    assert _result(toys, "ttft", "bench_ttft.json")["ttft_ms"]["pool hit"]["258"] > 0
    assert _result(toys, "ttft_mla", "bench_ttft_mla.json")["ttft_ms"]


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_bench_hit_breakdown_toy(toys):
    result = _result(toys, "hit_breakdown", "bench_hit_breakdown.json")
    assert [r["mode"] for r in result["modes"]] == ["async", "auto", "sync", "sync, lookup inline"]
    assert result["wire GB/s"] > 0 and all(r["transfer ms"] > 0 for r in result["modes"])


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_bench_multiturn_toy(toys):
    result = _result(toys, "multiturn", "bench_multiturn.json")
    assert result["agree"] and len(result["modes"]["decode cache"]["turns"]) == 2


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_bench_async_itl_idle_pd_toy(toys):
    result = _result(toys, "async", "bench_async.json")
    assert [r["mode"] for r in result["itl"]] == [r["mode"] for r in result["idle"]] == ["auto loads, TCP"]
    assert result["itl"][0]["pool hit tokens"] == 256
    assert [r["mode"] for r in result["pd"]][-1] == "the same prompts again, prefill skipped (the pool holds them)"


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_bench_fleet_toy(toys):
    result = _result(toys, "fleet", "bench_fleet.json")
    assert "did not run" not in result
    for workload in ("prefix", "chat"):
        phases = {r["phase"]: r for r in result[workload]}
        assert list(phases) == ["first server", "second server", "own repeat", "fleet"]
        assert phases["second server"]["pool hit %"] > 0, "the second server took nothing from the pool"


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_soak_capacity_toy(toys):
    result = _result(toys, "soak", "soak_capacity.json")
    assert len(result["windows"]) == 3 and result["errors"] == []
    assert sum(w["saved blocks"] for w in result["windows"]) > 0


@pytest.mark.benchmark_toys
@pytest.mark.e2e
def test_bench_capacity_toy(toys):
    result = _result(toys, "capacity", "bench_capacity.json")
    rows = result["traffic"]["rows"]
    assert [r["setup"] for r in rows] == ["admission + disk tier", "vLLM MooncakeStoreConnector + disk tier"]
    assert all(r["working set / DRAM"] != "unbounded" for r in rows)  # no unbounded row without its setups
    (disk_hit,) = result["disk-hit"]["rows"]
    assert disk_hit["objects read from disk"] > 0 and disk_hit["cached tokens (DRAM, disk)"] == "4096, 4096"
    modes = {"no connector", "saving, room in DRAM", "saving into a full pool"}
    assert {r["mode"] for r in result["save-cost"]["rows"]} == modes
