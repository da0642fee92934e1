"""Registered host memory that block objects pass through between the KV cache and the pool.

Saves stage there so that vLLM may reuse a block as soon as its copy-out ended (``saving``); loads of blocks stored at
another TP size read whole stored objects there and place each head range from it (``head_shard_reader``). The pool
client moves bytes only between registered memory and itself, so the area is registered once, for its lifetime.

Calls: ``StagingArea(pool, runtime, nbytes)``; ``shape(run_sizes, layer_major)`` cuts it into slots of one object
each; ``take(n)`` / ``release(slots)``; ``slot_addresses(slots)``; ``close()`` drops the registration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.pool import PoolHandle


class StagingArea:
    def __init__(self, pool: PoolHandle, runtime: DeviceRuntime, nbytes: int) -> None:
        self._pool = pool
        self._buffer = runtime.host_buffer(nbytes)  # pinned where device copies need it
        self.base: int = self._buffer.data_ptr()
        self.nbytes: int = self._buffer.numel()
        self._registered = True
        pool.register_memory(self.base, self.nbytes)
        self.capacity = 0
        self.free = np.zeros(0, dtype=bool)
        self._run_bases = np.zeros(0, dtype=np.int64)
        self._run_strides = np.zeros(0, dtype=np.int64)

    def shape(self, run_sizes: Sequence[int], layer_major: bool) -> int:
        """Cut the area into as many slots of one object (page runs ``run_sizes``) as fit, every slot free; returns
        how many. Layer-major (run 0 of every slot, then run 1, ...): consecutive blocks copied into consecutive slots
        merge into one copy per run. Otherwise each slot's runs lie back to back: a slot is one object."""
        sizes = np.asarray(run_sizes, dtype=np.int64)
        self.capacity = self.nbytes // int(sizes.sum())
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        if layer_major:
            self._run_bases, self._run_strides = self.base + self.capacity * offsets, sizes
        else:
            self._run_bases, self._run_strides = self.base + offsets, np.full_like(sizes, int(sizes.sum()))
        self.free = np.ones(self.capacity, dtype=bool)
        return self.capacity

    def take(self, n: int) -> np.ndarray:
        """Up to ``n`` free slots, lowest first, now taken."""
        slots = np.flatnonzero(self.free)[:n]
        self.free[slots] = False
        return slots

    def release(self, slots: np.ndarray) -> None:
        self.free[slots] = True

    def slot_addresses(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """(slots, runs) array: the address of each run of each slot."""
        s = np.asarray(slots, dtype=np.int64)
        return self._run_bases[None, :] + s[:, None] * self._run_strides[None, :]

    def close(self) -> None:
        """Drop the registration (the memory goes with this object). Idempotent."""
        if self._registered:
            self._registered = False
            self._pool.unregister_memory(self.base, self.nbytes)
