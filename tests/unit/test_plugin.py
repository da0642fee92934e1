import pytest
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

from kvpool_connector import plugin

pytestmark = pytest.mark.vllm_api


def test_register_is_idempotent_and_resolves_our_class():
    plugin.register()
    plugin.register()
    cls = KVConnectorFactory.get_connector_class_by_name("MemcacheConnectorStoreV1")
    from kvpool_connector.connector import MemcacheConnectorStoreV1

    assert cls is MemcacheConnectorStoreV1


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("kvpool_connector") == "kvpool_connector.plugin:register"
