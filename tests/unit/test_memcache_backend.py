"""The memcache backend (pymmc) against the real meta service and the pymmc double of its data path: return codes,
batch limits, one pymmc client per process shared by the scheduler's lookup client and a worker, start-up refusals."""

from __future__ import annotations

import numpy as np
import pytest
from doubles.npu_worker import init_lines, memcache_config, npu_kv_caches

from kvpool_connector.backends import Outcome, PoolUnavailable, RegistrationRefused
from kvpool_connector.backends import memcache as memcache_backend
from kvpool_connector.backends.memcache import MemcacheBackend
from kvpool_connector.pool import PoolHandle
from kvpool_connector.processes import stop_process
from kvpool_testkit.inspection import wait_connected
from kvpool_testkit.memcache_meta import start_meta_service

pytestmark = pytest.mark.processes


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


def host_backend(meta) -> MemcacheBackend:
    backend = MemcacheBackend(memcache_config(meta).backend_settings, holds_data=True)
    backend.connect()
    return backend


def test_batches_over_the_documented_limit_are_split(meta, pymmc, monkeypatch):
    calls: list[int] = []
    real_put = pymmc.DistributedObjectStore.batch_put_from_layers
    monkeypatch.setattr(
        pymmc.DistributedObjectStore,
        "batch_put_from_layers",
        lambda self, keys, *a: calls.append(len(keys)) or real_put(self, keys, *a),
    )
    backend = host_backend(meta)
    n = memcache_backend.MAX_BATCH_KEYS + 1
    buf = np.arange(n, dtype=np.uint8)
    keys = [f"kvp1/big/{i:05d}" for i in range(n)]
    assert backend.put(keys, [[buf.ctypes.data + i] for i in range(n)], [[1]] * n) == [Outcome.OK] * n
    assert calls == [memcache_backend.MAX_BATCH_KEYS, 1]
    assert backend.exists(keys) == [True] * n
    backend.close()


def test_a_reply_of_the_wrong_length_fails_every_key_and_opens_no_outage(meta, pymmc, monkeypatch):
    monkeypatch.setattr(pymmc.DistributedObjectStore, "batch_put_from_layers", lambda self, *a: [])
    handle = PoolHandle(lambda: MemcacheBackend(memcache_config(meta).backend_settings, holds_data=True), 0.5, "t")
    handle.start()
    assert wait_connected(handle, 10)
    buf = np.zeros(8, dtype=np.uint8)
    assert handle.put(["kvp1/a/0", "kvp1/a/1"], [[buf.ctypes.data]] * 2, [[4]] * 2) == [Outcome.FAILED] * 2
    assert handle.available  # a malformed answer is no outage: the pool is there
    assert handle.stats.total().get("outages", 0) == 0
    handle.close()


def test_an_object_over_the_buffer_limit_fails_alone(meta, pymmc):
    backend = host_backend(meta)
    buf = np.zeros(512, dtype=np.uint8)
    too_many = [[buf.ctypes.data + i for i in range(256)]]
    fine = [[buf.ctypes.data + 300]]
    assert backend.put(["kvp1/l/0", "kvp1/l/1"], too_many + fine, [[1] * 256, [1]]) == [Outcome.FAILED, Outcome.OK]
    backend.close()


def test_more_page_runs_than_memcache_takes_are_refused_at_start_up(meta):
    with pytest.raises(ValueError, match=r"at most 255 buffers per object.*256 page runs"):
        MemcacheBackend.check_worker(memcache_config(meta), "npu", 1 << 20, 256)
    MemcacheBackend.check_worker(memcache_config(meta), "npu", 1 << 20, 255)


# -- one pymmc client per process ------------------------------------------------------------------------------------
def test_scheduler_and_worker_in_one_process_share_one_init_with_pool_memory(meta, device, pymmc):
    """TP 1: the worker joins first (vLLM builds it before the scheduler); the lookup client connecting first must
    still start the BM, with the worker's device, and closing it must not close the worker's client."""
    settings = memcache_config(meta).backend_settings
    worker_backend = MemcacheBackend(settings, holds_data=True, device_id=3, runtime=device)
    lookup = MemcacheBackend(settings, holds_data=False)
    lookup.connect()  # the lookup client wins the race
    worker_backend.connect()
    lines = init_lines(pymmc)
    assert len(lines) == 1 and "device=3 init_bm=True initialised" in lines[0], lines
    kv = device.alloc(4, 64)
    worker_backend.register_memory(kv.data_ptr(), kv.numel() * 4)
    assert lookup.exists(["kvp1/a/00"]) == [False]
    lookup.close()
    assert worker_backend.put(["kvp1/a/00"], [[kv.data_ptr()]], [[256]]) == [Outcome.OK]
    worker_backend.close()
    assert not pymmc._initialised  # the last user closed it


def test_a_worker_after_a_lookup_only_init_is_a_clear_error(meta, pymmc):
    settings = memcache_config(meta).backend_settings
    lookup = MemcacheBackend(settings, holds_data=False)
    lookup.connect()
    worker_backend = MemcacheBackend(settings, holds_data=True)
    with pytest.raises(PoolUnavailable, match="initialised in this process without pool memory"):
        worker_backend.connect()
    worker_backend.close()
    lookup.close()
    assert len(init_lines(pymmc)) == 1


def test_a_worker_whose_first_connect_failed_still_gets_pool_memory_when_the_lookup_client_inits_first(
    meta, device, pymmc
):
    """The worker's first connect fails (meta service not reachable yet), the scheduler's lookup client then
    initialises first: it must start the BM the worker needs, or the worker's later init is a no-op."""
    settings = memcache_config(meta).backend_settings
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
    assert [line.split(" ", 1)[1] for line in init_lines(pymmc)] == ["device=0 init_bm=True initialised"]
    retry.close()
    lookup.close()


def test_a_failed_connect_leaves_the_process_client_and_is_retried(meta, pymmc, monkeypatch):
    """pymmc's init raising (a bad local-service file: ValueError) must not leave a user on the process-wide client:
    the failed attempt's client is closed, and the next attempt connects."""
    attempts: list[int] = []
    real_init = pymmc.DistributedObjectStore.init

    def init(self, device_id, init_bm=True):
        attempts.append(device_id)
        if len(attempts) == 1:
            raise ValueError("bad local service config")
        return real_init(self, device_id, init_bm)

    monkeypatch.setattr(pymmc.DistributedObjectStore, "init", init)
    settings = memcache_config(meta).backend_settings
    handle = PoolHandle(lambda: MemcacheBackend(settings, holds_data=False), 0.05, "retry")
    handle.start()
    assert wait_connected(handle, 5)
    assert len(attempts) == 2
    assert memcache_backend._PROCESS_CLIENT.users == 1  # the connected client only, not the failed attempt's too
    handle.close()


def test_a_refused_registration_is_a_start_up_error_naming_the_region(meta, device, pymmc, monkeypatch):
    from doubles.npu_worker import LAYOUT, NUM_BLOCKS

    from kvpool_connector.worker import PoolWorker

    monkeypatch.setattr(pymmc.DistributedObjectStore, "register_buffer", lambda self, ptr, size: -1)
    worker = PoolWorker(LAYOUT, "npushard", True, NUM_BLOCKS, memcache_config(meta), runtime=device)
    with pytest.raises(RegistrationRefused, match=r"refused to register the KV region \[0x[0-9a-f]+, 0x[0-9a-f]+\)"):
        worker.register_kv_caches(npu_kv_caches(device))
    assert worker.pool is not None and not worker.pool.connected
    assert not worker.pool._thread.is_alive()  # no reconnect loop against an answer that will not change
    worker.shutdown()
