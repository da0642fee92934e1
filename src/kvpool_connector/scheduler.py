"""Scheduler side: how much of a prompt the pool holds, and the per-step load/save plans for the workers.

Calls, in the order vLLM makes them for a request:
1. ``get_num_new_matched_tokens``: one batched existence query for the prompt's full blocks past the local prefix hit,
   across every (tp, pp) shard; returns the extra tokens the pool can supply and whether they load asynchronously
   (``load_async``; with ``auto``, ``load_mode`` picks per hit). With ``lookup_async`` the query runs on the pool
   handle's lookup thread (queries of requests arriving together share a pool call) and the answer is ``None`` ("ask
   again") until it is in or its deadline passed (a miss); otherwise it is asked inline, bounded by
   ``lookup_timeout_ms``. A decode request whose prefill instance is still saving (its notice in ``kv_transfer_params``)
   is answered ``None`` until those blocks are in the pool or ``producer_wait_ms`` passed. Repeatable: only the latest
   answer is kept, for step 2.
2. ``update_state_after_alloc``: now that vLLM allocated blocks, turns that answer into a load of those blocks, in
   each KV cache group only the real ones (a sliding-window group gets null blocks outside its window).
3. ``build_connector_meta`` (once per step): hands out the loads (synchronous ones before the forward pass,
   asynchronous ones to the loader thread), and plans saves of prompt blocks that become full in this step
   (computed tokens after the step; with ``save_decode_cache`` blocks of generated tokens too), skipping blocks
   that came from the pool. A preempted request needs nothing here: a save leaves its blocks inside the step that
   planned it (on a GPU/NPU the compute stream waits for the copy), and a resumed one is not saved twice.
4. ``update_connector_output`` (each step): notes asynchronous loads that failed, so a retry computes the prompt,
   and, with vLLM's KV events on, what the workers' saves left in the pool (``take_events`` publishes it).
5. ``request_finished``: forgets the request; a prefill for a remote decode answers with its saving notice. Saves
   leave the KV cache inside the step that planned them, so vLLM may free the blocks at once.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpool_connector import compat, head_shards, keys
from kvpool_connector.admission import Admission, Sighting
from kvpool_connector.backends import ClientRole, backend_class, create_backend
from kvpool_connector.config import ConfigError, ResolvedConfig
from kvpool_connector.counters import StatsCounter
from kvpool_connector.engine_layout import engine_layout, group_windows
from kvpool_connector.kv_events import PoolEvents, StoredInPool, pool_block_stored
from kvpool_connector.load_mode import LoadModeChooser
from kvpool_connector.logs import OncePerReason, init_logger
from kvpool_connector.lookups import LookupBatcher
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.metrics import PoolConnectorStats, pool_counters, take_stats
from kvpool_connector.model_identity import adapter_digest, model_identity
from kvpool_connector.pool import PoolHandle
from kvpool_connector.routing import SAVING_PARAM

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

IDLE_STEP_WAIT_S = 0.02
"""Longest a step with nothing scheduled waits for a lookup answer or a producer-wait poll (``_wait_while_idle``)."""


def present_prefix_blocks(found: list[bool], num_shards: int, windows: Sequence[int | None] | None = None) -> int:
    """The longest hit, in blocks, from exists() answers laid out block-major, shard-minor: every shard holds each
    of its blocks, except that a shard with a window (``windows[s]`` blocks: a sliding-window group's) needs only the
    blocks that far back from the hit's end, as vLLM's own lookup of such a group does."""
    blocks = len(found) // num_shards
    windows = windows or [None] * num_shards
    everywhere = [s for s, w in enumerate(windows) if w is None]
    prefix = next((b for b in range(blocks) if not all(found[b * num_shards + s] for s in everywhere)), blocks)
    windowed = [(s, w) for s, w in enumerate(windows) if w is not None]
    for end in range(prefix, 0, -1):  # the longest hit whose windows are whole (no window: the first)
        if all(found[b * num_shards + s] for s, w in windowed for b in range(max(0, end - w), end)):
            return end
    return 0


def present_prefix_by_layout(
    found: Sequence[bool], layout_groups: Sequence[Sequence[int]], windows: Sequence[int | None]
) -> tuple[int, list[list[int]]]:
    """The longest hit, in blocks, across readable stored layouts, and where each of its blocks loads from.

    ``found``: exists() answers of each layout in turn, each block-major, shard-minor; ``layout_groups[l]``: the KV
    cache group of each of layout l's shards; ``windows``: each group's window (``present_prefix_blocks``). A block
    of a group is there when some layout holds every shard of that group; it loads from the first such layout (the
    order is the preference). Returns the hit and, per block of it and per group, that layout's index."""
    num_groups = len(windows)
    blocks = len(found) // max(1, sum(len(groups) for groups in layout_groups))
    present = np.zeros((len(layout_groups), blocks, num_groups), dtype=bool)
    offset = 0
    for index, groups in enumerate(layout_groups):
        answers = np.asarray(found[offset : offset + blocks * len(groups)], dtype=bool).reshape(blocks, len(groups))
        offset += blocks * len(groups)
        shard_group = np.asarray(groups)
        for g in range(num_groups):
            present[index, :, g] = answers[:, shard_group == g].all(axis=1)
    hit = present_prefix_blocks(present.any(axis=0).ravel().tolist(), num_groups, windows)
    return hit, present.argmax(axis=0)[:hit].tolist()


def matched_tokens(start_block: int, found_blocks: int, block_size: int, num_tokens: int, num_computed: int) -> int:
    """Tokens the pool adds beyond the local hit; a full-prompt hit still leaves the last token to compute."""
    hit = min((start_block + found_blocks) * block_size, num_tokens - 1)
    return max(hit - num_computed, 0)


@dataclass
class _LoadAnswer:
    start_block: int
    num_blocks: int
    block_hashes: list[bytes]
    load_async: bool
    sources: list[list[int]]  # per block and KV cache group: the stored TP size it loads from


@dataclass
class _Lookup:
    """One request's existence query: asked once per question (first block, blocks), answered once."""

    question: tuple[int, int]
    future: concurrent.futures.Future[list[bool]]
    deadline: float  # past it, an unanswered query is a miss


@dataclass
class _ProducerWait:
    """A decode request whose prefill instance said it is saving ``blocks`` prompt blocks to the pool.

    vLLM asks a waiting request again every step, and with nothing to run a step comes about every millisecond, each
    an empty forward call on every rank: the engine spins, and a new existence query each time would keep the pool's
    master busy too, while the prefill instance, often on the same host, needs those cores to finish its puts (on a
    2-core host such a wait starved the pool node's heartbeat until the master dropped it, and the producer's puts
    with it). So the pool is asked again only after a pause that grows with the wait so far (a quarter of it, between
    1 and 20 ms), and an engine with nothing running waits the pause out in its idle step (``_wait_while_idle``)
    instead of stepping: a put that lands within milliseconds is seen at once, a slow one costs at most 20 ms more."""

    blocks: int
    deadline: float
    started: float = field(default_factory=time.monotonic)
    next_poll: float = 0.0  # no new query before this

    def pause(self, now: float) -> None:
        self.next_poll = now + min(0.02, max(0.001, (now - self.started) / 4))


def group_blocks(
    req_id: str,
    block_ids: Sequence[Sequence[int]],
    indices: Iterable[int],
    hashes: Sequence[bytes],
    sources: Sequence[Sequence[int]] | None = None,
    own_tp: int = 0,
) -> BlockTransfer:
    """The transfer of the blocks at ``indices`` (``hashes[k]`` is the k-th index's) in every KV cache group that
    holds them. A group holds no block where vLLM gave it the null block: a sliding-window group outside its window,
    so a load fills only the window and a save skips blocks the group already dropped. ``sources[k][g]``: the stored
    TP size the k-th block of group g loads from (None, or ``own_tp`` everywhere: this engine's own)."""
    ids: list[int] = []
    out_hashes: list[bytes] = []
    groups: list[int] = []
    stored_tp: list[int] = []
    for k, i in enumerate(indices):
        for g, group_ids in enumerate(block_ids):
            if i < len(group_ids) and group_ids[i] != compat.NULL_BLOCK_ID:
                ids.append(group_ids[i])
                out_hashes.append(hashes[k])
                groups.append(g)
                stored_tp.append(sources[k][g] if sources is not None else own_tp)
    return BlockTransfer(
        req_id,
        ids,
        out_hashes,
        groups if any(groups) else [],
        stored_tp if any(tp != own_tp for tp in stored_tp) else [],
    )


@dataclass
class _RequestState:
    """Everything the scheduler keeps about one request, from its first lookup to ``request_finished``: one record,
    so forgetting a request is one ``pop``."""

    request: Request
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group, once vLLM allocated them
    next_save_block: int = 0  # prompt blocks below this are planned, saved, or known to be in the pool
    loaded: range = range(0)  # block indices that came from the pool: no need to save them back
    answer: _LoadAnswer | None = None  # the latest lookup's answer, for update_state_after_alloc
    asked_tokens: int | None = None  # the latest lookup's tokens past the local hit, counted once allocated
    lookup: _Lookup | None = None  # an asynchronous existence query, asked or answered
    producer_wait: _ProducerWait | None = None  # its prefill instance is still saving its blocks
    loading: set[int] = field(default_factory=set)  # blocks of its asynchronous load in flight
    load_failed: bool = False  # its asynchronous load failed: no second try
    sighting: Sighting | None = None  # the latest lookup's admission answer; None: every block is admitted
    unanswered_blocks: int = 0  # the latest lookup's blocks the pool gave no answer for (unavailable, too slow)

    def forget_lookup(self) -> None:
        if self.lookup is not None:
            self.lookup.future.cancel()
            self.lookup = None


class PoolScheduler:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: ResolvedConfig) -> None:
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        if (reason := compat.unstable_block_hash_reason(vllm_config)) is not None:
            raise ConfigError(f"pool keys would differ between processes: {reason}")
        compat.recompute_failed_loads(transfer, logger)
        self.layout = engine_layout(vllm_config, kv_cache_config, config.pool.model_version)
        self.block_size = self.layout.block_size
        self.hash_block_size = compat.hash_block_size(kv_cache_config, self.block_size)
        self.shards = keys.shard_fingerprints(self.layout)
        self.group_shards = [keys.shard_fingerprints(self.layout, g) for g in range(self.layout.num_groups)]
        self.windows = group_windows([g.kv_cache_spec for g in kv_cache_config.kv_cache_groups], self.block_size)
        # The stored layouts a lookup asks for, this engine's own first: GQA blocks stored at another TP size load too.
        self.readable = [
            head_shards.layout_at_tp(self.layout, tp)
            for tp in head_shards.readable_tp_sizes(self.layout, config.pool.load_from_tp_sizes)
        ]
        self.readable_shards = [keys.shard_fingerprints(stored) for stored in self.readable]
        self.readable_groups = [keys.shard_groups(stored) for stored in self.readable]
        self.loads_enabled = transfer.is_kv_consumer
        self.saves_enabled = transfer.is_kv_producer
        self.lookup_timeout_s = config.pool.lookup_timeout_ms / 1e3
        self.lookup_async = config.pool.lookup_async
        self.load_mode = LoadModeChooser(config.pool.load_async)
        self.producer_wait_s = config.pool.producer_wait_ms / 1e3
        self.save_decode_cache = config.pool.save_decode_cache
        # Only an engine that looks up learns sightings; one that only saves (a P/D producer) saves everything.
        self.admission = Admission(config.pool.save_admission if self.loads_enabled else "all", self.shards[0])
        self.events = PoolEvents() if compat.kv_events_enabled(vllm_config) else None
        self.reset_policy = config.pool.reset_cache
        self._reset_pending = False  # tell the workers at the next step
        self.stats = StatsCounter()
        self.explain_once = OncePerReason(logger)
        self.pool: PoolHandle | None = None
        self.lookups: LookupBatcher | None = None
        if self.loads_enabled:
            self.pool = PoolHandle(
                lambda: create_backend(config, ClientRole(holds_data=False)),
                config.pool.reconnect_interval_s,
                label=f"lookup/instance {config.pool.instance_id}",
                bind_thread=backend_class(config).lookup_thread_binding(config),
                stats=self.stats,
            )
            self.lookups = LookupBatcher(self.pool)
            self.pool.start(wait_s=config.pool.startup_wait_s)
        self._requests: dict[str, _RequestState] = {}
        self._step_loads: list[BlockTransfer] = []
        self._step_async_loads: list[BlockTransfer] = []
        for note in config.notes:
            logger.info("MemcacheConnectorStoreV1 config: %s", note)
        identity = model_identity(vllm_config.model_config, config.pool.model_version)
        logger.info("KV pool model identity %s: %s", identity.digest, identity.description)
        logger.info(
            "MemcacheConnectorStoreV1 scheduler: backend=%s loads=%s saves=%s block_size=%d shards=%d%s",
            config.pool.backend,
            self.loads_enabled,
            self.saves_enabled,
            self.block_size,
            len(self.shards),
            f"; loads blocks stored at TP sizes {[s.tp_size for s in self.readable]} ({len(self.lookup_keys([b'']))} "
            "keys a block)"
            if len(self.readable) > 1 and self.loads_enabled
            else "",
        )

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        hashes = keys.block_hashes(request.block_hashes, self.block_size, self.hash_block_size, num_blocks)
        if (lora := request.lora_request) is not None:
            return keys.adapter_block_hashes(hashes, adapter_digest(lora.lora_path))
        return hashes

    # -- 1. lookup --------------------------------------------------------------------------------------------
    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _RequestState(request)
        return state

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Extra tokens the pool holds past the local hit, and whether they load asynchronously; ``None`` while the
        answer is not in yet (vLLM asks again next step). Asking again changes nothing but the latest answer."""
        if self.pool is None:
            return 0, False
        if compat.skips_external_kv(request):  # its blocks are still saved for other requests
            self.explain_once(
                "skip-reading-prefix-cache",
                "requests with prompt logprobs (or skip_reading_prefix_cache) are never served from the KV pool: "
                "vLLM computes every prompt position for them; their blocks are still saved (first: %s)",
                request.request_id,
            )
            return 0, False
        state = self._state(request)
        state.answer = None
        hashes = self._block_hashes(request, compat.prompt_length(request) // self.block_size)
        start = num_computed_tokens // self.block_size
        if start >= len(hashes):
            state.forget_lookup()
            return 0, False
        if state.load_failed:
            return 0, False  # its load just failed: vLLM asks again only when the first block did; compute it
        wait = self._producer_wait(state)
        if wait is not None and state.lookup is None and time.monotonic() < wait.next_poll:
            return None, False  # not yet: running requests' steps go on, an idle step waits for the poll
        answer = self._found_blocks(state, start, hashes)
        if answer is None:
            return None, False
        found, found_at = answer
        if wait is not None and start + found < wait.blocks:
            if (now := time.monotonic()) < wait.deadline:
                state.forget_lookup()  # ask again after a pause: the producer's put may land any moment
                wait.pause(now)
                return None, False
            wait.blocks = 0  # waited once: a later ask (say, after a failed allocation) takes what is there
            self.stats.add("producer_wait_expired")
            self.pool.warn(
                "producer-wait",
                "request %s: its prefill instance's blocks did not reach the pool within %.0f ms; computing them",
                request.request_id,
                self.producer_wait_s * 1e3,
            )
        state.forget_lookup()
        state.asked_tokens = (len(hashes) - start) * self.block_size
        extra = matched_tokens(start, found, self.block_size, request.num_tokens, num_computed_tokens)
        logger.debug(
            "pool lookup %s: %d blocks past %d tokens, %d extra", request.request_id, found, num_computed_tokens, extra
        )
        if extra <= 0:
            return 0, False
        load_async = self.load_mode.load_async(-(-extra // self.block_size))
        sources = [[self.readable[i].tp_size for i in groups] for groups in found_at]
        state.answer = _LoadAnswer(start, found, hashes[start : start + found], load_async, sources)
        return extra, load_async

    def _found_blocks(
        self, state: _RequestState, start: int, hashes: list[bytes]
    ) -> tuple[int, list[list[int]]] | None:
        """Leading blocks from ``start`` the pool holds on every shard of some readable layout, and the layout each
        block's groups load from (``present_prefix_by_layout``); None while an asynchronous query runs."""
        assert self.pool is not None and self.lookups is not None
        if not self.lookup_async:
            found = self.lookups.exists_within(self._question_keys(hashes[start:]), self.lookup_timeout_s)
            return self._answer(state, start, len(hashes) - start, found)
        question = (start, len(hashes))
        lookup = state.lookup
        if lookup is None or lookup.question != question:  # keys are built only for a new question
            future = self.lookups.exists_async(self._question_keys(hashes[start:]), stuck_after_s=self.lookup_timeout_s)
            lookup = state.lookup = _Lookup(question, future, time.monotonic() + self.lookup_timeout_s)
        if lookup.future.done():
            return self._answer(state, start, len(hashes) - start, lookup.future.result())
        if time.monotonic() < lookup.deadline:
            return None
        self.stats.add("lookup_timeouts")
        self.pool.warn(
            "lookup-timeout", "KV pool lookup took over %.0f ms; counting it as a miss", self.lookup_timeout_s * 1e3
        )
        return self._answer(state, start, len(hashes) - start, None)

    def _question_keys(self, hashes: list[bytes]) -> list[str]:
        """One lookup's keys: every readable layout's blocks (``lookup_keys``), then the blocks' sightings."""
        return self.lookup_keys(hashes) + self.admission.question_keys(hashes)

    def _answer(
        self, state: _RequestState, start: int, asked: int, found: list[bool] | None
    ) -> tuple[int, list[list[int]]]:
        """The hit of a lookup of ``asked`` blocks from ``start`` (``present_prefix_by_layout``), noting its admission
        answer in the request's record. ``found`` None (the pool gave no answer in time) is a miss of every block,
        counted as the pool's, that admits nothing and learns nothing."""
        if found is None:
            state.sighting, state.unanswered_blocks = self.admission.answer(start, 0, []), asked
            return 0, []
        sightings = asked if self.admission.by_sight else 0
        blocks, sighted = found[: len(found) - sightings], found[len(found) - sightings :]
        hit, at = present_prefix_by_layout(blocks, self.readable_groups, self.windows)
        state.sighting, state.unanswered_blocks = self.admission.answer(start, hit, sighted), 0
        return hit, at

    def may_load_async(self, request: Request) -> bool:
        """vLLM 0.34 asks this, cheaply and before any lookup, as a request enters the waiting queue: with
        ``--max-num-inflight-kv-loads`` such a request starts loading while the running batch is full. True for a
        decode request whose prefill instance said it is saving the prompt to the pool (the pool's P/D hand-off, as
        ``do_remote_prefill`` is a point-to-point one's) when hits load asynchronously. Any other request's hit is
        unknown until its lookup, and a guess would hold back real loads."""
        notice = (request.kv_transfer_params or {}).get(SAVING_PARAM)
        return self.pool is not None and self.load_mode.ever_async and isinstance(notice, dict)

    def lookup_keys(self, hashes: list[bytes]) -> list[str]:
        """Each readable layout's keys in turn, block-major, shard-minor: what ``present_prefix_by_layout`` reads."""
        return [keys.pool_key(shard, h) for shards in self.readable_shards for h in hashes for shard in shards]

    def _producer_wait(self, state: _RequestState) -> _ProducerWait | None:
        """The producer's notice in a decode request's ``kv_transfer_params``, when this engine can use its blocks:
        same shards (model, layout), and no point-to-point partner delivering the KV instead (MultiConnector)."""
        if state.producer_wait is not None:
            return state.producer_wait
        params = state.request.kv_transfer_params or {}
        notice = params.get(SAVING_PARAM)
        if not isinstance(notice, dict) or params.get("do_remote_prefill"):
            return None
        if notice.get("shards") not in self.readable_shards or not isinstance(notice.get("blocks"), int):
            return None  # another model, or a layout this engine does not read: its blocks are not ours to wait for
        state.producer_wait = _ProducerWait(notice["blocks"], time.monotonic() + self.producer_wait_s)
        return state.producer_wait

    # -- 2. after allocation ----------------------------------------------------------------------------------
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._state(request)
        answer, state.answer, state.producer_wait = state.answer, None, None
        if state.asked_tokens is not None:
            self.stats.add("lookups")
            self.stats.add("lookup_tokens", state.asked_tokens)
            if answer is not None:
                self.stats.add("hit_tokens", max(num_external_tokens, 0))
            if (sighting := state.sighting) is not None:
                self.stats.add("missed_blocks.first_sight", sighting.first_sight)
                self.stats.add("missed_blocks.seen_before", sighting.seen_before)
            self.stats.add("missed_blocks.pool_unavailable", state.unanswered_blocks)
            state.asked_tokens = None
        state.block_ids = [list(ids) for ids in blocks.get_block_ids()]
        if num_external_tokens <= 0 or answer is None:
            return
        count = min(-(-num_external_tokens // self.block_size), answer.num_blocks)
        first = answer.start_block
        transfer = group_blocks(
            request.request_id,
            state.block_ids,
            range(first, first + count),
            answer.block_hashes,
            answer.sources,
            self.layout.tp_size,
        )
        self.stats.add("async_loads" if answer.load_async else "sync_loads")
        if answer.load_async:
            self._step_async_loads.append(transfer)
            state.loading = set(transfer.block_ids)
        else:
            self._step_loads.append(transfer)
        state.loaded = range(first, first + count)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """Notes asynchronous loads that failed: when a request's first block fails, vLLM frees its blocks and asks
        for the prompt again, and the pool, which still lists the objects (a node just died, say), would offer the
        same failing hit again and again."""
        if output.invalid_block_ids:
            for state in self._requests.values():
                if state.loading & output.invalid_block_ids:
                    state.load_failed = True
        for req_id in output.finished_recving or ():
            if (state := self._requests.get(req_id)) is not None:
                state.loading = set()
        self.load_mode.loads_measured(pool_counters(getattr(output, "kv_connector_stats", None)))
        if self.events is not None and isinstance(output.kv_connector_worker_meta, StoredInPool):
            self.events.stored(output.kv_connector_worker_meta)

    def take_events(self) -> list[KVCacheEvent]:
        """Pool-tier KV events ready to publish (blocks every shard of which is in the pool; cache resets)."""
        return self.events.take() if self.events is not None else []

    # -- 3. per-step plan -------------------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PoolConnectorMetadata:
        self.load_mode.step_planned(scheduler_output.num_scheduled_tokens)
        idle_step = scheduler_output.total_num_scheduled_tokens == 0
        if idle_step:
            self._wait_while_idle()
        meta = PoolConnectorMetadata(
            loads=self._step_loads,
            async_loads=self._step_async_loads,
            idle_step=idle_step,
            reset=self._reset_pending,
        )
        self._reset_pending = False
        self._step_loads, self._step_async_loads = [], []
        if not self.saves_enabled:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:  # on vLLM 0.34+ also resumed ones, with all their blocks
            if (state := self._requests.get(new.req_id)) is not None:
                state.block_ids = [list(ids) for ids in new.block_ids]
                self._plan_saves(state, new.num_computed_tokens + scheduled[new.req_id], meta)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = compat.resumed_request_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            if (state := self._requests.get(req_id)) is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                state.block_ids = [list(ids) for ids in new_ids] if new_ids else [[] for _ in state.block_ids]
            elif new_ids:
                for group_ids, added in zip(state.block_ids, new_ids, strict=True):
                    group_ids.extend(added)
            self._plan_saves(state, cached.num_computed_tokens[i] + scheduled[req_id], meta)
        return meta

    def _wait_while_idle(self) -> None:
        """In a step that runs nothing, wait (at most ``IDLE_STEP_WAIT_S``) for what the waiting requests wait for:
        the first lookup answer, or the next producer-wait poll. vLLM steps again at once otherwise, an empty
        forward call on every rank, about a thousand a second: that spinning engine takes the cores the lookup itself
        needs (this process's lookup thread, the pool's master), and on a 2-core host a lookup waited over 10 s for
        them. Nothing runs meanwhile, and a request arriving is scheduled at most ``IDLE_STEP_WAIT_S`` later."""
        lookups: list[concurrent.futures.Future[list[bool]]] = []
        wake_at: list[float] = []  # lookup deadlines, producer-wait polls
        for state in self._requests.values():
            if state.lookup is not None:
                if state.lookup.future.done():
                    return  # an answer to hand out in the next step
                lookups.append(state.lookup.future)
                wake_at.append(state.lookup.deadline)
            elif state.producer_wait is not None:
                wake_at.append(state.producer_wait.next_poll)
        if not wake_at:
            return  # nothing of the pool's to wait for (asynchronous loads wait in the workers)
        now = time.monotonic()
        timeout = min(IDLE_STEP_WAIT_S, min(wake_at) - now)
        if timeout <= 0:
            return
        if lookups:
            concurrent.futures.wait(lookups, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        else:
            time.sleep(timeout)

    def _plan_saves(self, state: _RequestState, computed_after_step: int, meta: PoolConnectorMetadata) -> None:
        """Save the blocks this step completes: prompt blocks, and with ``save_decode_cache`` blocks of generated
        tokens too (a block is hashed once all its tokens are known, which the step computing its last one is)."""
        request = state.request
        if not self.save_decode_cache:
            computed_after_step = min(computed_after_step, compat.prompt_length(request))
        full_blocks = computed_after_step // self.block_size
        if full_blocks <= state.next_save_block:
            return
        hashes = self._block_hashes(request, full_blocks)
        todo = [i for i in range(state.next_save_block, len(hashes)) if i not in state.loaded]
        state.next_save_block = len(hashes)
        if not todo:
            return
        remote_decode = bool((request.kv_transfer_params or {}).get("do_remote_decode"))
        admit_until = None if state.sighting is None or remote_decode else state.sighting.admit_until
        todo, first_sight = Admission.split(todo, admit_until, compat.prompt_length(request) // self.block_size)
        if first_sight:
            meta.sightings.extend(hashes[i] for i in first_sight)
            self.stats.add("save_not_admitted.first_sight", len(first_sight))
        if not todo:
            return
        save = group_blocks(request.request_id, state.block_ids, todo, [hashes[i] for i in todo])
        meta.saves.append(save)
        if self.events is not None:
            objects: dict[bytes, list[str]] = defaultdict(list)  # every shard's object in each group holding it
            for block_hash, group in zip(save.block_hashes, save.block_groups(), strict=True):
                objects[block_hash] += (keys.pool_key(shard, block_hash) for shard in self.group_shards[group])
            for i in todo:
                if not objects[hashes[i]]:
                    continue  # no group holds it any more: nothing is saved
                parent = hashes[i - 1] if i else None
                event = pool_block_stored(request, i, hashes[i], parent, self.block_size)
                self.events.planned(hashes[i], event, objects[hashes[i]])

    # -- 4. finish --------------------------------------------------------------------------------------------
    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Forgets the request. A prefill for a remote decode (the P/D proxy's ``do_remote_decode``) answers with a
        notice of the prompt blocks it is saving, so the decode instance can wait for a put still in flight."""
        self.load_mode.finished(request.request_id)
        if (state := self._requests.pop(request.request_id, None)) is not None:
            state.forget_lookup()
        if not self.saves_enabled or not (request.kv_transfer_params or {}).get("do_remote_decode"):
            return False, None
        blocks = compat.prompt_length(request) // self.block_size
        return False, {SAVING_PARAM: {"blocks": blocks, "shards": self.shards}}

    # -- cache reset ------------------------------------------------------------------------------------------
    def reset_cache(self) -> bool:
        """vLLM's reset of the external cache: remove this layout's objects from the pool now (every shard, so no
        later lookup hits them), and have each worker drop its queued saves and remove its shard's objects again at
        the next step (a save in flight now could land after this removal). False when the policy or the pool
        keeps them."""
        if self.reset_policy == "off":
            logger.info("KV pool cache reset requested; reset_cache is off: the pool keeps its entries")
            return False
        removed = 0
        if self.pool is not None:  # a kv_producer's scheduler has no client: its workers remove
            count = self.pool.remove_shards([keys.shard_prefix(shard) for shard in self.shards])
            if count is None:
                logger.warning(
                    "KV pool cache reset: the pool could not remove this layout's entries (it cannot select them by "
                    "key prefix, or it is unreachable): they stay"
                )
                return False
            removed = count
        self._reset_pending = True
        if self.events is not None:
            self.events.cleared()
        logger.info("KV pool cache reset: %d objects of this layout removed (%d shards)", removed, len(self.shards))
        return True

    def take_stats(self) -> PoolConnectorStats | None:
        return take_stats(self.stats)

    def shutdown(self) -> None:
        if self.lookups is not None:
            self.lookups.close()
        if self.pool is not None:
            self.pool.close()
