"""PoolHandle's guarantees, with a scripted backend standing in only for faults Mooncake cannot produce on demand
(a client call that hangs, one that raises); the real Mooncake client is exercised in test_mooncake_backend.py."""

import threading

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

    def unregister_memory(self, ptr, size):
        self.registered.remove((ptr, size))

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


def test_an_unregistered_region_is_dropped_now_and_never_registered_by_a_later_connect():
    """vLLM's sleep mode releases the KV cache: its registration goes at once, and a connection made while it is
    released (the pool was down) must not register it again."""
    backend = ScriptedBackend()
    connected = PoolHandle(lambda: backend, reconnect_interval_s=0.05, label="t")
    connected.register_memory(0x1000, 4096)
    connected.register_memory(0x9000, 4096)
    connected.start()
    assert connected.wait_connected(5)
    connected.unregister_memory(0x1000, 4096)
    assert backend.registered == [(0x9000, 4096)]
    connected.close()

    later = ScriptedBackend(fail_connects=1)
    handle = PoolHandle(lambda: later, reconnect_interval_s=0.05, label="t")
    handle.register_memory(0x1000, 4096)
    handle.register_memory(0x9000, 4096)
    handle.unregister_memory(0x1000, 4096)  # while not connected
    handle.start()
    assert handle.wait_connected(5)
    assert later.registered == [(0x9000, 4096)]
    handle.close()
