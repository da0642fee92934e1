"""The connector inside the installed vLLM's real scheduler loop, without an engine (``scheduler_loop``): saves while
prompts prefill and decode, a fresh scheduler and worker loading every full prompt block from the pool
(asynchronously and synchronously), and preemption in a KV cache too small for the batch. Runs on every vLLM release
in the tested range, a CUDA build on a host without a GPU included (no engine can run there).

The oracle of every test, checked after every step: each position a scheduled request computed or loaded holds
exactly the bytes the forward pass's stand-in writes for its token prefix, in every layer; and every request's
output equals what a KV cache that is always right gives. A last check reads back every object the saves put.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from versions.scheduler_loop import BLOCK, SchedulerLoop

from kvpool_connector import keys

pytestmark = [pytest.mark.vllm_api, pytest.mark.processes]

MAX_TOKENS = 24  # decodes past every prompt's end, across a block boundary


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(length)]


# A few full blocks and a partial one each, and one exact multiple of the block (its full hit still computes the
# prompt's last token).
PROMPTS = {
    "three-and-5": prompt(3 * BLOCK + 5, seed=1),
    "four-and-9": prompt(4 * BLOCK + 9, seed=2),
    "two-and-1": prompt(2 * BLOCK + 1, seed=3),
    "exactly-three": prompt(3 * BLOCK, seed=4),
}


def full_prompt_blocks(tokens: list[int]) -> int:
    return len(tokens) // BLOCK


def pool_hit(tokens: list[int]) -> int:
    """Tokens a pool holding every full prompt block supplies: all of them, but the last token of the prompt."""
    return min(full_prompt_blocks(tokens) * BLOCK, len(tokens) - 1)


def connector_config(pool, **extra) -> dict:
    # A generous lookup deadline: on a loaded 2-core host a slow answer would count as a miss, and hits are checked.
    return {"backend": "mooncake", "mooncake": pool.client_config(), "lookup_timeout_ms": 5000, **extra}


def run_loop(loop: SchedulerLoop, prompts: dict[str, list[int]], max_tokens: int = MAX_TOKENS) -> None:
    loop.wait_connected()
    for req_id, tokens in prompts.items():
        loop.add(req_id, tokens, max_tokens)
    loop.run()


def assert_outputs_right(loop: SchedulerLoop, prompts: dict[str, list[int]]) -> None:
    assert sorted(loop.stats.outputs) == sorted(prompts), "every request finishes"
    for req_id in prompts:
        assert loop.stats.outputs[req_id] == loop.expected_tokens(req_id), f"{req_id}: output of wrong KV"


@dataclass
class FirstRun:
    loop: SchedulerLoop
    saved_keys: list[str]  # the pool keys of every full prompt block, from vLLM's own block hashes


@pytest.fixture(scope="module")
def first_run(tiny_model, pool):
    """A first scheduler and worker run the prompts on an empty pool, saving; kept open for the checks of test 1."""
    loop = SchedulerLoop(tiny_model, connector_config(pool))
    try:
        run_loop(loop, PROMPTS)
        loop.settle()  # the staging thread's puts are in
        saved_keys = [
            keys.pool_key(loop.shard, bytes(loop.requests[r].block_hashes[i]))
            for r, tokens in PROMPTS.items()
            for i in range(full_prompt_blocks(tokens))
        ]
        yield FirstRun(loop, saved_keys)
    finally:
        loop.close()


def test_a_first_run_saves_every_full_prompt_block_while_prompts_prefill_and_decode(first_run, mooncake_client):
    loop = first_run.loop
    assert loop.problems == []
    assert_outputs_right(loop, PROMPTS)
    assert loop.stats.first_hit == dict.fromkeys(PROMPTS, 0), "an empty pool supplies nothing"
    assert loop.stats.sync_loads == loop.stats.async_loads == 0
    assert loop.stats.load_errors == set()
    # Saved: the full prompt blocks, each once; the partial tails and the decode blocks not (save_decode_cache off).
    assert sorted(loop.saves) == sorted(first_run.saved_keys)
    assert loop.worker.stats.total().get("saved_blocks", 0) == len(first_run.saved_keys) == 12
    assert mooncake_client.batch_is_exist(first_run.saved_keys) == [1] * 12
    assert loop.check_pool(mooncake_client) == 12
    assert loop.problems == [], "a pool object holds other bytes than its block's"


@pytest.mark.parametrize("load_async", [True, False, "auto"], ids=["async-loads", "sync-loads", "auto"])
def test_a_fresh_scheduler_and_worker_load_every_full_prompt_block(tiny_model, pool, first_run, load_async):
    loop = SchedulerLoop(tiny_model, connector_config(pool, load_async=load_async))
    try:
        run_loop(loop, PROMPTS)
        assert loop.problems == []
        hits = {r: pool_hit(tokens) for r, tokens in PROMPTS.items()}
        assert loop.stats.external_cached == hits, "vLLM's own count of tokens the connector supplied"
        assert loop.stats.first_hit == hits, "the first step of each request starts past its pool hit"
        blocks = sum(full_prompt_blocks(tokens) for tokens in PROMPTS.values())
        planned = (loop.stats.async_loads, loop.stats.sync_loads)
        if load_async == "auto":  # the first hit finds nothing running: synchronous; later ones as measured
            assert sum(planned) == blocks and loop.stats.sync_loads > 0
        else:
            assert planned == ((blocks, 0) if load_async else (0, blocks))
        assert loop.worker.stats.total().get("loaded_blocks", 0) == blocks
        assert loop.stats.load_errors == set()
        assert loop.saves == {}, "blocks that came from the pool are not saved back"
        assert_outputs_right(loop, PROMPTS)
        assert loop.stats.outputs == first_run.loop.stats.outputs
    finally:
        loop.close()


def test_a_request_for_prompt_logprobs_is_never_served_from_the_pool(tiny_model, pool, first_run, caplog):
    """Prompt logprobs need every prompt position computed: vLLM skips its own prefix cache for such a request, and
    0.23 and 0.34 would take a connector's hit anyway. The pool offers none and says why, once."""
    loop = SchedulerLoop(tiny_model, connector_config(pool))
    try:
        loop.wait_connected()
        with caplog.at_level("INFO", logger="vllm.kvpool_connector.scheduler"):
            for req_id, tokens in PROMPTS.items():
                extra = {"prompt_logprobs": 1} if req_id in ("three-and-5", "four-and-9") else {}
                loop.add(req_id, tokens, MAX_TOKENS, **extra)
            loop.run()
        hits = {r: 0 if r in ("three-and-5", "four-and-9") else pool_hit(t) for r, t in PROMPTS.items()}
        assert loop.stats.external_cached == hits
        assert loop.stats.first_hit == hits
        assert loop.worker.stats.total().get("loaded_blocks", 0) == full_prompt_blocks(PROMPTS["two-and-1"]) + 3
        assert loop.problems == []
        assert_outputs_right(loop, PROMPTS)
        said = [r.getMessage() for r in caplog.records if "prompt logprobs" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        loop.close()


# Four requests of 5 blocks each at the end (3 of prompt, 2 of output) in 11 usable blocks (block 0 is vLLM's null
# block): the scheduler admits three prompts, then preempts as decodes need blocks, and resumes later.
PREEMPTION_MAX_TOKENS = 32


def preemption_prompts(seed: int) -> dict[str, list[int]]:
    """Prompts of their own for each case: the pool of this module holds the blocks of every earlier one."""
    return {f"tight-{i}": prompt(2 * BLOCK + 9 + i, seed=seed + i) for i in range(4)}


@pytest.mark.parametrize(
    ("seed", "extra"),
    [(100, {}), (200, {"load_async": False, "save_decode_cache": True, "async_save": False})],
    ids=["defaults", "sync-loads-and-saves-with-decode-blocks"],
)
def test_preempted_and_resumed_requests_keep_right_kv_while_saves_are_on(
    tiny_model, pool, mooncake_client, seed, extra
):
    prompts = preemption_prompts(seed)
    loop = SchedulerLoop(tiny_model, connector_config(pool, **extra), num_blocks=12)
    try:
        run_loop(loop, prompts, PREEMPTION_MAX_TOKENS)
        assert loop.stats.resumed, "the KV cache was meant to be too small: no request was preempted"
        assert loop.problems == []
        assert_outputs_right(loop, prompts)
        assert loop.stats.load_errors == set()
        # No block is planned twice by one request (a resumed request does not save its blocks again) ...
        plans = Counter((plan.req_id, plan.index) for plans in loop.saves.values() for plan in plans)
        assert [p for p, n in plans.items() if n > 1] == []
        # ... every full prompt block (and with save_decode_cache every full block of prompt + output but the last
        # token's, whose KV is never computed) is saved, and every saved object holds its block's bytes.
        full = {
            r: (len(tokens) + PREEMPTION_MAX_TOKENS - 1) // BLOCK
            if extra.get("save_decode_cache")
            else len(tokens) // BLOCK
            for r, tokens in prompts.items()
        }
        assert sorted(plans) == sorted((r, i) for r, n in full.items() for i in range(n))
        assert loop.check_pool(mooncake_client) == len(loop.saves)
        assert loop.problems == [], "a pool object holds other bytes than its block's"
    finally:
        loop.close()


@pytest.mark.parametrize("fault", ["skipped-load", "swapped-keys"])
def test_the_oracle_sees_a_load_that_went_wrong(tiny_model, pool, first_run, fault):
    """The harness's own negative control: with one synchronous load skipped, or two blocks' keys swapped in the
    plan, the pages hold wrong KV and the oracle must say so (a silent oracle would pass every test above)."""
    loop = SchedulerLoop(tiny_model, connector_config(pool, load_async=False))

    def tamper(out, meta) -> None:
        if fault == "skipped-load":
            meta.loads.clear()
        for transfer in meta.loads:
            if len(transfer.block_hashes) > 1:
                transfer.block_hashes[0], transfer.block_hashes[1] = transfer.block_hashes[1], transfer.block_hashes[0]

    loop.on_step = tamper
    try:
        run_loop(loop, {"three-and-5": PROMPTS["three-and-5"]})
        assert any("holds wrong KV" in problem for problem in loop.problems), loop.problems
    finally:
        loop.close()


def test_sleep_with_new_weights_hits_only_what_the_new_weights_saved(tiny_model, pool, first_run):
    """Sleep mode as vLLM 0.34's engine core runs it around a weight update: the scheduler's prefix cache reset with
    the connector's (``reset_connector``; ``reset_cache: layout`` removes this layout's objects), the KV memory
    released and registered again, and the model now writing other KV for the same tokens. The prompts after wake-up
    must compute (the old weights' blocks are gone from the pool) and the ones after that hit what they saved: the
    oracle, which knows the new weights, reads every loaded byte. Last in the module: it empties the pool."""
    loop = SchedulerLoop(tiny_model, connector_config(pool))
    rounds = {}
    try:
        for name in ("before", "after-wake-up", "again"):
            prompts = {f"{name}/{r}": tokens for r, tokens in PROMPTS.items()}
            run_loop(loop, prompts)
            loop.settle()
            rounds[name] = {r: loop.stats.first_hit[r] for r in prompts}
            assert all(loop.stats.outputs[r] == loop.expected_tokens(r) for r in prompts), f"{name}: wrong KV"
            if name == "before":
                assert loop.scheduler.reset_prefix_cache(reset_running_requests=True, reset_connector=True)
                loop.worker.release_kv_memory()
                loop.writer.weights = 1
                loop.worker.restore_kv_memory()
        hits = [pool_hit(tokens) for tokens in PROMPTS.values()]
        assert list(rounds["before"].values()) == hits  # first_run's blocks
        assert list(rounds["after-wake-up"].values()) == [0] * len(PROMPTS)
        assert list(rounds["again"].values()) == hits
        assert loop.problems == []
    finally:
        loop.close()
