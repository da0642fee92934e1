"""memcache backend as far as it runs without Ascend: a real meta service, client-only calls, and an engine started with
the field's exact connector config (examples/ascend), whose worker cannot hold pool memory here and must degrade to
misses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvpool_connector.backends.memcache import MemcacheBackend
from kvpool_connector.config import parse_config
from kvpool_testkit.engine import EngineSpec, engine_env, run_engine
from kvpool_testkit.workloads import standard_prompts

SEED_EXTRA = {"use_layerwise": False, "memcache_rpc_port": "0"}


def _settings(meta):
    return parse_config(SEED_EXTRA, env={"MMC_LOCAL_CONFIG_PATH": str(meta.local_config)}).backend_settings


@pytest.mark.memcache_package
def test_lookup_client_talks_to_meta_service(meta):
    backend = MemcacheBackend(_settings(meta), holds_data=False)
    backend.connect()
    assert backend.exists(["kvp1/x/00", "kvp1/x/01"]) == [False, False]
    # A client-only pymmc client must never reach the data path (pymmc would dereference a null client), and host
    # memory is never registered with memcache (register_buffer is for device RDMA).
    backend.register_memory(1, 1)
    assert backend.get(["k"], [[1]], [[1]])[0].value == "unavailable"
    backend.close()


DATA_CLIENT = """
import sys
from kvpool_connector.backends import PoolUnavailable
from kvpool_connector.backends.memcache import MemcacheBackend
from kvpool_connector.config import parse_config
settings = parse_config({"use_layerwise": False, "memcache_rpc_port": "0"}).backend_settings
backend = MemcacheBackend(settings, holds_data=True)
try:
    backend.connect()
except PoolUnavailable as exc:
    print("refused:", exc, flush=True)
"""


@pytest.mark.memcache_package
def test_data_client_without_ascend_is_a_clear_error(meta):
    """In a process of its own: memcache-hybrid 1.2.x aborts at the exit of a process whose BM init failed (a heap
    corruption in its teardown without Ascend), which would take the test run down with it."""
    env = {**os.environ, "MMC_LOCAL_CONFIG_PATH": str(meta.local_config)}
    done = subprocess.run([sys.executable, "-c", DATA_CLIENT], env=env, capture_output=True, text=True, timeout=120)
    assert "refused:" in done.stdout, done.stdout + done.stderr
    assert "Ascend driver and CANN" in done.stdout


@pytest.mark.e2e
@pytest.mark.light_engines
def test_engine_with_seed_config_serves_without_pool(tiny_model, meta, standard_baseline, tmp_path):
    prompts = standard_prompts()[:2]
    config = {"kv_connector": "MemcacheConnectorStoreV1", "kv_role": "kv_both", "kv_connector_extra_config": SEED_EXTRA}
    env = engine_env({"MMC_LOCAL_CONFIG_PATH": str(meta.local_config)})
    run = run_engine(EngineSpec(model=tiny_model, prompts=prompts, kv_transfer_config=config), tmp_path, env=env)
    assert run.outputs == standard_baseline.outputs[:2]
    # The worker's pool cannot hold data here: saves are skipped with a warning naming the worker's pool, whether
    # they come before its memcache init has failed ("not connected yet") or after ("unavailable").
    assert "KV pool (worker" in run.log
    assert "not connected yet" in run.log or "unavailable, serving without pool hits" in run.log
    assert "Traceback" not in run.log
