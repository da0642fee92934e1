"""What a worker refuses at start-up, before it touches the pool: settings that could only fail every transfer."""

from dataclasses import replace

import pytest
import torch

from kvpool_connector.config import parse_config
from kvpool_connector.keys import KVLayout
from kvpool_connector.worker import PoolWorker

BLOCK, HEADS, DIM, LAYERS = 16, 4, 64, 2  # fp32, K+V: 32 KiB per layer page, 64 KiB per block object


def test_a_shared_area_smaller_than_a_block_object_is_refused_with_the_fix():
    page = HEADS * BLOCK * 2 * DIM * 4
    layout = KVLayout(
        "t", "float32", "float32", "cpu", "NHD", "FullAttentionSpec", BLOCK, HEADS, DIM, page, LAYERS, 1, 1, False
    )
    mooncake = {"master_server_address": "127.0.0.1:1", "real_client_address": "127.0.0.1:2"}
    config = parse_config({"backend": "mooncake", "mooncake": {**mooncake, "shared_buffer_size": "1MB"}}, env={})
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(8, HEADS, BLOCK, 2 * DIM) for i in range(LAYERS)}
    worker = PoolWorker(layout, "t", True, 8, config)
    worker.register_kv_caches(caches)  # 1 MB holds a 64 KiB object: accepted (the pool is unreachable: no hits)
    worker.shutdown()

    big = {name: torch.zeros(8, HEADS, BLOCK * 64, 2 * DIM) for name in caches}  # 4 MiB block objects
    big_layout = replace(layout, block_size=BLOCK * 64, page_size_bytes=page * 64)
    worker = PoolWorker(big_layout, "t", True, 8, config)
    with pytest.raises(
        ValueError,
        match=r"`shared_buffer_size` \(1MB\) is smaller than one KV block object \(4194304 bytes\).*at least 4194304",
    ):
        worker.register_kv_caches(big)
    assert worker.pool is None  # refused before any pool client started
