"""What loads (``loading``) and saves (``saving``) share: one transfer-queue shape, and outcome counting.

A transfer runs now, on the caller's thread (synchronous loads before the forward pass, synchronous saves at
``wait_for_save``), or later, in submission order, on the queue's one background thread (asynchronous loads, which
vLLM waits for through ``get_finished``; staged saves, which nothing waits for). A job that raises never reaches vLLM:
its blocks are failed through the subclass's ``_failed`` and the queue goes on. Who picks the mode: the scheduler, per
load (its plan's ``loads`` or ``async_loads``: ``load_mode``), since vLLM must know before the step whether a request
waits for its load; the configuration for saves (``async_save``: a staging area), since nothing waits for them.

Calls, in the order they happen:
1. ``run_now(job)`` or ``submit(job)``: the first submit starts the thread (a worker that never transfers in the
   background never starts one);
2. ``drain(timeout_s)``: wait until nothing queued or running is left (shutdown, vLLM's sleep mode);
3. ``drop_queued(timeout_s)``: forget the jobs not started and wait for the one running (a cache reset);
4. ``close(timeout_s)``: drain, drop what is still queued then, stop and join the thread.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvpool_connector.backends.base import Outcome
from kvpool_connector.counters import Count, StatsCounter
from kvpool_connector.logs import init_logger
from kvpool_connector.pool import PoolHandle

logger = init_logger(__name__)

Job = TypeVar("Job")


class TransferQueue(ABC, Generic[Job]):
    """Runs jobs now or on one background thread; subclasses say what a job does and how it ends or fails."""

    def __init__(self, name: str, bind_thread: Callable[[], None] | None = None) -> None:
        self._name = name
        self._bind_thread = bind_thread or (lambda: None)
        self._cond = threading.Condition()  # guards the queue and the subclass's shared state
        self._queue: deque[Job] = deque()
        self._running = 0  # jobs taken off the queue, not ended yet
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- subclass hooks --------------------------------------------------------------------------------------
    @abstractmethod
    def _transfer(self, job: Job) -> None:
        """Move the job's blocks; count and warn about every outcome (``OutcomeCount``)."""

    @abstractmethod
    def _failed(self, job: Job) -> None:
        """The job raised: every block it had not moved yet is lost (counted, or recomputed by vLLM)."""

    def _ended(self, job: Job, background: bool) -> None:
        """After the job, moved or failed, with the lock held: release what it held, tell who waits for it."""

    def _dropped(self, jobs: Sequence[Job], reason: str) -> None:
        """Jobs forgotten before they started (``drop_queued``, ``close``), with the lock held."""

    # -- running jobs --------------------------------------------------------------------------------------------
    def run_now(self, job: Job) -> None:
        """Run the job on the calling thread; it may overlap the background thread's job."""
        self._run(job, background=False)

    def submit(self, job: Job) -> None:
        """Queue the job for the background thread."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._cond.notify_all()

    def _run(self, job: Job, background: bool) -> None:
        try:
            self._transfer(job)
        except Exception:  # a bug must not stop the queue or reach the forward pass
            logger.warning("KV pool transfer on %s failed", self._name, exc_info=True)
            self._failed(job)
        finally:
            with self._cond:
                self._ended(job, background)
                if background:
                    self._running -= 1
                self._cond.notify_all()

    def _loop(self) -> None:
        self._bind_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running += 1
            self._run(job, background=True)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def drain(self, timeout_s: float) -> bool:
        """Wait until no job is queued or running; False if that took longer than ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._running, timeout=timeout_s)

    def drop_queued(self, timeout_s: float) -> list[Job]:
        """Forget every job not started yet and wait for the one running: afterwards nothing submitted before this
        call still moves. Returns the jobs forgotten."""
        with self._cond:
            dropped = self._take_queued("reset")
            self._cond.wait_for(lambda: not self._running, timeout=timeout_s)
        return dropped

    def close(self, timeout_s: float) -> None:
        """Let queued jobs end (``drain``), forget those still queued after ``timeout_s``, stop the thread."""
        if self._thread is None:
            return
        if not self.drain(timeout_s):
            with self._cond:
                left = len(self._queue) + self._running
                logger.warning("shutdown: %s still had %d transfers after %.0f s", self._name, left, timeout_s)
                self._take_queued("shutdown")
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def _take_queued(self, reason: str) -> list[Job]:
        dropped = list(self._queue)
        self._queue.clear()
        if dropped:
            self._dropped(dropped, reason)
        return dropped


@dataclass(frozen=True)
class CounterNames:
    """The counters one direction's outcomes go to."""

    verb: str  # "load", "save": what the warnings say
    blocks: Count  # blocks moved
    bytes: Count  # their bytes
    seconds: Count  # time inside the pool's calls
    failed: Count  # the failure counter, kept by outcome
    lost: str  # what a failed block costs, for the warning
    present: Count | None = None  # a put of a key already there (EXISTS): not a failure where a name is given


LOADS = CounterNames(
    "load", Count.LOADED_BLOCKS, Count.LOADED_BYTES, Count.LOAD_SECONDS, Count.LOAD_FAILED, "vLLM recomputes them"
)
SAVES = CounterNames(
    "save",
    Count.SAVED_BLOCKS,
    Count.SAVED_BYTES,
    Count.SAVE_SECONDS,
    Count.SAVE_FAILED,
    "later lookups miss them",
    Count.SAVE_SKIPPED_PRESENT,
)


class OutcomeCount:
    """Counts one direction's per-block outcomes and warns (rate-limited, through the pool handle) about failures."""

    def __init__(self, names: CounterNames, stats: StatsCounter, pool: PoolHandle) -> None:
        self.names = names
        self.stats = stats
        self._pool = pool

    def __call__(self, outcomes: Sequence[Outcome], block_bytes: Sequence[int], seconds: float, what: str) -> None:
        """``block_bytes[i]``: the i-th block's size; ``what``: whose blocks, for the warning."""
        names, add = self.names, self.stats.add
        add(names.seconds, seconds)
        failed: dict[str, int] = {}
        for outcome, nbytes in zip(outcomes, block_bytes, strict=True):
            if outcome is Outcome.OK:
                add(names.blocks)
                add(names.bytes, nbytes)
            elif outcome is Outcome.EXISTS and names.present is not None:
                add(names.present)
            else:
                failed[outcome.value] = failed.get(outcome.value, 0) + 1
        for reason, count in failed.items():
            add(names.failed.by(reason), count)
        if failed:
            self._pool.warn(
                names.verb,
                "KV pool %s of %s: %d of %d blocks failed (%s); %s",
                names.verb,
                what,
                sum(failed.values()),
                len(outcomes),
                ", ".join(sorted(failed)),
                names.lost,
            )
