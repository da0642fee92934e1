"""Existence queries of prompt blocks, off the scheduler loop: one lookup thread, batched, bounded; and the
scheduler's lookup of one request on top of it.

``LookupBatcher``, in the order the scheduler makes its calls:
1. ``exists_async(keys, stuck_after_s)``: a future answered on the lookup thread. Queries made while a pool call is
   running go out together in the next one (64 prompts arriving at once cost two round trips, not 64). Answered
   ``None`` (no answer: every key a miss, the pool's fault) at once while the pool is not connected, inside an
   outage's back-off, or while a query has been running for over ``stuck_after_s`` (a stuck pool client costs
   misses, never a stalled scheduler), and when the pool's call fails.
2. ``exists_within(keys, timeout_s)``: the same, waited for, bounded by ``timeout_s`` (past it: ``None``).
3. ``close()``.

``PrefixLookup``: ``connect(config, ...)`` once, with the scheduler's own pool client; then for each request vLLM asks
about:
1. ``found_blocks(state, start, hashes)``: the blocks from ``start`` the pool holds on every shard of some readable
   stored layout, and the layout each loads from (``lookup_math``: the keys' order and what the answers mean), with
   the admission question asked beside them. Asked inline (bounded by the lookup timeout) or asynchronously: then
   ``None`` ("ask again") until the answer is in or its deadline passed (a miss).
2. ``count(state, hit_tokens)``, once vLLM allocated the request's blocks: the lookup's counters.
3. ``wait_while_idle(states)``, in a step that runs nothing: a short wait for what waiting requests wait for.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpool_connector.backends import ClientRole
from kvpool_connector.counters import Count
from kvpool_connector.keys import KVLayout, shard_fingerprints, shard_groups
from kvpool_connector.lookup_math import lookup_keys, present_prefix_by_layout
from kvpool_connector.pool import PoolHandle, open_pool

if TYPE_CHECKING:
    from kvpool_connector.admission import Admission
    from kvpool_connector.config import ResolvedConfig
    from kvpool_connector.counters import StatsCounter
    from kvpool_connector.request_state import RequestState

IDLE_STEP_LOOKUP_WAIT_S = 0.02
"""Longest a step with nothing scheduled waits on the scheduler for a lookup answer or a producer-wait poll: as long
as the longest pause between two polls of a P/D consumer (``handoff.POLL_PAUSE_MAX_S``), so an idle engine sleeps
through such a pause in one step rather than spinning through it."""


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
            self._pool.stats.add(Count.LOOKUP_TIMEOUTS)
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
            pool.stats.add(Count.LOOKUP_TIMEOUTS)
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


@dataclass
class Lookup:
    """One request's asynchronous existence query: asked once per question (first block, blocks), answered once."""

    question: tuple[int, int]
    future: concurrent.futures.Future[list[bool] | None]
    deadline: float  # time.monotonic() past which an unanswered query is a miss


class PrefixLookup:
    """How much of a request's prompt the pool holds, across every readable stored layout.

    ``readable``: the stored layouts a lookup asks for, this engine's own first (``head_shards.readable_tp_sizes``);
    ``windows``: each KV cache group's window in blocks (``lookup_math.present_prefix_blocks``); a lookup waits at
    most ``timeout_s`` for its answer, inline or (``asynchronous``) across steps."""

    def __init__(
        self,
        pool: PoolHandle,
        readable: Sequence[KVLayout],
        windows: Sequence[int | None],
        admission: Admission,
        timeout_s: float,
        asynchronous: bool,
        stats: StatsCounter,
    ) -> None:
        self.pool = pool
        self.readable = list(readable)
        self.readable_shards = [shard_fingerprints(stored) for stored in self.readable]
        self.readable_groups = [shard_groups(stored) for stored in self.readable]
        self.windows = list(windows)
        self.admission = admission
        self.timeout_s = timeout_s
        self.asynchronous = asynchronous
        self.stats = stats
        self.batcher = LookupBatcher(pool)

    @classmethod
    def connect(
        cls,
        config: ResolvedConfig,
        readable: Sequence[KVLayout],
        windows: Sequence[int | None],
        admission: Admission,
        stats: StatsCounter,
    ) -> PrefixLookup:
        """The lookup of a scheduler, with its own pool client (one that holds no data), connecting from now on: a
        lookup before it connected is a miss."""
        settings = config.pool
        pool = open_pool(config, ClientRole(holds_data=False), f"lookup/instance {settings.instance_id}", stats)
        lookup = cls(pool, readable, windows, admission, settings.lookup_timeout_ms / 1e3, settings.lookup_async, stats)
        pool.start(wait_s=settings.startup_wait_s)
        return lookup

    def keys(self, hashes: Sequence[bytes]) -> list[str]:
        """Each readable layout's keys of ``hashes``, in the lookup key order (``lookup_math``)."""
        return lookup_keys(self.readable_shards, hashes)

    def found_blocks(self, state: RequestState, start: int, hashes: list[bytes]) -> tuple[int, list[list[int]]] | None:
        """Leading blocks from ``start`` the pool holds on every shard of some readable layout, and the layout each
        block's groups load from (``present_prefix_by_layout``); None while an asynchronous query runs."""
        if not self.asynchronous:
            found = self.batcher.exists_within(self._question_keys(hashes[start:]), self.timeout_s)
            return self._answer(state, start, len(hashes) - start, found)
        question = (start, len(hashes))
        lookup = state.lookup
        if lookup is None or lookup.question != question:  # keys are built only for a new question
            future = self.batcher.exists_async(self._question_keys(hashes[start:]), stuck_after_s=self.timeout_s)
            lookup = state.lookup = Lookup(question, future, time.monotonic() + self.timeout_s)
        if lookup.future.done():
            return self._answer(state, start, len(hashes) - start, lookup.future.result())
        if time.monotonic() < lookup.deadline:
            return None
        self.stats.add(Count.LOOKUP_TIMEOUTS)
        self.pool.warn(
            "lookup-timeout", "KV pool lookup took over %.0f ms; counting it as a miss", self.timeout_s * 1e3
        )
        return self._answer(state, start, len(hashes) - start, None)

    def sources(self, found_at: list[list[int]]) -> list[list[int]]:
        """The stored TP size each block of a hit loads from, per KV cache group (``found_blocks``'s second part)."""
        return [[self.readable[i].tp_size for i in groups] for groups in found_at]

    def _question_keys(self, hashes: list[bytes]) -> list[str]:
        """One lookup's keys: every readable layout's blocks (``keys``), then the blocks' sightings."""
        return self.keys(hashes) + self.admission.question_keys(hashes)

    def _answer(
        self, state: RequestState, start: int, asked: int, found: list[bool] | None
    ) -> tuple[int, list[list[int]]]:
        """The hit of a lookup of ``asked`` blocks from ``start`` (``present_prefix_by_layout``), noting its admission
        answer in the request's record. ``found`` None (the pool gave no answer in time) is a miss of every block,
        counted as the pool's, that admits nothing and learns nothing."""
        if found is None:
            state.sighting, state.unanswered_blocks = self.admission.answer(start, 0, []), asked
            return 0, []
        sightings = asked if self.admission.by_sight else 0
        blocks, sighted = found[: len(found) - sightings], found[len(found) - sightings :]
        hit, at = present_prefix_by_layout(blocks, self.readable_groups, self.windows)
        state.sighting, state.unanswered_blocks = self.admission.answer(start, hit, sighted), 0
        return hit, at

    def count(self, state: RequestState, hit_tokens: int | None) -> None:
        """Once vLLM allocated the request's blocks: its latest lookup's counters (``hit_tokens`` None: no hit was
        offered), counted once however often vLLM asked."""
        if state.asked_tokens is None:
            return
        self.stats.add(Count.LOOKUPS)
        self.stats.add(Count.LOOKUP_TOKENS, state.asked_tokens)
        if hit_tokens is not None:
            self.stats.add(Count.HIT_TOKENS, max(hit_tokens, 0))
        if (sighting := state.sighting) is not None:
            self.stats.add(Count.MISSED_BLOCKS.by("first_sight"), sighting.first_sight)
            self.stats.add(Count.MISSED_BLOCKS.by("seen_before"), sighting.seen_before)
        self.stats.add(Count.MISSED_BLOCKS.by("pool_unavailable"), state.unanswered_blocks)
        state.asked_tokens = None

    def wait_while_idle(self, states: Iterable[RequestState]) -> None:
        """In a step that runs nothing, wait (at most ``IDLE_STEP_LOOKUP_WAIT_S``) for what the waiting requests wait
        for: the first lookup answer, or the next producer-wait poll. vLLM steps again at once otherwise, an empty
        forward call on every rank, about a thousand a second: that spinning engine takes the cores the lookup itself
        needs (this process's lookup thread, the pool's master), which on a small host can delay a lookup past its
        deadline. Nothing runs meanwhile, and a request arriving is scheduled at most ``IDLE_STEP_LOOKUP_WAIT_S``
        later."""
        lookups: list[concurrent.futures.Future[list[bool] | None]] = []
        wake_at: list[float] = []  # lookup deadlines, producer-wait polls
        for state in states:
            if state.lookup is not None:
                if state.lookup.future.done():
                    return  # an answer to hand out in the next step
                lookups.append(state.lookup.future)
                wake_at.append(state.lookup.deadline)
            elif state.producer_wait is not None:
                wake_at.append(state.producer_wait.next_poll)
        if not wake_at:
            return  # nothing of the pool's to wait for (asynchronous loads wait in the workers)
        timeout = min(IDLE_STEP_LOOKUP_WAIT_S, min(wake_at) - time.monotonic())
        if timeout <= 0:
            return
        if lookups:
            concurrent.futures.wait(lookups, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        else:
            time.sleep(timeout)

    def close(self) -> None:
        self.batcher.close()
