"""A pool client that is always safe to call: the pool is a cache, its outage costs hits and nothing else.

``PoolHandle`` wraps one :class:`PoolBackend` and owns its lifecycle:
1. ``start(wait_s)`` connects in a background thread, retrying from ``reconnect_interval_s`` with backoff until it
   succeeds or the handle is closed; start-up waits up to ``wait_s`` for the first attempt, then vLLM serves
   meanwhile. (A background thread is no shield against a client call that holds the GIL, as Mooncake's setup does
   while it retries a master: backends must refuse an absent pool before making such a call.) A pool that answers
   but refuses our memory (``RegistrationRefused``) is not retried: ``start`` raises it, naming the region.
2. ``register_memory()`` records KV regions and (re)registers them whenever a connection is made.
3. ``exists`` / ``put`` / ``get`` answer "absent"/"unavailable" while disconnected, and turn any exception from the
   pool client into the same, with a rate-limited warning that says why.
4. An outage seen by any call (the master refuses, resets or does not answer) opens a back-off window of
   ``reconnect_interval_s``: calls inside it fail fast instead of each waiting out the client's RPC retries (~4 s for
   a dead master, 30 s for a hung one). A probe thread ends the window as soon as the pool is back (a connect to
   its front door every 0.2 s, then one confirming lookup), or the first call after the window finds it back.
   Mooncake's client reconnects to a restarted master by itself, so hits and saves resume then.
5. Lookups run on one lookup thread: ``exists_async(keys)`` answers a future (queries made while a pool call is
   running go out together in the next one), ``exists_within(keys, timeout_s)`` waits for it with a bound. Past the
   timeout, or while an earlier lookup is still stuck in the pool client, the answer is a miss.
6. ``close()`` stops the connector thread and closes the client.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence

from kvpool_connector.backends.base import Outcome, PoolBackend, PoolUnavailable, RegistrationRefused
from kvpool_connector.counters import StatsCounter
from kvpool_connector.logs import RateLimitedWarning, init_logger

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
    ) -> None:
        self._factory = backend_factory
        # Runs first on the connect and lookup threads: the device's context is per thread (ACL, CUDA), and on the CPU
        # the pool client's own threads inherit the connecting thread's cores.
        self._bind_thread = bind_thread or (lambda: None)
        self._interval = reconnect_interval_s
        self.label = label
        self._backend: PoolBackend | None = None
        self._regions: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._first_attempt = threading.Event()  # the first connection attempt succeeded or failed
        self._thread: threading.Thread | None = None
        self._lookup_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"kvpool-lookup-{label}", initializer=self._bind_thread
        )
        self.refused: RegistrationRefused | None = None  # memory the pool will never take: no reconnect helps
        self._lookup_inflight: concurrent.futures.Future | None = None  # the lookup thread's current pool call
        self._lookup_started = 0.0
        self._batch_lock = threading.Lock()
        self._batch: list[tuple[list[str], concurrent.futures.Future[list[bool]]]] = []
        self._batch_queued = False
        self._outage_lock = threading.Lock()
        self._down_since: float | None = None
        self._down_until = 0.0
        self._probe: threading.Thread | None = None
        self.outages = 0
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

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _connect_loop(self) -> None:
        self._bind_thread()
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
            except (PoolUnavailable, OSError, RuntimeError, ValueError) as exc:
                # ValueError: pymmc's init raises it for a bad local-service config, which can be fixed while we wait.
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
        self._lookup_pool.shutdown(wait=False, cancel_futures=True)
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

    def _outage(self, op: str, reason: object) -> None:
        now = time.monotonic()
        with self._outage_lock:
            if self._down_since is None:
                self._down_since = now
                self.outages += 1
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
        self._bind_thread()
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

    def _skipped(self, op: str, count: int) -> None:
        if self.connected:
            self.warn("outage-skip", "KV pool (%s) in an outage: %s of %d blocks skipped", self.label, op, count)
        else:
            self.warn("not-connected", "KV pool (%s) not connected yet: %s of %d blocks skipped", self.label, op, count)

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
        backend = self._usable_backend()
        if backend is None:
            return [False] * len(keys)
        try:
            found = backend.exists(keys)
        except PoolUnavailable as exc:
            self._outage("lookup", exc)
            return [False] * len(keys)
        except Exception as exc:  # noqa: BLE001 - any pool client error is a miss
            self.warn("exists", "KV pool lookup failed, counting it as a miss: %r", exc)
            return [False] * len(keys)
        if len(found) != len(keys):
            self.warn("exists", "KV pool answered %d of %d existence queries; counting a miss", len(found), len(keys))
            return [False] * len(keys)
        self._reachable()
        return found

    def exists_within(self, keys: Sequence[str], timeout_s: float) -> list[bool]:
        """``exists`` bounded by ``timeout_s``; a stuck pool client costs misses, never a stalled scheduler."""
        try:
            return self.exists_async(keys).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            self.warn("lookup-timeout", "KV pool lookup took over %.0f ms; counting it as a miss", timeout_s * 1e3)
            return [False] * len(keys)

    def exists_async(self, keys: Sequence[str], stuck_after_s: float = 0.0) -> concurrent.futures.Future[list[bool]]:
        """``exists`` on the lookup thread. Queries made while one is running go out together in the next pool call
        (64 prompts arriving at once cost two round trips, not 64). Answered at once with misses while the pool is
        not connected, inside an outage's back-off, or while a query has been running over ``stuck_after_s``."""
        future: concurrent.futures.Future[list[bool]] = concurrent.futures.Future()
        if self._lookup_is_stuck(stuck_after_s):
            future.set_result([False] * len(keys))
            return future
        with self._batch_lock:
            self._batch.append((list(keys), future))
            if not self._batch_queued:
                self._batch_queued = True
                self._lookup_inflight = self._lookup_pool.submit(self._answer_batch)
                self._lookup_started = time.monotonic()
        return future

    def _lookup_is_stuck(self, after_s: float) -> bool:
        if self._backend is None:
            self.warn("not-connected", "KV pool (%s) not connected yet: counting lookups as misses", self.label)
            return True
        if not self.available:
            return True
        inflight = self._lookup_inflight
        if inflight is not None and not inflight.done() and time.monotonic() - self._lookup_started >= after_s:
            self.warn("lookup-stuck", "an earlier KV pool lookup has not returned; counting lookups as misses")
            return True
        return False

    def _answer_batch(self) -> None:
        with self._batch_lock:
            batch, self._batch = self._batch, []
            self._batch_queued = False
        batch = [(keys, future) for keys, future in batch if future.set_running_or_notify_cancel()]
        found = self.exists([key for keys, _ in batch for key in keys])
        offset = 0
        for keys, future in batch:
            future.set_result(found[offset : offset + len(keys)])
            offset += len(keys)

    def skip_saves(self, count: int, stats: StatsCounter) -> None:
        """Saves that cannot happen (not connected yet, or inside an outage's back-off window): counted and warned
        about, not attempted."""
        stats.add("save_dropped.unavailable", count)
        self._skipped("put", count)

    def _transfer(self, op: str, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[Outcome]:
        backend = self._usable_backend()
        if backend is None:
            self._skipped(op, len(keys))
            return [Outcome.UNAVAILABLE] * len(keys)
        try:
            outcomes = getattr(backend, op)(keys, addrs, sizes)
        except Exception as exc:  # noqa: BLE001 - a failed transfer costs hits, never the request
            self.warn(op, "KV pool %s of %d blocks failed: %r", op, len(keys), exc)
            return [Outcome.FAILED] * len(keys)
        if len(outcomes) != len(keys):
            return [Outcome.FAILED] * len(keys)
        if Outcome.UNAVAILABLE in outcomes:
            self._outage(op, f"{outcomes.count(Outcome.UNAVAILABLE)} of {len(keys)} blocks unavailable")
        else:
            self._reachable()
        return outcomes

    def put(self, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[Outcome]:
        return self._transfer("put", keys, addrs, sizes)

    def get(self, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]]) -> list[Outcome]:
        return self._transfer("get", keys, addrs, sizes)

    def put_missing(
        self, keys: Sequence[str], addrs: list[list[int]], sizes: list[list[int]], stats: StatsCounter
    ) -> list[str]:
        """Put the objects the pool does not hold yet; count every outcome into ``stats``, warn about failures.
        Returns the keys the pool holds afterwards (put now, or already there)."""
        if not self.available:
            self.skip_saves(len(keys), stats)
            return []
        present = self.exists(keys)
        if not self.available:  # the existence query just found the pool down
            self.skip_saves(len(keys), stats)
            return []
        todo = [i for i, p in enumerate(present) if not p]
        stats.add("save_skipped_present", len(keys) - len(todo))
        held = [key for key, p in zip(keys, present, strict=True) if p]
        if not todo:
            return held
        start = time.perf_counter()
        outcomes = self.put([keys[i] for i in todo], [addrs[i] for i in todo], [sizes[i] for i in todo])
        stats.add("save_seconds", time.perf_counter() - start)
        held += [keys[i] for i, outcome in zip(todo, outcomes, strict=True) if outcome.ok]
        for i, outcome in zip(todo, outcomes, strict=True):
            if outcome is Outcome.OK:
                stats.add("saved_blocks")
                stats.add("saved_bytes", sum(sizes[i]))
            elif outcome is Outcome.EXISTS:
                stats.add("save_skipped_present")
            else:
                stats.add(f"save_failed.{outcome.value}")
        failed = sorted({o.value for o in outcomes if not o.ok})
        if failed:
            self.warn(
                "save",
                "KV pool save: %d of %d blocks not stored (%s)",
                sum(not o.ok for o in outcomes),
                len(outcomes),
                ", ".join(failed),
            )
        return held

    def remove_prefix(self, prefix: str) -> int | None:
        """Objects removed under ``prefix``; None when the pool cannot select by prefix, is unreachable, or fails."""
        backend = self._usable_backend()
        if backend is None:
            return None
        try:
            return backend.remove_prefix(prefix)
        except Exception as exc:  # noqa: BLE001 - a failed removal leaves cache entries behind, nothing worse
            self.warn("remove", "KV pool removal of %s* failed: %r", prefix, exc)
            return None

    def remove(self, keys: Sequence[str]) -> list[bool]:
        backend = self._backend
        if backend is None:
            return [False] * len(keys)
        try:
            return backend.remove(keys)
        except Exception as exc:  # noqa: BLE001 - a failed removal leaves a cache entry behind, nothing worse
            self.warn("remove", "KV pool remove of %d keys failed: %r", len(keys), exc)
            return [False] * len(keys)


def _close_quietly(backend: PoolBackend | None) -> None:
    if backend is None:
        return
    try:
        backend.close()
    except Exception:
        logger.debug("closing the KV pool client failed", exc_info=True)


if __name__ == "__main__":  # ``python -m kvpool_connector.pool``: the standalone pool service, as ``kvpool-pool``
    from kvpool_connector.pool_service import main

    main()
