"""The Mooncake backend against a real mooncake_master and pool node on loopback.

Every data-path test runs twice: with the client's own transfer engine (TCP to the pool node) and attached to the pool
node through shared memory (``real_client_address``).
"""

import ctypes
import dataclasses
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvpool_connector.backends import Outcome, PoolUnavailable, RegistrationRefused
from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.backends.mooncake_settings import MooncakeSettings
from kvpool_connector.backends.shared_area import ObjectTooLarge, SharedArea
from kvpool_connector.pool import PoolHandle
from kvpool_connector.processes import stop_process
from kvpool_testkit.mooncake_pool import mooncake_pool
from kvpool_testkit.ports import reserve_port

pytestmark = pytest.mark.processes


def shared_memory_settings(pool, **extra) -> MooncakeSettings:
    return MooncakeSettings(**pool.client_config(shared_memory=True), **extra)


@pytest.fixture(params=["engine", "shared_memory"])
def backend(pool, request):
    settings = MooncakeSettings(**pool.client_config())
    if request.param == "shared_memory":
        settings = shared_memory_settings(pool)
    b = MooncakeBackend(settings, holds_data=True)
    b.connect()
    yield b
    b.close()


def test_put_get_roundtrip_multi_buffer(backend, mooncake_client):
    src = np.random.default_rng(0).integers(0, 255, 3 * 4096, dtype=np.uint8)
    dst = np.zeros_like(src)
    for arr in (src, dst):
        backend.register_memory(arr.ctypes.data, arr.nbytes)
    s, d = src.ctypes.data, dst.ctypes.data
    keys = ["t/rt/a", "t/rt/b"]
    assert backend.put(keys, [[s, s + 4096], [s + 8192]], [[4096, 4096], [4096]]) == [Outcome.OK, Outcome.OK]
    assert backend.exists([*keys, "t/rt/none"]) == [True, True, False]
    got = backend.get([*keys, "t/rt/none"], [[d, d + 4096], [d + 8192], [d]], [[4096, 4096], [4096], [4096]])
    assert got == [Outcome.OK, Outcome.OK, Outcome.MISSING]
    assert np.array_equal(src, dst)
    # A second put of the same key keeps the first copy and is not a failure.
    assert backend.put(["t/rt/a"], [[s + 8192, s]], [[4096, 4096]])[0].ok
    assert mooncake_client.batch_remove(["t/rt/a", "t/rt/none"], True)[0] == 0
    assert backend.exists(["t/rt/a", "t/rt/b"]) == [False, True]


def test_size_mismatch_is_never_ok(backend):
    buf = np.ones(2 * 4096, dtype=np.uint8)
    backend.register_memory(buf.ctypes.data, buf.nbytes)
    p = buf.ctypes.data
    assert backend.put(["t/size/a"], [[p, p + 4096]], [[4096, 4096]]) == [Outcome.OK]
    assert backend.get(["t/size/a"], [[p]], [[4096]]) == [Outcome.WRONG_SIZE]  # object bigger than our pages
    assert backend.put(["t/size/b"], [[p]], [[4096]]) == [Outcome.OK]
    assert not backend.get(["t/size/b"], [[p, p + 4096]], [[4096, 4096]])[0].ok  # object smaller


def test_lookup_client_contributes_no_memory(pool):
    b = MooncakeBackend(MooncakeSettings(**pool.client_config(global_segment_size="64MB")), holds_data=False)
    b.connect()
    assert b.exists(["t/none"]) == [False]
    b.close()


def test_one_bad_object_in_a_batch_fails_only_itself(backend):
    """A missing key and an object of the wrong size mid-batch: each reported on its own, the others land whole."""
    page = 4096
    src = np.random.default_rng(2).integers(0, 255, 4 * page, dtype=np.uint8)
    dst = np.zeros(4 * page, dtype=np.uint8)
    for arr in (src, dst):
        backend.register_memory(arr.ctypes.data, arr.nbytes)
    s, d = src.ctypes.data, dst.ctypes.data
    assert backend.put(["t/mid/0", "t/mid/3"], [[s], [s + 3 * page]], [[page], [page]]) == [Outcome.OK] * 2
    assert backend.put(["t/mid/2"], [[s + page, s + 2 * page]], [[page, page]]) == [Outcome.OK]  # two pages
    keys = ["t/mid/0", "t/mid/1", "t/mid/2", "t/mid/3"]
    got = backend.get(keys, [[d + i * page] for i in range(4)], [[page]] * 4)
    assert got == [Outcome.OK, Outcome.MISSING, Outcome.WRONG_SIZE, Outcome.OK]
    assert np.array_equal(dst[:page], src[:page])
    assert np.array_equal(dst[3 * page :], src[3 * page :])


def test_shared_memory_batches_larger_than_the_area_go_in_chunks(pool):
    """24 objects of 3 pages (192 KiB each) through a 1 MiB area: 5 per chunk, any order of hits and misses."""
    b = MooncakeBackend(shared_memory_settings(pool, shared_buffer_size="1MB"), holds_data=True)
    b.connect()
    try:
        page, n = 64 << 10, 24
        src = np.random.default_rng(3).integers(0, 255, 3 * n * page, dtype=np.uint8)
        dst = np.zeros_like(src)
        s, d = src.ctypes.data, dst.ctypes.data
        # object i = pages i, n+i, 2n+i: scattered like a block's layers
        addrs = [[s + (j * n + i) * page for j in range(3)] for i in range(n)]
        keys = [f"t/chunk/{i}" for i in range(n)]
        stored = [k for i, k in enumerate(keys) if i % 7 != 3]
        assert b.put(stored, [addrs[i] for i, k in enumerate(keys) if k in stored], [[page] * 3] * len(stored)) == [
            Outcome.OK
        ] * len(stored)
        got = b.get(keys, [[a - s + d for a in object_addrs] for object_addrs in addrs], [[page] * 3] * n)
        assert got == [Outcome.OK if k in stored else Outcome.MISSING for k in keys]
        for i, k in enumerate(keys):
            for a in addrs[i]:
                off = a - s
                expected = src[off : off + page] if k in stored else np.zeros(page, dtype=np.uint8)
                assert np.array_equal(dst[off : off + page], expected), f"object {i}"
    finally:
        b.close()


def test_shared_memory_object_larger_than_the_area_is_refused_with_the_fix(pool):
    b = MooncakeBackend(shared_memory_settings(pool, shared_buffer_size="1MB"), holds_data=True)
    b.connect()
    try:
        big = np.ones(2 << 20, dtype=np.uint8)
        with pytest.raises(ObjectTooLarge, match="shared_buffer_size"):
            b.put(["t/big"], [[big.ctypes.data]], [[big.nbytes]])
    finally:
        b.close()


def node_shared_mappings(pool) -> list[tuple[int, int]]:
    """(size, resident bytes) of each shared-memory mapping the pool node holds, from its /proc smaps."""
    entries = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path(f"/proc/{pool.node.pid}/smaps").read_text())
    found = []
    for entry in entries:
        if "memfd:mooncake_shm" in entry.splitlines()[0]:
            size = re.search(r"^Size:\s+(\d+) kB", entry, re.M)
            rss = re.search(r"^Rss:\s+(\d+) kB", entry, re.M)
            assert size and rss
            found.append((int(size[1]) << 10, int(rss[1]) << 10))
    return found


class RecordingPuts:
    """Forwards every call to the real Mooncake client, remembering the keys it was asked to store."""

    def __init__(self, store) -> None:
        self._store, self.put_keys = store, []

    def batch_put_from(self, keys, *args):
        self.put_keys.extend(keys)
        return self._store.batch_put_from(keys, *args)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.parametrize("segment", ["512 MB", "16 MB"])
def test_shared_memory_attach_premaps_the_load_area_in_the_node(tmp_path, segment):
    """The node's first write into a fresh area faults its pages in (first loads 4-5x slower): attaching makes it map
    the load area up front, through throwaway objects it removes again. A pool too small for all of them maps what
    fits and still attaches."""
    with mooncake_pool(tmp_path, segment_size=segment) as own:
        before = node_shared_mappings(own)
        b = MooncakeBackend(shared_memory_settings(own, shared_buffer_size="24MB"), holds_data=True)
        b._store = recorder = RecordingPuts(b._store)
        b.connect()
        try:
            areas = [m for m in node_shared_mappings(own) if m not in before and m[0] == 24 << 20]
            assert len(areas) == 2, areas  # the load area and the save area
            save_rss, load_rss = sorted(rss for _, rss in areas)
            assert save_rss == 0
            if segment == "512 MB":
                assert load_rss == 24 << 20
            else:  # only the first 16 MiB object fit (plus what the node's read-ahead mapped past it)
                assert 16 << 20 <= load_rss < 24 << 20
            assert recorder.put_keys and b.exists(recorder.put_keys) == [False] * len(recorder.put_keys)
            page = np.arange(64 << 10, dtype=np.uint8)
            back = np.zeros_like(page)
            assert b.put(["t/premap"], [[page.ctypes.data]], [[page.nbytes]]) == [Outcome.OK]
            assert b.get(["t/premap"], [[back.ctypes.data]], [[back.nbytes]]) == [Outcome.OK]
            assert np.array_equal(back, page)
        finally:
            b.close()


def test_shared_memory_attach_to_nothing_is_unavailable(pool):
    settings = MooncakeSettings(**pool.client_config(), real_client_address=f"127.0.0.1:{reserve_port()}")
    with pytest.raises(PoolUnavailable, match=r"mooncake_client at .* is not reachable"):
        MooncakeBackend(settings, holds_data=True).connect()


def test_absent_master_is_refused_at_once():
    """Mooncake's setup holds the GIL for ~90 s against an absent master, freezing the whole engine process; the
    backend must not call it then."""
    settings = MooncakeSettings(master_server_address=f"127.0.0.1:{reserve_port()}", global_segment_size=0)
    began = time.monotonic()
    with pytest.raises(PoolUnavailable, match=r"mooncake_master at .* is not reachable"):
        MooncakeBackend(settings, holds_data=True).connect()
    assert time.monotonic() - began < 5


def test_a_stopped_master_is_refused_without_freezing_the_process(tmp_path):
    """A master that accepts connections but never answers (SIGSTOP; across hosts, a half-open network) would keep
    Mooncake's setup waiting with the GIL held. The backend knocks first, then tries a client in a child process it
    can kill: connect fails within seconds while every other thread runs, and succeeds once the master continues."""
    with mooncake_pool(tmp_path / "pool", segment_size="64 MB") as running:
        settings = MooncakeSettings(**running.client_config())
        running.master.send_signal(signal.SIGSTOP)
        try:
            ticks = []
            ticker = threading.Thread(target=lambda: [ticks.append(time.sleep(0.1)) for _ in range(200)], daemon=True)
            ticker.start()
            began = time.monotonic()
            with pytest.raises(PoolUnavailable, match="accepts connections but does not answer"):
                MooncakeBackend(settings, holds_data=True).connect()
            took = time.monotonic() - began
            assert took < 15, took
            assert len(ticks) >= int(took / 0.1) - 10, "another thread was held up while connect ran"
        finally:
            running.master.send_signal(signal.SIGCONT)
        backend = MooncakeBackend(settings, holds_data=True)
        backend.connect()
        assert backend.answers()
        backend.close()


def test_shared_memory_node_killed_costs_hits_only(tmp_path):
    """The mooncake_client a worker is attached to dies: a get reports it unavailable at once (so the pool handle
    opens its outage window), a put fails, a lookup misses; nothing raises."""
    with mooncake_pool(tmp_path, segment_size="64 MB") as own:
        b = MooncakeBackend(shared_memory_settings(own), holds_data=True)
        b.connect()
        try:
            page = np.ones(64 << 10, dtype=np.uint8)
            p = page.ctypes.data
            assert b.put(["t/gone"], [[p]], [[page.nbytes]]) == [Outcome.OK]
            stop_process(own.node, signal.SIGKILL)
            began = time.monotonic()
            assert b.get(["t/gone"], [[p]], [[page.nbytes]]) == [Outcome.UNAVAILABLE]
            assert time.monotonic() - began < 1
            assert b.put(["t/new"], [[p]], [[page.nbytes]]) == [Outcome.UNAVAILABLE]  # ~4 s of client retries
            assert b.exists(["t/gone"]) == [False]
        finally:
            b.close()


def test_kv_cache_memory_is_premapped_and_moves_with_one_copy(tmp_path, monkeypatch):
    """Asked for KV cache memory, the shared-memory attach hands it out zero-filled and mapped in the node; pages
    inside it move straight between the node and the pages (the shared areas stay unused), pages elsewhere still go
    through the areas."""
    with mooncake_pool(tmp_path, segment_size="512 MB") as own:
        before = node_shared_mappings(own)
        settings = shared_memory_settings(own, shared_buffer_size="4MB")
        b = MooncakeBackend(settings, holds_data=True, kv_cache_bytes=40 << 20)
        b.connect()
        try:
            memory = b.kv_cache_memory
            assert memory is not None and memory.nbytes == 40 << 20
            assert [
                rss for size, rss in node_shared_mappings(own) if (size, rss) not in before and size == 40 << 20
            ] == [40 << 20]
            kv = np.ctypeslib.as_array((ctypes.c_uint8 * memory.nbytes).from_address(memory.base))
            assert not kv.any()
            page = 256 << 10
            kv[: 4 * page] = np.random.default_rng(1).integers(0, 255, 4 * page, dtype=np.uint8)
            base = memory.base

            def no_area(*args, **kwargs):
                raise AssertionError("pages in the KV cache memory went through a shared area")

            with monkeypatch.context() as patch:
                patch.setattr(SharedArea, "get", no_area)
                patch.setattr(SharedArea, "put", no_area)
                addrs = [[base, base + 2 * page], [base + page, base + 3 * page]]
                assert b.put(["t/kv/a", "t/kv/b"], addrs, [[page, page]] * 2) == [Outcome.OK, Outcome.OK]
                far = base + (20 << 20)
                got = b.get(
                    ["t/kv/a", "t/kv/b"], [[far, far + page], [far + 2 * page, far + 3 * page]], [[page, page]] * 2
                )
                assert got == [Outcome.OK, Outcome.OK]
            assert np.array_equal(kv[20 << 20 : (20 << 20) + page], kv[:page])
            assert np.array_equal(kv[(20 << 20) + 3 * page : (20 << 20) + 4 * page], kv[3 * page : 4 * page])
            private = np.zeros(2 * page, dtype=np.uint8)
            assert b.get(["t/kv/b"], [[private.ctypes.data, private.ctypes.data + page]], [[page, page]]) == [
                Outcome.OK
            ]
            assert np.array_equal(private[:page], kv[page : 2 * page])
        finally:
            b.close()
        assert b.exists(["t/kv/a"]) == [True]  # close leaves the client attached: the KV cache lives in its memory


def test_kv_cache_memory_outlives_a_killed_node(tmp_path):
    """vLLM's KV cache placed in the shared memory stays readable and writable when the node dies (the client keeps
    retrying its socket meanwhile); transfers report the pool unavailable, so the engine recomputes instead."""
    with mooncake_pool(tmp_path, segment_size="64 MB") as own:
        b = MooncakeBackend(
            shared_memory_settings(own, shared_buffer_size="4MB"), holds_data=True, kv_cache_bytes=8 << 20
        )
        b.connect()
        memory = b.kv_cache_memory
        assert memory is not None
        kv = np.ctypeslib.as_array((ctypes.c_uint8 * memory.nbytes).from_address(memory.base))
        kv[:] = 7
        assert b.put(["t/kept"], [[memory.base]], [[1 << 20]]) == [Outcome.OK]
        stop_process(own.node, signal.SIGKILL)
        assert b.get(["t/kept"], [[memory.base + (2 << 20)]], [[1 << 20]]) == [Outcome.UNAVAILABLE]
        time.sleep(5)  # past a few of the client's reconnect attempts (every 2 s)
        kv[:] += 1
        assert kv.min() == kv.max() == 8
        b.close()


def test_two_replicas_keep_every_object_when_one_pool_node_dies(tmp_path):
    """``replica_num: 2`` with two pool nodes: each object is on both, so killing one node loses nothing; with one
    replica, the objects the dead node held are gone (its segment is dropped once its heartbeat TTL, 2 s, passes)."""
    with mooncake_pool(tmp_path / "pool", segment_size="64 MB", client_ttl_s=2) as pool:
        second = dataclasses.replace(pool, workdir=tmp_path / "node2", node_port=reserve_port(), node=None)
        second.workdir.mkdir()
        second.start_node()
        try:
            deadline = time.monotonic() + 20
            while len(pool.segments()) < 2:
                assert time.monotonic() < deadline, "the second node's segment was not mounted"
                time.sleep(0.2)
            page = np.arange(4096, dtype=np.uint8)
            backends = {}
            for replicas in (1, 2):
                settings = MooncakeSettings(**pool.client_config(), replica_num=replicas)
                backends[replicas] = b = MooncakeBackend(settings, holds_data=True)
                b.connect()
                b.register_memory(page.ctypes.data, page.nbytes)
                keys = [f"r{replicas}/{i}" for i in range(16)]
                assert all(o.ok for o in b.put(keys, [[page.ctypes.data]] * 16, [[page.nbytes]] * 16))
            stop_process(pool.node, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while len(pool.segments()) != 1:
                assert time.monotonic() < deadline, "the dead node's segment is still listed"
                time.sleep(0.2)
            out = np.zeros_like(page)
            found = {}
            for replicas, b in backends.items():
                b.register_memory(out.ctypes.data, out.nbytes)
                keys = [f"r{replicas}/{i}" for i in range(16)]
                found[replicas] = sum(o.ok for o in (b.get([k], [[out.ctypes.data]], [[out.nbytes]])[0] for k in keys))
                b.close()
            assert found[2] == 16, found  # every object survived on the other node
            assert found[1] < 16, found  # without a second replica, the dead node's objects are gone
            print(f"\nafter one of two nodes died: {found[1]}/16 objects left with 1 replica, {found[2]}/16 with 2")
        finally:
            stop_process(second.node)


def test_transfer_timeouts_reach_mooncake_unless_the_environment_sets_them(pool, monkeypatch):
    """Mooncake reads its transfer timeouts from the environment only; an operator's own setting wins."""
    monkeypatch.delenv("MC_TCP_PROGRESS_TIMEOUT_SEC", raising=False)
    monkeypatch.setenv("MC_TCP_STATUS_TIMEOUT_SEC", "77")
    b = MooncakeBackend(MooncakeSettings(**pool.client_config(), transfer_stall_timeout_s=4), holds_data=True)
    b.connect()
    b.close()
    assert [os.environ["MC_TCP_PROGRESS_TIMEOUT_SEC"], os.environ["MC_TCP_STATUS_TIMEOUT_SEC"]] == ["4", "77"]


def test_remove_prefix_removes_exactly_the_keys_under_it(backend, mooncake_client):
    src = np.zeros(64, dtype=np.uint8)
    backend.register_memory(src.ctypes.data, src.nbytes)
    mine = [f"t/prefix/aa11/{i}" for i in range(3)]
    others = ["t/prefix/aa1/x", "t/prefix/bb22/0", "u/t/prefix/aa11/0"]  # a shorter prefix, another, one inside
    assert all(o.ok for o in backend.put(mine + others, [[src.ctypes.data]] * 6, [[64]] * 6))
    assert backend.remove_prefix("t/prefix/aa11/") == 3
    assert backend.exists(mine + others) == [False] * 3 + [True] * 3
    mooncake_client.batch_remove(others, True)


def test_memory_mooncake_refuses_is_a_start_up_error_not_an_endless_retry(pool):
    """Mooncake's transfer engine refuses a region that overlaps one it holds (-600): asking again gets the same
    answer, so start-up raises it, naming the region, and no reconnect loop follows."""
    settings = MooncakeSettings(**pool.client_config())
    buf = np.zeros(1 << 20, dtype=np.uint8)
    made: list[MooncakeBackend] = []
    handle = PoolHandle(lambda: made.append(MooncakeBackend(settings, holds_data=True)) or made[-1], 0.05, "refused")
    handle.register_memory(buf.ctypes.data, buf.nbytes)
    handle.register_memory(buf.ctypes.data + 4096, 4096)  # inside the first: refused
    with pytest.raises(RegistrationRefused, match=r"Mooncake refused to register the KV region \[0x[0-9a-f]+"):
        handle.start(wait_s=30)
    time.sleep(0.3)
    assert len(made) == 1 and not handle.connected
    handle.close()
