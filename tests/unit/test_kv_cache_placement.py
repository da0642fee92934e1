"""A worker attached to a Mooncake node through shared memory places vLLM's KV cache in memory the node maps, and
falls back to a private KV cache (transfers through the shared areas) whenever it cannot."""

import contextlib
import logging

import numpy as np
import pytest
import torch

from kvpool_connector.config import parse_config
from kvpool_connector.keys import KVLayout
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.worker import PoolWorker
from kvpool_testkit.ports import reserve_port

pytestmark = pytest.mark.processes

BLOCK, HEADS, DIM, LAYERS, BLOCKS = 16, 4, 64, 2, 8  # fp32, K+V: 32 KiB per layer page
PAGE = HEADS * BLOCK * 2 * DIM * 4
LAYOUT = KVLayout("t", "float32", "float32", "cpu", "NHD", "FullAttentionSpec", BLOCK, HEADS, DIM, PAGE, LAYERS, 1, 1)
KV_BYTES = LAYERS * BLOCKS * PAGE


def worker_for(mooncake: dict, **extra: object) -> PoolWorker:
    config = parse_config(
        {"backend": "mooncake", "async_save": False, "mooncake": {**mooncake, **extra}, "startup_wait_s": 5}, env={}
    )
    return PoolWorker(LAYOUT, f"t{reserve_port()}", True, BLOCKS, config, kv_cache_bytes=KV_BYTES)


def allocate_like_vllm(placement) -> dict[str, torch.Tensor]:
    """vLLM 0.32's CPU allocation: one int8 backing buffer, a view per layer."""
    with placement if placement is not None else contextlib.nullcontext():
        backing = torch.zeros(KV_BYTES, dtype=torch.int8, device=torch.device("cpu"))
    per_layer = backing.view(torch.float32).view(LAYERS, BLOCKS, HEADS, BLOCK, 2 * DIM)
    return {f"model.layers.{i}.self_attn.attn": per_layer[i] for i in range(LAYERS)}


def test_kv_cache_placed_in_node_memory_round_trips(pool, caplog):
    saver = worker_for(pool.client_config(shared_memory=True))
    placement = saver.kv_cache_allocation()
    assert placement is not None
    caches = allocate_like_vllm(placement)
    assert placement.served
    with caplog.at_level(logging.INFO, logger="vllm.kvpool_connector.worker"):
        saver.register_kv_caches(caches)
    assert "placed in the pool client's memory" in caplog.text
    rng = np.random.default_rng(3)
    for cache in caches.values():
        cache[:2] = torch.from_numpy(rng.standard_normal(cache[:2].shape, dtype=np.float32))
    hashes = [b"\x01" * 8, b"\x02" * 8]
    saver.save(PoolConnectorMetadata(saves=[BlockTransfer("r1", [0, 1], hashes)]))
    assert saver.stats.total()["saved_blocks"] == 2

    loader = worker_for(pool.client_config(shared_memory=True))
    loader.shards = saver.shards
    loader_placement = loader.kv_cache_allocation()
    loaded = allocate_like_vllm(loader_placement)
    assert loader_placement is not None and loader_placement.served
    loader.register_kv_caches(loaded)
    loader.load(PoolConnectorMetadata(loads=[BlockTransfer("r2", [5, 6], hashes)]))
    assert loader.take_load_errors() == set()
    for name in caches:
        assert torch.equal(loaded[name][5:7], caches[name][:2])
    saver.shutdown()
    loader.shutdown()


def test_no_placement_when_turned_off_or_the_node_does_not_answer(pool, caplog):
    assert (
        worker_for(pool.client_config(shared_memory=True), kv_cache_in_shared_memory=False).kv_cache_allocation()
        is None
    )
    assert worker_for(pool.client_config()).kv_cache_allocation() is None  # own transfer engine: nothing to place
    absent = {**pool.client_config(shared_memory=True), "real_client_address": f"127.0.0.1:{reserve_port()}"}
    worker = worker_for(absent)
    with caplog.at_level(logging.WARNING, logger="vllm.kvpool_connector.worker"):
        assert worker.kv_cache_allocation() is None
    assert "KV cache stays in private memory" in caplog.text
    assert "is not reachable" in caplog.text
