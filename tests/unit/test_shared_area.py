"""SharedArea on its own: a numpy buffer is the area, plain functions play the pool client's contiguous get/put (the
real shared-memory client is exercised in test_mooncake_backend)."""

import ctypes

import numpy as np
import pytest

from kvpool_connector.backends.shared_area import ObjectTooLarge, SharedArea

PAGE = 4096


def pages_and_objects(n: int, pages: int, seed: int):
    src = np.random.default_rng(seed).integers(0, 255, n * pages * PAGE, dtype=np.uint8)
    # object i = pages i, n+i, ...: scattered like a block's layers
    addrs = [[src.ctypes.data + (j * n + i) * PAGE for j in range(pages)] for i in range(n)]
    return src, addrs, [[PAGE] * pages] * n


def object_bytes(src: np.ndarray, addrs: list[int]) -> bytes:
    return b"".join(src[a - src.ctypes.data :][:PAGE].tobytes() for a in addrs)


@pytest.fixture
def area():
    memory = np.zeros(16 * PAGE, dtype=np.uint8)
    yield SharedArea(memory.ctypes.data, memory.nbytes, "test")
    del memory


def test_get_scatters_only_whole_objects_chunk_by_chunk(area):
    """40 objects of 3 pages through a 16-page area (5 per chunk): whole ones land, misses and short reads leave their
    pages untouched, and every code comes back in order."""
    stored, addrs, sizes = pages_and_objects(40, 3, seed=0)
    missing, short = {"k5", "k17"}, {"k23"}
    calls = []

    def fetch(keys, slots, slot_sizes):
        calls.append(len(keys))
        assert max(slots) + max(slot_sizes) <= area.base + area.nbytes
        codes = []
        for key, slot, size in zip(keys, slots, slot_sizes, strict=True):
            if key in missing:
                codes.append(-704)
                continue
            data = object_bytes(stored, addrs[int(key[1:])])[: size - (key in short)]
            (ctypes.c_uint8 * len(data)).from_address(slot)[:] = data
            codes.append(len(data))
        return codes

    loaded = np.full_like(stored, 0xAB)
    dst = [[a - stored.ctypes.data + loaded.ctypes.data for a in object_addrs] for object_addrs in addrs]
    codes = area.get([f"k{i}" for i in range(40)], dst, sizes, fetch)

    assert codes == [-704 if f"k{i}" in missing else 3 * PAGE - (f"k{i}" in short) for i in range(40)]
    assert calls == [5] * 8
    for i, object_addrs in enumerate(addrs):
        got = object_bytes(loaded, [a - stored.ctypes.data + loaded.ctypes.data for a in object_addrs])
        whole = f"k{i}" not in missing | short
        assert got == (object_bytes(stored, object_addrs) if whole else b"\xab" * 3 * PAGE), f"object {i}"


def test_put_stores_every_object_whole(area):
    pages, addrs, sizes = pages_and_objects(30, 2, seed=1)
    landed: dict[str, bytes] = {}

    def store(keys, slots, slot_sizes):
        for key, slot, size in zip(keys, slots, slot_sizes, strict=True):
            landed[key] = bytes((ctypes.c_uint8 * size).from_address(slot))
        return [0] * len(keys)

    assert area.put([f"k{i}" for i in range(30)], addrs, sizes, store) == [0] * 30
    assert all(landed[f"k{i}"] == object_bytes(pages, object_addrs) for i, object_addrs in enumerate(addrs))


def test_an_object_larger_than_the_area_is_refused_before_anything_moves(area):
    moved = []
    with pytest.raises(ObjectTooLarge, match=r"does not fit the 65536-byte shared test area.*shared_buffer_size"):
        area.put(["small", "big"], [[0], [0] * 17], [[PAGE], [PAGE] * 17], lambda *a: moved.append(a) or [0])
    assert moved == []
