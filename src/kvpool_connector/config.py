"""The connector's configuration, parsed once at startup into frozen, typed objects.

Sources, in the order they are read:
1. ``kv_connector_extra_config`` of the connector's ``--kv-transfer-config`` entry (vllm-ascend deployments' JSON works
   as written: ``use_layerwise``, ``memcache_rpc_port``);
2. for Mooncake, an inline ``"mooncake": {...}`` object, else the JSON file named by ``MOONCAKE_CONFIG_PATH``;
3. for memcache, the ``key = value`` file named by ``MMC_LOCAL_CONFIG_PATH`` (pymmc reads it itself; we check it,
   its SSD tier's raw devices included).

Every problem raises :class:`ConfigError` with the offending key and what is allowed, so vLLM fails at startup with
one readable line instead of a traceback from deep inside a pool client.
"""

from __future__ import annotations

import json
import os
import re
import stat
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from kvpool_connector.logs import init_logger

logger = init_logger(__name__)

MOONCAKE_CONFIG_ENV = "MOONCAKE_CONFIG_PATH"
MMC_LOCAL_CONFIG_ENV = "MMC_LOCAL_CONFIG_PATH"

# Mooncake's own documented defaults (mooncake/mooncake_config.py).
DEFAULT_GLOBAL_SEGMENT_SIZE = 3_355_443_200
DEFAULT_LOCAL_BUFFER_SIZE = 16 << 20
DEFAULT_SHARED_BUFFER_SIZE = 128 << 20
ASCEND_SEGMENT_ALIGN = 1 << 30
MOONCAKE_MASTER_ENV = "MOONCAKE_MASTER"  # overrides master_server_address, as vllm-ascend and Mooncake's tools do

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*((?:[kmgt]i?)?b?)\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MAX_SIZE = 1 << 60  # sizes go to C++ as 64-bit integers


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and what is allowed."""


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an int or a string such as ``"512MB"``, ``"4 GiB"`` or ``"1073741824"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size in bytes (int or string like '4GB'), got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{key}: cannot read {value!r} as a size; use bytes or a string like '512MB' or '4GB'")
        number, unit = match.groups()
        size = int(Decimal(number) * _SIZE_UNITS[(unit or "").lower()[:1]])
    if size < 0:
        raise ConfigError(f"{key}: a size cannot be negative, got {value!r}")
    if size > _MAX_SIZE:
        raise ConfigError(f"{key}: {value!r} is more than any host holds (limit {_MAX_SIZE >> 50} PiB)")
    return size


class MooncakeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Mooncake Store client settings, the keys of the ``mooncake.json`` the field already uses."""

    master_server_address: str
    """host:port of ``mooncake_master``."""
    local_hostname: str = "127.0.0.1"
    """Address this client's transfer engine listens on; peers reach its segment there."""
    metadata_server: str = "P2PHANDSHAKE"
    protocol: str = "tcp"
    """Transfer protocol: ``tcp`` anywhere, ``rdma``, ``ascend`` on Ascend clusters."""
    device_name: str = ""
    global_segment_size: int | str = DEFAULT_GLOBAL_SEGMENT_SIZE
    """DRAM this worker contributes to the pool; 0 = use only segments of other nodes (e.g. ``mooncake_client``)."""
    local_buffer_size: int | str = DEFAULT_LOCAL_BUFFER_SIZE
    """Client-side transfer buffer; the connector moves data zero-copy from registered KV memory, so it stays small."""
    real_client_address: str = ""
    """host:port (its ``--port``) of a ``mooncake_client`` on this host. When set, each worker attaches to it through
    shared memory instead of running its own transfer engine: a hit held by that process loads at memory speed rather
    than over loopback TCP, and that process does the network transfers. Needs KV pages in host memory (vLLM CPU)."""
    shared_buffer_size: int | str = DEFAULT_SHARED_BUFFER_SIZE
    """With ``real_client_address``: size of each of a worker's two shared areas (loads, saves). Larger batches go in
    chunks; it must hold at least one KV block object (all layers of one block)."""
    replica_num: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    """Copies of each object Mooncake keeps, each on another pool node: with 2, losing one node keeps every hit; each
    copy costs its share of save bandwidth and pool memory."""
    transfer_stall_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 5
    """A TCP transfer connection that makes no progress this long is dropped and its transfers fail (a load's blocks
    are recomputed, a save is dropped). Sets ``MC_TCP_PROGRESS_TIMEOUT_SEC`` and ``MC_TCP_STATUS_TIMEOUT_SEC``
    (Mooncake's default: 30 s) for this client unless the environment already does. Blocks of the same batch queued
    behind the dropped connection still wait for Mooncake's own batch deadline (measured: a 2-block load from a
    partitioned node failed its first block after this timeout, its second after 45-60 s)."""
    kv_cache_in_shared_memory: bool = True
    """With ``real_client_address``: allocate vLLM's KV cache in shared memory that ``mooncake_client`` maps, so the
    node copies loads straight into the KV pages (one copy; the node then maps the whole KV cache).
    ``false`` keeps the KV cache private: every transfer copies through the shared areas (two copies)."""

    def __post_init__(self) -> None:
        for key in ("master_server_address", "local_hostname", "metadata_server", "protocol"):
            if not getattr(self, key).strip():
                raise ValueError(f"`{key}` must not be empty")
        for key in ("master_server_address", "real_client_address"):
            value = getattr(self, key)
            host, sep, port = value.rpartition(":")
            if (value or key == "master_server_address") and (
                not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
            ):
                raise ValueError(f"`{key}` must be host:port, got {value!r}")
        for key in ("global_segment_size", "local_buffer_size", "shared_buffer_size"):
            try:
                parse_size(getattr(self, key), key)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.shared_buffer_bytes < 1 << 20:
            raise ValueError(f"`shared_buffer_size` must be at least 1 MB, got {self.shared_buffer_size!r}")

    @property
    def segment_bytes(self) -> int:
        size = parse_size(self.global_segment_size, "global_segment_size")
        if self.protocol == "ascend" and size % ASCEND_SEGMENT_ALIGN:
            # vllm-ascend's documentation: the segment "needs to be aligned to 1GB" for the ascend transport
            size += ASCEND_SEGMENT_ALIGN - size % ASCEND_SEGMENT_ALIGN
        return size

    @property
    def buffer_bytes(self) -> int:
        return parse_size(self.local_buffer_size, "local_buffer_size")

    @property
    def shared_buffer_bytes(self) -> int:
        return parse_size(self.shared_buffer_size, "shared_buffer_size")


class MemcacheSettings(msgspec.Struct, frozen=True, kw_only=True):
    """memcache (pymmc) client settings: pymmc reads the local service file itself; we keep what we checked."""

    local_config_path: str
    meta_service_url: str
    device_id: int | None = None
    """Device this worker's memcache client binds (``memcache_device_id``); None: the worker's local rank."""
    ssd_devices: tuple[str, ...] = ()
    """The raw block devices of memcache's SSD tier (``ubsio.disk.path``); empty when the tier is off."""


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``kv_connector_extra_config`` may hold for MemcacheConnectorStoreV1."""

    backend: Literal["memcache", "mooncake"] = "memcache"
    """Which pool: ``memcache`` (Huawei memcache, Ascend; the default) or ``mooncake`` (Mooncake Store)."""
    use_layerwise: bool = False
    """Per-layer load/save overlapping the forward pass; only ``false`` (whole blocks before/after it) so far."""
    memcache_rpc_port: int | str = 0
    """vllm-ascend's per-instance lookup-channel id (deployments give "0" on P, "1" on D). This connector's scheduler
    asks the pool directly, so no port is opened; the value labels the instance in logs and metrics."""
    lookup_timeout_ms: Annotated[int, msgspec.Meta(gt=0, le=60_000)] = 500
    """Upper bound of one scheduler-side existence query; past it the lookup counts as a miss."""
    reconnect_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    """How often an unreachable pool is retried in the background."""
    startup_wait_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 10.0
    """How long engine start-up waits for the pool's first connection attempt, so the first requests find it ready;
    a pool that does not answer by then is connected in the background while vLLM serves without hits."""
    load_async: bool | Literal["auto"] = True
    """``true``: load hits on a background thread while the rest of the batch runs (the request waits in vLLM's
    ``WAITING_FOR_REMOTE_KVS`` at least one step); ``false``: load before the forward pass, stalling every running
    request for the load's duration; ``"auto"`` (opt-in): per hit, synchronously when nothing else runs or the
    expected load (measured seconds per block) is short next to a step, else asynchronously (``load_mode``).
    Measured in BENCHMARKS.md (hit TTFT, decode latency while hits arrive)."""
    lookup_async: bool = True
    """Ask the pool off the scheduler loop: a new request is skipped for a step or two until the answer arrives
    (queries of requests arriving together go out as one pool call); ``false`` asks inside the scheduler loop."""
    producer_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 5_000
    """P/D through the pool: how long a decode request whose prefill instance is still saving its blocks (the
    producer's ``kv_transfer_params`` say so) waits for them to reach the pool before it computes what is missing."""
    reset_cache: Literal["layout", "off"] = "layout"
    """What vLLM's cache reset (``POST /reset_prefix_cache?reset_external=true``, or the reset after a weight update)
    does to the pool. ``layout``: remove every object stored under this deployment's layout (model, dtypes, KV
    layout, shard): the entries every instance serving the same model this way shares, and the ones a weight update
    makes stale for all of them; other models' entries stay. ``off``: leave the pool and report the reset as failed.
    memcache cannot select objects by key prefix: there the reset fails with a warning and the pool keeps them."""
    save_decode_cache: bool = False
    """Also save blocks filled by generated tokens (the partial tail never), keyed by the hashes of prompt + output,
    so a chat's next turn, whose prompt repeats this one and its answer, finds them in the pool. Costs pool space and
    save bandwidth for every answer. Measured in BENCHMARKS.md (multi-turn)."""
    async_save: bool = True
    """Copy new blocks to a staging area at ``wait_for_save`` and put them from a background thread (the forward
    pass waits only for the local copy); ``false`` puts synchronously inside ``wait_for_save``."""
    staging_buffer_mb: Annotated[int, msgspec.Meta(gt=0, le=1 << 20)] = 256
    """Host memory for blocks waiting to be put; when full, the oldest waiting saves are dropped and counted. A
    worker that loads blocks stored at another TP size (``load_from_tp_sizes``) sets aside as much again, at its
    first such load, for the objects it re-assembles."""
    load_from_tp_sizes: list[Annotated[int, msgspec.Meta(ge=1, le=1024)]] | None = None
    """GQA models: the TP sizes whose stored blocks this engine may load, beside its own (an engine at TP t reads
    the head shards of a block stored at TP s and places each head range into its own pages). ``null`` (default):
    every TP size that divides the model's KV heads; ``[]``: this engine's own only. Each size costs a lookup its
    shard count of keys per block (at TP s, s objects per block; 1 + 2 + 4 + 8 = 15 keys instead of 8 for a model of
    8 KV heads at TP 8 with the default). A size that does not split the KV heads evenly is refused at start-up.
    MLA ignores it: its blocks are the same at every TP size and share keys already."""
    save_admission: Literal["all", "second_sight"] = "all"
    """Which computed prompt blocks are put (``admission``): ``all``; or ``second_sight``, a block the second time any
    instance of the fleet computes it (the first time only a small sighting object is put), so one-off prompts do not
    push a full pool's reused blocks out. P/D producers' prompts and generated tokens' blocks are always saved."""
    model_version: str = ""
    """Part of every pool key beside the model's weights and config (which keys follow by themselves: see
    docs/configuration.md). Change it when weights change in place with no file changing (RL weight syncs,
    ``reload_weights``, updates through ``collective_rpc``): blocks saved under another version are then misses.
    Every instance that should share blocks must give the same value."""
    mooncake: MooncakeSettings | None = None
    """Inline Mooncake settings; when absent they come from the file named by ``MOONCAKE_CONFIG_PATH``."""
    mooncake_config_path: str | None = None
    """A Mooncake JSON file to read instead of ``MOONCAKE_CONFIG_PATH``."""
    memcache_config_path: str | None = None
    """A memcache local-service file to read instead of ``MMC_LOCAL_CONFIG_PATH``."""
    memcache_device_id: Annotated[int, msgspec.Meta(ge=0, le=1023)] | None = None

    def __post_init__(self) -> None:
        if self.use_layerwise:
            raise ValueError(
                "`use_layerwise`: only false is supported by this version (whole-block loads before the forward "
                "pass and saves after it); set it to false"
            )
        if self.load_from_tp_sizes is not None and len(set(self.load_from_tp_sizes)) != len(self.load_from_tp_sizes):
            raise ValueError(f"`load_from_tp_sizes` lists a TP size twice: {self.load_from_tp_sizes}")
        rpc = self.memcache_rpc_port
        if isinstance(rpc, bool) or (isinstance(rpc, str) and not rpc.strip().isdigit()) or int(rpc) < 0:
            raise ValueError(f"`memcache_rpc_port` must be a non-negative integer or digit string, got {rpc!r}")

    @property
    def instance_id(self) -> int:
        return int(self.memcache_rpc_port)


class ResolvedConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The parsed config plus the backend settings it points to, ready to open a pool."""

    pool: PoolConfig
    mooncake: MooncakeSettings | None = None
    memcache: MemcacheSettings | None = None
    notes: tuple[str, ...] = ()
    """What parsing translated (a peer connector's key names): logged once at start-up."""


class _PeerKey(msgspec.Struct, frozen=True):
    """A key of vllm-ascend's AscendStoreConnector or vLLM's MooncakeStoreConnector that users carry over.

    ``ours``: our key of the same meaning (the value moves there); otherwise the only value that means what this
    connector does, and ``instead``: what to do for any other value."""

    ours: str | None = None
    only: Any = None
    instead: str = ""


PEER_KEYS = {
    "lookup_rpc_port": _PeerKey(ours="memcache_rpc_port"),
    "consumer_is_to_load": _PeerKey(
        only=True,
        instead="a kv_consumer always loads its hits from the pool here; leave this connector out of the "
        "kv-transfer-config of an instance that must not load",
    ),
    "consumer_is_to_put": _PeerKey(
        only=False, instead='a kv_consumer never saves here; give the instance kv_role "kv_both" to save and load'
    ),
    "discard_partial_chunks": _PeerKey(only=True, instead="only full blocks are ever stored here"),
}
"""Peer key names accepted where they mean what ours do; ``lookup_async``, ``load_async``, ``use_layerwise`` and
``backend`` are spelled alike already."""


def _translate_peer_keys(extra_config: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``extra_config`` in our key names, and a note per peer key translated; refuse a peer value we do not honour."""
    out, notes = dict(extra_config), []
    for name, peer in PEER_KEYS.items():
        if name not in out:
            continue
        value = out.pop(name)
        if peer.ours is not None:
            if peer.ours in out and out[peer.ours] != value:
                raise ConfigError(
                    f"kv_connector_extra_config: `{name}` ({value!r}) and `{peer.ours}` ({out[peer.ours]!r}) name the "
                    f"same setting with different values; keep `{peer.ours}`"
                )
            out[peer.ours] = value
            notes.append(f"`{name}` read as `{peer.ours}` (same meaning)")
        elif value is peer.only or (type(value) is type(peer.only) and value == peer.only):
            notes.append(f"`{name}: {json.dumps(value)}` is what this connector always does; the key can go")
        else:
            raise ConfigError(
                f"kv_connector_extra_config: `{name}: {json.dumps(value)}` is not supported: {peer.instead}"
            )
    return out, tuple(notes)


def _allowed_keys(struct: type[msgspec.Struct]) -> str:
    return ", ".join(struct.__struct_fields__)


def _convert(raw: Any, struct: type[msgspec.Struct], source: str) -> Any:
    try:
        return msgspec.convert(raw, struct, strict=True)
    except msgspec.ValidationError as exc:
        msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))  # keys may hold control chars
        nested = "`$.mooncake`" in msg and struct is PoolConfig
        if "unknown field" in msg:
            msg += f" (allowed keys: {_allowed_keys(MooncakeSettings if nested else struct)})"
        elif "Invalid enum value" in msg and msg.endswith("`$.backend`"):
            msg += " (allowed: memcache, mooncake)"
        raise ConfigError(f"{source}: {msg}") from None


def _read_text_file(path: str, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}={path!r}: cannot read the file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}={path!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_json_file(path: str, source: str) -> Any:
    text = _read_text_file(path, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}={path!r}: not valid JSON ({exc})") from None


def _mooncake_settings(pool: PoolConfig, env: dict[str, str]) -> MooncakeSettings:
    settings = _mooncake_settings_as_given(pool, env)
    if master := env.get(MOONCAKE_MASTER_ENV, "").strip():
        try:
            return msgspec.structs.replace(settings, master_server_address=master)
        except ValueError as exc:
            raise ConfigError(f"{MOONCAKE_MASTER_ENV}={master!r}: {exc}") from None
    return settings


def _mooncake_settings_as_given(pool: PoolConfig, env: dict[str, str]) -> MooncakeSettings:
    if pool.mooncake is not None:
        return pool.mooncake
    path = pool.mooncake_config_path or env.get(MOONCAKE_CONFIG_ENV)
    source = "mooncake_config_path" if pool.mooncake_config_path else MOONCAKE_CONFIG_ENV
    if not path:
        raise ConfigError(
            'backend "mooncake" needs the pool address: give "mooncake": {"master_server_address": "host:port", ...} '
            f"in kv_connector_extra_config, or a JSON file in {MOONCAKE_CONFIG_ENV}"
        )
    raw = _read_json_file(path, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}={path!r}: expected a JSON object, got {type(raw).__name__}")
    # The file is shared with other Mooncake users (MooncakeConnectorV1, vllm-ascend): keep only our keys.
    ours = {k: v for k, v in raw.items() if k in MooncakeSettings.__struct_fields__}
    return _convert(ours, MooncakeSettings, f"{source}={path}")


def read_mmc_local_config(path: str, source: str) -> dict[str, str]:
    """Parse memcache's ``key = value`` local-service file (comments with #)."""
    lines = _read_text_file(path, source).splitlines()
    entries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}={path!r} line {number}: expected 'key = value', got {line!r}")
        entries[key.strip()] = value.strip()
    return entries


def _memcache_settings(pool: PoolConfig, env: dict[str, str]) -> MemcacheSettings:
    path = pool.memcache_config_path or env.get(MMC_LOCAL_CONFIG_ENV)
    source = "memcache_config_path" if pool.memcache_config_path else MMC_LOCAL_CONFIG_ENV
    if not path:
        raise ConfigError(
            f'backend "memcache" needs the memcache local service config: set {MMC_LOCAL_CONFIG_ENV} to its file '
            '(mmc-local.conf), or choose "backend": "mooncake"'
        )
    entries = read_mmc_local_config(path, source)
    url = entries.get("ock.mmc.meta_service_url", "")
    if not re.match(r"^tcp://[^:/]+:\d+$", url):
        raise ConfigError(
            f"{source}={path!r}: ock.mmc.meta_service_url must be tcp://host:port, got {url or 'nothing'!r}"
        )
    return MemcacheSettings(
        local_config_path=str(path),
        meta_service_url=url,
        device_id=pool.memcache_device_id,
        ssd_devices=_memcache_ssd_devices(entries, f"{source}={path!r}"),
    )


MMC_STORAGE_ENABLED = "ock.mmc.local_service.storage.enabled"
UBSIO_DISK_PATH = "ubsio.disk.path"
UBSIO_MEM_SIZE = "ubsio.mem.size_in_gb"
UBSIO_DEVICE_COUNT = "ubsio.standalone.device_count"
UBSIO_MAX_DEVICE_COUNT = 16  # UBS IO's documented range for ubsio.standalone.device_count: 0 to 16
_MOUNTINFO = Path("/proc/self/mountinfo")
_SYS_DEV_BLOCK = Path("/sys/dev/block")


def _memcache_ssd_devices(entries: dict[str, str], where: str) -> tuple[str, ...]:
    """Check memcache's SSD tier (UBS IO) where the host can, before memcache starts: UBS IO takes whole raw block
    devices and refuses mounted ones, so a wrong path otherwise fails deep inside the first pool client's init."""
    enabled = entries.get(MMC_STORAGE_ENABLED, "false")
    if enabled.lower() not in ("true", "false"):
        raise ConfigError(f"{where}: {MMC_STORAGE_ENABLED} must be true or false, got {enabled!r}")
    if enabled.lower() == "false":
        return ()
    mem = entries.get(UBSIO_MEM_SIZE)  # unset: UBS IO's default
    if mem is not None and not (mem.isdigit() and int(mem) > 0):
        raise ConfigError(f"{where}: {UBSIO_MEM_SIZE} must be a whole number of GB, at least 1, got {mem!r}")
    count = entries.get(UBSIO_DEVICE_COUNT)
    if count is not None and not (count.isdigit() and int(count) <= UBSIO_MAX_DEVICE_COUNT):
        raise ConfigError(
            f"{where}: {UBSIO_DEVICE_COUNT} must be a whole number from 0 to {UBSIO_MAX_DEVICE_COUNT} (the memcache "
            f"local services on this host that give DRAM), got {count!r}"
        )
    paths = [p.strip() for p in entries.get(UBSIO_DISK_PATH, "").split(":")]
    if paths == [""]:
        raise ConfigError(
            f"{where}: {MMC_STORAGE_ENABLED} is true but {UBSIO_DISK_PATH} is not set; give the raw block devices "
            "of the SSD tier, colon-separated (e.g. /dev/nvme1n1:/dev/nvme2n1)"
        )
    mountinfo = _MOUNTINFO.read_text() if _MOUNTINFO.exists() else ""
    mounted = {fields[2] for fields in map(str.split, mountinfo.splitlines()) if len(fields) > 2}
    seen: dict[int, str] = {}
    for dev in paths:
        problem = _raw_device_problem(dev, mounted, seen)
        if problem:
            raise ConfigError(f"{where}: {UBSIO_DISK_PATH} entry {dev!r} {problem}; UBS IO needs raw disks of its own")
    logger.info("memcache SSD tier on (%s): %d raw device(s) %s", where, len(paths), ":".join(paths))
    return tuple(paths)


def _raw_device_problem(dev: str, mounted: set[str], seen: dict[int, str]) -> str | None:
    """Why ``dev`` cannot be a UBS IO device (None if it can); ``seen`` collects the devices already checked."""
    if not os.path.isabs(dev):
        return "is not an absolute path"
    try:
        st = os.stat(dev)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISBLK(st.st_mode):
        return "is not a block device"
    number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if number in mounted:
        return f"is mounted (device {number} in {_MOUNTINFO})"
    if st.st_rdev in seen:
        return f"is the same device as {seen[st.st_rdev]!r}"
    seen[st.st_rdev] = dev
    sys_dir = _SYS_DEV_BLOCK / number
    if sys_dir.is_dir() and any((child / "partition").exists() for child in sys_dir.iterdir()):
        return "has partitions (give an unused partition, or a disk without any)"
    return None


def parse_config(extra_config: dict[str, Any] | None, env: dict[str, str] | None = None) -> ResolvedConfig:
    """Parse ``kv_connector_extra_config`` and the pool files it points to; raise ConfigError on any mistake."""
    env = dict(os.environ) if env is None else env
    if extra_config is None:
        extra_config = {}
    if not isinstance(extra_config, dict):
        raise ConfigError(f"kv_connector_extra_config: expected a JSON object, got {type(extra_config).__name__}")
    extra_config, notes = _translate_peer_keys(extra_config)
    pool = _convert(extra_config, PoolConfig, "kv_connector_extra_config")
    if pool.backend == "mooncake":
        return ResolvedConfig(pool=pool, mooncake=_mooncake_settings(pool, env), notes=notes)
    return ResolvedConfig(pool=pool, memcache=_memcache_settings(pool, env), notes=notes)
