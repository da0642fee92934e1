"""The seam between the connector and a pool: keys, page addresses and sizes in; per-key outcomes out.

A backend owns one pool client and is the only code that reads that pool's return codes. Everything above it sees
:class:`Outcome` values; a raw negative code is never mistaken for data.

Before any client, at start-up, the class parses its own keys of the connector's config (``config_keys``,
``parse_settings``) and answers the questions the layers above would otherwise ask by the pool's name.
Calls of a client, in the order they happen: ``connect`` (may block for long: the pool handle calls it off the hot
path), ``register_memory`` for each KV region, then any mix of ``exists`` / ``put`` / ``get`` / ``remove_prefix`` (and
``unregister_memory`` / ``register_memory`` around vLLM's sleep mode), and finally ``close``.
An object is one KV block of every layer this worker holds, gathered from (``put``) or scattered to (``get``)
several page buffers: ``addrs[i]`` and ``sizes[i]`` list the pages of ``keys[i]``.
"""

from __future__ import annotations

import enum
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvpool_connector.errors import ConfigError

if TYPE_CHECKING:
    from kvpool_connector.config import ResolvedConfig
    from kvpool_connector.devices import DeviceRuntime


class PoolUnavailable(RuntimeError):
    """The pool cannot be reached or set up; the message says why (address, code)."""


class RegistrationRefused(PoolUnavailable):
    """The pool refused memory we must register (names the region): a configuration problem, not an outage."""


class Outcome(enum.Enum):
    OK = "ok"
    EXISTS = "exists"  # put of a key already present: the pool keeps the first copy, which is the same block
    MISSING = "missing"  # get of a key the pool does not hold (evicted, removed, never stored)
    POOL_FULL = "pool_full"
    WRONG_SIZE = "wrong_size"  # the object is not exactly the bytes we expect: never load it
    UNAVAILABLE = "unavailable"  # pool or master not reachable
    FAILED = "failed"  # any other error code

    @property
    def ok(self) -> bool:
        return self in (Outcome.OK, Outcome.EXISTS)


@dataclass(frozen=True)
class ClientRole:
    """What a pool client is for."""

    holds_data: bool
    """False for the scheduler's lookup client: no pool memory, no transfers."""
    device_id: int = 0
    """The worker's local rank: the device its client binds (memcache's ``init``), unless the config names one."""
    runtime: DeviceRuntime | None = None
    """Where a call's buffers live (device or host memory: memcache's transfer direction)."""
    kv_cache_bytes: int = 0
    """Memory to hand out for vLLM's KV cache at connect, where the pool offers it (``places_kv_cache``)."""


@dataclass(frozen=True)
class HandedOutMemory:
    """Memory a pool client handed out (``[base, base + nbytes)``) for vLLM's KV cache to be allocated in."""

    base: int
    nbytes: int


class PoolBackend(ABC):
    """One pool's client, behind a few batched calls; its class answers every question about the pool the layers
    above would otherwise have to ask by name (limits, settings a worker's pages rule out, placement, devices)."""

    name: ClassVar[str] = "pool"
    max_buffers_per_object: ClassVar[int | None] = None
    """How many page buffers (runs) one object may gather; None: no limit."""
    config_keys: ClassVar[tuple[str, ...]] = ()
    """This pool's own keys of ``kv_connector_extra_config`` (its section); ``config`` reads only the keys every
    pool shares, and refuses a key that is neither those nor the chosen pool's."""

    @classmethod
    def parse_settings(cls, section: dict[str, Any], env: Mapping[str, str]) -> Any:
        """This pool's settings from ``section`` (the ``config_keys`` the user gave) and the environment or files
        they point to; raise ConfigError naming the key or file on any mistake. The result reaches ``from_config``
        as ``config.backend_settings``. A pool without keys of its own has none."""
        return None

    @classmethod
    @abstractmethod
    def from_config(cls, config: ResolvedConfig, role: ClientRole) -> PoolBackend:
        """A client for ``role``, not connected yet."""

    @classmethod
    def check_worker(cls, config: ResolvedConfig, device_type: str, block_bytes: int, runs_per_block: int) -> None:
        """Refuse, at start-up and with the setting to change, what would make every transfer of a worker fail: KV
        pages on ``device_type``, block objects of ``block_bytes`` gathered from ``runs_per_block`` page runs."""
        limit = cls.max_buffers_per_object
        if limit is not None and runs_per_block > limit:
            raise ConfigError(
                f"backend {cls.name!r} stores at most {limit} buffers per object, and one KV block of this worker is "
                f"{runs_per_block} page runs; use another backend, or pipeline parallelism to give each worker fewer "
                "layers"
            )

    @classmethod
    def lookup_thread_binding(cls, config: ResolvedConfig) -> Callable[[], None] | None:
        """What the scheduler's lookup threads must run first (a device context the client needs), or None."""
        return None

    @classmethod
    def thread_binding(cls, config: ResolvedConfig, role: ClientRole) -> Callable[[], None] | None:
        """What every thread that calls a client of ``role`` must run first: a worker's device binding (the
        device's context is per thread; on the CPU the client's own threads inherit the caller's cores), else
        ``lookup_thread_binding``."""
        if role.holds_data:
            return role.runtime.bind_thread if role.runtime is not None else None
        return cls.lookup_thread_binding(config)

    @classmethod
    def places_kv_cache(cls, config: ResolvedConfig) -> bool:
        """Whether a worker should have vLLM allocate its KV cache in memory this client hands out at connect
        (``kv_cache_memory``), so transfers reach the pages directly."""
        return False

    @property
    def kv_cache_memory(self) -> HandedOutMemory | None:
        """The memory handed out at connect for vLLM's KV cache (``kv_cache_bytes``), or None."""
        return None

    @abstractmethod
    def connect(self) -> None:
        """Set the client up; raise PoolUnavailable with the reason when the pool cannot be used."""

    @abstractmethod
    def register_memory(self, ptr: int, size: int) -> None:
        """Make [ptr, ptr+size) usable for zero-copy transfers; raise RegistrationRefused naming the region if the pool
        answers no, PoolUnavailable if it cannot be asked."""

    @abstractmethod
    def unregister_memory(self, ptr: int, size: int) -> None:
        """Undo ``register_memory`` (the memory is about to be released: vLLM's sleep mode); raise PoolUnavailable
        if the client refuses."""

    @abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Presence of each key; an error for a key counts as absent."""

    @abstractmethod
    def put(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        """Store each key's pages as one object."""

    @abstractmethod
    def get(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        """Read each key's object into its pages; OK only if exactly sum(sizes) bytes arrived."""

    def remove_prefix(self, prefix: str) -> int | None:
        """Drop every object whose key starts with ``prefix``: how many, or None where the pool cannot select keys
        by prefix (it then keeps them)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the client; later calls are not allowed."""

    def answers(self) -> bool:
        """Whether the pool's front door (its master, meta service) accepts a connection now: cheap and bounded, no
        client call, so an outage's probe can ask it often. A pool that cannot tell says True and lets the probe's
        confirming call decide."""
        return True


ANSWER_TIMEOUT_S = 0.2  # an outage probe's connect: a partitioned host drops SYNs, the probe must not wait long
_MALFORMED_REQUEST = b"\x00" * 64


@dataclass(frozen=True)
class FrontDoor:
    """What a pool server's port did when knocked on: ``answers`` (accepted and reacted), else why not; ``silent``:
    it accepted the connection and then did nothing (a stopped or hung process: the kernel completes the handshake
    for it; or a half-open network)."""

    answers: bool
    silent: bool = False
    reason: str = ""


def knock(address: str, timeout_s: float) -> FrontDoor:
    """Connect to ``host:port`` and send a malformed request: a live Mooncake master or pool node and a memcache meta
    service close such a connection at once (observed); a stopped one lets it sit. Bounded by ``timeout_s`` per step,
    and no pool client is involved, so nothing here can hold the GIL."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    except (OSError, ValueError) as exc:
        return FrontDoor(False, reason=str(exc) or type(exc).__name__)
    with sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendall(_MALFORMED_REQUEST)
            sock.recv(64)  # a reply or the close: either way, a process that serves
        except TimeoutError:
            return FrontDoor(False, silent=True, reason=f"accepts connections but does not answer within {timeout_s} s")
        except OSError:
            pass  # reset: also a reaction
    return FrontDoor(True)
