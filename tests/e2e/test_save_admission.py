"""Saves admitted by expected reuse (``save_admission: "second_sight"``) on real vLLM CPU engines and a real Mooncake
Store: a prompt computed once leaves only its sightings in the pool, computed again (by a fresh engine: the sightings
are the fleet's memory, not one engine's) it is saved, and a third engine loads it with the no-connector answer; a
P/D producer saves at the first sight, so its consumer hits. The pool is inspected directly, with keys derived
independently of the connector (vLLM's own block hash)."""

from __future__ import annotations

import pytest

from kvpool_testkit.engine import EngineSpec, run_engine
from kvpool_testkit.inspection import prompt_block_keys, worker_shard
from kvpool_testkit.workloads import distinct_prompts, expected_pool_hits

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

ONE_OFF, REPEATED, PRODUCED = distinct_prompts(3, 3 * 128 + 20, seed=34)
PROMPTS = [ONE_OFF, REPEATED, PRODUCED]
MAX_TOKENS = 12


def run(tiny_model, pool, tmp_path_factory, prompts, role="kv_both"):
    config = pool.connector_config(role, reconnect_interval_s=1.0, save_admission="second_sight")
    spec = EngineSpec(model=tiny_model, prompts=prompts, kv_transfer_config=config, sequential=True)
    return run_engine(spec, tmp_path_factory.mktemp(role))


def sighting_keys(block_keys: list[str]) -> list[str]:
    """``kvp1/<shard>/<hash>`` -> ``kvp1/<shard>/seen/<hash>``: the documented sighting key of each block."""
    return [f"{prefix}/seen/{block_hash}" for prefix, _, block_hash in (key.rpartition("/") for key in block_keys)]


@pytest.fixture(scope="module")
def first_sight(tiny_model, pool, tmp_path_factory):
    return run(tiny_model, pool, tmp_path_factory, [ONE_OFF, REPEATED])


@pytest.fixture(scope="module")
def second_sight(tiny_model, pool, first_sight, tmp_path_factory):
    return run(tiny_model, pool, tmp_path_factory, [REPEATED])


@pytest.fixture(scope="module")
def keys_of(first_sight):
    shard = worker_shard(first_sight.log)
    return lambda prompt: prompt_block_keys(shard, prompt)


def test_a_prompt_computed_once_leaves_only_its_sightings(first_sight, keys_of, mooncake_client, baseline_outputs):
    assert first_sight.outputs == baseline_outputs[:2]
    for prompt in (ONE_OFF, REPEATED):
        assert mooncake_client.batch_is_exist(keys_of(prompt)) == [0, 0, 0]
        assert mooncake_client.batch_is_exist(sighting_keys(keys_of(prompt))) == [1, 1, 1]
    totals = first_sight.worker_totals[0]
    assert totals.get("saved_blocks", 0) == 0
    assert totals["sightings_recorded"] == 6


def test_a_prompt_computed_again_by_another_engine_is_saved(second_sight, keys_of, mooncake_client, baseline_outputs):
    assert second_sight.results[0].num_cached_tokens == 0  # sighted, not stored: computed once more
    assert second_sight.outputs == [baseline_outputs[1]]
    assert second_sight.worker_totals[0]["saved_blocks"] == 3
    assert mooncake_client.batch_is_exist(keys_of(REPEATED)) == [1, 1, 1]
    assert mooncake_client.batch_is_exist(keys_of(ONE_OFF)) == [0, 0, 0]


def test_a_third_engine_loads_what_the_second_sight_saved(
    tiny_model, pool, second_sight, tmp_path_factory, baseline_outputs
):
    third = run(tiny_model, pool, tmp_path_factory, [REPEATED])
    assert [r.num_cached_tokens for r in third.results] == expected_pool_hits([REPEATED])
    assert third.outputs == [baseline_outputs[1]]


def test_a_pd_producer_saves_at_the_first_sight_and_its_consumer_hits(
    tiny_model, pool, keys_of, mooncake_client, tmp_path_factory, baseline_outputs
):
    producer = run(tiny_model, pool, tmp_path_factory, [PRODUCED], role="kv_producer")
    assert producer.worker_totals[0]["saved_blocks"] == 3
    assert mooncake_client.batch_is_exist(keys_of(PRODUCED)) == [1, 1, 1]
    consumer = run(tiny_model, pool, tmp_path_factory, [PRODUCED], role="kv_consumer")
    assert [r.num_cached_tokens for r in consumer.results] == expected_pool_hits([PRODUCED])
    assert consumer.outputs == [baseline_outputs[2]]
