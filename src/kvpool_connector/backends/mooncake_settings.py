"""Backend "mooncake"'s settings: its keys of ``kv_connector_extra_config``, its environment and its JSON file.

Sources, in the order they are read: an inline ``"mooncake": {...}`` object, else the JSON file named by
``mooncake_config_path`` or ``MOONCAKE_CONFIG_PATH`` (the ``mooncake.json`` vllm-ascend deployments already use,
shared with other Mooncake users: only our keys are read); then ``MOONCAKE_MASTER`` overrides the master's address.
Every mistake raises :class:`ConfigError` naming the key or file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from kvpool_connector.config import convert, parse_size, read_json_file
from kvpool_connector.errors import ConfigError

MOONCAKE_CONFIG_ENV = "MOONCAKE_CONFIG_PATH"
MOONCAKE_MASTER_ENV = "MOONCAKE_MASTER"  # overrides master_server_address, as vllm-ascend and Mooncake's tools do

# Mooncake's own documented defaults (mooncake/mooncake_config.py).
DEFAULT_GLOBAL_SEGMENT_SIZE = 3_355_443_200
DEFAULT_LOCAL_BUFFER_SIZE = 16 << 20
DEFAULT_SHARED_BUFFER_SIZE = 128 << 20
ASCEND_SEGMENT_ALIGN = 1 << 30


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


class MooncakeKeys(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The keys of ``kv_connector_extra_config`` backend "mooncake" reads."""

    mooncake: MooncakeSettings | None = None
    """Inline Mooncake settings; when absent they come from the file named by ``MOONCAKE_CONFIG_PATH``."""
    mooncake_config_path: str | None = None
    """A Mooncake JSON file to read instead of ``MOONCAKE_CONFIG_PATH``."""


def parse_mooncake_settings(section: dict[str, Any], env: Mapping[str, str]) -> MooncakeSettings:
    """The settings from this backend's keys of ``kv_connector_extra_config`` (``section``) and the environment."""
    settings = _as_given(convert(section, MooncakeKeys, "kv_connector_extra_config"), env)
    if master := env.get(MOONCAKE_MASTER_ENV, "").strip():
        try:
            return msgspec.structs.replace(settings, master_server_address=master)
        except ValueError as exc:
            raise ConfigError(f"{MOONCAKE_MASTER_ENV}={master!r}: {exc}") from None
    return settings


def _as_given(keys: MooncakeKeys, env: Mapping[str, str]) -> MooncakeSettings:
    if keys.mooncake is not None:
        return keys.mooncake
    path = keys.mooncake_config_path or env.get(MOONCAKE_CONFIG_ENV)
    source = "mooncake_config_path" if keys.mooncake_config_path else MOONCAKE_CONFIG_ENV
    if not path:
        raise ConfigError(
            'backend "mooncake" needs the pool address: give "mooncake": {"master_server_address": "host:port", ...} '
            f"in kv_connector_extra_config, or a JSON file in {MOONCAKE_CONFIG_ENV}"
        )
    raw = read_json_file(path, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}={path!r}: expected a JSON object, got {type(raw).__name__}")
    # The file is shared with other Mooncake users (MooncakeConnectorV1, vllm-ascend): keep only our keys.
    ours = {k: v for k, v in raw.items() if k in MooncakeSettings.__struct_fields__}
    return convert(ours, MooncakeSettings, f"{source}={path}")
