"""PoolHandle's guarantees, with a scripted backend standing in only for faults Mooncake cannot produce on demand
(a client call that hangs, one that raises); the real Mooncake client is exercised in test_mooncake_backend.py."""

import threading
import time

from kvpool_connector.backends.base import Outcome, PoolBackend, PoolUnavailable
from kvpool_connector.pool import PoolHandle


class ScriptedBackend(PoolBackend):
    name = "scripted"

    def __init__(self, fail_connects=0, hang: threading.Event | None = None, raise_on_get=False):
        self.fail_connects = fail_connects
        self.hang = hang
        self.raise_on_get = raise_on_get
        self.registered = []

    def connect(self):
        if self.fail_connects > 0:
            self.fail_connects -= 1
            raise PoolUnavailable("scripted outage")

    def register_memory(self, ptr, size):
        self.registered.append((ptr, size))

    def exists(self, keys):
        if self.hang is not None:
            self.hang.wait(10)
        return [True] * len(keys)

    def put(self, keys, addrs, sizes):
        return [Outcome.OK] * len(keys)

    def get(self, keys, addrs, sizes):
        if self.raise_on_get:
            raise RuntimeError("client exploded")
        return [Outcome.OK] * (len(keys) - 1)  # a short answer must not be trusted

    def remove(self, keys):
        return [True] * len(keys)

    def close(self):
        pass


def test_unreachable_then_recovers_and_replays_registrations(caplog):
    backend = ScriptedBackend(fail_connects=2)
    handle = PoolHandle(lambda: backend, reconnect_interval_s=0.05, label="t")
    handle.register_memory(0x1000, 4096)
    assert handle.exists(["a"]) == [False]
    assert handle.get(["a"], [[1]], [[1]]) == [Outcome.UNAVAILABLE]
    handle.start()
    assert handle.wait_connected(5)
    assert backend.registered == [(0x1000, 4096)]
    assert handle.exists(["a"]) == [True]
    handle.close()
    assert "unavailable" in caplog.text


def test_lookup_timeout_is_a_miss_and_does_not_pile_up():
    release = threading.Event()
    handle = PoolHandle(lambda: ScriptedBackend(hang=release), reconnect_interval_s=0.05, label="t")
    handle.start()
    assert handle.wait_connected(5)
    t0 = time.monotonic()
    assert handle.exists_within(["a", "b"], timeout_s=0.05) == [False, False]
    assert handle.exists_within(["a"], timeout_s=5) == [False]  # earlier lookup still stuck: miss at once
    assert time.monotonic() - t0 < 2
    release.set()
    time.sleep(0.1)
    assert handle.exists_within(["a"], timeout_s=5) == [True]
    handle.close()


def test_client_exceptions_and_short_answers_are_failures():
    handle = PoolHandle(lambda: ScriptedBackend(raise_on_get=True), reconnect_interval_s=0.05, label="t")
    handle.start()
    assert handle.wait_connected(5)
    assert handle.get(["a", "b"], [[1], [2]], [[1], [1]]) == [Outcome.FAILED, Outcome.FAILED]
    handle.close()
    short = PoolHandle(lambda: ScriptedBackend(), reconnect_interval_s=0.05, label="t")
    short.start()
    assert short.wait_connected(5)
    assert short.get(["a", "b"], [[1], [2]], [[1], [1]]) == [Outcome.FAILED, Outcome.FAILED]
    short.close()


class SlowConnect(ScriptedBackend):
    def __init__(self, delay_s: float, fail: bool = False):
        super().__init__()
        self.delay_s, self.fail = delay_s, fail

    def connect(self):
        time.sleep(self.delay_s)
        if self.fail:
            raise PoolUnavailable("refused")


def test_start_waits_for_a_slow_first_connection():
    handle = PoolHandle(lambda: SlowConnect(0.3), reconnect_interval_s=10, label="t")
    assert handle.start(wait_s=5)  # connected before start-up goes on: the first requests find it ready
    handle.close()


def test_start_gives_up_waiting_for_a_pool_that_does_not_answer(caplog):
    handle = PoolHandle(lambda: SlowConnect(30), reconnect_interval_s=10, label="t")
    began = time.monotonic()
    assert not handle.start(wait_s=0.3)
    assert time.monotonic() - began < 2
    assert "not connected after 0.3 s of start-up" in caplog.text
    assert handle.exists(["a"]) == [False]
    handle.close()


def test_start_does_not_wait_out_a_refusal():
    handle = PoolHandle(lambda: SlowConnect(0, fail=True), reconnect_interval_s=10, label="t")
    began = time.monotonic()
    assert not handle.start(wait_s=30)
    assert time.monotonic() - began < 2
    handle.close()
