"""The real ACL copy backend code, driven through a fake libascendcl.so this test builds (no Ascend runtime here).

The fake implements aclrtMemcpyAsync / aclrtSynchronizeStream (and aclrtMemcpyBatchAsync in one variant) with
memcpy and can be told to fail, so both paths, error codes and failIndex reporting are exercised for real.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kvpool_connector.devices import StreamRuntime
from kvpool_connector.ops import CopyError, backend_status, copy_batch

SOURCE = Path(__file__).parents[1] / "native" / "fake_ascendcl.c"


def _build(tmp: Path, with_batch: bool) -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to build the fake ACL runtime"
    out = tmp / ("libascendcl_batch.so" if with_batch else "libascendcl_loop.so")
    flags = ["-DFAKE_ACL_WITH_BATCH"] if with_batch else []
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", *flags, str(SOURCE), "-o", str(out)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def fake_libs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake_acl")
    return {"batch": _build(tmp, True), "loop": _build(tmp, False)}


def _calls(lib: str) -> tuple[int, int]:
    fn = ctypes.CDLL(lib).fake_acl_calls
    fn.restype = ctypes.c_uint64
    value = fn()
    return value >> 32, value & 0xFFFFFFFF


def _pages(n: int, size: int):
    rng = np.random.default_rng(n)
    src = rng.integers(0, 255, n * size * 2, dtype=np.uint8)
    dst = np.full_like(src, 0xCD)
    # every other page, so no two copies merge and copy indexes stay as given
    offs = [2 * i * size for i in range(n)]
    return src, dst, [dst.ctypes.data + o for o in offs], [src.ctypes.data + o for o in offs], offs


@pytest.mark.parametrize("variant", ["batch", "loop"])
def test_copies_land_and_the_right_path_runs(fake_libs, variant, monkeypatch):
    monkeypatch.delenv("FAKE_ACL_FAIL_AT", raising=False)
    lib = fake_libs[variant]
    assert backend_status("acl", lib) == (True, variant == "batch")
    src, dst, dsts, srcs, offs = _pages(6, 4096)
    before = _calls(lib)
    copy_batch(dsts, srcs, [4096] * 6, backend="acl", direction="h2d", library=lib)
    for o in offs:
        assert np.array_equal(dst[o : o + 4096], src[o : o + 4096])
    assert np.all(dst[4096:8192] == 0xCD)  # gaps untouched
    batch, per_copy = (a - b for a, b in zip(_calls(lib), before, strict=True))
    assert (batch, per_copy) == ((1, 0) if variant == "batch" else (0, 6))


@pytest.mark.parametrize("variant", ["batch", "loop"])
def test_failure_names_the_copy_and_code(fake_libs, variant, monkeypatch):
    lib = fake_libs[variant]
    keep_alive = _pages(5, 256)  # the arrays must outlive the copy that writes into them
    dsts, srcs = keep_alive[2], keep_alive[3]
    if variant == "loop":  # the fake counts per-copy calls across the process: fail the 4th of this batch
        monkeypatch.setenv("FAKE_ACL_FAIL_AT", str(_calls(lib)[1] + 3))
    else:
        monkeypatch.setenv("FAKE_ACL_FAIL_AT", "3")
    monkeypatch.setenv("FAKE_ACL_ERROR", "507899")
    api = "aclrtMemcpyBatchAsync" if variant == "batch" else "aclrtMemcpyAsync"
    with pytest.raises(CopyError, match=rf"{api} failed with error 507899 at copy 3 of 5"):
        copy_batch(dsts, srcs, [256] * 5, backend="acl", direction="d2h", library=lib)


def test_stream_sync_failure_is_reported(fake_libs, monkeypatch):
    monkeypatch.delenv("FAKE_ACL_FAIL_AT", raising=False)
    monkeypatch.setenv("FAKE_ACL_SYNC_FAIL", "1")
    keep_alive = _pages(2, 64)
    dsts, srcs = keep_alive[2], keep_alive[3]
    with pytest.raises(CopyError, match="aclrtSynchronizeStream failed with error 507000"):
        copy_batch(dsts, srcs, [64, 64], backend="acl", direction="h2d", library=fake_libs["batch"])
    # not synchronizing leaves the stream to the caller: no sync call, no error
    copy_batch(dsts, srcs, [64, 64], backend="acl", direction="h2d", synchronize=False, library=fake_libs["batch"])


def test_bad_direction_is_rejected(fake_libs):
    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValueError, match="'h2d' or 'd2h'"):
        copy_batch(
            [buf.ctypes.data],
            [buf.ctypes.data + 8],
            [1],
            backend="acl",
            direction="d2d",  # type: ignore[arg-type]
            library=fake_libs["batch"],
        )


def test_npu_runtime_falls_back_to_one_copy_per_call_when_the_batch_api_fails(fake_libs, monkeypatch, caplog):
    """CANN marks aclrtMemcpyBatchAsync experimental; its first failure switches the NPU runtime's
    copy-out to aclrtMemcpyAsync per copy for good, and the copies still land."""
    monkeypatch.delenv("FAKE_ACL_FAIL_AT", raising=False)
    monkeypatch.setenv("FAKE_ACL_BATCH_FAIL", "1")
    lib = fake_libs["batch"]
    runtime = StreamRuntime("npu", 0, copy_library=lib)
    for round_ in range(2):
        src, dst, dsts, srcs, offs = _pages(3, 512)
        before = _calls(lib)
        runtime._queue_copies(np.asarray(dsts), np.asarray(srcs), np.full(3, 512), stream=0)
        for o in offs:
            assert np.array_equal(dst[o : o + 512], src[o : o + 512])
        batch, per_copy = (a - b for a, b in zip(_calls(lib), before, strict=True))
        assert (batch, per_copy) == ((1, 3) if round_ == 0 else (0, 3))  # never the batch call again
    assert "one copy call per page from now on" in caplog.text
