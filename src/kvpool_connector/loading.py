"""The load path: read pool objects straight into the KV pages vLLM allocated, now or on a background thread.

Synchronous loads (``load_async: false``, or the scheduler's choice under ``auto``) run in ``start_load_kv``, before
the forward pass, on the forward thread: every request of the batch waits for them. Asynchronous loads go to the
loader's thread the moment the step's plan arrives; vLLM keeps their requests in ``WAITING_FOR_REMOTE_KVS``
(scheduling nothing into their blocks, and not freeing those blocks even if the request is aborted) until every worker
has reported the request finished through ``get_finished``, so the forward pass never reads a block before it landed
and the decode batch keeps running meanwhile.

Calls (the queue's shape, shared with saves, is ``transfers.TransferQueue``):
1. ``run_now(transfer)``: read the blocks; those that did not arrive whole become load errors.
2. ``submit(transfer)``: queue the same read on the loader thread.
3. ``take_finished(wait_s)``: requests whose queued reads ended since the last call; their failed blocks are in the
   load errors before it returns, as vLLM requires (no later than the step that reports the request finished). While
   vLLM has nothing to run but waits for loads, it steps in a tight loop (an empty step per loop); waiting here for
   a load to end, a few milliseconds at most, turns that loop into a poll that still reports a load the moment it
   ends, and leaves the CPU to the rest of the engine (the API server) meanwhile.
4. ``take_load_errors()``: failed blocks, for ``get_block_ids_with_load_errors``; vLLM recomputes them.
5. ``drain(timeout_s)`` (sleep mode) / ``close(timeout_s)``: let queued reads end (their blocks belong to live
   requests), then stop the thread.

Blocks a GQA engine at another TP size stored (``BlockTransfer.sources``) go through ``head_shard_reader``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvpool_connector import keys
from kvpool_connector.backends.base import Outcome
from kvpool_connector.counters import Count, StatsCounter
from kvpool_connector.head_shard_reader import HeadShardReader
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.pool import PoolHandle
from kvpool_connector.transfers import LOADS, OutcomeCount, TransferQueue

if TYPE_CHECKING:
    from kvpool_connector.metadata import BlockTransfer  # metadata.py subclasses vLLM's metadata: only for annotations


class BlockLoader(TransferQueue["BlockTransfer"]):
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
        super().__init__(f"kvpool-load-{shards[0]}", bind_thread)
        self.pool = pool
        self.pages = pages
        self.shards = shards  # this worker's fingerprint of each KV cache group
        self.stats = stats
        self.own_tp = own_tp
        self.other_tp = other_tp
        self._count = OutcomeCount(LOADS, stats, pool)
        self._errors: set[int] = set()  # under the queue's lock, as is _finished
        self._finished: set[str] = set()

    def _transfer(self, transfer: BlockTransfer) -> None:
        start = time.perf_counter()
        outcomes = self._read(transfer)
        block_bytes = [self.pages.block_bytes] * len(outcomes)
        self._count(outcomes, block_bytes, time.perf_counter() - start, f"request {transfer.req_id}")
        if failed := [b for b, o in zip(transfer.block_ids, outcomes, strict=True) if o is not Outcome.OK]:
            with self._cond:
                self._errors.update(failed)

    def _failed(self, transfer: BlockTransfer) -> None:
        with self._cond:
            self._errors.update(transfer.block_ids)

    def _ended(self, transfer: BlockTransfer, background: bool) -> None:
        if background:
            self._finished.add(transfer.req_id)

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
                self.stats.add(Count.LOADED_OTHER_TP_BLOCKS, read.count(Outcome.OK))
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

    def take_finished(self, wait_s: float = 0.0) -> set[str]:
        """Requests whose loads ended; with ``wait_s``, first wait up to that long for one while loads are running."""
        with self._cond:
            if wait_s > 0 and not self._finished and (self._queue or self._running):
                self._cond.wait_for(lambda: bool(self._finished), wait_s)
            finished, self._finished = self._finished, set()
        return finished

    def take_load_errors(self) -> set[int]:
        with self._cond:
            errors, self._errors = self._errors, set()
        return errors

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        if self.other_tp is not None:
            self.other_tp.close()
