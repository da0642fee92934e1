"""The native batched copy: the CPU backend against a numpy reference, run merging, and input checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool_connector.ops import backend_status, copy_batch, merge_runs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 70_000), min_size=1, max_size=40), st.integers(1, 4), st.randoms(), st.integers(0, 99))
def test_cpu_copy_matches_numpy_reference(sizes, threads, rnd, seed):
    src = np.random.default_rng(seed).integers(0, 256, sum(sizes) + 64, dtype=np.uint8)
    dst = np.full(sum(sizes) + 64, 0xAB, dtype=np.uint8)  # poison: bytes no copy writes must stay 0xAB
    expected = dst.copy()
    order = list(range(len(sizes)))
    rnd.shuffle(order)
    src_off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    dsts, srcs, lens, d = [], [], [], 0
    for i in order:
        dsts.append(dst.ctypes.data + d)
        srcs.append(src.ctypes.data + int(src_off[i]))
        lens.append(sizes[i])
        expected[d : d + sizes[i]] = src[src_off[i] : src_off[i] + sizes[i]]
        d += sizes[i]
    copy_batch(dsts, srcs, lens, threads=threads)
    assert np.array_equal(dst, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_batches_stream_around_the_cache_byte_exact(threads):
    """Batches of 1 MiB and more take the streaming-store path: unaligned ends and pieces on either side of its
    16 KiB cut-off must land exactly, and nothing outside them may be touched."""
    sizes = [16383, 16384, 16385, 1, 15, 17, 65537, 262144, 300001, 262139, 4095, 131077] * 3
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, sum(sizes) + 4096, dtype=np.uint8)
    dst = np.full(2 * sum(sizes) + 4096, 0xAB, dtype=np.uint8)
    expected = dst.copy()
    dsts, srcs, s, d = [], [], 3, 5  # odd starting offsets on both sides
    for n in sizes:
        dsts.append(dst.ctypes.data + d)
        srcs.append(src.ctypes.data + s)
        expected[d : d + n] = src[s : s + n]
        s, d = s + n, d + n + int(rng.integers(1, 64))  # gaps: no two pieces merge on the destination side
    assert sum(sizes) >= 1 << 20
    copy_batch(dsts, srcs, sizes, threads=threads)
    assert np.array_equal(dst, expected)


def test_merge_runs_coalesces_only_continuations():
    d, s, n = merge_runs([100, 110, 200, 300, 305], [0, 10, 20, 40, 45], [10, 10, 5, 5, 5])
    assert (d.tolist(), s.tolist(), n.tolist()) == ([100, 200, 300], [0, 20, 40], [20, 5, 10])
    assert [a.size for a in merge_runs([1, 2], [3, 4], [0, 0])] == [0, 0, 0]


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 64)), min_size=1, max_size=30))
def test_merge_runs_preserves_bytes(pieces):
    dsts, srcs, sizes, d, s = [], [], [], 1000, 5000
    for jump, size in pieces:
        if jump:
            d, s = d + 7, s + 3
        dsts.append(d)
        srcs.append(s)
        sizes.append(size)
        d, s = d + size, s + size
    md, ms, mn = (a.tolist() for a in merge_runs(dsts, srcs, sizes))
    assert sum(mn) == sum(sizes)
    expanded = [(a + k, b + k) for a, b, n in zip(md, ms, mn, strict=True) for k in range(n)]
    original = [(a + k, b + k) for a, b, n in zip(dsts, srcs, sizes, strict=True) for k in range(n)]
    assert expanded == original


def test_rejects_mismatched_lengths_null_addresses_and_unknown_backend():
    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValueError, match="same length"):
        copy_batch([buf.ctypes.data], [], [1])
    with pytest.raises(ValueError, match="null address"):
        copy_batch([0], [buf.ctypes.data], [4])
    with pytest.raises(ValueError, match="unknown copy backend"):
        copy_batch([buf.ctypes.data], [buf.ctypes.data + 8], [4], backend="tpu")  # type: ignore[arg-type]
    copy_batch([], [], [])  # an empty batch is a no-op


def test_absent_device_backends_say_so():
    from kvpool_connector.ops import BackendUnavailable

    assert backend_status("cpu") == (True, True)
    assert backend_status("acl", "/nonexistent/libascendcl.so") == (False, False)
    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(BackendUnavailable, match="Ascend CANN runtime"):
        copy_batch([buf.ctypes.data], [buf.ctypes.data + 8], [4], backend="acl", library="/nonexistent/libacl.so")
    with pytest.raises(BackendUnavailable, match="NVIDIA driver"):
        copy_batch([buf.ctypes.data], [buf.ctypes.data + 8], [4], backend="cuda", library="/nonexistent/libcuda.so")
