"""The asynchronous save path: copy blocks out of the KV cache fast, put them to the pool in the background.

The forward pass waits at most for one batched local copy (KV pages -> a host staging area; on a GPU/NPU it only
queues it); the pool put, which may cross a network, runs on a background thread. Once a block is copied out, vLLM
may free and reuse it: what lands in the pool is the staged copy, never a page rewritten by a later request.

Why stage on a GPU/NPU at all, when production (vllm-ascend) puts straight from the KV pages after an event: a put
from the pages keeps those blocks pinned in device memory until a network transfer ends, so vLLM must delay freeing
them (``request_finished`` -> delay free) and cannot reuse them meanwhile; a device-to-host copy ends in about a
millisecond per 64 MiB and releases them at once, and the put then reads host memory (memcache's ``H2G``). With
``async_save: false`` the worker puts synchronously from the pages instead (``L2G``), after the same event.

Calls, in the order they happen:
1. ``StagingSaver(pool, pages, capacity_blocks, runtime)``: allocate and register the staging area, start the thread;
2. ``stage(keys, block_ids, written)`` at ``wait_for_save``, with the event the forward pass's writes complete at:
   take free slots, queue the copy of the blocks in after that event (``DeviceRuntime.copy_out``), queue the job.
   When the area is full the oldest queued (not yet started) jobs are dropped and counted: a dropped save is a
   future miss, never a stalled forward pass. A copy the device refuses drops its blocks (counted), never raises;
3. the thread: wait for the job's copy, put the keys the pool does not hold yet from their slots
   (``PoolHandle.put_missing``), free the slots;
4. ``flush(timeout)`` / ``close(timeout)``: wait for queued puts (shutdown), then stop and join the thread.

The staging area is layer-major (all slots of run 0, then all slots of run 1, ...), so consecutive blocks copied into
consecutive slots merge into one copy per layer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.logs import init_logger
from kvpool_connector.ops import CopyError
from kvpool_connector.pool import PoolHandle

logger = init_logger(__name__)


@dataclass
class _SaveJob:
    keys: list[str]
    slots: np.ndarray  # staging slot of each key
    copied: Any  # the device event the copy into the slots completes at (None on the CPU: already done)


class StagingSaver:
    def __init__(
        self,
        pool: PoolHandle,
        pages: KVPages,
        capacity_blocks: int,
        runtime: DeviceRuntime,
        stats: StatsCounter | None = None,
        on_stored: Callable[[list[str]], None] | None = None,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"staging area must hold at least one block ({pages.block_bytes} bytes)")
        self._pool = pool
        self._pages = pages
        self.capacity = capacity_blocks
        self._runtime = runtime
        self._buffer = runtime.host_buffer(capacity_blocks * pages.block_bytes)
        base = self._buffer.data_ptr()
        sizes = np.asarray(pages.run_sizes, dtype=np.int64)
        self._run_sizes = pages.run_sizes
        self._run_bases = base + capacity_blocks * np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._run_strides = sizes
        pool.register_memory(base, self._buffer.numel())
        self._free = np.ones(capacity_blocks, dtype=bool)
        self._queue: deque[_SaveJob] = deque()
        self._busy = False
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = threading.Event()
        self._paused.set()
        self.stats = stats if stats is not None else StatsCounter()
        self._on_stored = on_stored  # told the keys each put left in the pool (KV events)
        self._thread = threading.Thread(target=self._run, name="kvpool-save", daemon=True)
        self._thread.start()

    def slot_addresses(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """(slots, runs) array: the address of each run of each slot (layer-major area)."""
        s = np.asarray(slots, dtype=np.int64)
        return self._run_bases[None, :] + s[:, None] * self._run_strides[None, :]

    # -- forward-pass side ---------------------------------------------------------------------------------
    def stage(
        self, keys: Sequence[str], block_ids: Sequence[int], written: Any, groups: Sequence[int] | None = None
    ) -> None:
        """Queue the save of ``block_ids`` (of KV cache ``groups``; None: group 0) under ``keys``; ``written`` is the
        event their KV is complete at."""
        if not self._pool.available:  # disconnected or in an outage: nothing could take the copy; count it
            self._pool.skip_saves(len(keys), self.stats)
            return
        with self._cond:
            slots = self._take_slots(len(keys))
        if len(slots) < len(keys):
            self.stats.add("save_dropped.staging_full", len(keys) - len(slots))
            keys, block_ids = keys[: len(slots)], block_ids[: len(slots)]
            groups = None if groups is None else groups[: len(slots)]
        if not len(slots):
            return
        # Copy run-major (transpose) so consecutive (block, slot) pairs of one layer are adjacent and merge.
        src = self._pages.address_array(block_ids, groups)
        dst = self.slot_addresses(slots)
        sizes = np.broadcast_to(self._run_strides[None, :], dst.shape)
        try:
            copied = self._runtime.copy_out(written, dst.T.ravel(), src.T.ravel(), sizes.T.ravel())
        except CopyError as exc:
            with self._cond:
                self._free[slots] = True
            self.stats.add("save_failed.copy", len(keys))
            self._pool.warn("copy", "KV pool save: copying %d blocks out of the KV cache failed: %s", len(keys), exc)
            return
        with self._cond:
            self._queue.append(_SaveJob(list(keys), slots, copied))
            self._cond.notify_all()

    def _take_slots(self, n: int) -> np.ndarray:
        """Up to n free slots, lowest first; drops the oldest queued jobs when short. Caller holds the lock."""
        while int(self._free.sum()) < n and self._queue:
            dropped = self._queue.popleft()
            self._free[dropped.slots] = True
            self.stats.add("save_dropped.staging_full", len(dropped.keys))
        slots = np.flatnonzero(self._free)[:n]
        self._free[slots] = False
        return slots

    # -- background side -----------------------------------------------------------------------------------
    def _run(self) -> None:
        self._runtime.bind_thread()
        while True:
            self._paused.wait()
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                self._put(job)
            except Exception:
                logger.warning("KV pool background save failed", exc_info=True)
                self.stats.add("save_failed.error", len(job.keys))
            finally:
                with self._cond:
                    self._free[job.slots] = True
                    self._busy = False
                    self._cond.notify_all()

    def _put(self, job: _SaveJob) -> None:
        self._runtime.wait_on_host(job.copied)
        addrs = self.slot_addresses(job.slots).tolist()
        held = self._pool.put_missing(job.keys, addrs, [self._run_sizes] * len(job.keys), self.stats)
        if self._on_stored is not None and held:
            self._on_stored(held)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued save has been put; False if that took longer than ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout=timeout_s)

    def drop_queued(self, timeout_s: float) -> int:
        """Forget every save not started yet and wait for the one in progress: afterwards nothing staged before
        this call can still reach the pool. Returns the blocks dropped."""
        with self._cond:
            dropped = sum(len(job.keys) for job in self._queue)
            for job in self._queue:
                self._free[job.slots] = True
            self._queue.clear()
            self._cond.wait_for(lambda: not self._busy, timeout=timeout_s)
        return dropped

    def pause(self) -> None:
        """Hold the background thread before its next job (tests use it to keep a save in flight)."""
        self._paused.clear()

    def resume(self) -> None:
        self._paused.set()

    def close(self, timeout_s: float = 10.0) -> None:
        self.resume()
        if not self.flush(timeout_s):
            with self._cond:
                self.stats.add("save_dropped.shutdown", sum(len(j.keys) for j in self._queue))
                self._queue.clear()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)
