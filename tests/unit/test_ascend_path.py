"""The Ascend path (memcache + NPU pages) checked against test doubles of pymmc and of the device runtime.

Each test names the finding of ``../shared/ASCEND_REVIEW.md`` it guards; each fails on the code before its fix.
The doubles (``tests/doubles``) behave as pymmc and an accelerator runtime do; the meta service is the real one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from doubles.device_double import RecordingDevice

from kvpool_connector.backends import Outcome, PoolUnavailable, RegistrationRefused
from kvpool_connector.backends import memcache as memcache_backend
from kvpool_connector.backends.memcache import MemcacheBackend
from kvpool_connector.config import MMC_LOCAL_CONFIG_ENV, parse_config
from kvpool_connector.keys import KVLayout, pool_key
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.pool import PoolHandle
from kvpool_connector.processes import stop_process
from kvpool_connector.testing.memcache_meta import memcache_meta_service, start_meta_service
from kvpool_connector.worker import PoolWorker

DOUBLE = Path(__file__).parents[1] / "doubles" / "pymmc" / "memcache_hybrid" / "__init__.py"
NUM_BLOCKS, BS, HEADS, DIM, LAYERS = 8, 16, 2, 16, 3
PAGE = 2 * BS * HEADS * DIM * 4  # one layer's K and V page of one block (float32)
_modules = itertools.count()


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    with memcache_meta_service(tmp_path_factory.mktemp("mmc-meta")) as running:
        yield running


def load_double(monkeypatch: pytest.MonkeyPatch, local_config: Path, store: Path):
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


@pytest.fixture
def pymmc(meta, tmp_path, monkeypatch):
    """The double, pointed at the module's real meta service."""
    yield load_double(monkeypatch, meta.local_config, tmp_path / "store")
    assert memcache_backend._PROCESS_CLIENT.users == 0, "a test left a memcache client open"


@pytest.fixture
def device(pymmc):
    device = RecordingDevice()
    pymmc.attach_device(device)
    return device


def config(meta, **extra):
    return parse_config({"reconnect_interval_s": 0.5, **extra}, env={MMC_LOCAL_CONFIG_ENV: str(meta.local_config)})


LAYOUT = KVLayout(
    model="ascend-double", model_dtype="bfloat16", kv_dtype="float32", device_type="npu", kv_layout="NHD",
    attention="FullAttentionSpec", block_size=BS, num_kv_heads=HEADS, head_size=DIM, page_size_bytes=PAGE,
    num_layers=LAYERS, tp_size=1, pp_size=1, kv_replicas=1,
)  # fmt: skip


def npu_kv_caches(device: RecordingDevice, layers: int = LAYERS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """vllm-ascend's layout: a (k_cache, v_cache) pair per layer, each (num_blocks, block_size, heads, dim)."""
    return {
        f"model.layers.{i}.self_attn.attn": (
            device.alloc(NUM_BLOCKS, BS, HEADS, DIM),
            device.alloc(NUM_BLOCKS, BS, HEADS, DIM),
        )
        for i in range(layers)
    }


def open_worker(meta, device, stripe=(0, 1), layers=LAYERS, **extra) -> tuple[PoolWorker, dict]:
    caches = npu_kv_caches(device, layers)
    layout = dataclasses.replace(LAYOUT, num_layers=layers)
    worker = PoolWorker(layout, "npushard", True, NUM_BLOCKS, config(meta, **extra), stripe=stripe, runtime=device)
    worker.register_kv_caches(caches)
    assert worker.pool is not None and worker.pool.wait_connected(10)
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
        assert worker.saver.flush(10)
    return hashes


def block_bytes(caches: dict, block: int) -> bytes:
    return b"".join(t[block].numpy().tobytes() for pair in caches.values() for t in pair)


# -- review 1 and 2: directions, and the compute-stream fence before any device page is read -----------------------
def test_staged_saves_put_host_memory_as_h2g_and_load_into_device_pages(meta, device):
    """Review 1: the async save stages NPU pages to host memory; its put must say H2G (the double refuses L2G on host
    addresses, as pymmc reads them as HBM). Loads go G2L straight into the device pages."""
    worker, caches = open_worker(meta, device)
    forward_writes(device, caches, [0, 1, 2])
    hashes = save(worker, [0, 1, 2], "staged")
    assert worker.stats["saved_blocks"] == 3, worker.stats.total()
    worker.load(PoolConnectorMetadata(loads=[BlockTransfer("load", [5, 6, 7], hashes)]))
    assert worker.take_load_errors() == set()
    assert [block_bytes(caches, b) for b in (5, 6, 7)] == [block_bytes(caches, b) for b in (0, 1, 2)]
    assert device.violations == []
    worker.shutdown()


def test_host_staging_is_never_registered_with_memcache(meta, device, pymmc):
    """Review 4: only the KV tensors' ranges are registered (register_buffer is for device RDMA)."""
    worker, _ = open_worker(meta, device)
    registered = worker.pool._backend._store.registered()
    assert registered and all(device.is_device_address(ptr) for ptr, _ in registered)
    assert sorted(registered) == sorted(worker.pages.regions)
    worker.shutdown()


def test_synchronous_save_waits_for_the_forward_pass_before_the_pool_reads_pages(meta, device):
    """Review 2 (vllm-ascend #4412): with async_save false the put reads the device pages; the worker must wait for
    the compute stream's event first, or memcache's engine reads KV still being written."""
    worker, caches = open_worker(meta, device, async_save=False)
    forward_writes(device, caches, [3, 4])
    save(worker, [3, 4], "sync")
    assert worker.stats["saved_blocks"] == 2
    assert device.violations == []
    worker.shutdown()


def test_async_save_copies_after_the_event_and_never_blocks_the_forward_thread(meta, device):
    worker, caches = open_worker(meta, device)
    forward_writes(device, caches, [1])
    save(worker, [1], "async")
    assert device.violations == [] and device.copies == 1
    assert threading.current_thread().name not in device.host_waits  # the save thread waits, not the forward pass
    assert "kvpool-save" in device.host_waits
    worker.shutdown()


def test_the_device_double_catches_a_read_before_the_event(device):
    """The double itself: a copy ordered after an event recorded before the write is a violation."""
    page = device.alloc(4, 4)
    early = device.record_event()
    device.launch_write(page, 1.0)
    out = np.zeros(64, dtype=np.uint8)
    device.copy_out(early, np.array([out.ctypes.data]), np.array([page.data_ptr()]), np.array([64]))
    assert device.violations


# -- review 3 and 12: every helper thread runs on the worker's device ------------------------------------------------
def test_connect_save_and_lookup_threads_set_the_device(meta, device):
    worker, _ = open_worker(meta, device)
    worker.pool.exists_within(["kvp1/x/00"], 1.0)
    threads = device.bound_threads
    assert any(t.startswith("kvpool-connect") for t in threads), threads
    assert "kvpool-save" in threads
    assert any(t.startswith("kvpool-lookup") for t in threads), threads
    worker.shutdown()


def test_scheduler_side_mooncake_ascend_client_binds_device_zero():
    from kvpool_connector.scheduler import _lookup_thread_binding

    ascend = parse_config(
        {"backend": "mooncake", "mooncake": {"master_server_address": "10.0.0.1:50051", "protocol": "ascend"}}
    )
    binding = _lookup_thread_binding(ascend)
    assert binding is not None and binding.__self__.kind == "npu" and binding.__self__.device_index == 0
    tcp = parse_config({"backend": "mooncake", "mooncake": {"master_server_address": "127.0.0.1:50051"}})
    assert _lookup_thread_binding(tcp) is None  # no device context (and no device memory) in a CPU/GPU scheduler


# -- review 4: registration -------------------------------------------------------------------------------------------
def test_refused_registration_is_a_start_up_error_naming_the_region(meta, device, pymmc, monkeypatch):
    monkeypatch.setattr(pymmc.DistributedObjectStore, "register_buffer", lambda self, ptr, size: -1)
    caches = npu_kv_caches(device)
    worker = PoolWorker(LAYOUT, "npushard", True, NUM_BLOCKS, config(meta), runtime=device)
    with pytest.raises(RegistrationRefused, match=r"refused to register the KV region \[0x[0-9a-f]+, 0x[0-9a-f]+\)"):
        worker.register_kv_caches(caches)
    assert worker.pool is not None and not worker.pool.connected
    assert not worker.pool._thread.is_alive()  # no reconnect loop against an answer that will not change
    worker.shutdown()


# -- review 7: one pymmc client per process ----------------------------------------------------------------------------
def _init_lines(pymmc) -> list[str]:
    log = pymmc.store_dir / "inits.log"
    return log.read_text().splitlines() if log.exists() else []


def test_scheduler_and_worker_in_one_process_share_one_init_with_pool_memory(meta, device, pymmc):
    """TP 1: the worker joins first (vLLM builds it before the scheduler); the lookup client connecting first must
    still start the BM, with the worker's device, and closing it must not close the worker's client."""
    settings = config(meta).memcache
    worker_backend = MemcacheBackend(settings, holds_data=True, device_id=3, runtime=device)
    lookup = MemcacheBackend(settings, holds_data=False)
    lookup.connect()  # the race of review 7: the lookup client wins
    worker_backend.connect()
    lines = _init_lines(pymmc)
    assert len(lines) == 1 and "device=3 init_bm=True initialised" in lines[0], lines
    kv = device.alloc(4, 64)
    worker_backend.register_memory(kv.data_ptr(), kv.numel() * 4)
    assert lookup.exists(["kvp1/a/00"]) == [False]
    lookup.close()
    assert worker_backend.put(["kvp1/a/00"], [[kv.data_ptr()]], [[256]]) == [Outcome.OK]
    worker_backend.close()
    assert not pymmc._initialised  # the last user closed it


def test_a_worker_after_a_lookup_only_init_is_a_clear_error(meta, pymmc):
    settings = config(meta).memcache
    lookup = MemcacheBackend(settings, holds_data=False)
    lookup.connect()
    worker_backend = MemcacheBackend(settings, holds_data=True)
    with pytest.raises(PoolUnavailable, match="initialised in this process without pool memory"):
        worker_backend.connect()
    worker_backend.close()
    lookup.close()
    assert len(_init_lines(pymmc)) == 1


# -- review 8: a failed device copy ----------------------------------------------------------------------------------
def test_a_failed_device_copy_drops_its_saves_and_frees_the_slots(meta, device):
    worker, caches = open_worker(meta, device)
    device.fail_next_copies = 1
    forward_writes(device, caches, [0, 1])
    save(worker, [0, 1], "copyfail")  # must not raise into wait_for_save
    assert worker.stats["save_failed.copy"] == 2
    assert worker.saver._free.all()
    save(worker, [0, 1], "after")
    assert worker.stats["saved_blocks"] == 2
    worker.shutdown()


# -- review 9: return codes, batch limits ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "put", "get"),
    [
        (0, Outcome.OK, Outcome.OK),
        (-3006, Outcome.OK, Outcome.FAILED),  # duplicated object: pymmc already maps it to 0 on puts
        (-3016, Outcome.POOL_FULL, Outcome.FAILED),
        (-3007, Outcome.FAILED, Outcome.MISSING),
        (-3102, Outcome.FAILED, Outcome.MISSING),
        (-3004, Outcome.UNAVAILABLE, Outcome.UNAVAILABLE),
        (-3014, Outcome.UNAVAILABLE, Outcome.UNAVAILABLE),
        (-3017, Outcome.UNAVAILABLE, Outcome.UNAVAILABLE),
        (-3018, Outcome.UNAVAILABLE, Outcome.UNAVAILABLE),
        (-3019, Outcome.UNAVAILABLE, Outcome.UNAVAILABLE),
        (-3000, Outcome.FAILED, Outcome.FAILED),
        (-1, Outcome.FAILED, Outcome.FAILED),
    ],
)
def test_every_documented_code_is_mapped(code, put, get):
    assert memcache_backend._put_outcome(code) is put
    assert memcache_backend._get_outcome(code) is get


def _host_backend(meta) -> MemcacheBackend:
    backend = MemcacheBackend(config(meta).memcache, holds_data=True)
    backend.connect()
    return backend


def test_batches_over_pymmcs_limit_are_split(meta, pymmc):
    backend = _host_backend(meta)
    n = memcache_backend.MAX_BATCH_KEYS + 1
    buf = np.arange(n, dtype=np.uint8)
    keys = [f"kvp1/big/{i:05d}" for i in range(n)]
    addrs = [[buf.ctypes.data + i] for i in range(n)]
    assert backend.put(keys, addrs, [[1]] * n) == [Outcome.OK] * n
    assert backend.exists(keys) == [True] * n
    backend.close()


def test_a_reply_of_the_wrong_length_fails_every_key_and_opens_no_outage(meta, pymmc, monkeypatch):
    backend = _host_backend(meta)
    monkeypatch.setattr(backend._store, "batch_put_from_layers", lambda *a: [])
    buf = np.zeros(8, dtype=np.uint8)
    assert backend.put(["kvp1/a/0", "kvp1/a/1"], [[buf.ctypes.data]] * 2, [[4]] * 2) == [Outcome.FAILED] * 2
    backend.close()


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
    assert worker.stats["load_failed.missing"] == 1 and worker.stats["loaded_blocks"] == 2
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
        assert worker.pool.outages == 1 and not worker.pool.available
        assert worker.stats["load_failed.unavailable"] == 1
    finally:  # the same service back where it was, for the rest of the module (its fixture stops it)
        meta.proc = start_meta_service(tmp_path / "meta-again", ports=(meta.meta_port, meta.config_store_port)).proc
    assert wait_for(lambda: worker.pool.available, 5)
    worker.load(PoolConnectorMetadata(loads=[BlockTransfer("up", [3], hashes)]))
    assert worker.take_load_errors() == set()
    assert block_bytes(caches, 3) == block_bytes(caches, 0)
    worker.shutdown()


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- review 10: at most 255 buffers per key --------------------------------------------------------------------------
def test_a_model_with_more_page_runs_than_memcache_takes_is_refused_at_start_up(meta, device):
    layers = 128  # a (k, v) pair per layer: 256 buffers per block object
    caches = npu_kv_caches(device, layers)
    layout = dataclasses.replace(LAYOUT, num_layers=layers)
    worker = PoolWorker(layout, "npushard", True, NUM_BLOCKS, config(meta), runtime=device)
    with pytest.raises(ValueError, match=r"at most 255 buffers per object.*256 page runs \(128 layers\)"):
        worker.register_kv_caches(caches)


def test_an_object_over_the_buffer_limit_fails_alone(meta, pymmc):
    backend = _host_backend(meta)
    buf = np.zeros(512, dtype=np.uint8)
    too_many = [[buf.ctypes.data + i for i in range(256)]]
    fine = [[buf.ctypes.data + 300]]
    outcomes = backend.put(["kvp1/l/0", "kvp1/l/1"], too_many + fine, [[1] * 256, [1]])
    assert outcomes == [Outcome.FAILED, Outcome.OK]
    backend.close()


# -- review 13: MLA ranks stripe their writes ------------------------------------------------------------------------
def test_ranks_holding_the_same_kv_split_the_puts_and_write_each_object_once(meta, device):
    mla = dataclasses.replace(LAYOUT, kv_replicas=2, tp_size=2)
    workers = []
    for rank in range(2):
        caches = npu_kv_caches(device)
        worker = PoolWorker(mla, "mla", True, NUM_BLOCKS, config(meta), stripe=(rank, 2), runtime=device)
        worker.register_kv_caches(caches)
        assert worker.pool.wait_connected(10)
        forward_writes(device, caches, list(range(5)))
        workers.append(worker)
    for worker in workers:  # every rank gets the same step metadata
        hashes = save(worker, list(range(5)), "mla")
    assert [w.stats["saved_blocks"] for w in workers] == [3, 2]
    assert workers[0].pool.exists([pool_key("mla", h) for h in hashes]) == [True] * 5
    for worker in workers:
        worker.shutdown()


# -- review 14: small items ------------------------------------------------------------------------------------------
def test_memcache_device_id_reaches_pymmcs_init(meta, pymmc):
    settings = parse_config({"memcache_device_id": 5}, env={MMC_LOCAL_CONFIG_ENV: str(meta.local_config)}).memcache
    assert settings.device_id == 5
    assert config(meta).memcache.device_id is None  # unset: the worker's local rank


def test_a_value_error_from_a_client_init_is_retried():
    class Flaky:
        name = "flaky"

        def __init__(self, attempt: int) -> None:
            self.attempt = attempt

        def connect(self) -> None:
            if self.attempt == 0:
                raise ValueError("bad local service config")

        def close(self) -> None:
            pass

    attempts = itertools.count()
    handle = PoolHandle(lambda: Flaky(next(attempts)), 0.05, "flaky")
    handle.start()
    assert handle.wait_connected(5)
    handle.close()


# -- the data plane imports without vLLM (a GPU machine with torch only) ---------------------------------------------
def test_the_data_plane_imports_without_vllm():
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any import of vllm now raises ImportError
        "import kvpool_connector.kv_pages, kvpool_connector.ops, kvpool_connector.devices, kvpool_connector.staging\n"
        "import kvpool_connector.pool, kvpool_connector.backends.memcache, kvpool_connector.backends.mooncake\n"
        "import kvpool_connector.counters\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr


def test_a_worker_whose_first_init_failed_still_gets_pool_memory_when_the_lookup_client_inits_first(
    meta, device, pymmc
):
    """Review 7's race: the worker's first init fails (meta service not reachable yet), the scheduler's lookup
    client then initialises first: it must start the BM the worker needs, or the worker's later init is a no-op."""
    settings = config(meta).memcache
    first = MemcacheBackend(settings, holds_data=True, runtime=device)
    stop_process(meta.proc)
    try:
        with pytest.raises(PoolUnavailable, match="memcache meta service at"):
            first.connect()  # refused before pymmc's init, which would wait 5 s (30 s on 1.2.x) for it
    finally:
        meta.proc = start_meta_service(
            meta.local_config.parent / "again", (meta.meta_port, meta.config_store_port)
        ).proc
    lookup = MemcacheBackend(settings, holds_data=False)
    lookup.connect()
    retry = MemcacheBackend(settings, holds_data=True, runtime=device)
    retry.connect()
    kv = device.alloc(2, 64)
    retry.register_memory(kv.data_ptr(), kv.numel() * 4)  # pymmc answers -3019 to a client without BM
    assert [line.split(" ", 1)[1] for line in _init_lines(pymmc)] == ["device=0 init_bm=True initialised"]
    retry.close()
    lookup.close()
