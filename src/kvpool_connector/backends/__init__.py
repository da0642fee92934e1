"""Pool backends, one module per pool, selected by ``backend`` in the connector's config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpool_connector.backends.base import Outcome, PoolBackend, PoolUnavailable, RegistrationRefused

if TYPE_CHECKING:
    from kvpool_connector.config import ResolvedConfig
    from kvpool_connector.devices import DeviceRuntime

__all__ = [
    "Outcome",
    "PoolBackend",
    "PoolUnavailable",
    "RegistrationRefused",
    "create_backend",
    "max_buffers_per_object",
]


def create_backend(
    config: ResolvedConfig,
    *,
    holds_data: bool,
    device_id: int = 0,
    runtime: DeviceRuntime | None = None,
    kv_cache_bytes: int = 0,
) -> PoolBackend:
    """A not-yet-connected backend for ``config``.

    ``holds_data`` is False for the scheduler's lookup client, which contributes no pool memory;
    ``runtime`` tells where a call's buffers live (device or host memory: memcache's direction); ``kv_cache_bytes`` asks
    a Mooncake shared-memory client for that much memory to place the KV cache in (see ``kv_allocation``).
    """
    if config.pool.backend == "mooncake":
        from kvpool_connector.backends.mooncake import MooncakeBackend

        assert config.mooncake is not None
        return MooncakeBackend(config.mooncake, holds_data=holds_data, kv_cache_bytes=kv_cache_bytes)
    from kvpool_connector.backends.memcache import MemcacheBackend

    assert config.memcache is not None
    return MemcacheBackend(config.memcache, holds_data=holds_data, device_id=device_id, runtime=runtime)


def max_buffers_per_object(config: ResolvedConfig) -> int | None:
    """How many page buffers one object of the configured pool may gather (None: no limit)."""
    if config.pool.backend == "memcache":
        from kvpool_connector.backends.memcache import MAX_BUFFERS_PER_KEY

        return MAX_BUFFERS_PER_KEY
    return None
