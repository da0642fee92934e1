"""MTP speculative decoding (DeepSeek's next-token-prediction layer) with the pool, in real vLLM CPU engines.

The model: ``build_mtp``, a tiny DeepSeek-V3 (MLA, dense, float32) whose checkpoint carries one MTP layer at
``model.layers.3``; ``speculative_config={"method": "mtp"}`` runs it as the drafter (vLLM maps only V3/V3.2 configs to
``DeepSeekMTPModel``). vLLM CPU 0.32 picks AMX_MLA (bf16 only) on a CPU with AMX, for the target and, separately, for
the drafter, so both are asked for CPU_MLA (any dtype, 16-token blocks; vLLM then turns its own prefix cache off:
every hit below is the connector's). Seen here, and asserted:

- the drafter's MLA layer is one more layer of the same (single) KV cache group: each block object holds 4 layers
  (the target's 3 and the MTP layer's), and what the pool stores is byte for byte what vLLM's reference connector
  (``ExampleConnector``) stores for the same prompt, the drafter's layer included (vLLM 0.32 defers the connector's
  ``wait_for_save`` until the drafter has run, so its KV of the step is in the pages when the connector copies them);
- an MTP engine and an engine without speculation on the same checkpoint are keyed apart (other shard fingerprint:
  the drafter's model config, the checkpoint with vLLM's MTP override, is part of the key): neither loads the other's
  blocks (they also differ in size, 4 layers against 3);
- an MTP engine takes every full block but the last back from the pool, its own and in a fresh engine, before and
  after vLLM's prefix cache is reset: with a drafter that reads the target's hidden states vLLM recomputes the last
  block of every hit (the drafter's KV at a block's last position came from the next block's first token), and so
  does the connector.

The oracle of the computed answers is vLLM's reference connector in an MTP engine; of the hits, vLLM's own
MooncakeStoreConnector in an MTP engine on the same pool, whose hits are as long (its last block dropped too). Not an
engine without speculation: on vLLM CPU 0.32 the MTP engine's greedy answers for this random model differ from the
same model's without speculation (with no connector at all; ngram speculation on the same model keeps them), and
differ between a computed prompt and one whose blocks were loaded, by hit length. So: computed passes answer like the
reference's, every pool hit like vLLM's connector's hit of the same 80 tokens, and the pool holds what the reference
stores.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvpool_testkit.engine import EngineRun, EngineSpec, engine_env, passes, run_engine, run_twice
from kvpool_testkit.inspection import prompt_block_keys, worker_block_bytes, worker_shard
from kvpool_testkit.mooncake_pool import vllm_store_connector
from kvpool_testkit.tiny_model import build_mtp
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

BLOCK = 16  # CPU_MLA's block size
PROMPTS = distinct_prompts(2, 6 * BLOCK + 5, seed=35)  # six full blocks each
MAX_TOKENS = 12
FULL_HIT = 6 * BLOCK
HIT = 5 * BLOCK  # vLLM recomputes the last block of a hit when a drafter reads hidden states; so does the pool
LAYERS, LATENT = 4, 576  # 3 target layers + the MTP layer; MLA's latent (512) + rope (64)
CPU_MLA = {"attention_config": {"backend": "CPU_MLA"}}
MTP = CPU_MLA | {"speculative_config": {"method": "mtp", "num_speculative_tokens": 1, "attention_backend": "CPU_MLA"}}


@pytest.fixture(scope="module")
def mtp_model(models_dir) -> str:
    return str(build_mtp(models_dir / "tiny-mtp"))


def pooled(model: str, pool, workdir, extra: dict) -> EngineRun:
    return run_twice(
        EngineSpec(model, PROMPTS, MAX_TOKENS, kv_transfer_config=pool.connector_config(), extra_llm_args=extra),
        workdir,
    )


@pytest.fixture(scope="module")
def engines(mtp_model, pool, tmp_path_factory) -> dict[str, EngineRun]:
    """One engine at a time on one pool: without speculation, then MTP (saves), then a fresh MTP engine."""
    root = tmp_path_factory.mktemp("mtp")
    plain = pooled(mtp_model, pool, root / "plain", CPU_MLA)
    saved = pooled(mtp_model, pool, root / "saved", MTP)
    fresh = pooled(mtp_model, pool, root / "fresh", MTP)
    return {"plain": plain, "saved": saved, "fresh": fresh}


def reference_run(model: str, workdir, kv_transfer_config: dict, prompts: list, env: dict | None = None) -> EngineRun:
    spec = EngineSpec(
        model,
        prompts,
        MAX_TOKENS,
        kv_transfer_config=kv_transfer_config,
        sequential=True,
        enable_prefix_caching=False,
        extra_llm_args=MTP,
    )
    return run_engine(spec, workdir, env=env)


@pytest.fixture(scope="module")
def reference(mtp_model, tmp_path_factory) -> tuple[EngineRun, object]:
    """An MTP engine with vLLM's reference connector (files, no pool): the prompts computed and stored."""
    root = tmp_path_factory.mktemp("mtp-reference")
    files = {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}
    files["kv_connector_extra_config"] = {"shared_storage_path": str(root / "kv")}
    return reference_run(mtp_model, root, files, PROMPTS), root / "kv"


@pytest.fixture(scope="module")
def vllm_pool_hits(mtp_model, pool, tmp_path_factory) -> EngineRun:
    """An MTP engine with vLLM's own MooncakeStoreConnector on the same pool: the prompts computed, then its hits,
    which drop the last block as vLLM's prefix cache does (the oracle of the pool's hits: the same hit length)."""
    root = tmp_path_factory.mktemp("mtp-vllm-store")
    config, env = vllm_store_connector(pool, root)
    return reference_run(mtp_model, root, config, PROMPTS * 2, env=engine_env(env))


def test_mtp_saves_its_layer_with_the_targets_and_hits_every_full_block_but_the_last(
    engines, reference, vllm_pool_hits
):
    saved, fresh = engines["saved"], engines["fresh"]
    computed = reference[0].outputs
    assert [r.num_cached_tokens for r in vllm_pool_hits.results] == [0, 0, HIT, HIT]  # the same hits as the pool's
    assert vllm_pool_hits.outputs[:2] == computed
    hit = vllm_pool_hits.outputs[2:]
    assert passes(saved) == ([0, 0], [HIT, HIT])
    assert (saved.loaded_before_reset, saved.loaded_blocks) == (0, 10)
    assert saved.outputs == computed + hit
    assert passes(fresh) == ([HIT, HIT], [HIT, HIT])
    assert (fresh.loaded_before_reset, fresh.loaded_blocks) == (10, 20)
    assert fresh.outputs == hit * 2
    for run in (saved, fresh):
        assert "MemcacheConnectorStoreV1 worker: 4 layers" in run.log
        assert "Resolved architecture: DeepSeekMTPModel" in run.log
        assert not any(k.startswith(("load_failed", "save_failed")) for t in run.worker_totals for k in t)


def test_an_engine_without_mtp_is_keyed_apart(engines):
    plain, saved = engines["plain"], engines["saved"]
    assert passes(plain) == ([0, 0], [FULL_HIT, FULL_HIT])  # no drafter: whole hits
    assert (plain.loaded_before_reset, plain.loaded_blocks) == (0, 12)
    assert plain.outputs[:2] == plain.outputs[2:]
    assert "MemcacheConnectorStoreV1 worker: 3 layers" in plain.log
    # The MTP engine came second and took none of the plain engine's blocks (checked above: its first pass missed).
    assert worker_shard(plain.log) != worker_shard(saved.log)
    assert worker_block_bytes(saved.log) == LAYERS * BLOCK * LATENT * 4  # float32
    assert worker_block_bytes(plain.log) == (LAYERS - 1) * BLOCK * LATENT * 4


def test_the_pool_holds_what_vllms_reference_connector_stores_the_drafter_layer_included(
    engines, reference, mooncake_client
):
    from safetensors.torch import load_file

    _, files = reference
    stored_by_reference = [
        [
            load_file(str(folder / f"model.layers.{layer}.self_attn.attn.safetensors"))["kv_cache"].numpy()
            for layer in range(LAYERS)
        ]
        for folder in sorted(files.iterdir())
    ]
    assert len(stored_by_reference) == len(PROMPTS)
    shard = worker_shard(engines["fresh"].log)
    for prompt in PROMPTS:
        objects = [
            np.frombuffer(mooncake_client.get(key), dtype=np.float32).reshape(LAYERS, BLOCK, LATENT)
            for key in prompt_block_keys(shard, prompt, BLOCK)
        ]
        assert len(objects) == FULL_HIT // BLOCK
        stored = np.concatenate(objects, axis=1)
        matches = [all(np.array_equal(stored[i], ref[i]) for i in range(LAYERS)) for ref in stored_by_reference]
        assert matches.count(True) == 1, [float(np.abs(stored[3] - ref[3]).max()) for ref in stored_by_reference]
        assert np.abs(stored[LAYERS - 1]).sum() > 0  # the MTP layer's KV, not empty pages
