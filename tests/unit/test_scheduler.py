"""Scheduler-side lookups against a real Mooncake Store, on real vLLM ``Request`` objects: non-blocking lookups
(``None`` until the answer is in, nothing asked twice, a deadline), lookups of many arrivals sharing pool calls, the
asynchronous-load answer, and the P/D producer's saving notice and the consumer's bounded wait for it; and the
save plan: which blocks a step saves, generated ones included with ``save_decode_cache``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import signal
import time

import numpy as np
import pytest

from kvpool_connector import keys
from kvpool_connector.config import ConfigError
from kvpool_connector.engine_layout import describe_engine
from kvpool_connector.handoff import SAVING_PARAM
from kvpool_connector.lookups import IDLE_STEP_LOOKUP_WAIT_S
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata, group_blocks
from kvpool_connector.request_state import RequestState
from kvpool_testkit import scheduler_side
from kvpool_testkit.inspection import wait_connected
from kvpool_testkit.scheduler_side import BLOCK, Requests, pool_scheduler

pytestmark = [pytest.mark.vllm_api, pytest.mark.processes]


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


@pytest.fixture(scope="module")
def requests() -> Requests:
    return Requests()


@pytest.fixture(scope="module")
def marker():
    return np.zeros(64, dtype=np.uint8)


def make_scheduler(tiny_model, pool, marker, **extra):
    config = {"backend": "mooncake", "mooncake": pool.client_config(), "lookup_timeout_ms": 300, **extra}
    scheduler = pool_scheduler(tiny_model, config)
    assert scheduler.pool is not None and wait_connected(scheduler.pool, 30)
    scheduler.pool.register_memory(marker.ctypes.data, marker.nbytes)
    return scheduler


def store_blocks(scheduler, request, blocks: int, marker) -> None:
    """A small marker object under each of the request's first ``blocks`` keys: existence is all a lookup asks."""
    hashes = keys.block_hashes(request.block_hashes, BLOCK, BLOCK, blocks)
    wanted = [keys.pool_key(s, h) for h in hashes for s in scheduler.shards]
    assert all(o.ok for o in scheduler.pool.put(wanted, [[marker.ctypes.data]] * len(wanted), [[64]] * len(wanted)))


def keys_a_block(scheduler) -> int:
    """Keys a lookup asks per block: this engine's shards, and every other TP size's it reads (3 for the tiny Llama
    at TP 1: its own object and a TP 2 engine's two)."""
    return len(scheduler.lookup_keys([b"\0" * 32]))


def count_exists_calls(scheduler) -> list[int]:
    """Wrap the pool client's ``exists``: the list grows by the number of keys of each pool call."""
    calls: list[int] = []
    backend = scheduler.pool._backend
    original = backend.exists

    def counted(wanted):
        calls.append(len(wanted))
        return original(wanted)

    backend.exists = counted
    return calls


def step_output(running: str | None = None):
    """A step's ``SchedulerOutput``: nothing scheduled, or one decode token of ``running``."""
    from vllm.v1.core.sched.output import SchedulerOutput

    output = SchedulerOutput.make_empty()
    if running is not None:
        output.num_scheduled_tokens = {running: 1}
        output.total_num_scheduled_tokens = 1
    return output


def steps_waiting(scheduler, request, seconds: float, running: str | None = None) -> int:
    """vLLM's steps asking for ``request`` for ``seconds``, each answered "ask again", then planned (running nothing,
    or one decode token of ``running``); a step without a model to run takes about a millisecond. Returns how many
    steps there were."""
    steps, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)
        scheduler.build_connector_meta(step_output(running))
        steps += 1
        time.sleep(0.001)
    return steps


def answer_when_ready(scheduler, request, computed: int = 0, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (answer := scheduler.get_num_new_matched_tokens(request, computed))[0] is None:
        assert time.monotonic() < deadline, "no lookup answer"
        time.sleep(0.005)
    return answer


def test_a_non_blocking_lookup_answers_none_until_in_then_the_same_answer(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker)
    try:
        request = requests.make("r1", tokens(3 * BLOCK + 20, seed=1))
        store_blocks(scheduler, request, 2, marker)
        calls = count_exists_calls(scheduler)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)  # asked, not waited for
        assert answer_when_ready(scheduler, request) == (2 * BLOCK, True)  # loads asynchronously by default
        assert calls == [3 * keys_a_block(scheduler)]  # asked once, however often vLLM called
        assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)  # a new call is a new question
    finally:
        scheduler.shutdown()


def test_lookups_of_requests_arriving_together_share_pool_calls(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker)
    try:
        batch = [requests.make(f"a{i}", tokens(2 * BLOCK + 5, seed=100 + i)) for i in range(64)]
        for request in batch[::2]:
            store_blocks(scheduler, request, 2, marker)
        calls = count_exists_calls(scheduler)
        assert all(scheduler.get_num_new_matched_tokens(r, 0) == (None, False) for r in batch)
        answers = [answer_when_ready(scheduler, r) for r in batch]
        assert answers == [(2 * BLOCK, True), (0, False)] * 32
        assert sum(calls) == 64 * 2 * keys_a_block(scheduler) and len(calls) <= 3, calls  # 64 questions, few calls
    finally:
        scheduler.shutdown()


def test_a_hung_pool_answers_a_miss_at_the_deadline_and_never_stalls(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker)
    request = requests.make("hung", tokens(2 * BLOCK + 5, seed=3))
    store_blocks(scheduler, request, 2, marker)
    pool.master.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        calls = []
        while (answer := scheduler.get_num_new_matched_tokens(request, 0))[0] is None:
            calls.append(time.monotonic())
            time.sleep(0.01)
        assert answer == (0, False)
        assert 0.3 <= time.monotonic() - start < 1.5
        assert max(b - a for a, b in zip([start, *calls], calls, strict=False)) < 0.1  # every call returned at once
        other = requests.make("while-hung", tokens(2 * BLOCK + 5, seed=4))
        assert scheduler.get_num_new_matched_tokens(other, 0) == (0, False)  # the stuck query: a miss at once
        # both misses are counted (vllm:kvpool_lookup_timeouts_total)
        assert scheduler.stats.total()["lookup_timeouts"] == 2
        # Each unanswered lookup's blocks are missed for the pool's sake, not for want of a save, once allocated.
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock

        for i, asked in enumerate((request, other)):
            blocks = KVCacheBlocks(([KVCacheBlock(10 * i + b) for b in range(3)],))
            scheduler.update_state_after_alloc(asked, blocks, 0)
        # two lookups of two full blocks each
        assert scheduler.stats.total()["missed_blocks.pool_unavailable"] == 4
    finally:
        pool.master.send_signal(signal.SIGCONT)
        scheduler.shutdown()


def test_an_idle_step_waits_for_an_unanswered_lookup_and_a_busy_one_does_not(tiny_model, pool, marker, requests):
    """With nothing to run, vLLM steps again at once, an empty forward call on every rank: that spinning engine takes
    the cores the lookup it waits for needs. So an idle step waits for the answer, up to IDLE_STEP_LOOKUP_WAIT_S; a
    step that runs requests never waits."""
    scheduler = make_scheduler(tiny_model, pool, marker, lookup_timeout_ms=5_000)
    request = requests.make("idle", tokens(2 * BLOCK + 5, seed=41))
    store_blocks(scheduler, request, 2, marker)
    pool.master.send_signal(signal.SIGSTOP)  # the lookup stays unanswered
    try:
        idle_steps = steps_waiting(scheduler, request, 0.4)
        busy_steps = steps_waiting(scheduler, request, 0.4, running="stream")
        assert idle_steps <= 0.4 / IDLE_STEP_LOOKUP_WAIT_S + 1 < busy_steps, (idle_steps, busy_steps)
    finally:
        pool.master.send_signal(signal.SIGCONT)
    try:
        assert answer_when_ready(scheduler, request) == (2 * BLOCK, True)  # the same query, answered once resumed
    finally:
        scheduler.shutdown()


def test_synchronous_lookups_and_loads_when_configured(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker, lookup_async=False, load_async=False)
    try:
        request = requests.make("sync", tokens(3 * BLOCK, seed=5))
        store_blocks(scheduler, request, 3, marker)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK - 1, False)
    finally:
        scheduler.shutdown()


def test_a_prefill_for_remote_decode_answers_with_what_it_saves(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker)
    try:
        prompt = tokens(3 * BLOCK + 20, seed=6)
        remote = requests.make("p", prompt, {"do_remote_decode": True})
        assert scheduler.request_finished(remote) == (
            False,
            {SAVING_PARAM: {"blocks": 3, "shards": scheduler.shards}},
        )
        assert scheduler.request_finished(requests.make("plain", prompt)) == (False, None)
    finally:
        scheduler.shutdown()


def test_a_consumer_waits_for_the_producers_blocks_until_they_land_or_the_deadline(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker, producer_wait_ms=800)
    try:
        prompt = tokens(3 * BLOCK + 20, seed=7)
        notice = {SAVING_PARAM: {"blocks": 3, "shards": scheduler.shards}}
        waiting = requests.make("d1", prompt, notice)
        store_blocks(scheduler, waiting, 1, marker)  # one of three blocks landed so far
        calls = count_exists_calls(scheduler)
        # Nothing running: each idle step waits for the query's answer or the pause before the next (a pause
        # growing to 20 ms), so vLLM's empty steps, about one a millisecond otherwise, come a few per query (one
        # asks, the next ones read the answer): under 80 in 300 ms, where steps that never wait came 150-300 times.
        steps = steps_waiting(scheduler, waiting, 0.3)
        assert 5 <= len(calls) < 40 and steps < 80, (steps, calls)
        calls.clear()  # a decode stream runs: its steps go on, the queries stay paced
        steps = steps_waiting(scheduler, waiting, 0.3, running="stream")
        assert 5 <= len(calls) < 25 and steps > 3 * len(calls), (steps, calls)
        store_blocks(scheduler, waiting, 3, marker)  # the rest of the producer's puts land
        assert answer_when_ready(scheduler, waiting) == (3 * BLOCK, True)

        never = requests.make("d2", tokens(3 * BLOCK + 20, seed=8), notice)
        start = time.monotonic()
        assert answer_when_ready(scheduler, never) == (0, False)
        assert 0.8 <= time.monotonic() - start < 2.0
        assert scheduler.stats.total()["producer_wait_expired"] == 1
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize(
    "params",
    [
        {"do_remote_prefill": True, "remote_engine_id": "p2p"},  # a point-to-point partner delivers (MultiConnector)
        {"shards": ["0123456789abcdef"]},  # another model or parallel layout: its blocks are not this engine's
    ],
    ids=["p2p-partner", "other-layout"],
)
def test_a_consumer_does_not_wait_for_blocks_it_cannot_use(tiny_model, pool, marker, requests, params):
    scheduler = make_scheduler(tiny_model, pool, marker, producer_wait_ms=60_000)
    try:
        notice = {"blocks": 3, "shards": scheduler.shards} | {k: v for k, v in params.items() if k == "shards"}
        transfer = {SAVING_PARAM: notice} | {k: v for k, v in params.items() if k != "shards"}
        request = requests.make("d", tokens(3 * BLOCK + 20, seed=9), transfer)
        assert answer_when_ready(scheduler, request, timeout_s=2.0) == (0, False)
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("decode_cache", [False, True])
def test_a_step_saves_the_blocks_it_completes_generated_ones_with_save_decode_cache(
    tiny_model, pool, marker, requests, decode_cache
):
    scheduler = make_scheduler(tiny_model, pool, marker, save_decode_cache=decode_cache)
    request = requests.make("chat", tokens(2 * BLOCK + 9, seed=71))
    state = RequestState(request, block_ids=[list(range(10, 20))])

    def saved_after(computed: int) -> list[tuple[list[int], list[bytes]]]:
        meta = PoolConnectorMetadata()
        scheduler.saves.plan(state, computed, meta)
        return [(t.block_ids, t.block_hashes) for t in meta.saves]

    prompt_hashes = keys.block_hashes(request.block_hashes, BLOCK, BLOCK, 2)
    assert saved_after(2 * BLOCK + 9) == [([10, 11], prompt_hashes)]  # the prefill step: both full prompt blocks
    request.append_output_token_ids(tokens(BLOCK, seed=72))  # the answer, one token per decode step
    assert saved_after(3 * BLOCK - 1) == []  # block 2 is not full yet (its last token not computed)
    third = keys.block_hashes(request.block_hashes, BLOCK, BLOCK, 3)[2:]
    assert saved_after(3 * BLOCK) == ([([12], third)] if decode_cache else [])  # the step computing its last token
    assert saved_after(3 * BLOCK + 40) == []  # never twice, never the partial tail


def test_a_cache_reset_removes_this_layouts_objects_or_says_it_did_not(tiny_model, pool, marker, requests):
    scheduler = make_scheduler(tiny_model, pool, marker)
    request = requests.make("reset", tokens(2 * BLOCK + 9, seed=91))
    store_blocks(scheduler, request, 2, marker)
    other = "kvp1/feedfacefeedface/another-layouts-block"
    assert scheduler.pool.put([other], [[marker.ctypes.data]], [[64]])[0].ok
    mine = [
        keys.pool_key(s, h) for h in keys.block_hashes(request.block_hashes, BLOCK, BLOCK, 2) for s in scheduler.shards
    ]
    assert scheduler.reset_cache() is True
    assert scheduler.pool.exists([*mine, other]) == [False, False, True]
    assert scheduler._reset_pending  # the workers drop queued saves and remove their shard at the next step
    assert make_scheduler(tiny_model, pool, marker, reset_cache="off").reset_cache() is False
    scheduler.pool._backend.remove_prefix = lambda prefix: None  # memcache: no removal by prefix
    assert scheduler.reset_cache() is False
    assert scheduler.pool.exists([other]) == [True]


def test_each_kv_cache_group_moves_only_the_blocks_vllm_gave_it():
    """Hybrid models: a full-attention group holds every block, a sliding-window group only those in its window (vLLM
    puts its null block, id 0, elsewhere): a load fills and a save reads only real blocks, each in its own group."""
    full, window = [10, 11, 12, 13], [0, 0, 22, 23]  # the window covers the last two blocks
    hashes = [b"a", b"b", b"c", b"d"]
    moved = group_blocks("r", [full, window], range(4), hashes)
    assert list(zip(moved.block_ids, moved.block_hashes, moved.groups, strict=True)) == [
        (10, b"a", 0),
        (11, b"b", 0),
        (12, b"c", 0),
        (22, b"c", 1),
        (13, b"d", 0),
        (23, b"d", 1),
    ]
    assert group_blocks("r", [full, window], [3], [b"d"]) == BlockTransfer("r", [13, 23], [b"d", b"d"], [0, 1])
    assert group_blocks("r", [[10, 11]], range(2), hashes[:2]) == BlockTransfer("r", [10, 11], [b"a", b"b"])
    # loads name each block's stored TP size where one differs from the engine's own (GQA across TP sizes)
    across = group_blocks("r", [full, window], [2, 3], hashes[2:], sources=[[2, 1], [2, 2]], own_tp=2)
    assert across.sources == [2, 1, 2, 2]
    assert group_blocks("r", [full], [2], hashes[2:3], sources=[[2, 2]], own_tp=2).sources is None


def shards_written_at_tp(tiny_model: str, own: keys.KVLayout, tp_size: int) -> list[str]:
    """The shard fingerprints a TP ``tp_size`` engine of the tiny Llama writes its blocks under, built from vLLM's own
    head assignment and the key format as written here, never from ``keys`` or ``head_shards`` (whose answer the
    lookup test checks). ``own`` is the TP 1 engine's layout (every field of its description, each rank's shard
    aside, is the same at any TP size).

    vLLM gives every rank ``ModelConfig.get_num_kv_heads`` heads; with more ranks than heads, ``tp // heads`` ranks
    hold one head (``QKVParallelLinear``'s ``num_kv_head_replicas``) and rank r holds shard ``r // replicas``. A
    page holds a rank's heads, so its bytes scale with them. A shard's fingerprint: the first 16 hex digits of the
    sha256 of the sorted JSON of the layout's fields, the key format, the KV shard and the pipeline rank; with one
    shard (every rank holds every head) the TP size and replicas are left out, and one KV cache group names none.
    """
    from types import SimpleNamespace

    model = scheduler_side.vllm_config(tiny_model, {}).model_config
    heads = model.get_total_num_kv_heads()
    per_rank = model.get_num_kv_heads(SimpleNamespace(tensor_parallel_size=tp_size))
    replicas = max(1, tp_size // heads)
    assert not own.groups and own.pp_size == 1 and own.tp_size == 1
    fields = {
        **dataclasses.asdict(own),
        "tp_size": tp_size,
        "num_kv_heads": per_rank,
        "page_size_bytes": own.page_size_bytes // heads * per_rank,
        "kv_replicas": replicas,
    }
    del fields["groups"]
    if tp_size // replicas == 1:
        del fields["tp_size"], fields["kv_replicas"]
    return [
        hashlib.sha256(
            json.dumps({"format": "kvp1", **fields, "kv_shard": shard, "pp_rank": 0}, sort_keys=True).encode()
        ).hexdigest()[:16]
        for shard in range(tp_size // replicas)
    ]


def test_a_gqa_prefix_stored_at_another_tp_size_is_a_hit_loaded_from_there(tiny_model, pool, marker, requests):
    """The tiny Llama (2 KV heads) at TP 1 reads blocks a TP 2 engine stored (two head shards a block): a block is
    there when some TP size holds all of its shards, its own layout first; the load names each block's stored TP
    size; a TP 2 producer's saving notice is waited for. The blocks are written under keys built here from vLLM's
    head assignment (``shards_written_at_tp``), so a wrong answer of the connector's own shard math is a miss."""
    scheduler = make_scheduler(tiny_model, pool, marker, lookup_async=False, load_async=False)
    try:
        assert [stored.tp_size for stored in scheduler.readable] == [1, 2] and keys_a_block(scheduler) == 3
        own_shards = shards_written_at_tp(tiny_model, scheduler.layout, 1)
        tp2_shards = shards_written_at_tp(tiny_model, scheduler.layout, 2)
        request = requests.make("tp2", tokens(4 * BLOCK + 5, seed=81))
        hashes = [bytes(h) for h in request.block_hashes[:4]]  # one vLLM hash a block: BLOCK is its hash block size

        def put(shards, blocks):
            wanted = [f"kvp1/{shard}/{hashes[b].hex()}" for b in blocks for shard in shards]
            assert all(
                o.ok for o in scheduler.pool.put(wanted, [[marker.ctypes.data]] * len(wanted), [[64]] * len(wanted))
            )

        put(own_shards, [0])  # block 0 in this engine's own layout
        put(tp2_shards, [0, 1, 2])  # blocks 0-2 at TP 2 (block 0 in both)
        put(tp2_shards[:1], [3])  # block 3: one TP 2 head shard only, so not a hit
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK, False)
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock
        from vllm.v1.core.sched.output import SchedulerOutput

        scheduler.update_state_after_alloc(
            request, KVCacheBlocks(([KVCacheBlock(i) for i in range(20, 25)],)), 3 * BLOCK
        )
        meta = scheduler.build_connector_meta(SchedulerOutput.make_empty())
        assert [(t.block_ids, t.sources) for t in meta.loads] == [([20, 21, 22], [1, 2, 2])]

        notice = {SAVING_PARAM: {"blocks": 4, "shards": tp2_shards}}
        waiting = requests.make("d-tp2", tokens(4 * BLOCK + 5, seed=81), notice)
        assert scheduler.get_num_new_matched_tokens(waiting, 0) == (None, False)  # block 3's second shard is due
        put(tp2_shards[1:], [3])
        assert answer_when_ready(scheduler, waiting) == (4 * BLOCK, False)
    finally:
        scheduler.shutdown()


def test_load_from_tp_sizes_names_what_a_lookup_reads(tiny_model, pool, marker):
    own_only = make_scheduler(tiny_model, pool, marker, load_from_tp_sizes=[])
    own_only.shutdown()
    assert [stored.tp_size for stored in own_only.readable] == [1]
    assert len(own_only.lookup_keys([b"\x01" * 32])) == 1  # one key a block: this engine's one shard
    with pytest.raises(ConfigError, match="TP 3 does not split this model's 2 KV heads evenly"):
        make_scheduler(tiny_model, pool, marker, load_from_tp_sizes=[3])


def test_both_sides_read_one_engine_layout_from_vllms_config(tiny_model):
    """The scheduler and every worker describe the engine with ``describe_engine`` on the same config: the same
    description, the worker of the only shard keying its blocks by the scheduler's shard, blocks stored at TP 2
    readable (the tiny Llama's 2 KV heads)."""
    config = scheduler_side.vllm_config(tiny_model, {})
    kv_cache = scheduler_side.kv_cache_config(config, num_blocks=64)
    engine = describe_engine(config, kv_cache)
    assert engine == describe_engine(config, kv_cache)
    assert engine.worker_shards(0, 0) == engine.shards == engine.readable_shards[0] == engine.group_shards[0]
    assert [stored.tp_size for stored in engine.readable] == [1, 2] and len(engine.readable_shards[1]) == 2
    assert (engine.block_size, engine.hash_block_size, engine.num_blocks) == (BLOCK, BLOCK, 64)
    assert engine.windows == (None,) and engine.group_layers is None
    assert [stored.tp_size for stored in describe_engine(config, kv_cache, load_from_tp_sizes=[]).readable] == [1]
