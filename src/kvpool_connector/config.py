"""The connector's configuration, parsed once at startup into frozen, typed objects.

Sources, in the order they are read:
1. ``kv_connector_extra_config`` of the connector's ``--kv-transfer-config`` entry (vllm-ascend deployments' JSON works
   as written: ``use_layerwise``, ``memcache_rpc_port``): the keys every pool shares are read here (``PoolConfig``);
2. the named backend's own keys, with the environment and files they point to, by that backend's section parser
   (``backends``' registry: ``PoolBackend.config_keys``, ``PoolBackend.parse_settings``).

Every problem raises :class:`ConfigError` with the offending key and what is allowed, so vLLM fails at startup with
one readable line instead of a traceback from deep inside a pool client. The helpers the backends' parsers share
(``parse_size``, ``convert``, ``read_text_file``, ``read_json_file``) live here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from kvpool_connector import backends
from kvpool_connector.errors import ConfigError

__all__ = ["ConfigError", "PoolConfig", "ResolvedConfig", "convert", "parse_config", "parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*((?:[kmgt]i?)?b?)\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MAX_SIZE = 1 << 60  # sizes go to C++ as 64-bit integers


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


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The keys of ``kv_connector_extra_config`` every pool shares; each backend reads its own besides."""

    backend: str = backends.DEFAULT_BACKEND
    """Which pool: a name in ``backends.BACKENDS`` (``backends.DEFAULT_BACKEND`` when absent)."""
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
    A pool that cannot select objects by key prefix (``PoolBackend.remove_prefix``) keeps them: the reset fails with a
    warning."""
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

    def __post_init__(self) -> None:
        if self.backend not in backends.BACKENDS:
            raise ValueError(f"`backend`: no pool named {self.backend!r} (allowed: {', '.join(backends.BACKENDS)})")
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
    backend_settings: Any = None
    """The settings of the backend ``pool.backend`` names, as its ``parse_settings`` returned them (that backend's
    class reads them; None only in a config built by hand for a test of the common keys)."""
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


def convert(raw: Any, struct: type[msgspec.Struct], source: str) -> Any:
    """``raw`` as ``struct`` (strictly: no string for a number), or one ConfigError line that starts with ``source``
    and, for an unknown key, lists the keys allowed where it was found."""
    try:
        return msgspec.convert(raw, struct, strict=True)
    except msgspec.ValidationError as exc:
        msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))  # keys may hold control chars
        if "unknown field" in msg and (where := _struct_at(struct, msg)) is not None:
            msg += f" (allowed keys: {', '.join(where.__struct_fields__)})"
        raise ConfigError(f"{source}: {msg}") from None


def _struct_at(struct: type[msgspec.Struct], msg: str) -> type[msgspec.Struct] | None:
    """The struct type at the path a msgspec error ends with (`` - at `$.a.b` ``; none: ``struct`` itself)."""
    _, at, path = msg.rpartition(" - at `$")
    info: Any = msgspec.inspect.type_info(struct)
    for name in path.rstrip("`").split(".")[1:] if at else ():
        field = next((f for f in info.fields if f.encode_name == name), None)
        if field is None:
            return None
        types = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        info = next((t for t in types if isinstance(t, msgspec.inspect.StructType)), None)
        if info is None:
            return None
    return info.cls


def read_text_file(path: str, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}={path!r}: cannot read the file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}={path!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json_file(path: str, source: str) -> Any:
    text = read_text_file(path, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}={path!r}: not valid JSON ({exc})") from None


def parse_config(extra_config: dict[str, Any] | None, env: Mapping[str, str] | None = None) -> ResolvedConfig:
    """Parse ``kv_connector_extra_config`` and the pool files it points to; raise ConfigError on any mistake."""
    env = dict(os.environ) if env is None else env
    if extra_config is None:
        extra_config = {}
    if not isinstance(extra_config, dict):
        raise ConfigError(f"kv_connector_extra_config: expected a JSON object, got {type(extra_config).__name__}")
    extra_config, notes = _translate_peer_keys(extra_config)
    common = {k: v for k, v in extra_config.items() if k in PoolConfig.__struct_fields__}
    pool = convert(common, PoolConfig, "kv_connector_extra_config")
    backend = backends.backend_type(pool.backend)
    section = {k: v for k, v in extra_config.items() if k in backend.config_keys}
    for key in extra_config:
        if key not in common and key not in section:
            _refuse_key(key, pool.backend, [*PoolConfig.__struct_fields__, *backend.config_keys])
    return ResolvedConfig(pool=pool, backend_settings=backend.parse_settings(section, env), notes=notes)


def _refuse_key(key: str, chosen: str, allowed: list[str]) -> None:
    """A key that is neither common nor the chosen backend's: another backend's, or unknown."""
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(key))
    owner = next((name for name in backends.BACKENDS if key in backends.backend_type(name).config_keys), None)
    if owner is not None:
        raise ConfigError(
            f"kv_connector_extra_config: `{printable}` is a key of backend {owner!r}, and this config selects backend "
            f'{chosen!r}: remove it, or give "backend": "{owner}"'
        )
    raise ConfigError(
        f"kv_connector_extra_config: Object contains unknown field `{printable}` (allowed keys: {', '.join(allowed)})"
    )
