"""The load path: read pool objects straight into the KV pages vLLM allocated, now or on a background thread.

Synchronous loads (``load_async: false``) run in ``start_load_kv``, before the forward pass, on the forward thread:
every request of the batch waits for them. Asynchronous loads (the default) go to one loader thread the moment the
step's plan arrives; vLLM keeps their requests in ``WAITING_FOR_REMOTE_KVS`` (scheduling nothing into their blocks,
and not freeing those blocks even if the request is aborted) until every worker has reported the request finished
through ``get_finished``, so the forward pass never reads a block before it landed and the decode batch keeps running
meanwhile.

Calls:
1. ``load_now(transfer)``: read the blocks; those that did not arrive whole become load errors.
2. ``submit(transfer)``: queue the same read on the loader thread.
3. ``take_finished(wait_s)``: requests whose queued reads ended since the last call; their failed blocks are in the
   load errors before it returns, as vLLM requires (no later than the step that reports the request finished). While
   vLLM has nothing to run but waits for loads, it steps in a tight loop (an empty step per loop); waiting here for
   a load to end, a few milliseconds at most, turns that loop into a poll that still reports a load the moment it
   ends (without it, on a 2-core host, the spin delayed the API server's /health by up to 8 s).
4. ``take_load_errors()``: failed blocks, for ``get_block_ids_with_load_errors``; vLLM recomputes them.
5. ``close(timeout_s)``: let queued reads end (their blocks belong to live requests), then stop the thread.

Blocks a GQA engine at another TP size stored (``BlockTransfer.sources``) go through ``HeadShardReader``: the stored
head shards this rank needs are read into a staging area, and one native batched copy per chunk of blocks places each
head range into the rank's pages (``head_shards`` works out the ranges once per stored TP size).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpool_connector import head_shards, keys
from kvpool_connector.backends import Outcome
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.logs import init_logger
from kvpool_connector.metadata import BlockTransfer
from kvpool_connector.ops import CopyError
from kvpool_connector.pool import PoolHandle

logger = init_logger(__name__)


class BlockLoader:
    def __init__(
        self,
        pool: PoolHandle,
        pages: KVPages,
        shards: Sequence[str],
        stats: StatsCounter,
        bind_thread: Callable[[], None] | None = None,
        own_tp: int = 1,
        other_tp: HeadShardReader | None = None,
    ) -> None:
        """``own_tp``: this engine's TP size; ``other_tp``: reads blocks stored at other TP sizes (None: such a block
        fails, and vLLM recomputes it)."""
        self.pool = pool
        self.pages = pages
        self.shards = shards  # this worker's fingerprint of each KV cache group
        self.stats = stats
        self.own_tp = own_tp
        self.other_tp = other_tp
        self._bind_thread = bind_thread or (lambda: None)
        self._lock = threading.Lock()
        self._errors: set[int] = set()
        self._finished: set[str] = set()
        self._queue: queue.SimpleQueue[BlockTransfer | None] = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet finished
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def load_now(self, transfer: BlockTransfer) -> None:
        start = time.perf_counter()
        outcomes = self._read(transfer)
        self.stats.add("load_seconds", time.perf_counter() - start)
        failed = [b for b, o in zip(transfer.block_ids, outcomes, strict=True) if o is not Outcome.OK]
        self.stats.add("loaded_blocks", len(outcomes) - len(failed))
        self.stats.add("loaded_bytes", (len(outcomes) - len(failed)) * self.pages.block_bytes)
        if not failed:
            return
        with self._lock:
            self._errors.update(failed)
        for outcome in outcomes:
            if outcome is not Outcome.OK:
                self.stats.add(f"load_failed.{outcome.value}")
        self.pool.warn(
            "load",
            "KV pool load of request %s: %d of %d blocks failed (%s); vLLM recomputes them",
            transfer.req_id,
            len(failed),
            len(outcomes),
            ", ".join(sorted({o.value for o in outcomes if o is not Outcome.OK})),
        )

    def _read(self, transfer: BlockTransfer) -> list[Outcome]:
        """Each block's outcome: this engine's own objects straight into its pages, other TP sizes' re-assembled."""
        groups = transfer.block_groups()
        if transfer.sources is None:  # all in this engine's own layout (the common case): one read, no regrouping
            return self._read_own(transfer.block_ids, transfer.block_hashes, groups)
        sources = transfer.sources
        outcomes = [Outcome.FAILED] * len(sources)
        for tp in sorted(set(sources)):
            at = [i for i, source in enumerate(sources) if source == tp]
            ids = [transfer.block_ids[i] for i in at]
            hashes = [transfer.block_hashes[i] for i in at]
            part_groups = [groups[i] for i in at]
            if tp == self.own_tp:
                read = self._read_own(ids, hashes, part_groups)
            elif self.other_tp is not None:
                read = self.other_tp.read(tp, ids, hashes, part_groups)
                self.stats.add("loaded_other_tp_blocks", read.count(Outcome.OK))
            else:
                read = [Outcome.FAILED] * len(at)
                self.pool.warn("other-tp", "KV pool: this worker cannot place blocks stored at TP %d; recomputing", tp)
            for i, outcome in zip(at, read, strict=True):
                outcomes[i] = outcome
        return outcomes

    def _read_own(self, block_ids: list[int], hashes: list[bytes], groups: list[int]) -> list[Outcome]:
        """Objects of this engine's own layout, read straight into the pages."""
        addrs, sizes = self.pages.addresses(block_ids, groups)
        return self.pool.get(keys.group_keys(self.shards, hashes, groups), addrs, sizes)

    def submit(self, transfer: BlockTransfer) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kvpool-load-{self.shards[0]}", daemon=True)
            self._thread.start()
        with self._lock:
            self._pending += 1
        self._queue.put(transfer)

    def _run(self) -> None:
        self._bind_thread()
        while (transfer := self._queue.get()) is not None:
            try:
                self.load_now(transfer)
            except Exception:  # a bug must not leave the request waiting forever: its blocks get recomputed
                logger.exception("KV pool load of request %s failed; vLLM recomputes it", transfer.req_id)
                with self._lock:
                    self._errors.update(transfer.block_ids)
            with self._lock:
                self._finished.add(transfer.req_id)
                self._pending -= 1
                self._idle.notify_all()

    def take_finished(self, wait_s: float = 0.0) -> set[str]:
        """Requests whose loads ended; with ``wait_s``, first wait up to that long for one while loads are running."""
        with self._lock:
            if wait_s > 0 and not self._finished and self._pending:
                self._idle.wait_for(lambda: bool(self._finished), wait_s)
            finished, self._finished = self._finished, set()
        return finished

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def drain(self, timeout_s: float) -> bool:
        """Wait until no queued load is left (their pages may be written until then); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float) -> None:
        if self._thread is None:
            if self.other_tp is not None:
                self.other_tp.close()
            return
        if not self.drain(timeout_s):
            logger.warning("shutdown: %d KV pool loads still running after %.0f s", self._pending, timeout_s)
        self._queue.put(None)
        self._thread.join(timeout=1.0)
        if self.other_tp is not None:
            self.other_tp.close()


@dataclass(frozen=True)
class _StoredShards:
    """How this rank reads blocks stored at one other TP size: the stored shards that hold its heads."""

    fingerprints: list[list[str]]  # [group][k]: the k-th such shard's fingerprint
    run_sizes: list[int]  # the buffers of one stored object (its page runs)
    pieces: list[head_shards.HeadPieces]  # [k]: what the k-th shard's object gives this rank's pages

    @property
    def object_bytes(self) -> int:
        return sum(self.run_sizes)


class HeadShardReader:
    """Loads GQA blocks stored at another TP size into this rank's pages: the stored objects that hold its heads are
    read into a staging area (registered host memory, set aside at the first such load), then one native batched
    copy per chunk of blocks places every head range of every layer."""

    def __init__(
        self,
        pool: PoolHandle,
        pages: KVPages,
        layout: keys.KVLayout,
        ranks: tuple[int, int],
        runtime: DeviceRuntime,
        staging_bytes: int,
    ) -> None:
        """``ranks``: this worker's (tp, pp) rank; ``staging_bytes``: the staging area's size (at least a block)."""
        if pages.run_heads is None:
            raise ValueError(f"the KV heads' place in each page run is not known: {pages.run_heads_problem}")
        self._pool = pool
        self._pages = pages
        self._run_heads = pages.run_heads
        self._layout = layout
        self._ranks = ranks
        self._runtime = runtime
        self._staging_bytes = staging_bytes
        self._staging: Any = None
        self._plans: dict[int, _StoredShards] = {}
        self._lock = threading.Lock()  # synchronous and asynchronous loads may overlap; they share the staging area

    def _plan(self, tp: int) -> _StoredShards:
        plan = self._plans.get(tp)
        if plan is None:
            tp_rank, pp_rank = self._ranks
            stored = head_shards.layout_at_tp(self._layout, tp)
            own = head_shards.rank_heads(self._layout, tp_rank)
            shards = head_shards.overlapping_shards(stored, own)
            plan = self._plans[tp] = _StoredShards(
                fingerprints=[
                    [keys.fingerprint(stored, j * stored.kv_replicas, pp_rank, g) for j in shards]
                    for g in range(self._layout.num_groups)
                ],
                run_sizes=head_shards.object_run_sizes(self._run_heads, stored.num_kv_heads),
                pieces=[
                    head_shards.head_pieces(
                        self._run_heads, own, head_shards.rank_heads(stored, j * stored.kv_replicas)
                    )
                    for j in shards
                ],
            )
        return plan

    def _staging_for(self, nbytes: int) -> tuple[int, int]:
        """(base, size) of a registered staging area of at least ``nbytes``."""
        if self._staging is None or self._staging.numel() < nbytes:
            if self._staging is not None:
                self._pool.unregister_memory(self._staging.data_ptr(), self._staging.numel())
            self._staging = self._runtime.host_buffer(max(nbytes, self._staging_bytes))
            self._pool.register_memory(self._staging.data_ptr(), self._staging.numel())
        return self._staging.data_ptr(), self._staging.numel()

    def close(self) -> None:
        """Drop the staging area's registration (the area goes with this reader)."""
        with self._lock:
            if self._staging is not None:
                self._pool.unregister_memory(self._staging.data_ptr(), self._staging.numel())
                self._staging = None

    def read(self, tp: int, block_ids: Sequence[int], hashes: Sequence[bytes], groups: Sequence[int]) -> list[Outcome]:
        """Load blocks stored at TP ``tp``; each block's outcome (OK only if all of its objects arrived and were
        placed)."""
        plan = self._plan(tp)
        block_bytes = len(plan.pieces) * plan.object_bytes
        with self._lock:
            base, size = self._staging_for(block_bytes)
            chunk = size // block_bytes
            outcomes: list[Outcome] = []
            for first in range(0, len(block_ids), chunk):
                end = first + chunk
                outcomes += self._read_chunk(plan, base, block_ids[first:end], hashes[first:end], groups[first:end])
        return outcomes

    def _read_chunk(
        self, plan: _StoredShards, base: int, block_ids: Sequence[int], hashes: Sequence[bytes], groups: Sequence[int]
    ) -> list[Outcome]:
        per_block = len(plan.pieces)
        pool_keys = [
            keys.pool_key(plan.fingerprints[g][k], h)
            for h, g in zip(hashes, groups, strict=True)
            for k in range(per_block)
        ]
        objects = base + np.arange(len(pool_keys), dtype=np.int64) * plan.object_bytes
        run_offsets = np.concatenate([[0], np.cumsum(plan.run_sizes)[:-1]]).astype(np.int64)
        read = self._pool.get(pool_keys, (objects[:, None] + run_offsets).tolist(), [plan.run_sizes] * len(pool_keys))
        outcomes = [
            next((o for o in read[b * per_block : (b + 1) * per_block] if o is not Outcome.OK), Outcome.OK)
            for b in range(len(block_ids))
        ]
        arrived = np.flatnonzero([o is Outcome.OK for o in outcomes])
        if not arrived.size:
            return outcomes
        pages = self._pages.address_array([block_ids[b] for b in arrived], [groups[b] for b in arrived])
        dsts, srcs, sizes = [], [], []
        for k, pieces in enumerate(plan.pieces):
            dsts.append(pages[:, pieces.run] + pieces.dst)
            srcs.append(objects[arrived * per_block + k][:, None] + pieces.src)
            sizes.append(np.broadcast_to(pieces.size, (arrived.size, pieces.size.size)))
        try:
            self._runtime.copy_in(
                np.concatenate(dsts, axis=1).ravel(),
                np.concatenate(srcs, axis=1).ravel(),
                np.concatenate(sizes, axis=1).ravel(),
            )
        except CopyError as exc:
            self._pool.warn("copy", "KV pool load: placing %d blocks' head shards failed: %s", arrived.size, exc)
            for b in arrived:
                outcomes[b] = Outcome.FAILED
        return outcomes
