"""A pool client that is always safe to call: the pool is a cache, its outage costs hits and nothing else.

``open_pool`` builds every ``PoolHandle`` of the connector (the scheduler's lookup client, each worker's data client).
A handle wraps one :class:`PoolBackend` and owns its connection and its outages:
1. ``start(wait_s)`` connects in a background thread, retrying from ``reconnect_interval_s`` with backoff until it
   succeeds or the handle is closed; start-up waits up to ``wait_s`` for the first attempt, then vLLM serves
   meanwhile. (A background thread is no shield against a client call that holds the GIL while it retries an absent
   server: backends must refuse an absent pool before making such a call.) A failed attempt's
   client is closed before the next one. A pool that answers but refuses our memory (``RegistrationRefused``) is not
   retried: ``start`` raises it, naming the region.
2. ``register_memory()`` / ``unregister_memory()`` keep the KV regions registered whenever a connection is made.
3. ``exists`` / ``put`` / ``get`` / ``remove_prefix`` answer "absent"/"unavailable" while disconnected, and turn any
   exception from the pool client into the same, with a rate-limited warning that says why.
4. An outage seen by any call (the master refuses, resets or does not answer) opens a back-off window of
   ``reconnect_interval_s`` (counted as ``outages``): calls inside it fail fast instead of each waiting out the
   client's RPC retries (~4 s for a dead master, 30 s for a hung one). A probe thread ends the window as soon as the
   pool is back (a connect to its front door every 0.2 s, then one confirming lookup), or the first call after the
   window finds it back. The handle keeps the client it has: a pool client reconnects to a restarted server by itself,
   and hits and saves resume then.
5. ``close()`` stops the connector thread and closes the client.

Batched lookups off the caller's thread live in ``lookups``; the accounting of loads and saves in ``loading`` and
``saving``, beside the paths they count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvpool_connector.backends import backend_class
from kvpool_connector.backends.base import ClientRole, Outcome, PoolBackend, PoolUnavailable, RegistrationRefused
from kvpool_connector.counters import Count, StatsCounter
from kvpool_connector.logs import RateLimitedWarning, init_logger

if TYPE_CHECKING:
    from kvpool_connector.config import ResolvedConfig

logger = init_logger(__name__)

PROBE_INTERVAL_S = 0.2  # how often an outage's probe asks whether the pool is back
PROBE_KEY = "kvpool/probe"


class PoolHandle:
    def __init__(
        self,
        backend_factory: Callable[[], PoolBackend],
        reconnect_interval_s: float,
        label: str,
        bind_thread: Callable[[], None] | None = None,
        stats: StatsCounter | None = None,
    ) -> None:
        """``backend_factory``: a new client for each connection attempt (``open_pool`` makes the connector's)."""
        self._factory = backend_factory
        # Runs first on the connect and probe threads: the device's context is per thread (ACL, CUDA), and on the CPU
        # the pool client's own threads inherit the connecting thread's cores.
        self.bind_thread = bind_thread or (lambda: None)
        self._interval = reconnect_interval_s
        self.label = label
        self.stats = stats if stats is not None else StatsCounter()
        self._backend: PoolBackend | None = None
        self._regions: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._first_attempt = threading.Event()  # the first connection attempt succeeded or failed
        self._thread: threading.Thread | None = None
        self.refused: RegistrationRefused | None = None  # memory the pool will never take: no reconnect helps
        self._outage_lock = threading.Lock()
        self._down_since: float | None = None
        self._down_until = 0.0
        self._probe: threading.Thread | None = None
        self.warn = RateLimitedWarning(logger)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, wait_s: float = 0.0) -> bool:
        """Connect in the background; wait up to ``wait_s`` for the first attempt to end. True if connected.

        vLLM serves its first requests right after start-up: a connection still being made then (a shared-memory
        attach maps its areas, ~0.3 s here) delays them or costs their hits, so start-up waits for it. A pool that
        refuses fails the first attempt at once; one that does not answer is left to connect in the background once
        ``wait_s`` is over.
        """
        self._thread = threading.Thread(target=self._connect_loop, name=f"kvpool-connect-{self.label}", daemon=True)
        self._thread.start()
        if wait_s > 0 and self._first_attempt.wait(wait_s) and self.refused is not None:
            raise self.refused
        if wait_s > 0 and not self._first_attempt.is_set():
            logger.warning(
                "KV pool (%s) not connected after %.1f s of start-up; serving without it until it connects",
                self.label,
                wait_s,
            )
        return self.connected

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _connect_loop(self) -> None:
        self.bind_thread()
        delay = self._interval
        while not self._stop.is_set():
            backend: PoolBackend | None = None
            try:
                backend = self._factory()
                backend.connect()
                with self._lock:
                    for ptr, size in self._regions:
                        backend.register_memory(ptr, size)
                    self._backend = backend
                    self._connected.set()
                self._first_attempt.set()
                logger.info("KV pool %s (%s) connected", backend.name, self.label)
                return
            except RegistrationRefused as exc:
                # The pool answered and said no to our memory: retrying would loop forever on the same answer.
                self.refused = exc
                logger.error("KV pool (%s) disabled: %s", self.label, exc)
                _close_quietly(backend)
                self._first_attempt.set()
                return
            except (PoolUnavailable, OSError, RuntimeError) as exc:
                # The attempt's client goes: a client shared by the process keeps a user per open one, and each retry
                # would register the regions again.
                _close_quietly(backend)
                self._first_attempt.set()
                self.warn(
                    "connect",
                    "KV pool (%s) unavailable, serving without pool hits; retrying in %.0f s: %s",
                    self.label,
                    delay,
                    exc,
                )
            self._stop.wait(delay)
            delay = min(delay * 2, self._interval * 12)  # back off: a failed setup can be costly for the pool client

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a connect stuck in the pool client must not hold up shutdown
        with self._lock:
            backend, self._backend = self._backend, None
            self._connected.clear()
        _close_quietly(backend)

    # -- outages ------------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Connected and not inside an outage's back-off window: a call now is worth making."""
        return self.connected and time.monotonic() >= self._down_until

    def _usable_backend(self) -> PoolBackend | None:
        return self._backend if time.monotonic() >= self._down_until else None

    def outage(self, op: str, reason: object) -> None:
        """A call found the pool unreachable: open (or extend) the back-off window and probe until it is back."""
        now = time.monotonic()
        with self._outage_lock:
            if self._down_since is None:
                self._down_since = now
                self.stats.add(Count.OUTAGES)
            self._down_until = now + self._interval
            if self._probe is None or not self._probe.is_alive():
                self._probe = threading.Thread(target=self._probe_until_back, name=f"kvpool-probe-{self.label}")
                self._probe.daemon = True
                self._probe.start()
        self.warn(
            "outage",
            "KV pool (%s) unreachable during %s (%s): serving without it, probing again every %.0f s",
            self.label,
            op,
            reason,
            self._interval,
        )

    def _probe_until_back(self) -> None:
        """Ends an outage as soon as the pool answers again, instead of when its back-off window runs out: every
        ``PROBE_INTERVAL_S`` a bounded connect to the pool's front door, and once that answers, one real call on this
        thread (so no data-path call pays for a pool that accepts connections but cannot serve yet)."""
        self.bind_thread()
        while not self._stop.wait(PROBE_INTERVAL_S):
            backend = self._backend
            if self._down_since is None or backend is None:
                return
            if not backend.answers():
                continue
            try:
                backend.exists([PROBE_KEY])
            except Exception:  # noqa: BLE001 - still down: the window stays, the probe goes on
                continue
            self._reachable()
            return

    def _reachable(self) -> None:
        if self._down_since is None:  # the common case: no lock taken
            return
        with self._outage_lock:
            since, self._down_since, self._down_until = self._down_since, None, 0.0
        if since is not None:  # another thread may have ended the outage first
            logger.warning("KV pool (%s) reachable again after %.1f s", self.label, time.monotonic() - since)

    def skipped(self, op: str, count: int) -> None:
        """Warn (rate-limited) that ``count`` blocks' ``op`` was not attempted: not connected yet, or in an outage."""
        if self.connected:
            self.warn("outage-skip", "KV pool (%s) in an outage: %s of %d blocks skipped", self.label, op, count)
        else:
            self.warn("not-connected", "KV pool (%s) not connected yet: %s of %d blocks skipped", self.label, op, count)

    # -- memory --------------------------------------------------------------------------------------------
    def register_memory(self, ptr: int, size: int) -> None:
        with self._lock:
            self._regions.append((ptr, size))
            if self._backend is not None:
                self._backend.register_memory(ptr, size)

    def unregister_memory(self, ptr: int, size: int) -> None:
        """Forget a region registered with ``register_memory``: the client drops it now, a reconnect does not
        register it again."""
        with self._lock:
            self._regions.remove((ptr, size))
            if self._backend is not None:
                self._backend.unregister_memory(ptr, size)

    # -- data calls -----------------------------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` the pool holds; no answer counts as absent."""
        found = self.exists_or_none(keys)
        return [False] * len(keys) if found is None else found

    def exists_or_none(self, keys: Sequence[str]) -> list[bool] | None:
        """Which of ``keys`` the pool holds, or None when it gave no answer (not connected, in an outage, a failed or
        short reply): a lookup counts those misses as the pool's, not the blocks'."""
        backend = self._usable_backend()
        if backend is None:
            return None
        try:
            found = backend.exists(keys)
        except PoolUnavailable as exc:
            self.outage("lookup", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - any pool client error is a miss
            self.warn("exists", "KV pool lookup failed, counting it as a miss: %r", exc)
            return None
        if len(found) != len(keys):
            self.warn("exists", "KV pool answered %d of %d existence queries; counting a miss", len(found), len(keys))
            return None
        self._reachable()
        return found

    def _transfer(self, op: str, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[Outcome]:
        backend = self._usable_backend()
        if backend is None:
            self.skipped(op, len(keys))
            return [Outcome.UNAVAILABLE] * len(keys)
        try:
            outcomes = getattr(backend, op)(keys, addrs, sizes)
        except Exception as exc:  # noqa: BLE001 - a failed transfer costs hits, never the request
            self.warn(op, "KV pool %s of %d blocks failed: %r", op, len(keys), exc)
            return [Outcome.FAILED] * len(keys)
        if len(outcomes) != len(keys):
            return [Outcome.FAILED] * len(keys)
        if Outcome.UNAVAILABLE in outcomes:
            self.outage(op, f"{outcomes.count(Outcome.UNAVAILABLE)} of {len(keys)} blocks unavailable")
        else:
            self._reachable()
        return outcomes

    def put(self, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[Outcome]:
        return self._transfer("put", keys, addrs, sizes)

    def get(self, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[Outcome]:
        return self._transfer("get", keys, addrs, sizes)

    def remove_shards(self, prefixes: Sequence[str]) -> int | None:
        """Objects removed under every key prefix of ``prefixes`` (a cache reset of some shards); None when the
        pool cannot select keys by prefix, is unreachable, or fails for any of them."""
        backend = self._usable_backend()
        if backend is None:
            return None
        removed = 0
        for prefix in prefixes:
            try:
                count = backend.remove_prefix(prefix)
            except Exception as exc:  # noqa: BLE001 - a failed removal leaves cache entries behind, nothing worse
                self.warn("remove", "KV pool removal of %s* failed: %r", prefix, exc)
                return None
            if count is None:
                return None
            removed += count
        return removed


def open_pool(
    config: ResolvedConfig,
    role: ClientRole,
    label: str,
    stats: StatsCounter | None = None,
    attached: PoolBackend | None = None,
) -> PoolHandle:
    """The handle of every pool client the connector holds, not started: clients of ``config``'s backend for
    ``role``, retried from ``reconnect_interval_s``, every thread that calls them bound as the backend class says for
    the role (``thread_binding``); ``label`` names it in logs and threads, ``stats`` counts its outages.

    ``attached``: a client of this backend that a worker connected already, on its own thread, because vLLM's KV
    cache was to be allocated in memory it hands out (``ClientRole.kv_cache_bytes``, ``PoolBackend.kv_cache_memory``).
    It makes the handle's first connection, since the KV pages in its memory are reachable through it alone; a later
    attempt (after it failed to register the regions) gets a new client of ``role``, which hands out none.
    """
    backend = backend_class(config)
    pending = [attached] if attached is not None else []

    def next_client() -> PoolBackend:
        return pending.pop() if pending else backend.from_config(config, role)

    return PoolHandle(
        next_client,
        config.pool.reconnect_interval_s,
        label,
        bind_thread=backend.thread_binding(config, role),
        stats=stats,
    )


def _close_quietly(backend: PoolBackend | None) -> None:
    if backend is None:
        return
    try:
        backend.close()
    except Exception:
        logger.debug("closing the KV pool client failed", exc_info=True)
