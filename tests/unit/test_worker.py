"""PoolWorker against a real Mooncake Store: what its registrations of KV memory do across vLLM's sleep mode (vLLM
0.34 calls ``unregister_kv_caches`` before it releases the KV cache's memory and ``restore_kv_caches`` after wake-up
backed it again, at the same addresses)."""

from __future__ import annotations

import torch

from kvpool_connector.config import parse_config
from kvpool_connector.keys import KVLayout
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.worker import PoolWorker

BLOCK, HEADS, DIM, LAYERS, BLOCKS = 16, 2, 64, 2, 8
NOT_REGISTERED = -600  # Mooncake's unregister_buffer of memory it does not hold a registration for (INVALID_PARAMS)


def mooncake_worker(pool) -> tuple[PoolWorker, dict[str, torch.Tensor]]:
    page = HEADS * BLOCK * 2 * DIM * 4
    layout = KVLayout(
        "t", "float32", "float32", "cpu", "LBHNC", "FullAttentionSpec", BLOCK, HEADS, DIM, page, LAYERS, 1, 1
    )
    config = parse_config({"backend": "mooncake", "mooncake": pool.client_config(), "async_save": False}, env={})
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM) for i in range(LAYERS)}
    worker = PoolWorker(layout, "sleep-test", True, BLOCKS, config)
    worker.register_kv_caches(caches)
    assert worker.pool is not None and worker.pool.wait_connected(30)
    return worker, caches


def test_sleep_drops_the_kv_registrations_and_wake_up_makes_them_again(pool):
    worker, caches = mooncake_worker(pool)
    store = worker.pool._backend._store  # the real Mooncake client: it knows what is registered
    regions = worker.pages.regions
    try:
        worker.release_kv_memory()
        worker.release_kv_memory()  # idempotent, as vLLM may call it twice (sleep after a discard)
        assert [store.unregister_buffer(ptr) for ptr, _ in regions] == [NOT_REGISTERED] * len(regions)

        worker.restore_kv_memory()
        worker.restore_kv_memory()
        for name in caches:
            caches[name][1] = float(len(name))  # "new pages" after wake-up: the KV of block 1
        block = BlockTransfer("r", [1], [b"\x01" * 32])
        worker.save(PoolConnectorMetadata(saves=[block]))
        for name in caches:
            caches[name][1] = 0
        worker.load(PoolConnectorMetadata(loads=[BlockTransfer("r", [1], [b"\x01" * 32])]))
        assert worker.take_load_errors() == set()
        assert all(bool((caches[name][1] == float(len(name))).all()) for name in caches)
        assert [store.unregister_buffer(ptr) for ptr, _ in regions] == [0] * len(regions)  # registered again
        for ptr, size in regions:
            assert store.register_buffer(ptr, size) == 0
    finally:
        worker.shutdown()
