"""vLLM plugin entry point: makes ``"kv_connector": "MemcacheConnectorStoreV1"`` resolvable in every vLLM process.

vLLM calls every ``vllm.general_plugins`` entry point in each process it starts (API server, engine core, workers),
so registering here reaches the spawned processes where a registration from a driver script would not.
Other plugins (vllm-ascend's) may call :func:`register` too; calling it again is harmless.
"""

from __future__ import annotations

import contextlib

from kvpool_connector import compat

CONNECTOR_MODULE = "kvpool_connector.connector"
CONNECTOR_CLASS = "MemcacheConnectorStoreV1"
CONNECTOR_NAMES = ("MemcacheConnectorStoreV1",)


def register() -> None:
    factory = compat.connector_factory()
    for name in CONNECTOR_NAMES:
        # ValueError: already registered, by an earlier call or by another plugin that ships this name.
        with contextlib.suppress(ValueError):
            factory.register_connector(name, CONNECTOR_MODULE, CONNECTOR_CLASS)
