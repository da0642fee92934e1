"""The pool with the vLLM features users switch on, each in a real vLLM CPU engine on one Mooncake pool.

Every engine asks the module's prompts twice, one at a time: the first pass computes and saves, then vLLM's own
prefix cache is emptied (the pool is not) and the second pass must take every full block from the pool. The oracle
is a no-connector engine without the feature (greedy decoding: speculation, chunking and parallel sampling do not
change the tokens), or, for an fp8 KV cache, the same engine's own first pass. The engines run in this order on one
pool, so each first pass also says whether the feature's blocks are shared with the engines before it:
1. chunked prefill with a 128-token budget: the plain fp32 layout, saved first;
2. ngram speculative decoding, and the same prompts with a ``cache_salt``: ngram shares the plain blocks (it adds no
   layers), a salted prompt shares nothing with an unsalted one;
3. draft-model speculative decoding: the draft's layers are saved beside the target's, and the draft model is part of
   the key, so nothing is shared with engines without it;
4. an fp8 KV cache, with parallel sampling (n = 2, seeded; greedy sampling takes no n): a quarter of the fp32 bytes
   per block, never shared with the fp32 engines, the same samples from a hit as from the computed prompt;
5. LoRA: one prompt for the base model and two adapters: the base request takes the plain blocks, each adapter's are
   its own (vLLM's block hash names the adapter); then one adapter's weights rewritten under the same name and path,
   in a fresh engine: a miss (the connector keys LoRA requests by the adapter's weights too), new answers;
6. EAGLE speculative decoding (a tiny EAGLE head): the head's attention layer is saved with the target's (5 layers
   a block object instead of 4), keyed apart (the head's weights are part of the key), hits of every full block but
   the last (recomputed, as vLLM's own prefix cache does with such a drafter), identical answers;
7. prompt embeddings and structured outputs: a prompt sent as its input embeddings is keyed by them (vLLM hashes
   the embeddings), apart from the same tokens; a constrained answer is the same from a hit as from the computed
   prompt (constraints act on sampling, not on the prompt's KV).
"""

from __future__ import annotations

import pytest

from kvpool_testkit.engine import EngineRun, EngineSpec, passes, run_twice
from kvpool_testkit.tiny_model import build_eagle, build_lora, build_model
from kvpool_testkit.workloads import distinct_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

BLOCK = 128
PROMPTS = distinct_prompts(2, 3 * BLOCK + 5, seed=35)  # three full blocks each
MAX_TOKENS = 12
FULL_HIT = 3 * BLOCK
LORA = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}


def features(model: str, pool, workdir, prompts=PROMPTS, **spec: object) -> EngineRun:
    config = pool.connector_config()
    return run_twice(EngineSpec(model, prompts, MAX_TOKENS, kv_transfer_config=config, **spec), workdir)


@pytest.fixture(scope="module")
def plain(tiny_model, pool, tmp_path_factory) -> EngineRun:
    return features(tiny_model, pool, tmp_path_factory.mktemp("chunked"), max_num_batched_tokens=BLOCK)


@pytest.fixture(scope="module")
def ngram(tiny_model, pool, plain, tmp_path_factory) -> EngineRun:
    speculation = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    return features(
        tiny_model,
        pool,
        tmp_path_factory.mktemp("ngram"),
        prompts=[*PROMPTS, PROMPTS[0]],
        cache_salts=[None, None, "tenant-a"],
        extra_llm_args={"speculative_config": speculation},
    )


@pytest.fixture(scope="module")
def draft(tiny_model, pool, ngram, models_dir, tmp_path_factory) -> EngineRun:
    drafter = str(build_model(models_dir / "tiny-llama-draft", preset="tiny", seed=1))
    speculation = {"model": drafter, "num_speculative_tokens": 2}
    return features(
        tiny_model, pool, tmp_path_factory.mktemp("draft"), extra_llm_args={"speculative_config": speculation}
    )


@pytest.fixture(scope="module")
def fp8(tiny_model, pool, draft, tmp_path_factory) -> EngineRun:
    return features(
        tiny_model,
        pool,
        tmp_path_factory.mktemp("fp8"),
        extra_llm_args={"kv_cache_dtype": "fp8"},
        sampling={"n": 2, "temperature": 0.8, "seed": 7},
    )


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("adapters")
    return [str(build_lora(root / name, tiny_model, seed)) for name, seed in (("lora-a", 1), ("lora-b", 2))]


@pytest.fixture(scope="module")
def lora(tiny_model, pool, fp8, adapters, tmp_path_factory) -> EngineRun:
    return features(
        tiny_model,
        pool,
        tmp_path_factory.mktemp("lora"),
        prompts=[PROMPTS[0]] * 3,
        adapters=[None, *adapters],
        extra_llm_args=LORA,
    )


@pytest.fixture(scope="module")
def inputs(tiny_model, pool, lora, tmp_path_factory) -> EngineRun:
    return features(
        tiny_model,
        pool,
        tmp_path_factory.mktemp("inputs"),
        embeds=[False, True],
        sampling={"structured_outputs": {"regex": "[a-z]+( [a-z]+)*"}},
        extra_llm_args={"enable_prompt_embeds": True},
    )


@pytest.fixture(scope="module")
def eagle(tiny_model, pool, inputs, tmp_path_factory) -> EngineRun:
    head = str(build_eagle(tmp_path_factory.mktemp("eagle-head"), tiny_model, seed=5))
    speculation = {"method": "eagle", "model": head, "num_speculative_tokens": 2}
    return features(
        tiny_model, pool, tmp_path_factory.mktemp("eagle"), extra_llm_args={"speculative_config": speculation}
    )


def test_chunked_prefill_with_a_small_token_budget_saves_and_hits(plain, baseline_outputs):
    assert passes(plain) == ([0, 0], [FULL_HIT, FULL_HIT])
    assert plain.outputs == baseline_outputs * 2
    assert (plain.loaded_before_reset, plain.loaded_blocks) == (0, 6)


def test_ngram_speculation_shares_the_plain_blocks_and_a_cache_salt_shares_none(ngram, baseline_outputs):
    first, second = passes(ngram)
    assert first == [FULL_HIT, FULL_HIT, 0]  # the plain engine's blocks; the salted prompt is another key
    assert second == [FULL_HIT] * 3
    assert ngram.loaded_before_reset == 6
    assert ngram.outputs == [*baseline_outputs, baseline_outputs[0]] * 2


def test_draft_model_speculation_is_keyed_apart_and_hits_its_own(draft, baseline_outputs):
    assert passes(draft) == ([0, 0], [FULL_HIT, FULL_HIT])
    assert (draft.loaded_before_reset, draft.loaded_blocks) == (0, 6)
    assert draft.outputs == baseline_outputs * 2


def bytes_per_block(run: EngineRun) -> float:
    return sum(t.get("loaded_bytes", 0) for t in run.worker_totals) / run.loaded_blocks


def test_eagle_saves_its_head_layer_with_the_target_keyed_apart_and_hits_its_own(eagle, plain, baseline_outputs):
    # vLLM recomputes the last block of a hit when a drafter reads hidden states, and so does the pool
    assert passes(eagle) == ([0, 0], [FULL_HIT - BLOCK, FULL_HIT - BLOCK])
    assert (eagle.loaded_before_reset, eagle.loaded_blocks) == (0, 4)
    assert bytes_per_block(eagle) * 4 == bytes_per_block(plain) * 5  # the head's layer beside the target's four
    assert eagle.outputs == baseline_outputs * 2
    assert "EAGLE drafter KV cache initialized" in eagle.log


def test_an_fp8_kv_cache_and_parallel_sampling_keyed_apart_with_a_quarter_of_the_bytes(fp8, plain):
    # With n = 2 the second sample of a prompt takes the first's blocks from vLLM's own cache in either pass; the
    # pool's loads tell the passes apart: none before the reset (fp32 blocks are other keys), every block after.
    assert fp8.loaded_before_reset == 0 and fp8.loaded_blocks >= 2 * 3
    assert passes(fp8)[1] == [FULL_HIT, FULL_HIT]
    half = len(PROMPTS)
    assert fp8.outputs[half:] == fp8.outputs[:half]  # a hit samples as the fp8 engine's own computation did

    assert bytes_per_block(fp8) * 4 == bytes_per_block(plain)


def test_lora_adapters_and_the_base_model_never_share_a_block_and_each_hits_its_own(lora, baseline_outputs):
    first, second = passes(lora)
    assert first == [FULL_HIT, 0, 0]  # the base request: the plain engine's blocks; each adapter: none
    assert second == [FULL_HIT] * 3
    assert (lora.loaded_before_reset, lora.loaded_blocks) == (3, 12)
    base, adapter_a, adapter_b = lora.outputs[:3]
    assert base == baseline_outputs[0] and len({tuple(base), tuple(adapter_a), tuple(adapter_b)}) == 3
    assert lora.outputs[3:] == lora.outputs[:3]


def test_an_adapter_rewritten_under_its_name_and_path_misses(lora, tiny_model, pool, adapters, tmp_path):
    build_lora(adapters[0], tiny_model, seed=3)  # other weights, same folder: vLLM's block hash is unchanged
    again = features(tiny_model, pool, tmp_path, prompts=[PROMPTS[0]], adapters=adapters[:1], extra_llm_args=LORA)
    assert passes(again) == ([0], [FULL_HIT])
    assert (again.loaded_before_reset, again.loaded_blocks) == (0, 3)
    assert again.outputs[0] != lora.outputs[1]  # the new weights answer otherwise
    assert again.outputs[1] == again.outputs[0]


def test_prompt_embeddings_are_keyed_apart_and_structured_outputs_hit(inputs):
    first, second = passes(inputs)
    assert first == [FULL_HIT, 0]  # the tokens: the plain engine's blocks; their embeddings: another key
    assert second == [FULL_HIT, FULL_HIT]
    assert (inputs.loaded_before_reset, inputs.loaded_blocks) == (3, 9)
    assert inputs.outputs[2:] == inputs.outputs[:2]
