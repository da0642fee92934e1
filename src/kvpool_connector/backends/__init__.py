"""Pool backends, one module per pool, selected by ``backend`` in the connector's config: the only place a pool's name
is turned into its code.

The registry (``BACKENDS``) names each pool's module; that module's ``BACKEND`` is its :class:`PoolBackend` class,
which owns everything about the pool: its keys of the connector's config and their parsing (``config_keys``,
``parse_settings``), its client, and the answers the layers above would otherwise have to ask by name. A backend's
module is imported only when the config names it: each pool's client package is optional.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kvpool_connector.backends.base import (
    ClientRole,
    HandedOutMemory,
    Outcome,
    PoolBackend,
    PoolUnavailable,
    RegistrationRefused,
)
from kvpool_connector.errors import ConfigError

if TYPE_CHECKING:
    from kvpool_connector.config import ResolvedConfig

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "ClientRole",
    "HandedOutMemory",
    "Outcome",
    "PoolBackend",
    "PoolUnavailable",
    "RegistrationRefused",
    "backend_class",
    "backend_type",
    "create_backend",
]

BACKENDS = {
    "memcache": "kvpool_connector.backends.memcache",
    "mooncake": "kvpool_connector.backends.mooncake",
}
"""Each pool's name in the config (``backend``) and the module that holds its ``BACKEND`` class."""
DEFAULT_BACKEND = "memcache"  # vllm-ascend's deployments name no backend: their pool is memcache


def backend_type(name: str) -> type[PoolBackend]:
    """The backend class of the pool ``name`` (one of ``BACKENDS``)."""
    if name not in BACKENDS:
        raise ConfigError(f"`backend`: no pool named {name!r} (allowed: {', '.join(BACKENDS)})")
    backend: type[PoolBackend] = importlib.import_module(BACKENDS[name]).BACKEND
    return backend


def backend_class(config: ResolvedConfig) -> type[PoolBackend]:
    """The backend class of ``config.pool.backend``."""
    return backend_type(config.pool.backend)


def create_backend(config: ResolvedConfig, role: ClientRole) -> PoolBackend:
    """A not-yet-connected client of the configured pool, for ``role``."""
    return backend_class(config).from_config(config, role)
