"""The save path: put the full blocks a step completed, now or from a staging area on a background thread.

One saver, two modes, on the same transfer-queue shape as loads (``transfers.TransferQueue``):
- Synchronous (``async_save: false``): at ``wait_for_save`` wait for the compute stream's event, then put straight
  from the KV pages (memcache's ``L2G`` on an NPU); the forward thread waits for the put.
- Asynchronous (the default): copy the blocks out of the KV cache into a registered host staging area, queued after
  that event (``DeviceRuntime.copy_out``; on the CPU a synchronous batched copy), and put them from the staging area
  on the saver's thread. The forward pass waits at most for one local copy; once a block is copied out vLLM may free
  and reuse it, and what lands in the pool is the staged copy, never a page a later request rewrote.

Why stage on a GPU/NPU at all, when production (vllm-ascend) puts straight from the KV pages after an event: a put
from the pages keeps those blocks pinned in device memory until a network transfer ends, so vLLM must delay freeing
them and cannot reuse them meanwhile; a device-to-host copy ends in about a millisecond per 64 MiB and releases them
at once, and the put then reads host memory (memcache's ``H2G``).

Calls, in the order they happen:
1. ``BlockSaver(pool, pages, shards, runtime, stats, stripe, staging_blocks)``: with ``staging_blocks`` > 0, allocate
   and register the staging area (saves are then asynchronous);
2. ``save(transfers, sightings)`` at ``wait_for_save``: this rank's stripe of the step's blocks (ranks that hold the
   same KV, MLA's, split the puts), keyed by this worker's shard of each block's KV cache group. Only keys the pool
   does not hold yet are put; every outcome is counted. The worker of the layout's first shard also records the
   step's sightings (``admission``: blocks computed for the first time), small objects put with the step's blocks.
   When the staging area is full the oldest queued (not yet started) saves are dropped and counted: a dropped save
   is a future miss, never a stalled forward pass; a copy the device refuses drops its blocks (counted), never
   raises;
3. ``drop_queued(timeout_s)`` (a cache reset): forget saves not started, wait for the one in flight;
4. ``drain(timeout_s)`` / ``close(timeout_s)``: wait for queued puts (shutdown), then stop and join the thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpool_connector import keys
from kvpool_connector.admission import SIGHTING_BYTES
from kvpool_connector.counters import Count, StatsCounter
from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.ops import CopyError
from kvpool_connector.pool import PoolHandle
from kvpool_connector.staging import StagingArea
from kvpool_connector.transfers import SAVES, OutcomeCount, TransferQueue

if TYPE_CHECKING:
    from kvpool_connector.metadata import BlockTransfer  # metadata.py subclasses vLLM's metadata: only for annotations


@dataclass
class SaveJob:
    """Blocks of one step to put, and where their bytes are once ``ready`` completed."""

    keys: list[str]
    addrs: list[list[int]]  # each block's runs: in the KV pages (synchronous) or in its staging slot
    sizes: list[list[int]]
    ready: Any  # the device event the sources are complete at (None on the CPU: already)
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # staging slots it holds
    sightings: list[str] = field(default_factory=list)  # sighting keys to put with them


class BlockSaver(TransferQueue[SaveJob]):
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
        super().__init__("kvpool-save", runtime.bind_thread)
        self._pool = pool
        self._pages = pages
        self._shards = list(shards)
        self._runtime = runtime
        self.stats = stats
        self._count = OutcomeCount(SAVES, stats, pool)
        self._stripe = slice(stripe[0], None, stripe[1])
        self._on_stored = on_stored
        self._sighting_shard = sighting_shard
        self._sighting_source: np.ndarray | None = None  # registered at the first sighting
        self._staging: StagingArea | None = None
        if staging_blocks > 0:
            self._staging = StagingArea(pool, runtime, staging_blocks * pages.block_bytes)
            self._staging.shape(pages.run_sizes, layer_major=True)

    # -- forward-pass side ---------------------------------------------------------------------------------
    def save(self, transfers: Sequence[BlockTransfer], sightings: Sequence[bytes] = ()) -> None:
        """Save this rank's stripe of the blocks of ``transfers``, whose KV the forward pass just queued, and record
        ``sightings`` where this worker keeps them."""
        sighting_keys = [keys.sighting_key(self._sighting_shard, h) for h in sightings] if self._sighting_shard else []
        block_ids = [b for t in transfers for b in t.block_ids][self._stripe]
        if not block_ids:
            if sighting_keys:
                self._dispatch(SaveJob([], [], [], None, sightings=sighting_keys))
            return
        hashes = [h for t in transfers for h in t.block_hashes][self._stripe]
        groups = [g for t in transfers for g in t.block_groups()][self._stripe]
        pool_keys = keys.group_keys(self._shards, hashes, groups)
        written = self._runtime.record_event()  # after every kernel that writes this step's KV
        if self._staging is None:
            addrs, sizes = self._pages.addresses(block_ids, groups)
            self.run_now(SaveJob(pool_keys, addrs, sizes, written, sightings=sighting_keys))
        else:
            self._stage(pool_keys, block_ids, groups, written, sighting_keys)

    def _dispatch(self, job: SaveJob) -> None:
        if self._staging is None:
            self.run_now(job)
        else:
            self.submit(job)

    def _stage(
        self, pool_keys: list[str], block_ids: list[int], groups: list[int], written: Any, sightings: list[str]
    ) -> None:
        staging = self._staging
        assert staging is not None
        if not self._pool.available:  # disconnected or in an outage: nothing could take the copy; count it
            self._skip(len(pool_keys))
            return
        with self._cond:
            slots = self._take_slots(staging, len(pool_keys))
        if len(slots) < len(pool_keys):
            self.stats.add(Count.SAVE_DROPPED.by("staging_full"), len(pool_keys) - len(slots))
            pool_keys, block_ids, groups = pool_keys[: len(slots)], block_ids[: len(slots)], groups[: len(slots)]
        if not len(slots):
            if sightings:
                self.submit(SaveJob([], [], [], None, sightings=sightings))
            return
        dst = staging.slot_addresses(slots)
        run_sizes = np.broadcast_to(np.asarray(self._pages.run_sizes, dtype=np.int64)[None, :], dst.shape)
        src = self._pages.address_array(block_ids, groups)
        try:
            # Run-major (transposed): consecutive (block, slot) pairs of one layer are adjacent and merge.
            copied = self._runtime.copy_out(written, dst.T.ravel(), src.T.ravel(), run_sizes.T.ravel())
        except CopyError as exc:
            with self._cond:
                staging.release(slots)
            self.stats.add(Count.SAVE_FAILED.by("copy"), len(pool_keys))
            self._pool.warn(
                "copy", "KV pool save: copying %d blocks out of the KV cache failed: %s", len(pool_keys), exc
            )
            return
        sizes = [self._pages.run_sizes] * len(pool_keys)
        self.submit(SaveJob(list(pool_keys), dst.tolist(), sizes, copied, slots, sightings))

    def _take_slots(self, staging: StagingArea, n: int) -> np.ndarray:
        """Up to n free slots, lowest first; drops the oldest queued jobs when short. Caller holds the lock."""
        while int(staging.free.sum()) < n and self._queue:
            dropped = self._queue.popleft()
            staging.release(dropped.slots)
            self.stats.add(Count.SAVE_DROPPED.by("staging_full"), len(dropped.keys))
        return staging.take(n)

    # -- the queue's side ---------------------------------------------------------------------------------------
    def _transfer(self, job: SaveJob) -> None:
        if job.keys:
            self._runtime.wait_on_host(job.ready)
            self._stored(self._put_missing(job.keys, job.addrs, job.sizes))
        self._put_sightings(job.sightings)

    def _failed(self, job: SaveJob) -> None:
        self.stats.add(Count.SAVE_FAILED.by("error"), len(job.keys))

    def _ended(self, job: SaveJob, background: bool) -> None:
        if self._staging is not None:
            self._staging.release(job.slots)

    def _dropped(self, jobs: Sequence[SaveJob], reason: str) -> None:
        for job in jobs:
            self._ended(job, background=True)
        if reason == "shutdown":  # a reset's drop is the reset's job: the worker logs it
            self.stats.add(Count.SAVE_DROPPED.by("shutdown"), sum(len(job.keys) for job in jobs))

    def _put_sightings(self, sighting_keys: list[str]) -> None:
        """Record blocks computed for the first time: their bytes are never read, only their existence."""
        if not sighting_keys or not self._pool.available:
            return
        if self._sighting_source is None:
            self._sighting_source = np.zeros(SIGHTING_BYTES, dtype=np.uint8)
            self._pool.register_memory(self._sighting_source.ctypes.data, SIGHTING_BYTES)
        source = [[self._sighting_source.ctypes.data]] * len(sighting_keys)
        outcomes = self._pool.put(sighting_keys, source, [[SIGHTING_BYTES]] * len(sighting_keys))
        self.stats.add(Count.SIGHTINGS_RECORDED, sum(o.ok for o in outcomes))

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
        self.stats.add(Count.SAVE_SKIPPED_PRESENT, len(pool_keys) - len(todo))
        held = [key for key, p in zip(pool_keys, present, strict=True) if p]
        if not todo:
            return held
        start = time.perf_counter()
        outcomes = pool.put([pool_keys[i] for i in todo], [addrs[i] for i in todo], [sizes[i] for i in todo])
        self._count(outcomes, [sum(sizes[i]) for i in todo], time.perf_counter() - start, "a step's blocks")
        return held + [pool_keys[i] for i, outcome in zip(todo, outcomes, strict=True) if outcome.ok]

    def _skip(self, count: int) -> None:
        """Saves that cannot happen now (not connected yet, or inside an outage's back-off): counted, not tried."""
        self.stats.add(Count.SAVE_DROPPED.by("unavailable"), count)
        self._pool.skipped("put", count)

    def _stored(self, held: list[str]) -> None:
        if self._on_stored is not None and held:
            self._on_stored(held)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> None:
        super().close(timeout_s)
        if self._staging is not None:
            self._staging.close()
