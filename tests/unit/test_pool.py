"""PoolHandle's guarantees, with a scripted backend standing in only for faults a real pool cannot produce on demand
(a client call that hangs, one that raises); the real Mooncake client is exercised in test_mooncake_backend.py and
test_pool_faults.py."""

import threading
import time
from typing import ClassVar

import pytest

from kvpool_connector import pool as pool_module
from kvpool_connector.backends.base import ClientRole, Outcome, PoolBackend, PoolUnavailable, RegistrationRefused
from kvpool_connector.config import PoolConfig, ResolvedConfig
from kvpool_connector.pool import PoolHandle, open_pool
from kvpool_testkit.inspection import wait_connected


class ScriptedBackend(PoolBackend):
    name = "scripted"

    def __init__(self, fail_connects=0, hang: threading.Event | None = None, raise_on_get=False, refuse=None):
        self.fail_connects = fail_connects
        self.hang = hang
        self.raise_on_get = raise_on_get
        self.refuse = refuse  # an exception register_memory raises
        self.registered = []
        self.closed = False

    @classmethod
    def from_config(cls, config, role):
        return cls()

    def connect(self):
        if self.fail_connects > 0:
            self.fail_connects -= 1
            raise PoolUnavailable("scripted outage")

    def register_memory(self, ptr, size):
        if self.refuse is not None:
            raise self.refuse
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

    def close(self):
        self.closed = True


def test_unreachable_then_recovers_and_replays_registrations(caplog):
    backend = ScriptedBackend(fail_connects=2)
    handle = PoolHandle(lambda: backend, reconnect_interval_s=0.05, label="t")
    handle.register_memory(0x1000, 4096)
    assert handle.exists(["a"]) == [False]
    assert handle.get(["a"], [[1]], [[1]]) == [Outcome.UNAVAILABLE]
    handle.start()
    assert wait_connected(handle, 5)
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
    assert wait_connected(connected, 5)
    connected.unregister_memory(0x1000, 4096)
    assert backend.registered == [(0x9000, 4096)]
    connected.close()

    later = ScriptedBackend(fail_connects=1)
    handle = PoolHandle(lambda: later, reconnect_interval_s=0.05, label="t")
    handle.register_memory(0x1000, 4096)
    handle.register_memory(0x9000, 4096)
    handle.unregister_memory(0x1000, 4096)  # while not connected
    handle.start()
    assert wait_connected(handle, 5)
    assert later.registered == [(0x9000, 4096)]
    handle.close()


def test_a_failed_attempt_closes_its_client_before_the_next_one():
    """A client whose memory registration failed, or whose set-up raised, is closed: memcache's per-process client
    would otherwise keep a user that never leaves, and every retry would register the regions again."""
    attempts = [
        ScriptedBackend(refuse=PoolUnavailable("registration: client not ready")),
        ScriptedBackend(fail_connects=1),
        ScriptedBackend(),
    ]
    clients = iter(attempts)
    handle = PoolHandle(lambda: next(clients), reconnect_interval_s=0.05, label="t")
    handle.register_memory(0x1000, 4096)
    handle.start()
    assert wait_connected(handle, 5)
    assert [c.closed for c in attempts] == [True, True, False]
    handle.close()
    assert attempts[2].closed


def test_a_refused_registration_is_raised_at_start_up_and_never_retried():
    refusing = ScriptedBackend(refuse=RegistrationRefused("refused to register the KV region [0x1000, 0x2000)"))
    made: list[ScriptedBackend] = []
    handle = PoolHandle(lambda: made.append(refusing) or refusing, 0.05, "t")
    handle.register_memory(0x1000, 4096)
    with pytest.raises(RegistrationRefused, match=r"KV region \[0x1000, 0x2000\)"):
        handle.start(wait_s=5)
    handle._thread.join(2)
    assert not handle._thread.is_alive() and len(made) == 1 and refusing.closed
    handle.close()


class SlowConnect(ScriptedBackend):
    def __init__(self, connect_s: float = 0.0, refuse: bool = False) -> None:
        super().__init__(fail_connects=10**6 if refuse else 0)
        self.connect_s = connect_s

    def connect(self):
        time.sleep(self.connect_s)
        super().connect()


def test_start_waits_for_a_slow_connection():
    handle = PoolHandle(lambda: SlowConnect(connect_s=0.3), 5.0, "slow")
    began = time.monotonic()
    assert handle.start(wait_s=5) and 0.3 <= time.monotonic() - began < 3
    handle.close()


def test_start_gives_up_on_a_silent_pool_after_its_wait_and_connects_later(caplog):
    handle = PoolHandle(lambda: SlowConnect(connect_s=1.0), 5.0, "silent")
    began = time.monotonic()
    assert not handle.start(wait_s=0.2) and time.monotonic() - began < 0.9
    assert "not connected after 0.2 s of start-up" in caplog.text
    assert wait_connected(handle, 5)  # in the background, while vLLM serves
    handle.close()


def test_start_does_not_wait_out_a_refusal():
    handle = PoolHandle(lambda: SlowConnect(refuse=True), 5.0, "refused")
    began = time.monotonic()
    assert not handle.start(wait_s=5) and time.monotonic() - began < 1
    handle.close()


class MadeByTheFactory(ScriptedBackend):
    roles: ClassVar[list[ClientRole]] = []

    @classmethod
    def from_config(cls, config, role):
        cls.roles.append(role)
        return cls()

    @classmethod
    def lookup_thread_binding(cls, config):
        return lookup_binding


def lookup_binding():
    """What a lookup client's threads would run first (a device context, for Mooncake's ascend transport)."""


class Runtime:
    def bind_thread(self):
        """A worker's device binding."""


def test_open_pool_connects_the_attached_client_first_then_new_clients_of_the_role(monkeypatch):
    """A worker's client attached before vLLM allocated the KV cache in its memory makes the first connection; a later
    attempt gets a new client of the handle's role. Threads bind as the backend class says for the role."""
    MadeByTheFactory.roles = []
    monkeypatch.setattr(pool_module, "backend_class", lambda config: MadeByTheFactory)
    config = ResolvedConfig(pool=PoolConfig(reconnect_interval_s=0.05))
    runtime = Runtime()
    role = ClientRole(holds_data=True, device_id=3, runtime=runtime)  # type: ignore[arg-type]
    attached = ScriptedBackend(refuse=PoolUnavailable("registration: client not ready"))
    handle = open_pool(config, role, "worker", attached=attached)
    assert handle.bind_thread == runtime.bind_thread
    handle.register_memory(0x1000, 4096)
    handle.start()
    assert wait_connected(handle, 5)
    assert attached.closed and MadeByTheFactory.roles == [role]
    handle.close()
    lookup = open_pool(config, ClientRole(holds_data=False), "lookup")
    assert lookup.bind_thread is lookup_binding
