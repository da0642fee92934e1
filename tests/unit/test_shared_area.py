"""SharedArea's pipeline on its own: a numpy buffer is the area, plain functions play the pool client's contiguous
get/put (the real shared-memory client is exercised in test_mooncake_backend)."""

import ctypes
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from kvpool_connector.backends import shared_area
from kvpool_connector.backends.shared_area import ObjectTooLarge, SharedArea

PAGE = 4096


class Halves:
    """Watches the area's two halves: the copy and the pool call must never use the same half at once."""

    def __init__(self, area: SharedArea, monkeypatch: pytest.MonkeyPatch) -> None:
        self.area, self.lock, self.busy, self.copies = area, threading.Lock(), set(), 0
        real_copy = shared_area.ops.copy_batch

        def watched_copy(dsts, srcs, sizes):
            with self.using(srcs if self.in_area(srcs) else dsts):
                real_copy(dsts, srcs, sizes)
            self.copies += 1

        monkeypatch.setattr(shared_area.ops, "copy_batch", watched_copy)

    def in_area(self, addrs) -> bool:
        return self.area.base <= min(addrs) < self.area.base + self.area.nbytes

    @contextmanager
    def using(self, addrs):
        half = (min(addrs) - self.area.base) // self.area.half
        with self.lock:
            assert half not in self.busy, f"half {half} used by both threads at once"
            self.busy.add(half)
        time.sleep(0.002)  # widen the window a race would need
        yield
        with self.lock:
            self.busy.discard(half)


def pages_and_objects(n: int, pages: int, seed: int):
    src = np.random.default_rng(seed).integers(0, 255, n * pages * PAGE, dtype=np.uint8)
    # object i = pages i, n+i, ...: scattered like a block's layers
    addrs = [[src.ctypes.data + (j * n + i) * PAGE for j in range(pages)] for i in range(n)]
    return src, addrs, [[PAGE] * pages] * n


@pytest.fixture
def area():
    memory = np.zeros(64 * PAGE, dtype=np.uint8)
    a = SharedArea(memory.ctypes.data, memory.nbytes, "test", chunk_bytes=8 * PAGE)
    yield a
    a.close()
    del memory


def test_get_overlaps_chunks_without_overwriting_a_half_in_use(area, monkeypatch):
    """40 objects of 3 pages through 8-page chunks: 20 chunks alternate the halves; every byte lands, misses stay
    untouched, and no fetch writes a half that is still being scattered."""
    halves = Halves(area, monkeypatch)
    stored, addrs, sizes = pages_and_objects(40, 3, seed=0)
    objects = {f"k{i}": np.concatenate([stored[a - stored.ctypes.data :][:PAGE] for a in addrs[i]]) for i in range(40)}
    missing = {"k5", "k17"}
    fetched = []

    def fetch(keys, slots, slot_sizes):
        fetched.append(len(keys))
        codes = []
        with halves.using(slots):
            for key, slot, size in zip(keys, slots, slot_sizes, strict=True):
                if key in missing:
                    codes.append(-704)
                    continue
                (ctypes.c_uint8 * size).from_address(slot)[:] = objects[key].tobytes()
                codes.append(size)
        return codes

    loaded = np.zeros_like(stored)
    dst = [[a - stored.ctypes.data + loaded.ctypes.data for a in object_addrs] for object_addrs in addrs]
    codes = area.get([f"k{i}" for i in range(40)], dst, sizes, fetch)

    assert codes == [-704 if f"k{i}" in missing else 3 * PAGE for i in range(40)]
    assert fetched == [2] * 20  # 3-page objects, 8-page chunks
    assert halves.copies == 20
    for i, object_addrs in enumerate(addrs):
        for a in object_addrs:
            off = a - stored.ctypes.data
            want = 0 if f"k{i}" in missing else stored[off : off + PAGE]
            assert np.array_equal(loaded[off : off + PAGE], np.broadcast_to(want, PAGE)), f"object {i}"


def test_put_stores_every_chunk_whole(area, monkeypatch):
    halves = Halves(area, monkeypatch)
    pages, addrs, sizes = pages_and_objects(30, 2, seed=1)
    landed: dict[str, bytes] = {}

    def store(keys, slots, slot_sizes):
        with halves.using(slots):
            for key, slot, size in zip(keys, slots, slot_sizes, strict=True):
                landed[key] = bytes((ctypes.c_uint8 * size).from_address(slot))
        return [0] * len(keys)

    assert area.put([f"k{i}" for i in range(30)], addrs, sizes, store) == [0] * 30
    for i, object_addrs in enumerate(addrs):
        want = b"".join(pages[a - pages.ctypes.data :][:PAGE].tobytes() for a in object_addrs)
        assert landed[f"k{i}"] == want, f"object {i}"


def test_a_failing_pool_call_raises_after_the_other_half_is_done(area, monkeypatch):
    """The pool client raising on chunk 3 surfaces as that error, and nothing still copies when get returns."""
    halves = Halves(area, monkeypatch)
    pages, addrs, sizes = pages_and_objects(12, 3, seed=2)  # pages: keeps the scatter's targets alive
    calls = 0

    def fetch(keys, slots, slot_sizes):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("pool client went away")
        return list(slot_sizes)

    with pytest.raises(RuntimeError, match="went away"):
        area.get([f"k{i}" for i in range(12)], addrs, sizes, lambda *a: fetch(*a))
    assert halves.copies == 2 and not halves.busy
    del pages


def test_an_object_over_half_the_area_is_refused_before_anything_moves(area):
    moved = []
    big = [[PAGE] * 33]  # 33 pages: more than half of a 64-page area
    with pytest.raises(ObjectTooLarge, match=r"half of the 262144-byte shared test area.*shared_buffer_size"):
        area.put(["small", "big"], [[0], [0] * 33], [[PAGE], *big], lambda *a: moved.append(a) or [0])
    assert moved == []
