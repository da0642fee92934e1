"""PoolWorker against real pools: its KV registrations across vLLM's sleep mode (vLLM 0.34 calls
``unregister_kv_caches`` before it releases the KV cache's memory and ``restore_kv_caches`` after wake-up backed it
again, at the same addresses) on Mooncake; and on a simulated Ascend NPU (the device double, vllm-ascend's KV layout,
memcache through the pymmc double and the real meta service): transfer directions, the compute-stream fence before
any device page is read, failed device copies, codes mid-batch, outages, ranks that split their puts."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch
from doubles.npu_worker import NUM_BLOCKS, block_bytes, forward_writes, init_lines, memcache_config, open_worker, save

from kvpool_connector.backends import ClientRole, create_backend
from kvpool_connector.config import parse_config
from kvpool_connector.keys import KVLayout, pool_key
from kvpool_connector.lookups import LookupBatcher
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.processes import stop_process
from kvpool_connector.worker import PoolWorker
from kvpool_testkit.inspection import wait_connected
from kvpool_testkit.memcache_meta import start_meta_service

pytestmark = pytest.mark.processes

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
    assert worker.pool is not None and wait_connected(worker.pool, 30)
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


# -- on a simulated NPU: the device double and the pymmc double ----------------------------------------------------
def test_staged_saves_put_host_memory_as_h2g_and_load_into_device_pages(meta, device):
    """Asynchronous saves stage NPU pages to host memory, so their put must say H2G (pymmc reads an L2G buffer as
    HBM; the double refuses host addresses there); loads go G2L straight into the device pages."""
    worker, caches = open_worker(meta, device)
    forward_writes(device, caches, [0, 1, 2])
    hashes = save(worker, [0, 1, 2], "staged")
    assert worker.stats.total()["saved_blocks"] == 3, worker.stats.total()
    worker.load(PoolConnectorMetadata(loads=[BlockTransfer("load", [5, 6, 7], hashes)]))
    assert worker.take_load_errors() == set()
    assert [block_bytes(caches, b) for b in (5, 6, 7)] == [block_bytes(caches, b) for b in (0, 1, 2)]
    assert device.violations == []
    worker.shutdown()


def test_only_the_kv_tensors_are_registered_with_memcache(meta, device, pymmc):
    """register_buffer is for device RDMA: the KV tensors' bytes are registered, host staging never is."""
    worker, caches = open_worker(meta, device)
    registered = sorted(worker.pool._backend._store.registered())
    tensors = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for pair in caches.values() for t in pair
    )
    merged: list[list[int]] = []  # adjacent tensors are one region
    for start, end in tensors:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    assert registered == [(start, end - start) for start, end in merged]
    assert all(device.holds(ptr, size) for ptr, size in registered)
    worker.shutdown()


def test_synchronous_save_waits_for_the_forward_pass_before_the_pool_reads_pages(meta, device):
    """With async_save false the put reads the device pages: the worker must wait for the compute stream's event
    first, or memcache's engine reads KV still being written (vllm-ascend #4412)."""
    worker, caches = open_worker(meta, device, async_save=False)
    forward_writes(device, caches, [3, 4])
    save(worker, [3, 4], "sync")
    assert worker.stats.total()["saved_blocks"] == 2
    assert device.violations == []
    assert device.host_waits == [threading.current_thread().name]  # the forward thread waited, once
    worker.shutdown()


def test_async_save_copies_after_the_event_and_never_blocks_the_forward_thread(meta, device):
    worker, caches = open_worker(meta, device)
    forward_writes(device, caches, [1])
    save(worker, [1], "async")
    assert device.violations == [] and device.copies == 1
    assert threading.current_thread().name not in device.host_waits  # the save thread waits, not the forward pass
    assert "kvpool-save" in device.host_waits
    worker.shutdown()


def test_a_failed_device_copy_drops_its_saves_and_frees_the_slots(meta, device):
    worker, caches = open_worker(meta, device, staging_buffer_mb=1)
    slots = (1 << 20) // worker.pages.block_bytes
    device.fail_next_copies = 1
    forward_writes(device, caches, [0, 1])
    save(worker, [0, 1], "copyfail")  # must not raise into wait_for_save
    assert worker.stats.total()["save_failed.copy"] == 2
    every = list(range(NUM_BLOCKS)) * (slots // NUM_BLOCKS + 1)
    forward_writes(device, caches, list(range(NUM_BLOCKS)))
    save(worker, every[:slots], "after")  # as many blocks as the area holds: none of its slots leaked
    assert worker.stats.total().get("save_dropped.staging_full", 0) == 0
    worker.shutdown()


def test_a_code_in_the_middle_of_a_batch_fails_that_block_only(meta, device, monkeypatch):
    worker, caches = open_worker(meta, device)
    forward_writes(device, caches, [0, 1, 2])
    hashes = save(worker, [0, 1, 2], "mid")
    store = worker.pool._backend._store
    real_get = store.batch_get_into_layers
    monkeypatch.setattr(
        store, "batch_get_into_layers", lambda *a: [c if i != 1 else -3102 for i, c in enumerate(real_get(*a))]
    )
    worker.load(PoolConnectorMetadata(loads=[BlockTransfer("mid", [4, 5, 6], hashes)]))
    assert worker.take_load_errors() == {5}
    assert worker.stats.total()["load_failed.missing"] == 1 and worker.stats.total()["loaded_blocks"] == 2
    worker.shutdown()


def test_meta_service_down_opens_the_outage_back_off_and_hits_resume(meta, device, tmp_path):
    """Data calls answer MMC_NOT_CONNET_META while the real meta service is stopped: the handle stops calling the
    pool for its back-off window instead of waiting out pymmc's timeouts on every step, and recovers by itself."""
    worker, caches = open_worker(meta, device)
    forward_writes(device, caches, [0])
    hashes = save(worker, [0], "outage")
    stop_process(meta.proc)
    try:
        worker.load(PoolConnectorMetadata(loads=[BlockTransfer("down", [3], hashes)]))
        assert worker.take_load_errors() == {3}
        assert worker.stats.total()["outages"] == 1 and not worker.pool.available
        assert worker.stats.total()["load_failed.unavailable"] == 1
    finally:  # the same service back where it was, for the rest of the module (its fixture stops it)
        meta.proc = start_meta_service(tmp_path / "meta-again", ports=(meta.meta_port, meta.config_store_port)).proc
    deadline = time.monotonic() + 5
    while not worker.pool.available and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.load(PoolConnectorMetadata(loads=[BlockTransfer("up", [3], hashes)]))
    assert worker.take_load_errors() == set()
    assert block_bytes(caches, 3) == block_bytes(caches, 0)
    worker.shutdown()


def test_ranks_holding_the_same_kv_split_the_puts_and_write_each_object_once(meta, device):
    workers = []
    for rank in range(2):
        worker, caches = open_worker(meta, device, stripe=(rank, 2), shard="mla")
        forward_writes(device, caches, list(range(5)))
        workers.append(worker)
    for worker in workers:  # every rank gets the same step metadata
        hashes = save(worker, list(range(5)), "mla")
    assert [w.stats.total().get("saved_blocks", 0) for w in workers] == [3, 2]
    assert workers[0].pool.exists([pool_key("mla", h) for h in hashes]) == [True] * 5
    for worker in workers:
        worker.shutdown()


@pytest.mark.parametrize(("extra", "expected"), [({"memcache_device_id": 5}, 5), ({}, 2)], ids=["configured", "unset"])
def test_memcache_device_id_reaches_pymmcs_init_in_place_of_the_local_rank(meta, pymmc, device, extra, expected):
    """``memcache_device_id`` picks the device the worker's pymmc client binds; unset, the worker's local rank (what
    the worker hands every backend as ``device_id``)."""
    backend = create_backend(memcache_config(meta, **extra), ClientRole(True, device_id=2, runtime=device))
    backend.connect()
    backend.close()
    assert init_lines(pymmc)[-1].split(" ", 1)[1] == f"device={expected} init_bm=True initialised"


def test_connect_save_and_lookup_threads_bind_the_device(meta, device):
    worker, caches = open_worker(meta, device)
    lookups = LookupBatcher(worker.pool)
    lookups.exists_within(["kvp1/x/00"], 1.0)
    forward_writes(device, caches, [0])
    save(worker, [0], "bind")
    threads = device.bound_threads
    assert any(t.startswith("kvpool-connect") for t in threads), threads
    assert "kvpool-save" in threads
    assert any(t.startswith("kvpool-lookup") for t in threads), threads
    lookups.close()
    worker.shutdown()


# -- start-up refusals -------------------------------------------------------------------------------------------
def test_a_shared_area_smaller_than_a_block_object_is_refused_with_the_fix():
    heads = 4
    page = heads * BLOCK * 2 * DIM * 4  # 16-token blocks, fp32, K+V: 64 KiB per block object over 2 layers
    layout = KVLayout(
        "t", "float32", "float32", "cpu", "NHD", "FullAttentionSpec", BLOCK, heads, DIM, page, LAYERS, 1, 1
    )
    mooncake = {"master_server_address": "127.0.0.1:1", "real_client_address": "127.0.0.1:2"}
    config = parse_config({"backend": "mooncake", "mooncake": {**mooncake, "shared_buffer_size": "1MB"}}, env={})
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(8, heads, BLOCK, 2 * DIM) for i in range(LAYERS)}
    worker = PoolWorker(layout, "t", True, 8, config)
    worker.register_kv_caches(caches)  # 1 MB holds a 64 KiB object: accepted (the pool is unreachable: no hits)
    worker.shutdown()

    big = {name: torch.zeros(8, heads, BLOCK * 64, 2 * DIM) for name in caches}  # 4 MiB block objects
    big_layout = replace(layout, block_size=BLOCK * 64, page_size_bytes=page * 64)
    worker = PoolWorker(big_layout, "t", True, 8, config)
    with pytest.raises(
        ValueError,
        match=r"`shared_buffer_size` \(1MB\) is smaller than one KV block object \(4194304 bytes\).*at least 4194304",
    ):
        worker.register_kv_caches(big)
    assert worker.pool is None  # refused before any pool client started
