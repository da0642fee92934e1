"""Pool faults against a real Mooncake Store on loopback, each with its own master and pool node: the master killed
and restarted, the master hung, the process holding the objects gone, objects removed between lookup and load.

The promise under test: every fault costs hits (misses, recomputed blocks, dropped saves, all counted) and never an
exception, a wrong block, or a call that waits out the pool client's own RPC timeouts over and over.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvpool_connector.backends import Outcome
from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.backends.mooncake_settings import MooncakeSettings
from kvpool_connector.config import parse_config
from kvpool_connector.keys import KVLayout, pool_key
from kvpool_connector.lookups import LookupBatcher
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.pool import PoolHandle
from kvpool_connector.processes import stop_process
from kvpool_connector.worker import PoolWorker
from kvpool_testkit.inspection import wait_connected
from kvpool_testkit.mooncake_pool import PoolOnFreePorts, mooncake_pool, plain_client

pytestmark = pytest.mark.processes

NUM_BLOCKS, HEADS, BS, DIM, LAYERS = 8, 2, 16, 32, 3
BLOCK_BYTES = LAYERS * HEADS * BS * DIM * 4
PROBE_S = 0.5


@pytest.fixture
def own_pool(tmp_path) -> Iterator[PoolOnFreePorts]:
    """A pool this test may break."""
    with mooncake_pool(tmp_path / "mooncake", segment_size="64 MB") as running:
        yield running


@pytest.fixture
def buffer() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, 4 * BLOCK_BYTES, dtype=np.uint8)


def open_handle(
    pool: PoolOnFreePorts, buffer: np.ndarray, interval_s: float = PROBE_S
) -> tuple[PoolHandle, LookupBatcher]:
    settings = MooncakeSettings(**pool.client_config())
    handle = PoolHandle(lambda: MooncakeBackend(settings, holds_data=True), interval_s, "test")
    handle.register_memory(buffer.ctypes.data, buffer.nbytes)
    handle.start()
    assert wait_connected(handle, 15)
    return handle, LookupBatcher(handle)


def spans(buffer: np.ndarray, n: int) -> tuple[list[list[int]], list[list[int]]]:
    return [[buffer.ctypes.data + i * BLOCK_BYTES] for i in range(n)], [[BLOCK_BYTES]] * n


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def wait_until(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not true after {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - start


def test_master_killed_then_restarted(own_pool, buffer, caplog):
    handle, lookups = open_handle(own_pool, buffer)
    addrs, sizes = spans(buffer, 2)
    assert handle.put(["k/0", "k/1"], addrs, sizes) == [Outcome.OK] * 2

    stop_process(own_pool.master, signal.SIGKILL)
    found, took = timed(lookups.exists_within, ["k/0", "k/1"], 0.5)
    assert found is None and took < 1.0  # no answer: the pool's miss, not the blocks'
    assert handle.stats.total()["outages"] == 1 and not handle.available
    # Inside the back-off window nothing waits on the dead master: loads and saves fail fast.
    for op in (handle.get, handle.put):
        got, took = timed(op, ["k/2"], addrs[:1], sizes[:1])
        assert got == [Outcome.UNAVAILABLE] and took < 0.1
    assert "unreachable during lookup" in caplog.text

    # Mooncake's client reconnects to a restarted master, and the pool node mounts its segment again: saves and
    # hits resume. The old objects went with the master's metadata.
    own_pool.start_master()
    recovered_s = wait_until(lambda: handle.put(["k/3"], addrs[:1], sizes[:1]) == [Outcome.OK], 20)
    assert lookups.exists_within(["k/3", "k/0"], 0.5) == [True, False]
    assert handle.get(["k/3"], addrs[1:2], sizes[1:2]) == [Outcome.OK]
    assert "reachable again" in caplog.text
    assert handle.stats.total()["outages"] == 1
    print(f"saves resumed {recovered_s:.1f} s after the master restarted")
    lookups.close()
    handle.close()


def test_an_outage_ends_when_the_pool_is_back_not_when_the_back_off_runs_out(own_pool, buffer):
    """With the default 5-s back-off, the probe ends the outage within a probe interval or two of the master's
    return: saves and hits resume then (measured and printed), long before the window would have closed."""
    handle, lookups = open_handle(own_pool, buffer, interval_s=5.0)
    addrs, sizes = spans(buffer, 2)
    stop_process(own_pool.master, signal.SIGKILL)
    assert lookups.exists_within(["r/0"], 0.5) is None and not handle.available
    time.sleep(1.0)  # the probe keeps finding nothing
    assert not handle.available
    own_pool.start_master()
    restarted = time.monotonic()
    wait_until(lambda: handle.put(["r/1"], addrs[:1], sizes[:1]) == [Outcome.OK], 20)
    resumed_s = time.monotonic() - restarted
    assert lookups.exists_within(["r/1"], 0.5) == [True]
    assert handle.get(["r/1"], addrs[1:2], sizes[1:2]) == [Outcome.OK]
    print(f"saves and hits resumed {resumed_s:.2f} s after the master restarted (back-off window 5 s)")
    assert resumed_s < 5.0, "the outage lasted as long as its back-off window: the probe did not end it"
    lookups.close()
    handle.close()


def test_hung_master_costs_one_lookup_timeout(own_pool, buffer):
    handle, lookups = open_handle(own_pool, buffer)
    addrs, sizes = spans(buffer, 1)
    assert handle.put(["h/0"], addrs, sizes) == [Outcome.OK]
    own_pool.master.send_signal(signal.SIGSTOP)
    try:
        found, took = timed(lookups.exists_within, ["h/0"], 0.3)
        assert found is None and took < 1.0
        # The first lookup is still inside the client (its RPC timeout is 30 s): later ones answer at once.
        found, took = timed(lookups.exists_within, ["h/0"], 5.0)
        assert found is None and took < 0.1
    finally:
        own_pool.master.send_signal(signal.SIGCONT)
    wait_until(lambda: lookups.exists_within(["h/0"], 0.5) == [True], 10)
    lookups.close()
    handle.close()


@pytest.fixture
def worker(own_pool) -> Iterator[tuple[PoolWorker, dict[str, torch.Tensor]]]:
    layout = KVLayout(
        model="faults", model_dtype="float32", kv_dtype="float32", device_type="cpu", kv_layout="NHD",
        attention="FullAttentionSpec", block_size=BS, num_kv_heads=HEADS, head_size=DIM,
        page_size_bytes=HEADS * BS * DIM * 4, num_layers=LAYERS, tp_size=1, pp_size=1, kv_replicas=1,
    )  # fmt: skip
    config = parse_config(
        {"backend": "mooncake", "mooncake": own_pool.client_config(), "reconnect_interval_s": PROBE_S}
    )
    w = PoolWorker(layout, "faultshard", saves_enabled=True, num_blocks=NUM_BLOCKS, config=config)
    torch.manual_seed(0)
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, HEADS, BS, DIM) for i in range(LAYERS)}
    w.register_kv_caches(caches)
    assert w.pool is not None and wait_connected(w.pool, 15)
    yield w, caches
    w.shutdown()


def _save_blocks(w: PoolWorker, hashes: list[bytes], block_ids: list[int]) -> None:
    w.save(PoolConnectorMetadata(saves=[BlockTransfer("r-save", block_ids, hashes)]))
    assert w.saver is not None and w.saver.drain(10)
    assert w.stats.total().get("saved_blocks", 0) == len(block_ids)


def test_object_removed_between_lookup_and_load_is_recomputed(worker, own_pool):
    w, caches = worker
    hashes = [bytes([i]) * 32 for i in range(3)]
    _save_blocks(w, hashes, [0, 1, 2])
    keys = [pool_key("faultshard", h) for h in hashes]
    assert w.pool.exists(keys) == [True, True, True]  # the scheduler's lookup saw all three
    with plain_client(own_pool) as store:
        assert store.batch_remove(keys[1:2], True) == [0]  # evicted before the worker loads
    before = {name: t.clone() for name, t in caches.items()}
    w.load(PoolConnectorMetadata(loads=[BlockTransfer("r-load", [5, 6, 7], hashes)]))
    assert w.take_load_errors() == {6}  # vLLM recomputes block 6 (its load-error path)
    assert w.stats.total()["load_failed.missing"] == 1 and w.stats.total()["loaded_blocks"] == 2
    for name, t in caches.items():
        assert torch.equal(t[5], before[name][0]) and torch.equal(t[7], before[name][2])


def test_holder_of_the_objects_exits(worker, own_pool):
    """The pool node dies: its objects are still listed for a few seconds, but no byte of them can be read."""
    w, _ = worker
    hashes = [bytes([9, i]) * 16 for i in range(2)]
    _save_blocks(w, hashes, [0, 1])
    stop_process(own_pool.node, signal.SIGKILL)
    keys = [pool_key("faultshard", h) for h in hashes]
    w.load(PoolConnectorMetadata(loads=[BlockTransfer("r-gone", [4, 5], hashes)]))
    assert w.take_load_errors() == {4, 5}
    assert w.stats.total().get("loaded_blocks", 0) == 0
    # Later saves fail (no segment left) and are counted; nothing raises.
    w.save(PoolConnectorMetadata(saves=[BlockTransfer("r-more", [2], [b"\x07" * 32])]))
    assert w.saver.drain(10)
    failed = {k: v for k, v in w.stats.total().items() if k.startswith(("save_failed", "save_dropped"))}
    assert sum(failed.values()) >= 1, w.stats.total()
    wait_until(lambda: w.pool.exists(keys) == [False, False], 30)  # the master forgets the dead node's objects


def test_an_async_load_reports_finished_only_after_its_blocks_landed_with_its_errors(worker, own_pool):
    """The load runs on the loader thread; while the node holding the objects is stopped it cannot end, and the
    request is not reported; once it ends, the request is reported together with the block that failed."""
    w, caches = worker
    hashes = [bytes([7, i]) * 16 for i in range(3)]
    _save_blocks(w, hashes, [0, 1, 2])
    with plain_client(own_pool) as store:
        assert store.batch_remove([pool_key("faultshard", hashes[2])], True) == [0]
    before = {name: t[:2].clone() for name, t in caches.items()}
    own_pool.node.send_signal(signal.SIGSTOP)
    try:
        w.begin_step(PoolConnectorMetadata(async_loads=[BlockTransfer("r-async", [4, 5, 6], hashes)]))
        time.sleep(1.0)
        assert w.finished_loads(idle_step=True) == set()  # waited its few ms, then answered: still loading
    finally:
        own_pool.node.send_signal(signal.SIGCONT)
    wait_until(lambda: bool(finished := w.finished_loads(idle_step=True)) and finished == {"r-async"}, 15)
    assert w.take_load_errors() == {6}
    for name, t in caches.items():
        assert torch.equal(t[4:6], before[name])
