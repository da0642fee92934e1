"""Pool keys follow the weights: new weights under the same path miss the old weights' blocks, and one checkpoint at
two paths shares its blocks (real vLLM CPU engines, a real Mooncake Store).

The oracle is a no-connector engine on the new weights: the engine whose old-weight blocks sit in the pool must
answer exactly as it does. The old weights answer otherwise (asserted), so a stale hit could not pass unseen.
"""

from __future__ import annotations

import shutil

import pytest

from kvpool_testkit.engine import EngineSpec, run_engine
from kvpool_testkit.mooncake_pool import connector_config
from kvpool_testkit.tiny_model import build_model
from kvpool_testkit.workloads import distinct_prompts, expected_pool_hits

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

PROMPTS = distinct_prompts(4, 2 * 128 + 30, seed=33)
FULL_HITS = expected_pool_hits(PROMPTS)  # 256 tokens each: two full blocks


def spec(model: str, pool=None) -> EngineSpec:
    """One prompt per call, so every run computes the same shapes."""
    transfer = connector_config(pool.client_config(), reconnect_interval_s=1.0) if pool else None
    return EngineSpec(model=model, prompts=PROMPTS, kv_transfer_config=transfer, sequential=True)


@pytest.fixture(scope="module")
def deployed(tiny_model, tmp_path_factory):
    """A model folder a deployment serves from: the tiny Llama's files, copied."""
    folder = tmp_path_factory.mktemp("deployed") / "model"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.fixture(scope="module")
def old_weights_saved(deployed, pool, tmp_path_factory):
    """An engine on the first weights saves every prompt's full blocks."""
    return run_engine(spec(str(deployed), pool), tmp_path_factory.mktemp("old"))


@pytest.fixture(scope="module")
def new_weights(deployed, old_weights_saved, models_dir):
    """Other weights of the same shapes replace the first under the same path (config and tokenizer unchanged), as a
    fine-tune redeployed under one name would."""
    other = build_model(models_dir / "tiny-llama-seed1", preset="tiny", seed=1)
    shutil.copy(other / "model.safetensors", deployed / "model.safetensors")
    return deployed


@pytest.fixture(scope="module")
def new_weights_oracle(new_weights, tmp_path_factory):
    return run_engine(spec(str(new_weights)), tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="module")
def new_weights_with_pool(new_weights, pool, new_weights_oracle, tmp_path_factory):
    return run_engine(spec(str(new_weights), pool), tmp_path_factory.mktemp("new"))


def test_the_old_weights_answer_otherwise(old_weights_saved, new_weights_oracle):
    assert "Traceback" not in old_weights_saved.log
    differing = sum(a != b for a, b in zip(old_weights_saved.outputs, new_weights_oracle.outputs, strict=True))
    assert differing >= len(PROMPTS) - 1, "the oracle must tell the two weights apart"


def test_new_weights_under_the_same_path_miss_the_old_blocks(new_weights_with_pool, new_weights_oracle):
    assert new_weights_with_pool.loaded_blocks == 0
    assert [r.num_cached_tokens for r in new_weights_with_pool.results] == [0] * len(PROMPTS)
    assert new_weights_with_pool.outputs == new_weights_oracle.outputs
    assert "KV pool model identity" in new_weights_with_pool.log


def test_one_checkpoint_at_two_paths_shares_its_blocks(
    new_weights, new_weights_with_pool, new_weights_oracle, pool, tmp_path_factory
):
    """The new weights, mounted at another path (another host's cache folder), load what the first path saved."""
    elsewhere = tmp_path_factory.mktemp("another-host") / "checkpoints" / "same-model"
    shutil.copytree(new_weights, elsewhere)
    run = run_engine(spec(str(elsewhere), pool), tmp_path_factory.mktemp("elsewhere"))
    assert [r.num_cached_tokens for r in run.results] == FULL_HITS
    assert run.loaded_blocks == 2 * len(PROMPTS)
    assert run.outputs == new_weights_oracle.outputs
