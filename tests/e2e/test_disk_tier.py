"""The pool's disk tier (``kvpool-pool --disk-dir --disk-size``: Mooncake's own offload) on a real Mooncake: a pool
node with 64 MB of DRAM takes three times that through the connector's pool client, every object reads back
byte-exact through the same client (the calls the loader makes), a node restarted on its directory serves what went
to disk, settings known to lose objects or stall the pool are refused with the reason, and a vLLM engine whose saves
overflow the DRAM is served from disk by a fresh engine with the no-connector answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvpool_connector.backends.base import Outcome
from kvpool_connector.backends.mooncake_service import DiskTier
from kvpool_connector.config import ConfigError
from kvpool_testkit.client import wait_for
from kvpool_testkit.engine import EngineSpec, run_engine
from kvpool_testkit.mooncake_pool import mooncake_pool, pool_handle
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.processes, pytest.mark.e2e, pytest.mark.light_engines]

SEGMENT = "64MB"
OBJECT_BYTES = 2 << 20
OBJECTS = 96  # three times the DRAM
PUT_RETRY_S = 10.0  # a refused put waits for the next offload cycle (1-s heartbeat + 1-s lease)


def payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, OBJECT_BYTES, dtype=np.uint8)


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    work = tmp_path_factory.mktemp("disk-tier")
    disk = DiskTier.plan(work / "disk", "1GB", SEGMENT)
    with mooncake_pool(work / "pool", segment_size=SEGMENT, client_ttl_s=3, disk=disk) as pool:
        yield pool


DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "kvpool-dashboard.json"


def put_all(handle) -> tuple[int, int]:
    """Every object put, a refused one again until the tier took room for it; returns (puts, refusals)."""
    buf = np.empty(OBJECT_BYTES, np.uint8)
    handle.register_memory(buf.ctypes.data, buf.nbytes)
    refusals = 0
    for i in range(OBJECTS):
        buf[:] = payload(i)
        deadline = time.monotonic() + PUT_RETRY_S
        while (outcome := handle.put([f"obj-{i}"], [[buf.ctypes.data]], [[OBJECT_BYTES]])[0]) is Outcome.POOL_FULL:
            assert time.monotonic() < deadline, f"object {i} refused for {PUT_RETRY_S} s"
            refusals += 1
            time.sleep(0.1)
        assert outcome.ok, (i, outcome)
    return OBJECTS, refusals


def read_back(handle, indices) -> list[int]:
    """The objects of ``indices`` that came back byte-exact (a missing one is left out; a wrong one fails)."""
    buf = np.empty(OBJECT_BYTES, np.uint8)
    handle.register_memory(buf.ctypes.data, buf.nbytes)
    back = []
    for i in indices:
        outcome = handle.get([f"obj-{i}"], [[buf.ctypes.data]], [[OBJECT_BYTES]])[0]
        if outcome is Outcome.MISSING:
            continue
        assert outcome is Outcome.OK, (i, outcome)
        assert np.array_equal(buf, payload(i)), f"object {i} came back with other bytes"
        back.append(i)
    return back


@pytest.fixture(scope="module")
def stored(tiered):
    with pool_handle(tiered) as handle:
        put_all(handle)
    return tiered


def test_three_times_the_dram_reads_back_byte_exact(stored):
    health = stored.health()
    assert health["disk_used_bytes"] >= (OBJECTS * OBJECT_BYTES) - health["capacity_bytes"]
    assert health["disk_capacity_bytes"] == 1 << 30
    with pool_handle(stored) as handle:
        assert read_back(handle, range(OBJECTS)) == list(range(OBJECTS))
    assert stored.health()["disk_hits"] > 0, "some reads came from disk"


def test_a_node_restarted_on_its_directory_serves_what_went_to_disk(stored):
    """Restarted after the master dropped the old node (``--client-ttl``): objects only in DRAM die with it, the
    ones on disk come back."""
    on_disk = stored.health()["disk_used_bytes"] // OBJECT_BYTES
    old = set(stored.segments())
    stored.node.terminate()
    stored.node.wait(timeout=30)
    wait_for(lambda: not old & set(stored.segments()), 30, "the master dropping the stopped node")
    stored.start_node()
    with pool_handle(stored) as handle:
        back = read_back(handle, range(OBJECTS))
    assert len(back) >= on_disk * 0.9, (len(back), on_disk)


@pytest.mark.parametrize(
    ("size", "segment", "bucket", "reason"),
    [
        ("1GB", "32MB", None, "at least 64 MB of DRAM"),
        ("1GB", "64MB", "8MB", "between 16 MB and half the segment"),
        ("1GB", "64MB", "48MB", "between 16 MB and half the segment"),
        ("32MB", "64MB", None, "at least 4 buckets"),
        ("900TB", "64MB", None, "free under"),
    ],
)
def test_settings_that_lose_objects_or_stall_are_refused(tmp_path, size, segment, bucket, reason):
    with pytest.raises(ConfigError, match=reason):
        DiskTier.plan(tmp_path / "disk", size, segment, bucket)


def test_kvpool_pool_names_a_refused_setting_and_starts_nothing(tmp_path):
    args = [sys.executable, "-m", "kvpool_connector.backends.mooncake_service", "--workdir", str(tmp_path)]
    done = subprocess.run([*args, "--disk-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs both --disk-dir and --disk-size" in done.stderr
    done = subprocess.run(
        [*args, "--disk-dir", str(tmp_path / "d"), "--disk-size", "1GB", "--segment-size", "64MB",
         "--disk-bucket-size", "40MB"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--disk-bucket-size 40MB: must be between 16 MB" in done.stderr
    assert not (tmp_path / "mooncake_master.log").exists()


def test_the_dashboards_pool_tier_series_are_ones_the_master_exports(tiered):
    """The dashboard's series not named ``vllm:`` are the Mooncake master's: each must be in its exposition."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"(?<![:\w])([a-z_][a-z0-9_]*)\{", e)}
    assert {"master_allocated_file_size_bytes", "file_cache_hit_nums_"} <= used
    exported = set(re.findall(r"^([a-z_][a-z0-9_]*)[ {]", tiered._master_http("/metrics"), re.M))
    assert used <= exported, used - exported


ENGINE_PROMPTS = distinct_prompts(24, 8 * 128 + 10, seed=35)  # 192 blocks of 512 KiB (tiny Llama, fp32): 1.5x DRAM


def test_an_engine_is_served_from_disk_what_overflowed_the_dram(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("engine-disk-tier")
    disk = DiskTier.plan(work / "disk", "1GB", SEGMENT)
    with mooncake_pool(work / "pool", segment_size=SEGMENT, disk=disk) as pool:
        config = pool.connector_config(reconnect_interval_s=1.0)
        assert config["kv_connector_extra_config"]["mooncake"]["local_buffer_size"] == "64MB"

        def run(name: str, transfer: dict | None, prompts: list[list[int]] = ENGINE_PROMPTS):
            spec = EngineSpec(model=tiny_model, prompts=prompts, kv_transfer_config=transfer, sequential=True)
            return run_engine(spec, work / name)

        baseline = run("baseline", None)
        # Saves the pool cannot take before its next offload cycle are refused and dropped (never waited for): save
        # in four engines, the offload catching up while each starts.
        stored = sum(
            run(f"save-{i}", config, ENGINE_PROMPTS[i::4]).worker_totals[0].get("saved_blocks", 0) for i in range(4)
        )
        assert stored * 512 * 1024 > 1.2 * pool.health()["capacity_bytes"], "the saves must overflow the DRAM"
        before = pool.health()
        loaded = run("load", config)
        after = pool.health()
    assert loaded.outputs == baseline.outputs
    assert loaded.loaded_blocks > 128, "more blocks than the DRAM holds came back"
    assert after["disk_hits"] > before["disk_hits"], "some of them from disk"
