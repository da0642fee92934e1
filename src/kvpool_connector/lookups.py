"""Existence queries off the scheduler loop: one lookup thread, batched, bounded.

Calls, in the order the scheduler makes them:
1. ``exists_async(keys, stuck_after_s)``: a future answered on the lookup thread. Queries made while a pool call is
   running go out together in the next one (64 prompts arriving at once cost two round trips, not 64). Answered
   ``None`` (no answer: every key a miss, the pool's fault) at once while the pool is not connected, inside an
   outage's back-off, or while a query has been running for over ``stuck_after_s`` (a stuck pool client costs
   misses, never a stalled scheduler), and when the pool's call fails.
2. ``exists_within(keys, timeout_s)``: the same, waited for, bounded by ``timeout_s`` (past it: ``None``).
3. ``close()``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Sequence

from kvpool_connector.pool import PoolHandle


class LookupBatcher:
    def __init__(self, pool: PoolHandle) -> None:
        self._pool = pool
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"kvpool-lookup-{pool.label}", initializer=pool.bind_thread
        )
        self._lock = threading.Lock()
        self._batch: list[tuple[list[str], concurrent.futures.Future[list[bool] | None]]] = []
        self._queued = False
        self._inflight: concurrent.futures.Future | None = None  # the lookup thread's current pool call
        self._started = 0.0

    def exists_within(self, keys: Sequence[str], timeout_s: float) -> list[bool] | None:
        try:
            return self.exists_async(keys).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            self._pool.stats.add("lookup_timeouts")
            self._pool.warn(
                "lookup-timeout", "KV pool lookup took over %.0f ms; counting it as a miss", timeout_s * 1e3
            )
            return None

    def exists_async(
        self, keys: Sequence[str], stuck_after_s: float = 0.0
    ) -> concurrent.futures.Future[list[bool] | None]:
        future: concurrent.futures.Future[list[bool] | None] = concurrent.futures.Future()
        if self._answer_now_with_misses(stuck_after_s):
            future.set_result(None)
            return future
        with self._lock:
            self._batch.append((list(keys), future))
            if not self._queued:
                self._queued = True
                self._inflight = self._executor.submit(self._answer_batch)
                self._started = time.monotonic()
        return future

    def _answer_now_with_misses(self, stuck_after_s: float) -> bool:
        pool = self._pool
        if not pool.connected:
            pool.warn("not-connected", "KV pool (%s) not connected yet: counting lookups as misses", pool.label)
            return True
        if not pool.available:
            return True
        inflight = self._inflight
        if inflight is not None and not inflight.done() and time.monotonic() - self._started >= stuck_after_s:
            pool.stats.add("lookup_timeouts")
            pool.warn("lookup-stuck", "an earlier KV pool lookup has not returned; counting lookups as misses")
            return True
        return False

    def _answer_batch(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
            self._queued = False
        batch = [(keys, future) for keys, future in batch if future.set_running_or_notify_cancel()]
        found = self._pool.exists_or_none([key for keys, _ in batch for key in keys])
        offset = 0
        for keys, future in batch:
            future.set_result(None if found is None else found[offset : offset + len(keys)])
            offset += len(keys)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
