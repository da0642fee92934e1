"""The save path against a real Mooncake Store, in both modes: staged bytes are what lands in the pool, even when vLLM
reuses a block while its put is in flight; a full staging area drops the oldest queued saves; a cache reset drops
the queued ones; synchronous saves put straight from the pages; every outcome is counted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from kvpool_connector.backends import Outcome
from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.backends.mooncake_settings import MooncakeSettings
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import CpuRuntime
from kvpool_connector.keys import pool_key
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.metadata import BlockTransfer
from kvpool_connector.pool import PoolHandle
from kvpool_connector.saving import BlockSaver
from kvpool_testkit.mooncake_pool import pool_handle

pytestmark = pytest.mark.processes

NUM_BLOCKS, HEADS, BS, DIM = 8, 2, 16, 32


@pytest.fixture
def kv():
    torch.manual_seed(0)
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, HEADS, BS, DIM) for i in range(3)}
    return caches, KVPages(caches, NUM_BLOCKS, HEADS * BS * DIM * 4)


@pytest.fixture
def handle(pool):
    with pool_handle(pool) as h:
        yield h


class GatedPuts:
    """Holds every put of the pool handle until ``open()``: a save in flight that the test controls."""

    def __init__(self, handle: PoolHandle) -> None:
        self._put = handle.put
        self._gate = threading.Event()
        self.entered = threading.Event()
        handle.put = self._held_put  # type: ignore[method-assign]

    def _held_put(self, *args):
        self.entered.set()
        self._gate.wait(10)
        return self._put(*args)

    def open(self) -> None:
        self._gate.set()


def saver_for(handle, pages, staging_blocks: int, shard: str) -> BlockSaver:
    return BlockSaver(handle, pages, [shard], CpuRuntime(), StatsCounter(), staging_blocks=staging_blocks)


def transfer(block_ids: list[int], tag: int) -> BlockTransfer:
    return BlockTransfer("r", block_ids, [bytes([tag, b]) * 16 for b in block_ids])


def keys_of(shard: str, t: BlockTransfer) -> list[str]:
    return [pool_key(shard, h) for h in t.block_hashes]


def _block_bytes(caches, block: int) -> bytes:
    return b"".join(caches[name][block].numpy().tobytes() for name in sorted(caches))


@pytest.fixture
def read_back(handle, kv):
    """Read one pool object into a buffer registered once (Mooncake refuses to register an address twice)."""
    out = np.zeros(kv[1].block_bytes, dtype=np.uint8)
    handle.register_memory(out.ctypes.data, out.nbytes)

    def read(key: str) -> bytes:
        out.fill(0)
        assert handle.get([key], [[out.ctypes.data]], [[out.nbytes]]) == [Outcome.OK]
        return out.tobytes()

    return read


@pytest.mark.parametrize("staging_blocks", [4, 0], ids=["staged", "synchronous"])
def test_saved_blocks_land_in_the_pool_once(kv, handle, read_back, staging_blocks):
    caches, pages = kv
    shard = f"land{staging_blocks}"
    saver = saver_for(handle, pages, staging_blocks, shard)
    blocks = transfer([1, 2, 5], tag=1)
    saver.save([blocks])
    assert saver.drain(10)
    for key, block in zip(keys_of(shard, blocks), (1, 2, 5), strict=True):
        assert read_back(key) == _block_bytes(caches, block)
    totals = saver.stats.total()
    assert totals["saved_blocks"] == 3 and totals["saved_bytes"] == 3 * pages.block_bytes
    saver.save([transfer([1], tag=1)])  # already in the pool: skipped, not put again
    assert saver.drain(10)
    assert saver.stats.total()["save_skipped_present"] == 1 and saver.stats.total()["saved_blocks"] == 3
    saver.close()


def test_ranks_holding_the_same_kv_put_their_stripe_only(kv, handle):
    _, pages = kv
    blocks = transfer([0, 1, 2, 3, 4], tag=2)
    saver = BlockSaver(handle, pages, ["stripe"], CpuRuntime(), StatsCounter(), stripe=(1, 2))
    saver.save([blocks])
    assert handle.exists(keys_of("stripe", blocks)) == [False, True, False, True, False]  # rank 1 of 2: blocks 1, 3
    saver.close()


def test_block_reused_while_save_in_flight_does_not_corrupt_pool(kv, handle, read_back):
    caches, pages = kv
    saver = saver_for(handle, pages, 4, "reuse")
    gate = GatedPuts(handle)
    original = _block_bytes(caches, 3)
    blocks = transfer([3], tag=3)
    saver.save([blocks])
    assert gate.entered.wait(10)  # the put of block 3 is in flight
    for tensor in caches.values():  # a new request gets block 3 and writes its own KV there
        tensor[3].fill_(42.0)
    gate.open()
    assert saver.drain(10)
    assert read_back(keys_of("reuse", blocks)[0]) == original
    saver.close()


def test_full_staging_drops_oldest_queued_saves(kv, handle, read_back):
    caches, pages = kv
    saver = saver_for(handle, pages, 3, "full")
    gate = GatedPuts(handle)
    first, queued, last = transfer([6], tag=4), transfer([0, 1], tag=4), transfer([4], tag=4)
    saver.save([first])
    assert gate.entered.wait(10)  # in flight: its slot stays taken
    saver.save([queued])
    saver.save([last])  # no free slot: the queued job (2 blocks) is dropped, never the one in flight
    assert saver.stats.total()["save_dropped.staging_full"] == 2
    gate.open()
    assert saver.drain(10)
    present = handle.exists(keys_of("full", first) + keys_of("full", queued) + keys_of("full", last))
    assert present == [True, False, False, True]
    assert read_back(keys_of("full", last)[0]) == _block_bytes(caches, 4)
    saver.close()


def test_close_with_queued_saves_puts_them(kv, handle):
    _, pages = kv
    saver = saver_for(handle, pages, 4, "close")
    blocks = transfer([6], tag=5)
    saver.save([blocks])
    saver.close(timeout_s=10)
    assert handle.exists(keys_of("close", blocks)) == [True]


def test_a_cache_reset_drops_the_queued_saves_and_frees_their_slots(kv, handle):
    _, pages = kv
    saver = saver_for(handle, pages, 4, "reset")
    gate = GatedPuts(handle)
    in_flight, queued = transfer([7], tag=6), transfer([1, 2], tag=6)
    saver.save([in_flight])
    assert gate.entered.wait(10)
    saver.save([queued])
    dropped: list[int] = []
    dropper = threading.Thread(target=lambda: dropped.extend(len(job.keys) for job in saver.drop_queued(timeout_s=10)))
    dropper.start()  # forgets the queued save at once, then waits for the one in flight
    time.sleep(0.2)
    gate.open()
    dropper.join(10)
    assert dropped == [2]
    assert handle.exists(keys_of("reset", in_flight) + keys_of("reset", queued)) == [True, False, False]
    after = transfer([0, 1, 2, 3], tag=7)
    saver.save([after])  # every slot is free again
    assert saver.drain(10)
    assert handle.exists(keys_of("reset", after)) == [True] * 4
    assert saver.stats.total().get("save_dropped.staging_full", 0) == 0
    saver.close()


def test_saves_while_the_pool_is_unreachable_are_counted_not_tried(kv):
    _, pages = kv
    settings = MooncakeSettings(master_server_address="127.0.0.1:1")  # nothing listens there
    handle = PoolHandle(lambda: MooncakeBackend(settings, holds_data=True), 60.0, "down")
    saver = saver_for(handle, pages, 4, "down")
    saver.save([transfer([1, 2], tag=8)])
    assert saver.drain(10)
    totals = saver.stats.total()
    assert totals.get("save_dropped.unavailable", 0) == 2 and totals.get("saved_blocks", 0) == 0
    saver.close()
    handle.close()
