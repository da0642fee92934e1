"""Huawei memcache backend (``memcache-hybrid``'s pymmc ``DistributedObjectStore``; Ascend NPUs).

One object per KV block through pymmc's ``*_layers`` batch calls, which gather/scatter one page per layer. The copy
direction tells memcache where our pages live: device HBM (``L2G``/``G2L``) or host DRAM (``H2G``/``G2H``).

Two client kinds, from pymmc's ``init(device_id, init_bm)``:
- the scheduler's lookup client uses ``init_bm=False``: it only talks to the meta service (``batch_is_exist``);
- each worker uses ``init_bm=True``, which starts the local service that holds pool memory and moves data. That
  needs the Ascend driver and CANN; without them init fails (checked on x86_64: -1, "the current version of ascend
  driver does not support mf!") and we raise PoolUnavailable so the connector serves with misses only.
A client whose BM is not up must never be asked to register memory: pymmc then dereferences a null client.

Return codes are read here and nowhere else: ``batch_is_exist`` gives 1/0/-1, data calls 0 on success; -3019 is what
pymmc answers while its client is not initialised (seen here). The pymmc binding returns an empty list instead of one
code per key when the client is not initialised, which we treat as a failure of every key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from kvpool_connector.backends.base import Outcome, PoolBackend, PoolUnavailable
from kvpool_connector.config import MMC_LOCAL_CONFIG_ENV, MemcacheSettings

NOT_INITIALISED = -3019

# pymmc copy directions (memcache_hybrid.L2G ...), as its documentation numbers them.
L2G, G2L, G2H, H2G = 0, 1, 2, 3


def _import_store():
    try:
        from memcache_hybrid import DistributedObjectStore
    except ImportError as exc:
        raise ImportError(
            f"backend 'memcache' needs Huawei memcache's Python client ({exc}). Install it with "
            '`pip install memcache-hybrid memfabric-hybrid`, or choose "backend": "mooncake".'
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


def _codes(result: Sequence[int], n: int) -> list[int]:
    return list(result) if len(result) == n else [NOT_INITIALISED] * n


class MemcacheBackend(PoolBackend):
    name = "memcache"

    def __init__(
        self, settings: MemcacheSettings, *, holds_data: bool, device_id: int = 0, pages_on_device: bool = False
    ) -> None:
        self._settings = settings
        self._holds_data = holds_data
        self._device_id = device_id
        _point_pymmc_at(settings.local_config_path)
        self._store = _import_store()()
        self._bm_ready = False
        self._pages_on_device = pages_on_device  # NPU pages: copy L2G/G2L; host DRAM pages: H2G/G2H

    def connect(self) -> None:
        rc = self._store.init(self._device_id, self._holds_data)
        if rc != 0:
            hint = (
                " (the worker's memcache client needs the Ascend driver and CANN to hold pool memory)"
                if self._holds_data
                else ""
            )
            raise PoolUnavailable(
                f"memcache init(device {self._device_id}) against {self._settings.meta_service_url} returned {rc}"
                + hint
            )
        self._bm_ready = self._holds_data

    def register_memory(self, ptr: int, size: int) -> None:
        if not self._bm_ready:
            raise PoolUnavailable("memcache client holds no pool memory; cannot register buffers")
        rc = self._store.register_buffer(ptr, size)
        if rc != 0:
            raise PoolUnavailable(f"memcache register_buffer({size} bytes) returned {rc}")

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [code == 1 for code in _codes(self._store.batch_is_exist(list(keys)), len(keys))]

    def _data_path_ready(self, n: int) -> list[Outcome] | None:
        return None if self._bm_ready else [Outcome.UNAVAILABLE] * n

    def put(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        if (refused := self._data_path_ready(len(keys))) is not None:
            return refused
        direct = L2G if self._pages_on_device else H2G
        codes = _codes(self._store.batch_put_from_layers(list(keys), addrs, sizes, direct), len(keys))
        return [_outcome(code) for code in codes]

    def get(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        if (refused := self._data_path_ready(len(keys))) is not None:
            return refused
        direct = G2L if self._pages_on_device else G2H
        codes = _codes(self._store.batch_get_into_layers(list(keys), addrs, sizes, direct), len(keys))
        return [_outcome(code) for code in codes]

    def remove(self, keys: Sequence[str]) -> list[bool]:
        return [code == 0 for code in _codes(self._store.remove_batch(list(keys)), len(keys))]

    def close(self) -> None:
        self._store.close()


def _outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome.OK
    if code == NOT_INITIALISED:
        return Outcome.UNAVAILABLE
    return Outcome.FAILED
