"""A worker on a simulated Ascend NPU: KV pages in the device double's memory, vllm-ascend's (k_cache, v_cache) layout,
memcache through the pymmc double against the real meta service. Shared by the tests of the worker, the memcache
backend and the device seam."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from doubles.device_double import RecordingDevice

from kvpool_connector.backends import memcache as memcache_backend
from kvpool_connector.backends.memcache_settings import MMC_LOCAL_CONFIG_ENV
from kvpool_connector.config import ResolvedConfig, parse_config
from kvpool_connector.keys import KVLayout
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.worker import PoolWorker
from kvpool_testkit.inspection import wait_connected

DOUBLE = Path(__file__).parent / "pymmc" / "memcache_hybrid" / "__init__.py"
NUM_BLOCKS, BS, HEADS, DIM, LAYERS = 8, 16, 2, 16, 3
PAGE = 2 * BS * HEADS * DIM * 4  # one layer's K and V page of one block (float32)
_modules = itertools.count()

LAYOUT = KVLayout(
    model="ascend-double", model_dtype="bfloat16", kv_dtype="float32", device_type="npu", kv_layout="NHD",
    attention="FullAttentionSpec", block_size=BS, num_kv_heads=HEADS, head_size=DIM, page_size_bytes=PAGE,
    num_layers=LAYERS, tp_size=1, pp_size=1, kv_replicas=1,
)  # fmt: skip


def load_pymmc_double(monkeypatch: pytest.MonkeyPatch, local_config: Path, store: Path):
    """A fresh pymmc double (its own process-wide state) that reads ``local_config``, as the connector's pymmc."""
    monkeypatch.setenv(MMC_LOCAL_CONFIG_ENV, str(local_config))
    monkeypatch.setenv("MMC_DOUBLE_STORE", str(store))
    spec = importlib.util.spec_from_file_location(f"pymmc_double_{next(_modules)}", DOUBLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(memcache_backend, "_import_store_class", lambda: module.DistributedObjectStore)
    monkeypatch.setattr(memcache_backend, "_PROCESS_CLIENT", memcache_backend._ProcessClient())
    module.store_dir = store
    return module


def init_lines(pymmc) -> list[str]:
    """What the double logged of each pymmc ``init`` in this process."""
    log = pymmc.store_dir / "inits.log"
    return log.read_text().splitlines() if log.exists() else []


def memcache_config(meta, **extra) -> ResolvedConfig:
    return parse_config({"reconnect_interval_s": 0.5, **extra}, env={MMC_LOCAL_CONFIG_ENV: str(meta.local_config)})


def npu_kv_caches(device: RecordingDevice, layers: int = LAYERS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """vllm-ascend's layout: a (k_cache, v_cache) pair per layer, each (num_blocks, block_size, heads, dim)."""
    return {
        f"model.layers.{i}.self_attn.attn": (
            device.alloc(NUM_BLOCKS, BS, HEADS, DIM),
            device.alloc(NUM_BLOCKS, BS, HEADS, DIM),
        )
        for i in range(layers)
    }


def open_worker(meta, device, stripe=(0, 1), layers=LAYERS, shard="npushard", **extra) -> tuple[PoolWorker, dict]:
    caches = npu_kv_caches(device, layers)
    layout = dataclasses.replace(LAYOUT, num_layers=layers)
    worker = PoolWorker(layout, shard, True, NUM_BLOCKS, memcache_config(meta, **extra), stripe=stripe, runtime=device)
    worker.register_kv_caches(caches)
    assert worker.pool is not None and wait_connected(worker.pool, 10)
    return worker, caches


def forward_writes(device: RecordingDevice, caches: dict, block_ids: list[int]) -> None:
    """The forward pass queues kernels that write these blocks' KV (distinct values per block and layer)."""
    for layer, (k, v) in enumerate(caches.values()):
        for block in block_ids:
            device.launch_write(k[block], 1000 * layer + block)
            device.launch_write(v[block], -1000 * layer - block)


def save(worker: PoolWorker, block_ids: list[int], tag: str) -> list[bytes]:
    hashes = [f"{tag}-{b}".encode().ljust(32, b".") for b in block_ids]
    worker.save(PoolConnectorMetadata(saves=[BlockTransfer(f"req-{tag}", block_ids, hashes)]))
    if worker.saver is not None:
        assert worker.saver.drain(10)
    return hashes


def block_bytes(caches: dict, block: int) -> bytes:
    return b"".join(t[block].numpy().tobytes() for pair in caches.values() for t in pair)
