"""Huawei memcache backend (``memcache-hybrid``'s pymmc ``DistributedObjectStore``; Ascend NPUs).

One object per KV block through pymmc's ``*_layers`` batch calls, which gather/scatter one buffer per layer run.

Facts of pymmc 1.3.0 this module is built on (memcache ``mmcache_store.cpp``, ``mmc.cpp``, ``mmc_types.h``):
- ``init(device_id, init_bm)`` and ``close()`` act on one client per *process*: once any init succeeded, a later
  init returns 0 and does nothing (not even start the BM a worker needs), and close tears the client down for every
  holder. With TP 1 the scheduler's lookup client and the worker's data client live in one process, so both roles
  share :class:`_ProcessClient`: one init, with the strongest role that joined (``init_bm=True`` when a worker did),
  closed by the last user.
- ``init_bm=True`` starts the local service that holds pool memory and moves data; it needs the Ascend driver and
  CANN (here: -1, "the current version of ascend driver does not support mf!"). The lookup role uses
  ``init_bm=False``: meta-service calls only. A client without BM must never register memory.
- The direction of a transfer says where *that call's buffers* live: ``L2G``/``G2L`` for device (HBM) addresses,
  ``H2G``/``G2H`` for host memory. pymmc treats every buffer of an L2G call as HBM, so a host staging buffer sent
  as L2G is read as a device address. We ask the device runtime where the first buffer of each object lives.
- ``init`` raises ValueError for a bad local-service file: read as PoolUnavailable, since the file can be fixed while
  the engine serves and the pool handle retries.
- ``register_buffer`` is for device RDMA; host memory is not registered (production never does).
- Batches are cut at memcache's documented limits (``mmc_def.h``: 16,384 keys, 255 buffers per key, keys of 1..256
  bytes), although pymmc's wrapper passed 200,000 keys and 1,024 buffers on a client without pool memory; a put of a
  key already present returns 0.
- 1.2.0, 1.2.1 (vllm-ascend 0.23 pins 1.2.0) and 1.3.0 have the same calls and codes, except that 1.2.0 answers a get
  of a missing key with -1 (counted as ``failed``, recomputed all the same). memcache-hybrid must be installed with
  memfabric-hybrid of the very same version (any other pair crashes its meta service or fails ``init``), and 1.2.x
  blocks 30 s in ``init`` against an absent meta service (1.3.0: 5 s): ``connect`` knocks on it first.

Return codes are read here and nowhere else (:func:`_put_outcome`, :func:`_get_outcome`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

from kvpool_connector.backends.base import (
    ANSWER_TIMEOUT_S,
    ClientRole,
    Outcome,
    PoolBackend,
    PoolUnavailable,
    RegistrationRefused,
    knock,
)
from kvpool_connector.backends.memcache_settings import (
    MMC_LOCAL_CONFIG_ENV,
    MemcacheKeys,
    MemcacheSettings,
    parse_memcache_settings,
)
from kvpool_connector.config import ResolvedConfig
from kvpool_connector.devices import CpuRuntime, DeviceRuntime

# pymmc copy directions (memcache_hybrid.L2G ...).
L2G, G2L, G2H, H2G = 0, 1, 2, 3

# memcache's limits (mmcache_store.cpp, mmc_def.h)
MAX_BATCH_KEYS = 16_384
MAX_BUFFERS_PER_KEY = 255
MAX_KEY_BYTES = 256

# memcache return codes (mmc_types.h)
MMC_OK = 0
INVALID_PARAM = -3000
TIMEOUT = -3004
DUPLICATED_OBJECT = -3006
OBJECT_NOT_EXISTS = -3007
LINK_NOT_FOUND = -3014
NOT_ENOUGH_MEMORY = -3016
NOT_CONNECTED_META = -3017
NOT_CONNECTED_LOCAL = -3018
CLIENT_NOT_INIT = -3019
UNMATCHED_KEY = -3102
_UNAVAILABLE = frozenset({TIMEOUT, LINK_NOT_FOUND, NOT_CONNECTED_META, NOT_CONNECTED_LOCAL, CLIENT_NOT_INIT})
_KNOCK_TIMEOUT_S = 2.0
_INIT_SETTLE_S = 0.1  # pymmc starts its service threads after init returns (production waits as long)


def _put_outcome(code: int) -> Outcome:
    if code in (MMC_OK, DUPLICATED_OBJECT):
        return Outcome.OK
    if code == NOT_ENOUGH_MEMORY:
        return Outcome.POOL_FULL
    if code in _UNAVAILABLE:
        return Outcome.UNAVAILABLE
    return Outcome.FAILED


def _get_outcome(code: int) -> Outcome:
    if code == MMC_OK:
        return Outcome.OK
    if code in (OBJECT_NOT_EXISTS, UNMATCHED_KEY):
        return Outcome.MISSING
    if code in _UNAVAILABLE:
        return Outcome.UNAVAILABLE
    return Outcome.FAILED


def _check_matched_pair() -> None:
    """memcache-hybrid 1.2.x declares ``memfabric-hybrid>=1.2.0``, so pip pairs it with a newer memfabric, which crashes
    memcache's meta service and fails ``init``: refuse any pair of two versions with the fix."""
    try:
        memcache, memfabric = version("memcache-hybrid"), version("memfabric-hybrid")
    except PackageNotFoundError:
        return  # installed outside pip (an Ascend image): nothing to compare
    if memcache != memfabric:
        raise ImportError(
            f"memcache-hybrid {memcache} runs only with memfabric-hybrid {memcache}, found memfabric-hybrid "
            f"{memfabric}: `pip install memfabric-hybrid=={memcache}`"
        )


def _import_store_class() -> type:
    _check_matched_pair()
    try:
        from memcache_hybrid import DistributedObjectStore
    except ImportError as exc:
        raise ImportError(
            f"backend 'memcache' needs Huawei memcache's Python client ({exc}). Install it with "
            "`pip install 'kvpool-connector[memcache]'` (the 1.3.0 pair), or `[memcache12]` (the 1.2.0 pair "
            'vllm-ascend 0.23 pins); or choose "backend": "mooncake".'
        ) from exc
    return DistributedObjectStore


def _point_pymmc_at(path: str) -> None:
    """pymmc reads MMC_LOCAL_CONFIG_PATH once, when ``memcache_hybrid`` is imported (checked: setting it later is
    not seen); set it before that import, and refuse clearly when it was imported with another value."""
    current = os.environ.get(MMC_LOCAL_CONFIG_ENV)
    if current == path:
        return
    if "memcache_hybrid" in sys.modules:
        raise PoolUnavailable(
            f"memcache_hybrid was imported with {MMC_LOCAL_CONFIG_ENV}={current!r} and reads it only then; "
            f"set {MMC_LOCAL_CONFIG_ENV}={path} in the environment of the vLLM process"
        )
    os.environ[MMC_LOCAL_CONFIG_ENV] = path


class _ProcessClient:
    """The one pymmc client of this process, shared by every role in it (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Sticky for the process: once a worker here needed pool memory, every later init starts it, even after
        # its client failed to connect and left (the race of a lookup client initialising first, without BM).
        self.wants_bm = False
        self.device_id = 0
        self._reset()

    def _reset(self) -> None:
        """No client: the state before the first role joined or after the last one left."""
        self.store: Any = None
        self.users = 0
        self.initialised = False
        self.with_bm = False

    def join(self, needs_bm: bool, device_id: int) -> None:
        """A role will use the client; a worker (``needs_bm``) decides the device and that the BM is started."""
        with self._lock:
            if self.store is None:
                self.store = _import_store_class()()
            self.users += 1
            if needs_bm and not self.wants_bm:
                self.wants_bm, self.device_id = True, device_id

    def init(self, needs_bm: bool, meta_url: str) -> Any:
        """The initialised store; the first caller initialises it with the strongest role that joined so far."""
        with self._lock:
            if self.initialised:
                if needs_bm and not self.with_bm:
                    raise PoolUnavailable(
                        "pymmc was initialised in this process without pool memory (a lookup client that joined "
                        "before this worker) and initialises only once per process; this worker cannot move data"
                    )
                return self.store
            try:
                rc = self.store.init(self.device_id, self.wants_bm)
            except ValueError as exc:  # pymmc's answer to a bad local-service file, which can be fixed while we wait
                raise PoolUnavailable(
                    f"memcache init(device {self.device_id}) refused its local service config: {exc}"
                ) from exc
            if rc != 0:
                hint = " (a client holding pool memory needs the Ascend driver and CANN)" if self.wants_bm else ""
                raise PoolUnavailable(
                    f"memcache init(device {self.device_id}, init_bm={self.wants_bm}) against {meta_url} "
                    f"returned {rc}{hint}"
                )
            time.sleep(_INIT_SETTLE_S)
            self.initialised, self.with_bm = True, self.wants_bm
            return self.store

    def leave(self) -> None:
        """A role is done; the last one closes the client (pymmc's close ends it for every holder)."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            store, initialised = self.store, self.initialised
            self._reset()
        if initialised:
            store.close()


_PROCESS_CLIENT = _ProcessClient()


class MemcacheBackend(PoolBackend):
    name: ClassVar[str] = "memcache"
    max_buffers_per_object: ClassVar[int | None] = MAX_BUFFERS_PER_KEY
    config_keys: ClassVar[tuple[str, ...]] = MemcacheKeys.__struct_fields__

    @classmethod
    def parse_settings(cls, section: dict[str, Any], env: Mapping[str, str]) -> MemcacheSettings:
        return parse_memcache_settings(section, env)

    @classmethod
    def from_config(cls, config: ResolvedConfig, role: ClientRole) -> MemcacheBackend:
        settings = config.backend_settings
        assert isinstance(settings, MemcacheSettings), "a config of another backend"
        configured = settings.device_id  # memcache_device_id overrides the worker's local rank
        device = role.device_id if configured is None else configured
        return cls(settings, holds_data=role.holds_data, device_id=device, runtime=role.runtime)

    def __init__(
        self,
        settings: MemcacheSettings,
        *,
        holds_data: bool,
        device_id: int = 0,
        runtime: DeviceRuntime | None = None,
    ) -> None:
        self._settings = settings
        self._holds_data = holds_data
        self._runtime = runtime or CpuRuntime()
        _point_pymmc_at(settings.local_config_path)
        self._client = _PROCESS_CLIENT
        self._client.join(holds_data, device_id)
        self._store: Any = None
        self._joined = True

    def connect(self) -> None:
        door = knock(self._settings.meta_service_url, _KNOCK_TIMEOUT_S)
        if not door.answers:  # init would wait 5 s (1.3.0) or 30 s (1.2.x) holding the process client's lock
            self.close()
            raise PoolUnavailable(f"memcache meta service at {self._settings.meta_service_url}: {door.reason}")
        try:
            self._store = self._client.init(self._holds_data, self._settings.meta_service_url)
        except PoolUnavailable:
            self.close()  # the pool handle retries with a new backend, which joins again
            raise

    def register_memory(self, ptr: int, size: int) -> None:
        if not self._runtime.is_device_address(ptr):
            return  # host memory moves with H2G/G2H, which read it directly; register_buffer is for device RDMA
        if not self._client.with_bm:
            raise PoolUnavailable("memcache client holds no pool memory; cannot register buffers")
        rc = self._store.register_buffer(ptr, size)
        if rc in _UNAVAILABLE:
            raise PoolUnavailable(f"memcache register_buffer returned {rc}")
        if rc != 0:
            raise RegistrationRefused(
                f"memcache refused to register the KV region [{ptr:#x}, {ptr + size:#x}) ({size} bytes): code {rc}"
            )

    def unregister_memory(self, ptr: int, size: int) -> None:
        if not self._runtime.is_device_address(ptr) or not self._client.with_bm:
            return  # never registered (host memory), or no client that could hold it
        rc = self._store.unregister_buffer(ptr, size)
        if rc != 0:
            raise PoolUnavailable(f"memcache unregister_buffer({ptr:#x}, {size} bytes) returned {rc}")

    def answers(self) -> bool:
        return knock(self._settings.meta_service_url, ANSWER_TIMEOUT_S).answers

    # -- data calls ----------------------------------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> list[bool]:
        codes = _batched(self._store.batch_is_exist, list(keys), -1)
        if down := sorted({c for c in codes if c in _UNAVAILABLE}):
            raise PoolUnavailable(f"memcache meta service {self._settings.meta_service_url} answered {down}")
        return [code == 1 for code in codes]

    def put(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        return self._transfer(self._store.batch_put_from_layers, (H2G, L2G), _put_outcome, keys, addrs, sizes)

    def get(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        return self._transfer(self._store.batch_get_into_layers, (G2H, G2L), _get_outcome, keys, addrs, sizes)

    def _transfer(
        self,
        call: Callable[..., list[int]],
        directions: tuple[int, int],
        outcome: Callable[[int], Outcome],
        keys: Sequence[str],
        addrs: Sequence[Sequence[int]],
        sizes: Sequence[Sequence[int]],
    ) -> list[Outcome]:
        if not self._client.with_bm:
            return [Outcome.UNAVAILABLE] * len(keys)
        outcomes = [Outcome.FAILED] * len(keys)
        # One call per direction: an object's buffers all live where its first one does (KV pages or staging).
        by_direction: dict[int, list[int]] = {}
        for i, (key, page_addrs) in enumerate(zip(keys, addrs, strict=True)):
            if 0 < len(page_addrs) <= MAX_BUFFERS_PER_KEY and 0 < len(key.encode()) <= MAX_KEY_BYTES:
                on_device = self._runtime.is_device_address(page_addrs[0])
                by_direction.setdefault(directions[on_device], []).append(i)
        for direct, todo in by_direction.items():
            for start in range(0, len(todo), MAX_BATCH_KEYS):
                chunk = todo[start : start + MAX_BATCH_KEYS]
                codes = call([keys[i] for i in chunk], [addrs[i] for i in chunk], [sizes[i] for i in chunk], direct)
                if len(codes) != len(chunk):
                    continue  # a reply that does not name every key: none of them counts as done
                for i, code in zip(chunk, codes, strict=True):
                    outcomes[i] = outcome(code)
        return outcomes

    def close(self) -> None:
        if self._joined:
            self._joined = False
            self._client.leave()


def _batched(call: Callable[[list[str]], list[int]], keys: list[str], failed: int) -> list[int]:
    """``call`` over chunks of at most MAX_BATCH_KEYS keys; a chunk whose reply has the wrong length gets ``failed``."""
    codes: list[int] = []
    for start in range(0, len(keys), MAX_BATCH_KEYS):
        chunk = keys[start : start + MAX_BATCH_KEYS]
        reply = list(call(chunk))
        codes.extend(reply if len(reply) == len(chunk) else [failed] * len(chunk))
    return codes


BACKEND = MemcacheBackend
