"""The transfer-queue shape loads and saves share: jobs run now or in order on one background thread started by the
first submit; a job that raises fails its blocks and the queue goes on; a reset forgets queued jobs and waits for the
running one; close stops and joins the thread. Outcomes are counted one way for both directions."""

from __future__ import annotations

import threading

from kvpool_connector.backends.base import Outcome
from kvpool_connector.counters import StatsCounter
from kvpool_connector.transfers import LOADS, SAVES, OutcomeCount, TransferQueue


class Recorder(TransferQueue[str]):
    """Jobs are names; "boom" raises; "hold" waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__("test-queue")
        self.release = threading.Event()
        self.holding = threading.Event()
        self.done: list[tuple[str, str, bool]] = []  # (job, thread name, background)
        self.failed: list[str] = []
        self.dropped: list[tuple[list[str], str]] = []

    def _transfer(self, job: str) -> None:
        if job == "boom":
            raise RuntimeError("a bug in a transfer")
        if job == "hold":
            self.holding.set()
            assert self.release.wait(10)

    def _failed(self, job: str) -> None:
        self.failed.append(job)

    def _ended(self, job: str, background: bool) -> None:
        self.done.append((job, threading.current_thread().name, background))

    def _dropped(self, jobs, reason: str) -> None:
        self.dropped.append((list(jobs), reason))


def test_jobs_run_now_or_in_order_on_one_thread_started_by_the_first_submit():
    queue = Recorder()
    queue.run_now("a")
    assert queue._thread is None  # a worker that only transfers synchronously runs no thread
    assert queue.done == [("a", threading.current_thread().name, False)]
    for job in ("b", "boom", "c"):
        queue.submit(job)
    assert queue.drain(10)
    assert queue.done[1:] == [("b", "test-queue", True), ("boom", "test-queue", True), ("c", "test-queue", True)]
    assert queue.failed == ["boom"]  # failed, and the job after it still ran
    queue.close(10)
    assert not queue._thread.is_alive()


def test_a_job_that_raises_now_never_reaches_the_caller():
    queue = Recorder()
    queue.run_now("boom")  # the forward thread's call returns
    assert queue.failed == ["boom"] and queue.done == [("boom", threading.current_thread().name, False)]


def test_drop_queued_forgets_what_has_not_started_and_waits_for_the_running_job():
    queue = Recorder()
    queue.submit("hold")
    assert queue.holding.wait(10)
    queue.submit("x")
    queue.submit("y")
    threading.Timer(0.2, queue.release.set).start()
    assert queue.drop_queued(10) == ["x", "y"]
    assert [job for job, _, _ in queue.done] == ["hold"]  # ended before drop_queued returned
    assert queue.dropped == [(["x", "y"], "reset")]
    queue.close(10)


def test_close_drops_what_is_still_queued_after_the_timeout():
    queue = Recorder()
    queue.submit("hold")
    assert queue.holding.wait(10)
    queue.submit("late")
    threading.Timer(0.5, queue.release.set).start()
    queue.close(0.1)  # returns after its timeout: the running job may still end on its own
    assert queue.dropped == [(["late"], "shutdown")]
    queue._thread.join(10)
    assert [job for job, _, _ in queue.done] == ["hold"]  # the thread ended after it, without taking "late"


class Warnings:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warn(self, reason: str, msg: str, *args: object) -> None:
        self.lines.append(msg % args)


def test_outcomes_are_counted_the_same_way_in_both_directions():
    stats, warnings = StatsCounter(), Warnings()
    count = OutcomeCount(LOADS, stats, warnings)  # type: ignore[arg-type]
    count([Outcome.OK, Outcome.MISSING, Outcome.OK, Outcome.MISSING], [10, 10, 10, 10], 0.5, "request r")
    assert stats.total() == {
        "loaded_blocks": 2,
        "loaded_bytes": 20,
        "load_seconds": 0.5,
        "load_failed.missing": 2,
    }
    assert warnings.lines == ["KV pool load of request r: 2 of 4 blocks failed (missing); vLLM recomputes them"]

    stats, warnings = StatsCounter(), Warnings()
    count = OutcomeCount(SAVES, stats, warnings)  # type: ignore[arg-type]
    count([Outcome.OK, Outcome.EXISTS, Outcome.POOL_FULL], [7, 7, 7], 0.25, "a step's blocks")
    assert stats.total() == {
        "saved_blocks": 1,
        "saved_bytes": 7,
        "save_seconds": 0.25,
        "save_skipped_present": 1,  # already there: the pool keeps the first copy of the same bytes
        "save_failed.pool_full": 1,
    }
    assert warnings.lines == [
        "KV pool save of a step's blocks: 1 of 3 blocks failed (pool_full); later lookups miss them"
    ]
