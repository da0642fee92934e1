"""TEST DOUBLE of pymmc (``memcache_hybrid`` of memcache-hybrid 1.2.0 - 1.3.0), for machines without Ascend NPUs.

The real client's data path needs the Ascend driver and CANN; everything up to its meta service runs here, and the
tests keep using the real one for that. This double stands in for the data path, written from pymmc's documented and
observed behaviour (``../shared/reference/pymmc-1.3.0-api.txt``; memcache's ``mmcache_store.cpp``, ``mmc.cpp``,
``mmc_types.h``; calls made on the real 1.2.0, 1.2.1 and 1.3.0 clients without pool memory), never from the
connector's code. It follows the release of the real package installed beside it where releases differ:
- ``init(device_id, init_bm)`` / ``close()`` act on one client per process: once an init succeeded, a later init
  returns 0 and does nothing (no BM is started by it); close ends the client for every instance. A client without
  BM answers -1 to puts and gets. An uninitialised one answers ``[]`` to the ``*_layers`` calls, -3019 per key to
  ``batch_is_exist`` / ``remove_batch`` and -3019 to register_buffer.
- Directions: ``L2G``/``G2L`` name device (HBM) buffers, which must lie in registered device memory; ``H2G``/``G2H``
  name host memory. A buffer of the wrong kind fails its key (-1); a direction the call does not take fails every
  key (-3000). Which addresses are device memory is the device double's own record of what it allocated
  (``holds``/``touches``, attached with :func:`attach_device`; without one, no address is), never the connector's
  ``is_device_address``, whose answer these checks judge.
- Keys of 1..256 bytes: a longer or empty key gets -3000 (that key alone in ``batch_is_exist``, every key of a put
  or get); 1..65,534 buffers per key (else every key: -3000). A put of a key already present returns 0 and keeps the
  first copy. A get whose buffers do not add up to the object's size fails (-1); a missing key answers -3007
  (``MMC_OBJECT_NOT_EXISTS``; -1 on 1.2.0); removing a missing key answers -3102 (``MMC_UNMATCHED_KEY``).
- The meta service named by ``ock.mmc.meta_service_url`` in ``MMC_LOCAL_CONFIG_PATH`` (read once, at import, as
  pymmc does) must accept connections: init fails without it; while it is down, existence queries and removals
  answer -3014 (``MMC_LINK_NOT_FOUND``) per key and puts and gets -3017 (``MMC_NOT_CONNET_META``).
Objects live as files under ``MMC_DOUBLE_STORE`` (default: a directory in /dev/shm), so a fresh engine process sees
what an earlier one stored. Each init call is appended to ``inits.log`` there (pid, device, init_bm, did it act), and
each batch put/get to ``ops.log`` (pid, op, keys done, keys failed), so tests count transfers across processes.

Fault injection (tests only), ``MMC_DOUBLE_FAULTS`` as JSON: ``{"get_code_at": [i, code]}`` gives key i of every
batch get that code; ``{"down_after_calls": n, "down_for_s": s}`` makes the meta service unreachable from the
n-th data call of a process for s seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

L2G, G2L, G2H, H2G, AUTO = 0, 1, 2, 3, 9
MMC_OK = 0
MMC_ERROR = -1
MMC_INVALID_PARAM = -3000
MMC_OBJECT_NOT_EXISTS = -3007
MMC_LINK_NOT_FOUND = -3014
MMC_NOT_CONNET_META = -3017
MMC_CLIENT_NOT_INIT = -3019
MMC_UNMATCHED_KEY = -3102
MAX_LAYERS = 65_534
MAX_KEY_LEN = 256


def _real_release() -> str:
    """The release of the real memcache-hybrid installed beside this double (the one it stands in for)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memcache-hybrid")
    except PackageNotFoundError:
        return "1.3.0"


MISSING_ON_GET = MMC_ERROR if _real_release() == "1.2.0" else MMC_OBJECT_NOT_EXISTS

_CONFIG_PATH = os.environ.get("MMC_LOCAL_CONFIG_PATH", "")
_STORE = Path(os.environ.get("MMC_DOUBLE_STORE", "/dev/shm/kvpool-pymmc-double"))
_FAULTS = json.loads(os.environ.get("MMC_DOUBLE_FAULTS", "{}"))

# -- process-wide state, as mmc_init/mmc_uninit keep it -------------------------------------------------------------
_lock = threading.RLock()
_initialised = False
_with_bm = False
_registered: list[tuple[int, int]] = []
_device = None
_data_calls = 0
_down_until = 0.0
_meta_checked = (0.0, True)


def attach_device(device) -> None:
    """Tell the double which addresses are device memory (and who checks device reads)."""
    global _device
    _device = device


def _meta_address() -> tuple[str, int] | None:
    if not _CONFIG_PATH:
        return None
    for line in Path(_CONFIG_PATH).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ock.mmc.meta_service_url":
            host, _, port = value.strip().removeprefix("tcp://").rpartition(":")
            return host, int(port)
    return None


_META = _meta_address()


def _meta_up() -> bool:
    global _meta_checked
    if time.monotonic() < _down_until:
        return False
    if _META is None:
        return True
    checked_at, up = _meta_checked
    if time.monotonic() - checked_at < 0.05:
        return up
    try:
        socket.create_connection(_META, timeout=0.5).close()
        up = True
    except OSError:
        up = False
    _meta_checked = (time.monotonic(), up)
    return up


def _count_call() -> None:
    global _data_calls, _down_until
    _data_calls += 1
    if _data_calls == _FAULTS.get("down_after_calls"):
        _down_until = time.monotonic() + float(_FAULTS.get("down_for_s", 2.0))


def _on_device(ptr: int, size: int) -> bool:
    """[ptr, ptr+size) lies in device memory (HBM), by the device double's record of what it allocated."""
    return _device is not None and _device.holds(ptr, size)


def _on_host(ptr: int, size: int) -> bool:
    """No byte of [ptr, ptr+size) is device memory."""
    return _device is None or not _device.touches(ptr, size)


def _in_registered(ptr: int, size: int) -> bool:
    return any(start <= ptr and ptr + size <= start + length for start, length in _registered)


def _object_path(key: str) -> Path:
    return _STORE / hashlib.sha256(key.encode()).hexdigest()


def _key_ok(key: str) -> bool:
    return 0 < len(key.encode()) <= MAX_KEY_LEN


def _batch_check(keys: list[str], buffers: list[list[int]]) -> list[int] | None:
    """The whole-batch answers pymmc's ``*_layers`` calls give before touching any key; None when it may go on."""
    if not _initialised or not keys:
        return []
    if not all(_key_ok(k) for k in keys):
        return [MMC_INVALID_PARAM] * len(keys)
    if len(buffers) != len(keys) or any(not 0 < len(b) <= MAX_LAYERS for b in buffers):
        return [MMC_INVALID_PARAM] * len(keys)
    return None


def _per_key_check(keys: list[str]) -> list[int] | None:
    """What ``batch_is_exist`` / ``remove_batch`` answer before asking the meta service; None when they ask it."""
    if not _initialised:
        return [MMC_CLIENT_NOT_INIT] * len(keys)
    _count_call()
    if not _meta_up():
        return [MMC_LINK_NOT_FOUND] * len(keys)
    return None


class ReplicateConfig:
    def __init__(self) -> None:
        self.replicaNum = 1


class DistributedObjectStore:
    def init(self, device_id: int, init_bm: bool = True) -> int:
        global _initialised, _with_bm
        with _lock:
            acted = not _initialised
            if acted:
                if not _meta_up():
                    _log_init(device_id, init_bm, "failed: meta service unreachable")
                    return MMC_ERROR
                _STORE.mkdir(parents=True, exist_ok=True)
                _initialised, _with_bm = True, bool(init_bm)
            _log_init(device_id, init_bm, "initialised" if acted else "no-op (already initialised)")
            return MMC_OK

    def close(self) -> int:
        global _initialised, _with_bm
        with _lock:
            _initialised, _with_bm = False, False
            _registered.clear()
        return MMC_OK

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        with _lock:
            if not _initialised or not _with_bm:
                return MMC_CLIENT_NOT_INIT
            _registered.append((int(buffer_ptr), int(size)))
            return MMC_OK

    def registered(self) -> list[tuple[int, int]]:
        """(test helper) the ranges registered in this process."""
        return list(_registered)

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        if (early := _per_key_check(keys)) is not None:
            return early
        return [(1 if _object_path(k).exists() else 0) if _key_ok(k) else MMC_INVALID_PARAM for k in keys]

    def _buffers_ok(self, ptrs: list[int], sizes: list[int], device: bool) -> bool:
        for ptr, size in zip(ptrs, sizes, strict=True):
            if not (_on_device(ptr, size) and _in_registered(ptr, size) if device else _on_host(ptr, size)):
                return False
        return True

    def batch_put_from_layers(
        self, keys: list[str], buffer_ptrs: list[list[int]], sizes: list[list[int]], direct: int = H2G, cfg=None
    ) -> list[int]:
        if (early := _batch_check(keys, buffer_ptrs)) is not None:
            return early
        if direct not in (L2G, H2G):
            return [MMC_INVALID_PARAM] * len(keys)
        _count_call()
        if not _meta_up():
            return _log_op("put", [MMC_NOT_CONNET_META] * len(keys))
        codes = []
        for key, ptrs, lens in zip(keys, buffer_ptrs, sizes, strict=True):
            if not _with_bm or not self._buffers_ok(ptrs, lens, device=direct == L2G):
                codes.append(MMC_ERROR)
                continue
            path = _object_path(key)
            if not path.exists():
                if direct == L2G and _device is not None:
                    for ptr, size in zip(ptrs, lens, strict=True):
                        _device.check_pool_read(ptr, size)
                data = b"".join(ctypes.string_at(p, n) for p, n in zip(ptrs, lens, strict=True))
                tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            codes.append(MMC_OK)
        return _log_op("put", codes)

    def batch_get_into_layers(
        self, keys: list[str], buffer_ptrs: list[list[int]], sizes: list[list[int]], direct: int = G2H
    ) -> list[int]:
        if (early := _batch_check(keys, buffer_ptrs)) is not None:
            return early
        if direct not in (G2L, G2H):
            return [MMC_INVALID_PARAM] * len(keys)
        _count_call()
        if not _meta_up():
            return _log_op("get", [MMC_NOT_CONNET_META] * len(keys))
        forced = _FAULTS.get("get_code_at")
        codes = []
        for i, (key, ptrs, lens) in enumerate(zip(keys, buffer_ptrs, sizes, strict=True)):
            if forced is not None and i == forced[0]:
                codes.append(int(forced[1]))
                continue
            if not _with_bm or not self._buffers_ok(ptrs, lens, device=direct == G2L):
                codes.append(MMC_ERROR)
                continue
            try:
                data = _object_path(key).read_bytes()
            except FileNotFoundError:
                codes.append(MISSING_ON_GET)
                continue
            if len(data) != sum(lens):
                codes.append(MMC_ERROR)
                continue
            offset = 0
            for ptr, size in zip(ptrs, lens, strict=True):
                ctypes.memmove(ptr, data[offset : offset + size], size)
                offset += size
            codes.append(MMC_OK)
        return _log_op("get", codes)

    def remove_batch(self, keys: list[str]) -> list[int]:
        if (early := _per_key_check(keys)) is not None:
            return early
        codes = []
        for key in keys:
            try:
                _object_path(key).unlink()
                codes.append(MMC_OK)
            except FileNotFoundError:
                codes.append(MMC_UNMATCHED_KEY)
        return codes


def _log_init(device_id: int, init_bm: bool, what: str) -> None:
    _STORE.mkdir(parents=True, exist_ok=True)
    with (_STORE / "inits.log").open("a") as log:
        log.write(f"{os.getpid()} device={device_id} init_bm={bool(init_bm)} {what}\n")


def _log_op(op: str, codes: list[int]) -> list[int]:
    done = sum(code == MMC_OK for code in codes)
    with (_STORE / "ops.log").open("a") as log:
        log.write(f"{os.getpid()} {op} {done} {len(codes) - done}\n")
    return codes
