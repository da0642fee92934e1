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
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

from kvpool_connector import keys
from kvpool_connector.backends import Outcome
from kvpool_connector.counters import StatsCounter
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.logs import init_logger
from kvpool_connector.metadata import BlockTransfer
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
    ) -> None:
        self.pool = pool
        self.pages = pages
        self.shards = shards  # this worker's fingerprint of each KV cache group
        self.stats = stats
        self._bind_thread = bind_thread or (lambda: None)
        self._lock = threading.Lock()
        self._errors: set[int] = set()
        self._finished: set[str] = set()
        self._queue: queue.SimpleQueue[BlockTransfer | None] = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet finished
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def load_now(self, transfer: BlockTransfer) -> None:
        groups = transfer.block_groups()
        addrs, sizes = self.pages.addresses(transfer.block_ids, groups)
        start = time.perf_counter()
        outcomes = self.pool.get(keys.group_keys(self.shards, transfer.block_hashes, groups), addrs, sizes)
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
            return
        if not self.drain(timeout_s):
            logger.warning("shutdown: %d KV pool loads still running after %.0f s", self._pending, timeout_s)
        self._queue.put(None)
        self._thread.join(timeout=1.0)
