"""The asynchronous save path against a real Mooncake Store: staged bytes are what lands in the pool, even when vLLM
reuses the blocks while the put is still in flight; a full staging area drops the oldest queued saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpool_connector.backends import Outcome
from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.config import MooncakeSettings
from kvpool_connector.devices import CpuRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.pool import PoolHandle
from kvpool_connector.staging import StagingSaver

NUM_BLOCKS, HEADS, BS, DIM = 8, 2, 16, 32


@pytest.fixture
def kv():
    torch.manual_seed(0)
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, HEADS, BS, DIM) for i in range(3)}
    return caches, KVPages(caches, NUM_BLOCKS, HEADS * BS * DIM * 4)


@pytest.fixture
def handle(pool):
    h = PoolHandle(lambda: MooncakeBackend(MooncakeSettings(**pool.client_config()), holds_data=True), 1.0, "test")
    h.start()
    assert h.wait_connected(10)
    yield h
    h.close()


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


def test_staged_blocks_land_in_pool(kv, handle, read_back):
    caches, pages = kv
    saver = StagingSaver(handle, pages, capacity_blocks=4, runtime=CpuRuntime())
    keys = [f"t/staging/land/{b}" for b in (1, 2, 5)]
    saver.stage(keys, [1, 2, 5], None)
    assert saver.flush(10)
    for key, block in zip(keys, (1, 2, 5), strict=True):
        assert read_back(key) == _block_bytes(caches, block)
    assert saver.stats["saved_blocks"] == 3
    saver.stage(keys[:1], [1], None)  # already in the pool: skipped, not re-put
    assert saver.flush(10)
    assert saver.stats["save_skipped_present"] == 1
    saver.close()


def test_block_reused_while_save_in_flight_does_not_corrupt_pool(kv, handle, read_back):
    caches, pages = kv
    saver = StagingSaver(handle, pages, capacity_blocks=4, runtime=CpuRuntime())
    original = _block_bytes(caches, 3)
    saver.pause()
    saver.stage(["t/staging/reuse/3"], [3], None)
    for tensor in caches.values():  # a new request gets block 3 and writes its own KV there
        tensor[3].fill_(42.0)
    saver.resume()
    assert saver.flush(10)
    assert read_back("t/staging/reuse/3") == original
    saver.close()


def test_full_staging_drops_oldest_queued_saves(kv, handle, read_back):
    caches, pages = kv
    saver = StagingSaver(handle, pages, capacity_blocks=2, runtime=CpuRuntime())
    saver.pause()
    saver.stage(["t/staging/full/a0", "t/staging/full/a1"], [0, 1], None)
    saver.stage(["t/staging/full/b"], [4], None)  # no free slot: the queued job "a" is dropped
    assert saver.stats["save_dropped.staging_full"] == 2
    saver.resume()
    assert saver.flush(10)
    assert handle.exists(["t/staging/full/a0", "t/staging/full/a1", "t/staging/full/b"]) == [False, False, True]
    assert read_back("t/staging/full/b") == _block_bytes(caches, 4)
    saver.close()


def test_close_with_queued_saves_puts_them(kv, handle):
    _, pages = kv
    saver = StagingSaver(handle, pages, capacity_blocks=4, runtime=CpuRuntime())
    saver.stage(["t/staging/close/6"], [6], None)
    saver.close(timeout_s=10)
    assert handle.exists(["t/staging/close/6"]) == [True]


def test_a_cache_reset_drops_the_queued_saves_and_frees_their_slots(kv, handle):
    _, pages = kv
    saver = StagingSaver(handle, pages, capacity_blocks=4, runtime=CpuRuntime())
    saver.pause()
    saver.stage(["t/staging/reset/1", "t/staging/reset/2"], [1, 2], None)
    assert saver.drop_queued(timeout_s=10) == 2
    saver.resume()
    assert saver.flush(10)
    assert handle.exists(["t/staging/reset/1", "t/staging/reset/2"]) == [False, False]
    keys = [f"t/staging/reset/after/{b}" for b in range(4)]
    saver.stage(keys, [0, 1, 2, 3], None)  # every slot is free again
    assert saver.flush(10)
    assert handle.exists(keys) == [True] * 4 and saver.stats["save_dropped.staging_full"] == 0
    saver.close()
