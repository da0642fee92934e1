"""The Mooncake backend against a real mooncake_master and pool node on loopback."""

import numpy as np
import pytest

from kvpool_connector.backends import Outcome
from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.config import MooncakeSettings


@pytest.fixture
def backend(pool):
    b = MooncakeBackend(MooncakeSettings(**pool.client_config()), holds_data=True)
    b.connect()
    yield b
    b.close()


def test_put_get_roundtrip_multi_buffer(backend):
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
    assert backend.remove(["t/rt/a", "t/rt/none"]) == [True, False]
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
