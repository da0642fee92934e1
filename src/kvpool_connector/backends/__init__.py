"""Pool backends, one module per pool, selected by ``backend`` in the connector's config: the only place a pool's name
is turned into its code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpool_connector.backends.base import (
    ClientRole,
    HandedOutMemory,
    Outcome,
    PoolBackend,
    PoolUnavailable,
    RegistrationRefused,
)

if TYPE_CHECKING:
    from kvpool_connector.config import ResolvedConfig

__all__ = [
    "ClientRole",
    "HandedOutMemory",
    "Outcome",
    "PoolBackend",
    "PoolUnavailable",
    "RegistrationRefused",
    "backend_class",
    "create_backend",
]


def backend_class(config: ResolvedConfig) -> type[PoolBackend]:
    """The backend class of ``config.pool.backend`` (imported on demand: each pool's client package is optional)."""
    if config.pool.backend == "mooncake":
        from kvpool_connector.backends.mooncake import MooncakeBackend

        return MooncakeBackend
    from kvpool_connector.backends.memcache import MemcacheBackend

    return MemcacheBackend


def create_backend(config: ResolvedConfig, role: ClientRole) -> PoolBackend:
    """A not-yet-connected client of the configured pool, for ``role``."""
    return backend_class(config).from_config(config, role)
