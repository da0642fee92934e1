import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool_connector.ops import copy_batch


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 20_000), min_size=1, max_size=40), st.integers(1, 4), st.randoms())
def test_batched_copy_matches_numpy(sizes, threads, rnd):
    src = np.frombuffer(rnd.randbytes(sum(sizes) + 64), dtype=np.uint8)
    dst = np.full(sum(sizes) + 64, 0xAB, dtype=np.uint8)  # poison: unwritten bytes stay 0xAB
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
    copy_batch(dsts, srcs, lens, threads)
    assert np.array_equal(dst, expected)


def test_rejects_mismatched_lengths_and_null_addresses():
    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValueError, match="same length"):
        copy_batch([buf.ctypes.data], [], [1])
    with pytest.raises(ValueError, match="null address"):
        copy_batch([0], [buf.ctypes.data], [4])
    copy_batch([], [], [])  # an empty batch is a no-op
