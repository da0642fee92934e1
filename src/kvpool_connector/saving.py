"""The save path: put the full blocks a step completed, now or from a staging area on a background thread.

Mirrors ``loading``: one saver, two modes.
- Synchronous (``async_save: false``): at ``wait_for_save`` wait for the compute stream's event, then put straight
  from the KV pages (memcache's ``L2G`` on an NPU); the forward thread waits for the put.
- Asynchronous (the default): copy the blocks out of the KV cache into a registered host staging area, queued after
  that event (``DeviceRuntime.copy_out``; on the CPU a synchronous batched copy), and put them from the staging area
  on a background thread. The forward pass waits at most for one local copy; once a block is copied out vLLM may
  free and reuse it, and what lands in the pool is the staged copy, never a page a later request rewrote.

Why stage on a GPU/NPU at all, when production (vllm-ascend) puts straight from the KV pages after an event: a put
from the pages keeps those blocks pinned in device memory until a network transfer ends, so vLLM must delay freeing
them and cannot reuse them meanwhile; a device-to-host copy ends in about a millisecond per 64 MiB and releases them
at once, and the put then reads host memory (memcache's ``H2G``).

Calls, in the order they happen:
1. ``BlockSaver(pool, pages, shards, runtime, stats, stripe, staging_blocks)``: with ``staging_blocks`` > 0, allocate
   and register the staging area and start the save thread;
2. ``save(transfers, sightings)`` at ``wait_for_save``: this rank's stripe of the step's blocks (ranks that hold the
   same KV, MLA's, split the puts), keyed by this worker's shard of each block's KV cache group. Only keys the pool
   does not hold yet are put; every outcome is counted. The worker of the layout's first shard also records the
   step's sightings (``admission``: blocks computed for the first time), small objects put with the step's blocks.
   When the staging area is full the oldest queued (not yet started) saves are dropped and counted: a dropped save
   is a future miss, never a stalled forward pass; a copy the device refuses drops its blocks (counted), never
   raises;
3. ``drop_queued(timeout)`` (a cache reset): forget saves not started, wait for the one in flight;
4. ``flush(timeout)`` / ``close(timeout)``: wait for queued puts (shutdown), then stop and join the thread.

The staging area is layer-major (all slots of run 0, then all slots of run 1, ...), so consecutive blocks copied into
consecutive slots merge into one copy per layer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvpool_connector import keys
from kvpool_connector.admission import SIGHTING_BYTES
from kvpool_connector.backends import Outcome
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.logs import init_logger
from kvpool_connector.metadata import BlockTransfer
from kvpool_connector.ops import CopyError
from kvpool_connector.pool import PoolHandle

logger = init_logger(__name__)


@dataclass
class _SaveJob:
    keys: list[str]
    slots: np.ndarray  # staging slot of each key
    copied: Any  # the device event the copy into the slots completes at (None on the CPU: already done)
    sightings: list[str] = field(default_factory=list)  # sighting keys to put with them


class BlockSaver:
    def __init__(
        self,
        pool: PoolHandle,
        pages: KVPages,
        shards: Sequence[str],
        runtime: DeviceRuntime,
        stats: StatsCounter,
        stripe: tuple[int, int] = (0, 1),
        staging_blocks: int = 0,
        on_stored: Callable[[list[str]], None] | None = None,
        sighting_shard: str | None = None,
    ) -> None:
        """``shards``: this worker's fingerprint of each KV cache group; ``stripe``: (index, count), this rank puts
        every count-th block of a step from index on; ``staging_blocks``: the staging area's size in blocks (0:
        synchronous saves); ``on_stored``: told the keys each save left in the pool (KV events);
        ``sighting_shard``: the layout's first shard, on the one worker that records sightings."""
        self._pool = pool
        self._pages = pages
        self._shards = list(shards)
        self._runtime = runtime
        self.stats = stats
        self._stripe = slice(stripe[0], None, stripe[1])
        self._on_stored = on_stored
        self._sighting_shard = sighting_shard
        self._sighting_source: np.ndarray | None = None  # registered at the first sighting
        self._staging: _StagingArea | None = None
        self._cond = threading.Condition()
        self._queue: deque[_SaveJob] = deque()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        if staging_blocks > 0:
            self._staging = _StagingArea(pages, staging_blocks, runtime)
            pool.register_memory(self._staging.base, self._staging.nbytes)
            self._thread = threading.Thread(target=self._run, name="kvpool-save", daemon=True)
            self._thread.start()

    # -- forward-pass side ---------------------------------------------------------------------------------
    def save(self, transfers: Sequence[BlockTransfer], sightings: Sequence[bytes] = ()) -> None:
        """Save this rank's stripe of the blocks of ``transfers``, whose KV the forward pass just queued, and record
        ``sightings`` where this worker keeps them."""
        sighting_keys = [keys.sighting_key(self._sighting_shard, h) for h in sightings] if self._sighting_shard else []
        block_ids = [b for t in transfers for b in t.block_ids][self._stripe]
        if not block_ids:
            if sighting_keys:
                self._queue_sightings(sighting_keys)
            return
        hashes = [h for t in transfers for h in t.block_hashes][self._stripe]
        groups = [g for t in transfers for g in t.block_groups()][self._stripe]
        pool_keys = keys.group_keys(self._shards, hashes, groups)
        written = self._runtime.record_event()  # after every kernel that writes this step's KV
        if self._staging is None:
            self._runtime.wait_on_host(written)
            addrs, sizes = self._pages.addresses(block_ids, groups)
            self._stored(self._put_missing(pool_keys, addrs, sizes))
            self._put_sightings(sighting_keys)
        else:
            self._stage(pool_keys, block_ids, groups, written, sighting_keys)

    def _queue_sightings(self, sighting_keys: list[str]) -> None:
        if self._staging is None:
            self._put_sightings(sighting_keys)
            return
        with self._cond:
            self._queue.append(_SaveJob([], np.zeros(0, dtype=np.int64), None, sighting_keys))
            self._cond.notify_all()

    def _stage(
        self, pool_keys: list[str], block_ids: list[int], groups: list[int], written: Any, sightings: list[str]
    ) -> None:
        assert self._staging is not None
        if not self._pool.available:  # disconnected or in an outage: nothing could take the copy; count it
            self._skip(len(pool_keys))
            return
        with self._cond:
            slots = self._take_slots(len(pool_keys))
        if len(slots) < len(pool_keys):
            self.stats.add("save_dropped.staging_full", len(pool_keys) - len(slots))
            pool_keys, block_ids, groups = pool_keys[: len(slots)], block_ids[: len(slots)], groups[: len(slots)]
        if not len(slots):
            if sightings:
                self._queue_sightings(sightings)
            return
        try:
            copied = self._staging.copy_in(slots, self._pages.address_array(block_ids, groups), written)
        except CopyError as exc:
            with self._cond:
                self._staging.free[slots] = True
            self.stats.add("save_failed.copy", len(pool_keys))
            self._pool.warn(
                "copy", "KV pool save: copying %d blocks out of the KV cache failed: %s", len(pool_keys), exc
            )
            return
        with self._cond:
            self._queue.append(_SaveJob(list(pool_keys), slots, copied, sightings))
            self._cond.notify_all()

    def _take_slots(self, n: int) -> np.ndarray:
        """Up to n free slots, lowest first; drops the oldest queued jobs when short. Caller holds the lock."""
        assert self._staging is not None
        free = self._staging.free
        while int(free.sum()) < n and self._queue:
            dropped = self._queue.popleft()
            free[dropped.slots] = True
            self.stats.add("save_dropped.staging_full", len(dropped.keys))
        slots = np.flatnonzero(free)[:n]
        free[slots] = False
        return slots

    # -- background side -----------------------------------------------------------------------------------
    def _run(self) -> None:
        self._runtime.bind_thread()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                self._put_staged(job)
            except Exception:
                logger.warning("KV pool background save failed", exc_info=True)
                self.stats.add("save_failed.error", len(job.keys))
            finally:
                with self._cond:
                    assert self._staging is not None
                    self._staging.free[job.slots] = True
                    self._busy = False
                    self._cond.notify_all()

    def _put_staged(self, job: _SaveJob) -> None:
        assert self._staging is not None
        if job.keys:
            self._runtime.wait_on_host(job.copied)
            addrs = self._staging.slot_addresses(job.slots).tolist()
            self._stored(self._put_missing(job.keys, addrs, [self._pages.run_sizes] * len(job.keys)))
        self._put_sightings(job.sightings)

    def _put_sightings(self, sighting_keys: list[str]) -> None:
        """Record blocks computed for the first time: their bytes are never read, only their existence."""
        if not sighting_keys or not self._pool.available:
            return
        if self._sighting_source is None:
            self._sighting_source = np.zeros(SIGHTING_BYTES, dtype=np.uint8)
            self._pool.register_memory(self._sighting_source.ctypes.data, SIGHTING_BYTES)
        source = [[self._sighting_source.ctypes.data]] * len(sighting_keys)
        outcomes = self._pool.put(sighting_keys, source, [[SIGHTING_BYTES]] * len(sighting_keys))
        self.stats.add("sightings_recorded", sum(o.ok for o in outcomes))

    # -- the put and its accounting ------------------------------------------------------------------------
    def _put_missing(self, pool_keys: list[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[str]:
        """Put the objects the pool does not hold yet; count every outcome, warn about failures. Returns the keys
        the pool holds afterwards (put now, or already there)."""
        pool = self._pool
        if not pool.available:
            self._skip(len(pool_keys))
            return []
        present = pool.exists(pool_keys)
        if not pool.available:  # the existence query just found the pool down
            self._skip(len(pool_keys))
            return []
        todo = [i for i, p in enumerate(present) if not p]
        self.stats.add("save_skipped_present", len(pool_keys) - len(todo))
        held = [key for key, p in zip(pool_keys, present, strict=True) if p]
        if not todo:
            return held
        start = time.perf_counter()
        outcomes = pool.put([pool_keys[i] for i in todo], [addrs[i] for i in todo], [sizes[i] for i in todo])
        self.stats.add("save_seconds", time.perf_counter() - start)
        held += [pool_keys[i] for i, outcome in zip(todo, outcomes, strict=True) if outcome.ok]
        for i, outcome in zip(todo, outcomes, strict=True):
            if outcome is Outcome.OK:
                self.stats.add("saved_blocks")
                self.stats.add("saved_bytes", sum(sizes[i]))
            elif outcome is Outcome.EXISTS:
                self.stats.add("save_skipped_present")
            else:
                self.stats.add(f"save_failed.{outcome.value}")
        if failed := sorted({o.value for o in outcomes if not o.ok}):
            pool.warn(
                "save",
                "KV pool save: %d of %d blocks not stored (%s)",
                sum(not o.ok for o in outcomes),
                len(outcomes),
                ", ".join(failed),
            )
        return held

    def _skip(self, count: int) -> None:
        """Saves that cannot happen now (not connected yet, or inside an outage's back-off): counted, not tried."""
        self.stats.add("save_dropped.unavailable", count)
        self._pool.skipped("put", count)

    def _stored(self, held: list[str]) -> None:
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
                assert self._staging is not None
                self._staging.free[job.slots] = True
            self._queue.clear()
            self._cond.wait_for(lambda: not self._busy, timeout=timeout_s)
        return dropped

    def close(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        if not self.flush(timeout_s):
            with self._cond:
                self.stats.add("save_dropped.shutdown", sum(len(j.keys) for j in self._queue))
                self._queue.clear()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)


class _StagingArea:
    """Registered host memory holding ``capacity`` block objects, layer-major, and which slots are free."""

    def __init__(self, pages: KVPages, capacity: int, runtime: DeviceRuntime) -> None:
        self._runtime = runtime
        self._buffer = runtime.host_buffer(capacity * pages.block_bytes)
        self.base = self._buffer.data_ptr()
        self.nbytes = self._buffer.numel()
        sizes = np.asarray(pages.run_sizes, dtype=np.int64)
        self._run_bases = self.base + capacity * np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._run_strides = sizes
        self.free = np.ones(capacity, dtype=bool)

    def slot_addresses(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """(slots, runs) array: the address of each run of each slot."""
        s = np.asarray(slots, dtype=np.int64)
        return self._run_bases[None, :] + s[:, None] * self._run_strides[None, :]

    def copy_in(self, slots: np.ndarray, src: np.ndarray, after: Any) -> Any:
        """Copy the (blocks, runs) pages at ``src`` into ``slots`` once ``after`` completed; returns the event the
        copy ends at. Run-major (transposed), so consecutive (block, slot) pairs of one layer are adjacent and merge."""
        dst = self.slot_addresses(slots)
        sizes = np.broadcast_to(self._run_strides[None, :], dst.shape)
        return self._runtime.copy_out(after, dst.T.ravel(), src.T.ravel(), sizes.T.ravel())
