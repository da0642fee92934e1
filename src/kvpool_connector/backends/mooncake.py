"""Mooncake Store backend (``mooncake-transfer-engine``; ``-non-cuda`` on CPU machines).

One object per KV block, gathered from / scattered to that block's page of every layer through Mooncake's
``*_multi_buffers`` batch calls, zero-copy from KV memory registered with the client. Objects go to this worker's
own segment when it contributes one (``preferred_segment``), else wherever the master places them.

With ``real_client_address`` the worker instead attaches to a ``mooncake_client`` on the same host as Mooncake's
shared-memory ("dummy") client: objects move through two shared areas (loads, saves; see ``shared_area``) at memory
speed, and that process does any network transfer. Such a client reaches only memory it handed out itself, so when
vLLM lets the connector place its KV cache (``kv_cache_bytes``, see ``kv_allocation``) the attach also hands out that
much memory for it: then the node copies objects straight into (and, for synchronous saves, out of) the KV pages,
one copy instead of two. The scheduler's lookup client is an ordinary client either way.

Return codes (mooncake-store types.h) are read here and nowhere else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from kvpool_connector.backends.base import (
    ANSWER_TIMEOUT_S,
    ClientRole,
    HandedOutMemory,
    Outcome,
    PoolBackend,
    PoolUnavailable,
    RegistrationRefused,
    knock,
)
from kvpool_connector.backends.mooncake_settings import MooncakeKeys, MooncakeSettings, parse_mooncake_settings
from kvpool_connector.backends.shared_area import SharedArea
from kvpool_connector.config import ResolvedConfig
from kvpool_connector.devices import runtime_for
from kvpool_connector.errors import ConfigError
from kvpool_connector.logs import init_logger

logger = init_logger(__name__)

NO_AVAILABLE_HANDLE = -200  # no space left in any segment
INVALID_PARAMS = -600  # e.g. our buffer is smaller than the object
REPLICA_IS_NOT_READY = -703  # another writer is still putting this key
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
TRANSFER_FAIL = -800  # e.g. our buffer is larger than the object
RPC_FAIL = -900  # master unreachable (refused or reset: answered at once, or after ~4 s of retries)
RPC_TIMEOUT = -901  # master not answering (hung, or a black-holed network): each call waits 30 s
_MASTER_DOWN = (RPC_FAIL, RPC_TIMEOUT)
_DUMMY_LOCAL_BUFFER = 16 << 20
_PREFAULT_OBJECT_BYTES = 16 << 20
_PREFAULT_WINDOW_BYTES = 256 << 20  # pool memory the throwaway objects hold at any one time
_POOL_ALLOC_SLACK = 2 << 20  # per allocation from the shared pool, for its alignment
_PROBE_TIMEOUT_S = 2.0
_CHILD_PROBE_TIMEOUT_S = 10.0

_PUT_CODES = {
    NO_AVAILABLE_HANDLE: Outcome.POOL_FULL,
    OBJECT_ALREADY_EXISTS: Outcome.EXISTS,
    REPLICA_IS_NOT_READY: Outcome.EXISTS,
    RPC_FAIL: Outcome.UNAVAILABLE,
    RPC_TIMEOUT: Outcome.UNAVAILABLE,
}
_GET_CODES = {
    OBJECT_NOT_FOUND: Outcome.MISSING,
    REPLICA_IS_NOT_READY: Outcome.MISSING,
    INVALID_PARAMS: Outcome.WRONG_SIZE,
    RPC_FAIL: Outcome.UNAVAILABLE,
    RPC_TIMEOUT: Outcome.UNAVAILABLE,
}


def _timeout_variables(s: MooncakeSettings) -> dict[str, int]:
    """Mooncake's transfer timeouts, which it reads from the environment only."""
    return {
        "MC_TCP_PROGRESS_TIMEOUT_SEC": s.transfer_stall_timeout_s,  # no bytes moved on a connection
        "MC_TCP_STATUS_TIMEOUT_SEC": s.transfer_stall_timeout_s,  # no status frame after a request
    }


def _check_answering(address: str, what: str, serves_a_child_client: Callable[[], bool] | None = None) -> None:
    """Refuse at once unless the server at ``address`` answers.

    Mooncake's ``setup`` holds the GIL while it waits for a master: ~90 s of retries against an absent one, and
    indefinitely against one that accepts connections but does not answer (a stopped process, a half-open network).
    Called from a background thread it would still freeze every thread of the engine, serving included. So the
    server is knocked on first (``knock``: bounded, no client call); one that accepts the connection but ignores the
    malformed knock is given a real client in a child process, which can be killed, before this process calls it.
    """
    door = knock(address, _PROBE_TIMEOUT_S)
    if door.answers or (door.silent and serves_a_child_client is not None and serves_a_child_client()):
        return
    raise PoolUnavailable(f"{what} at {address} is not reachable: {door.reason}")


_SETUP_IN_CHILD = (
    "import sys\n"
    "from mooncake.store import MooncakeDistributedStore\n"
    "h, m, p, a = sys.argv[1:]\n"
    "sys.exit(0 if MooncakeDistributedStore().setup(h, m, 0, 0, p, '', a) == 0 else 1)\n"
)


def _master_serves_a_child_client(settings: MooncakeSettings) -> bool:
    s = settings
    args = [sys.executable, "-c", _SETUP_IN_CHILD, s.local_hostname, s.metadata_server, s.protocol]
    try:
        done = subprocess.run([*args, s.master_server_address], capture_output=True, timeout=_CHILD_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _import_store():
    try:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    except ImportError as exc:
        raise ImportError(
            f"backend 'mooncake' needs Mooncake Store's Python client ({exc}). Install the extra of this host: "
            "`pip install 'kvpool-connector[mooncake]'` (CPU engines), `[mooncake-cuda]` (GPU, torch on CUDA 12) or "
            "`[mooncake-cuda13]` (CUDA 13): README, Install; on Debian it also needs "
            "`apt-get install libibverbs1 libnl-3-200 libnl-route-3-200`."
        ) from exc
    return MooncakeDistributedStore, ReplicateConfig


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _settings(config: ResolvedConfig) -> MooncakeSettings:
    settings = config.backend_settings
    assert isinstance(settings, MooncakeSettings), "a config of another backend"
    return settings


class MooncakeBackend(PoolBackend):
    name: ClassVar[str] = "mooncake"
    config_keys: ClassVar[tuple[str, ...]] = MooncakeKeys.__struct_fields__

    def __init__(self, settings: MooncakeSettings, *, holds_data: bool, kv_cache_bytes: int = 0) -> None:
        self._settings = settings
        self._holds_data = holds_data
        store_cls, self._replicate_config_cls = _import_store()
        self._store = store_cls()
        self._replicate_config = self._replicate_config_cls()
        self._replicate_config.replica_num = settings.replica_num
        self._kv_cache_bytes = kv_cache_bytes if self.shared_memory else 0
        self._kv_cache_area: SharedArea | None = None
        """Shared memory handed out for vLLM's KV cache at attach (``kv_cache_bytes``); pages inside it move with one
        copy. It stays mapped as long as this process lives: never closed while the KV cache may be in use."""
        self._connected = False

    # -- what the layers above ask of this pool ------------------------------------------------------------------
    @classmethod
    def parse_settings(cls, section: dict[str, Any], env: Mapping[str, str]) -> MooncakeSettings:
        return parse_mooncake_settings(section, env)

    @classmethod
    def from_config(cls, config: ResolvedConfig, role: ClientRole) -> MooncakeBackend:
        return cls(_settings(config), holds_data=role.holds_data, kv_cache_bytes=role.kv_cache_bytes)

    @classmethod
    def check_worker(cls, config: ResolvedConfig, device_type: str, block_bytes: int, runs_per_block: int) -> None:
        super().check_worker(config, device_type, block_bytes, runs_per_block)
        s = _settings(config)
        if device_type == "npu" and s.protocol != "ascend":
            raise ConfigError(
                'mooncake `protocol`: KV pages on an Ascend NPU move only over the "ascend" transport, got '
                f"{s.protocol!r}"
            )
        if s.protocol == "ascend" and s.local_hostname in _LOOPBACK:
            raise ConfigError(
                'mooncake `local_hostname`: with protocol "ascend" peers on other hosts read this worker\'s segment at '
                f"that address, and {s.local_hostname!r} is loopback; set this host's IP"
            )
        if s.real_client_address and device_type != "cpu":
            raise ConfigError(
                f"`real_client_address` (Mooncake through shared memory) needs the KV cache in host memory; this "
                f"worker's is on {device_type}. Remove it: on GPU/NPU hosts the client transfers KV pages itself."
            )
        if s.real_client_address and block_bytes > s.shared_buffer_bytes:
            raise ConfigError(
                f"`shared_buffer_size` ({s.shared_buffer_size}) is smaller than one KV block object ({block_bytes} "
                f"bytes), so every transfer would fail; set it to at least {block_bytes} bytes in the Mooncake settings"
            )

    @classmethod
    def lookup_thread_binding(cls, config: ResolvedConfig) -> Callable[[], None] | None:
        """The ``ascend`` transport sets up its memory in the calling thread's ACL context, so even the lookup client,
        which holds no KV, needs a device there: device 0, as vllm-ascend's scheduler client does. Other transports
        need no device in the scheduler (and a CUDA context there would cost device memory)."""
        if _settings(config).protocol == "ascend":
            return runtime_for("npu", 0).bind_thread
        return None

    @classmethod
    def places_kv_cache(cls, config: ResolvedConfig) -> bool:
        s = _settings(config)
        return bool(s.real_client_address) and s.kv_cache_in_shared_memory

    @property
    def kv_cache_memory(self) -> HandedOutMemory | None:
        area = self._kv_cache_area
        return None if area is None else HandedOutMemory(area.base, area.nbytes)

    @property
    def shared_memory(self) -> bool:
        """Data moves through shared memory with a local ``mooncake_client`` rather than this client's own engine."""
        return bool(self._settings.real_client_address) and self._holds_data

    def connect(self) -> None:
        if self._connected:  # attached early to place the KV cache (``kv_allocation``)
            return
        s = self._settings
        _check_answering(s.master_server_address, "mooncake_master", lambda: _master_serves_a_child_client(s))
        if self.shared_memory:
            _check_answering(s.real_client_address, "mooncake_client")
            self._attach(s.real_client_address, s.shared_buffer_bytes)
            self._connected = True
            return
        segment = s.segment_bytes if self._holds_data else 0
        buffer = s.buffer_bytes if self._holds_data else 0
        for variable, seconds in _timeout_variables(s).items():  # read when setup creates the transport
            os.environ.setdefault(variable, str(seconds))
        rc = self._store.setup(
            s.local_hostname, s.metadata_server, segment, buffer, s.protocol, s.device_name, s.master_server_address
        )
        if rc != 0:
            raise PoolUnavailable(f"Mooncake setup against master {s.master_server_address} returned {rc}")
        if segment > 0:
            self._replicate_config.preferred_segment = self._store.get_hostname()
        self._connected = True

    def _attach(self, address: str, area_bytes: int) -> None:
        # The shared pool holds our two areas and, when asked for, the KV cache; the real client's own buffer for us
        # stays at its minimum.
        wanted = {"load": area_bytes, "save": area_bytes}
        if self._kv_cache_bytes:
            wanted["KV cache"] = self._kv_cache_bytes
        pool_bytes = sum(wanted.values()) + len(wanted) * _POOL_ALLOC_SLACK
        rc = self._store.setup_dummy(pool_bytes, _DUMMY_LOCAL_BUFFER, address)
        if rc != 0:
            raise PoolUnavailable(f"Mooncake shared-memory attach to mooncake_client at {address} returned {rc}")
        areas = {}
        for name, nbytes in wanted.items():
            base = self._store.alloc_from_mem_pool(nbytes)
            if not base:
                raise PoolUnavailable(f"Mooncake could not allocate {nbytes} bytes of shared memory for the {name}")
            if (rc := self._store.register_buffer(base, nbytes)) != 0:
                raise PoolUnavailable(f"mooncake_client at {address} refused the shared memory for the {name}: {rc}")
            areas[name] = SharedArea(base, nbytes, name)
            areas[name].fill_zeros()
        self._load_area, self._save_area = areas["load"], areas["save"]
        self._kv_cache_area = areas.get("KV cache")
        for area in (self._load_area, self._kv_cache_area):
            if area is not None:
                self._map_in_node(area)

    def _map_in_node(self, area: SharedArea) -> None:
        """Have ``mooncake_client`` map every page of ``area`` now rather than during the first transfers.

        Its first write into fresh shared memory faults each page into its own mapping: a fresh engine's first 64 MiB
        load took 35 ms instead of 7.5 (BENCHMARKS.md). Storing the area as throwaway objects makes the node read all
        of it (read faults map pages in batches, and the pages stay writable); each window of objects is removed
        before the next is stored, so they hold at most ``_PREFAULT_WINDOW_BYTES`` of pool memory at a time (in a
        nearly full pool that can hasten Mooncake's eviction of older objects). They go wherever the master places
        them (another host's segment in a multi-host pool: the same read, plus a transfer). Best effort: a full pool
        only leaves the first transfers slower.
        """
        run = uuid.uuid4().hex
        offsets = list(range(0, area.nbytes, _PREFAULT_OBJECT_BYTES))
        per_window = _PREFAULT_WINDOW_BYTES // _PREFAULT_OBJECT_BYTES
        refused: set[int] = set()
        for first in range(0, len(offsets), per_window):
            window = offsets[first : first + per_window]
            keys = [f"kvpool-prefault/{run}/{first + i}" for i in range(len(window))]
            sizes = [min(_PREFAULT_OBJECT_BYTES, area.nbytes - offset) for offset in window]
            codes = self._store.batch_put_from(keys, [area.base + o for o in window], sizes, self._replicate_config)
            if stored := [key for key, code in zip(keys, codes, strict=True) if code == 0]:
                self._store.batch_remove(stored, True)
            refused.update(code for code in codes if code != 0)
        if refused:
            logger.info(
                "mooncake_client could not pre-map the shared %s (codes %s): the first transfers will be slower",
                area.name,
                sorted(refused),
            )

    def _in_kv_cache_memory(self, addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> bool:
        """Every page lies in the shared memory vLLM's KV cache was placed in: the node can reach it directly."""
        memory = self._kv_cache_area
        if memory is None or not addrs:
            return False
        low = min(min(page_addrs) for page_addrs in addrs)
        high = max(
            a + n
            for page_addrs, page_sizes in zip(addrs, sizes, strict=True)
            for a, n in zip(page_addrs, page_sizes, strict=True)
        )
        return memory.base <= low and high <= memory.base + memory.nbytes

    def register_memory(self, ptr: int, size: int) -> None:
        if self.shared_memory:
            return  # a shared-memory client reaches only memory it handed out (areas, KV cache): registered at attach
        rc = self._store.register_buffer(ptr, size)
        if rc != 0:  # a local refusal (the transfer engine's, no master involved): asking again gets the same answer
            raise RegistrationRefused(
                f"Mooncake refused to register the KV region [{ptr:#x}, {ptr + size:#x}) ({size} bytes): code {rc}"
            )

    def unregister_memory(self, ptr: int, size: int) -> None:
        if self.shared_memory:
            return
        rc = self._store.unregister_buffer(ptr)
        if rc != 0:
            raise PoolUnavailable(f"Mooncake unregister_buffer({ptr:#x}, {size} bytes) returned {rc}")

    def exists(self, keys: Sequence[str]) -> list[bool]:
        codes = self._store.batch_is_exist(list(keys))
        if down := sorted({c for c in codes if c in _MASTER_DOWN}):
            raise PoolUnavailable(f"Mooncake master {self._settings.master_server_address} answered {down}")
        return [code == 1 for code in codes]

    def put(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        if self.shared_memory and not self._in_kv_cache_memory(addrs, sizes):
            codes = self._save_area.put(keys, addrs, sizes, self._put_contiguous)
        else:
            codes = self._store.batch_put_from_multi_buffers(list(keys), addrs, sizes, self._replicate_config)
        return [Outcome.OK if code == 0 else _PUT_CODES.get(code, Outcome.FAILED) for code in codes]

    def get(self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> list[Outcome]:
        if self.shared_memory and not self._in_kv_cache_memory(addrs, sizes):
            got = self._load_area.get(keys, addrs, sizes, self._store.batch_get_into)
        else:
            got = self._store.batch_get_into_multi_buffers(list(keys), addrs, sizes)
        outcomes = []
        for n_read, page_sizes in zip(got, sizes, strict=True):
            if n_read == sum(page_sizes):
                outcomes.append(Outcome.OK)
            elif n_read >= 0:
                outcomes.append(Outcome.WRONG_SIZE)
            else:
                outcomes.append(_GET_CODES.get(n_read, Outcome.FAILED))
        return outcomes

    def _put_contiguous(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        return self._store.batch_put_from(keys, ptrs, sizes, self._replicate_config)

    def remove_prefix(self, prefix: str) -> int | None:
        removed = int(self._store.remove_by_regex("^" + re.escape(prefix), True))  # also objects a reader leases
        if removed < 0:
            raise PoolUnavailable(f"Mooncake remove_by_regex returned {removed}")
        return removed

    def answers(self) -> bool:
        s = self._settings
        addresses = [s.master_server_address] + ([s.real_client_address] if self.shared_memory else [])
        return all(knock(address, ANSWER_TIMEOUT_S).answers for address in addresses)

    def close(self) -> None:
        if self._kv_cache_area is not None:
            # Closing would unmap the shared pool, and vLLM's KV cache lives in it until the process exits (the node
            # drops this client when the process goes).
            logger.debug("leaving the shared-memory client attached: the KV cache lives in its memory")
            return
        self._store.close()


BACKEND = MooncakeBackend
