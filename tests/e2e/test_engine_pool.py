"""The connector on a real vLLM CPU engine with a real Mooncake Store: save in one engine process, load in a fresh one.

The oracle is greedy decoding of a random-weight model: outputs with pool hits must equal a no-connector run token
for token, and a tampered pool object must change them (so a connector that loads nothing could not pass).
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from kvpool_connector import compat
from kvpool_connector.kv_events import MEDIUM
from kvpool_testkit.client import KVEventSubscriber, wait_for
from kvpool_testkit.engine import EngineSpec, run_engine
from kvpool_testkit.inspection import prompt_block_keys, worker_shard
from kvpool_testkit.mooncake_pool import connector_config
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.workloads import distinct_prompts, expected_pool_hits, standard_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.light_engines]

PROMPTS = standard_prompts()
EXPECTED_HITS = expected_pool_hits(PROMPTS)  # [256, 384, 255, 0]
BLOCK = 128


def pool_config(mooncake: dict) -> dict:
    return connector_config(mooncake, reconnect_interval_s=1.0)


@pytest.fixture(scope="module")
def baseline(standard_baseline):
    return standard_baseline


@pytest.fixture(scope="module")
def saved(tiny_model, pool, tmp_path_factory):
    """First engine: empty pool; saves every full prompt block (one prompt at a time, like separate requests)."""
    spec = EngineSpec(
        model=tiny_model, prompts=PROMPTS, kv_transfer_config=pool_config(pool.client_config()), sequential=True
    )
    return run_engine(spec, tmp_path_factory.mktemp("save"))


@pytest.fixture(scope="module")
def loaded(tiny_model, pool, saved, tmp_path_factory):
    """A fresh engine process on the now warm pool."""
    spec = EngineSpec(model=tiny_model, prompts=PROMPTS, kv_transfer_config=pool_config(pool.client_config()))
    return run_engine(spec, tmp_path_factory.mktemp("load"))


@pytest.mark.vllm_engines
def test_empty_pool_run_matches_baseline(saved, baseline):
    assert saved.outputs == baseline.outputs
    assert "Traceback" not in saved.log


@pytest.mark.vllm_engines
def test_fresh_engine_loads_from_pool(loaded, baseline):
    assert [r.num_cached_tokens for r in loaded.results] == EXPECTED_HITS
    assert next(r.num_cached_tokens for r in baseline.results) == 0  # the baseline computed the first prompt
    assert loaded.outputs == baseline.outputs
    # 2 + 3 + 2 blocks come from the pool; prompt 2 shares its first two blocks with prompt 1, which vLLM's own
    # prefix cache may serve instead when both are in one batch.
    assert 5 <= loaded.loaded_blocks <= 7


@pytest.mark.vllm_engines
def test_a_fresh_engine_loading_synchronously_answers_alike(tiny_model, pool, saved, baseline, tmp_path):
    """``load_async: false`` and ``lookup_async: false``: hits asked inside the scheduler loop, loaded before the
    forward pass."""
    config = connector_config(pool.client_config(), reconnect_interval_s=1.0, load_async=False, lookup_async=False)
    run = run_engine(EngineSpec(model=tiny_model, prompts=PROMPTS, kv_transfer_config=config), tmp_path)
    assert [r.num_cached_tokens for r in run.results] == EXPECTED_HITS
    assert run.outputs == baseline.outputs
    assert "Traceback" not in run.log


def test_tampered_object_changes_output(tiny_model, pool, loaded, baseline, mooncake_client, tmp_path):
    """Overwrite one stored block with other bytes of the same size: the next load must produce other tokens."""
    from mooncake.store import ReplicateConfig

    keys = prompt_block_keys(worker_shard(loaded.log), PROMPTS[2])
    assert mooncake_client.batch_is_exist(keys) == [1, 1], "the pool should hold the exact-multiple prompt's blocks"
    size = mooncake_client.get_size(keys[0])
    assert size > 0
    noise = np.random.default_rng(1).standard_normal(size // 4).astype(np.float32)
    original = np.empty_like(noise)
    for buf in (noise, original):
        mooncake_client.register_buffer(buf.ctypes.data, buf.nbytes)
    assert mooncake_client.get_into(keys[0], original.ctypes.data, original.nbytes) == size

    def replace_object(buf: np.ndarray) -> None:
        assert mooncake_client.remove(keys[0], True) == 0  # force: lookups hold short leases on the object
        assert mooncake_client.put_from(keys[0], buf.ctypes.data, buf.nbytes, ReplicateConfig()) == 0

    replace_object(noise)
    spec = EngineSpec(model=tiny_model, prompts=PROMPTS, kv_transfer_config=pool_config(pool.client_config()))
    try:
        tampered = run_engine(spec, tmp_path)
    finally:
        replace_object(original)  # later tests load this block again
    assert tampered.results[2].num_cached_tokens == 255
    assert tampered.outputs[2] != baseline.outputs[2]
    assert tampered.outputs[:2] == baseline.outputs[:2]
    assert tampered.outputs[3] == baseline.outputs[3]


@pytest.mark.vllm_engines
def test_shared_memory_client_saves_and_loads(tiny_model, pool, saved, baseline, tmp_path):
    """Workers attached to the pool node through shared memory (``real_client_address``), their KV cache placed in
    memory the node maps: they load what an engine with its own transfer engine saved, save new blocks, and a fresh
    engine loads those; outputs never change."""
    mooncake = pool.client_config(shared_memory=True)
    fresh = distinct_prompts(2, 2 * 128 + 7, seed=21)
    first = run_engine(
        EngineSpec(model=tiny_model, prompts=fresh, kv_transfer_config=pool_config(mooncake), sequential=True),
        tmp_path / "first",
    )
    assert [r.num_cached_tokens for r in first.results] == [0, 0]
    second = run_engine(
        EngineSpec(model=tiny_model, prompts=PROMPTS + fresh, kv_transfer_config=pool_config(mooncake)),
        tmp_path / "second",
    )
    assert [r.num_cached_tokens for r in second.results] == [*EXPECTED_HITS, 256, 256]
    assert second.outputs == baseline.outputs + first.outputs
    assert "Traceback" not in first.log + second.log
    for run in (first, second):
        if compat.places_kv_cache():  # the KV cache sat in memory the node maps: loads made one copy
            assert "placed in the pool client's memory: loads land in its pages in one copy" in run.log
        else:  # vLLM 0.23 lets no connector place it: one line says so, and transfers copy through the shared areas
            assert f"is off: vLLM {compat.VLLM_VERSION} does not let a connector choose" in run.log


def test_unreachable_pool_serves_with_misses(tiny_model, baseline, tmp_path):
    dead = {
        "master_server_address": f"127.0.0.1:{reserve_port()}",
        "local_hostname": "127.0.0.1",
        "global_segment_size": 0,
        "local_buffer_size": 0,
    }
    run = run_engine(EngineSpec(model=tiny_model, prompts=PROMPTS, kv_transfer_config=pool_config(dead)), tmp_path)
    assert run.outputs == baseline.outputs
    assert [r.num_cached_tokens for r in run.results] == [r.num_cached_tokens for r in baseline.results]
    assert "not connected yet: counting lookups as misses" in run.log
    assert "Traceback" not in run.log


@pytest.mark.vllm_engines
def test_multiconnector_load_comes_from_the_child_with_blocks(tiny_model, pool, loaded, baseline, tmp_path):
    """ExampleConnector (first, empty storage) beside ours: MultiConnector must take the hits from our pool. With
    vLLM's KV events on, the blocks our child saves are published as the pool tier (MultiConnector forwards each
    child its workers' reports): one ``BlockStored`` per block with medium ``KVPOOL``, the tokens, and the very hash
    and parent vLLM's own events give the block in its KV cache, so a router can match the two tiers."""
    from vllm.distributed.kv_events import BlockStored

    config = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "connectors": [
                {
                    "kv_connector": "ExampleConnector",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "example-storage")},
                },
                pool_config(pool.client_config()),
            ]
        },
    }
    new_prompt = distinct_prompts(1, 2 * BLOCK + 10, seed=71)[0]  # new to the pool: its 2 full blocks are saved
    prompts = [PROMPTS[0], PROMPTS[3], new_prompt]
    subscriber = KVEventSubscriber(f"tcp://127.0.0.1:{reserve_port()}")
    events_config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": subscriber.endpoint}
    try:
        spec = EngineSpec(
            model=tiny_model,
            prompts=prompts,
            kv_transfer_config=config,
            extra_llm_args={"kv_events_config": events_config},
        )
        run = run_engine(spec, tmp_path)
        wait_for(lambda: len(subscriber.pool_tier()) >= 2, 10, "the pool tier's BlockStored events")
    finally:
        subscriber.close()
    assert [r.num_cached_tokens for r in run.results] == [EXPECTED_HITS[0], 0, 0]
    assert run.outputs[:2] == [baseline.outputs[0], baseline.outputs[3]]
    assert run.loaded_blocks == 2

    stored = subscriber.pool_tier()
    assert [e.token_ids for e in stored] == [new_prompt[:BLOCK], new_prompt[BLOCK : 2 * BLOCK]]
    own_tier = {}  # vLLM's events for its KV cache: one event may list several blocks, their tokens concatenated
    for e in subscriber.events:
        if isinstance(e, BlockStored) and e.medium != MEDIUM:
            parents = [e.parent_block_hash, *e.block_hashes[:-1]]
            extra_keys = e.extra_keys or [None] * len(e.block_hashes)
            for i, block_hash in enumerate(e.block_hashes):
                tokens = e.token_ids[i * BLOCK : (i + 1) * BLOCK]
                own_tier[block_hash] = (tokens, parents[i], extra_keys[i], e.lora_name, getattr(e, "session_id", None))
    for event in stored:  # vLLM stored the same block in its KV cache under the same hash, with the same keys
        [extra_keys] = event.extra_keys
        published = (
            event.token_ids,
            event.parent_block_hash,
            extra_keys,
            event.lora_name,
            getattr(event, "session_id", None),
        )
        assert own_tier[event.block_hashes[0]] == published


def test_an_engine_started_while_the_master_is_stopped_serves_then_connects(tiny_model, pool, tmp_path):
    """A master that accepts connections but does not answer (SIGSTOP) at engine start: the engine starts anyway
    (start-up waits ``startup_wait_s`` for the pool, never on a client call that holds the GIL), serves with misses,
    and takes hits once the master answers again."""
    from kvpool_testkit.client import cached_tokens, complete, wait_for
    from kvpool_testkit.engine import engine_env
    from kvpool_testkit.server import vllm_server

    config = connector_config(pool.client_config(), reconnect_interval_s=1.0, startup_wait_s=3.0)
    prompt = distinct_prompts(1, 2 * 128 + 9, seed=41)[0]
    args = ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]
    pool.master.send_signal(signal.SIGSTOP)
    try:
        with vllm_server(tiny_model, tmp_path, config, args, env=engine_env()) as server:
            miss = complete(server.url, tiny_model, prompt, 8, return_token_ids=True)
            assert cached_tokens(miss) == 0
            pool.master.send_signal(signal.SIGCONT)
            wait_for(lambda: server.log_text().count(") connected") >= 2, 60, "the worker and lookup clients connected")

            def hit() -> bool:
                answer = complete(server.url, tiny_model, prompt, 8, return_token_ids=True)
                assert answer["choices"][0]["token_ids"] == miss["choices"][0]["token_ids"]
                return cached_tokens(answer) == 256

            wait_for(hit, 30, "a pool hit")
            assert "not connected after 3.0 s of start-up; serving without it" in server.log_text()
    finally:
        pool.master.send_signal(signal.SIGCONT)
