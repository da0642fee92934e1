"""Scheduler side: how much of a prompt the pool holds, and the per-step load/save plans for the workers.

``PoolScheduler`` orchestrates: the lookups (``lookups.PrefixLookup``, their keys and math in ``lookup_math``), the
save plan (``save_planning``), the P/D hand-off (``handoff``), one record per request (``request_state``).

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
   asynchronous ones to the loader thread), and plans saves of the blocks that become full in this step
   (``save_planning``). A step that runs nothing first waits briefly for lookup answers (``wait_while_idle``).
4. ``update_connector_output`` (each step): notes asynchronous loads that failed, so a retry computes the prompt,
   and, with vLLM's KV events on, what the workers' saves left in the pool (``take_events`` publishes it).
5. ``request_finished``: forgets the request; a prefill for a remote decode answers with its saving notice. Saves
   leave the KV cache inside the step that planned them, so vLLM may free the blocks at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kvpool_connector import compat, handoff, keys
from kvpool_connector.admission import Admission
from kvpool_connector.config import ConfigError, ResolvedConfig
from kvpool_connector.counters import Count, StatsCounter
from kvpool_connector.engine_layout import describe_engine
from kvpool_connector.kv_events import PoolEvents, StoredInPool
from kvpool_connector.load_mode import LoadModeChooser
from kvpool_connector.logs import OncePerReason, init_logger
from kvpool_connector.lookup_math import lookup_keys, matched_tokens
from kvpool_connector.lookups import PrefixLookup
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.metrics import PoolConnectorStats, pool_counters, take_stats
from kvpool_connector.model_identity import model_identity
from kvpool_connector.pool import PoolHandle
from kvpool_connector.request_state import LoadAnswer, RequestState, pool_block_hashes
from kvpool_connector.save_planning import SavePlanner

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


class PoolScheduler:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: ResolvedConfig) -> None:
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        if (reason := compat.unstable_block_hash_reason(vllm_config)) is not None:
            raise ConfigError(f"pool keys would differ between processes: {reason}")
        compat.recompute_failed_loads(transfer, logger)
        settings = config.pool
        self.engine = describe_engine(vllm_config, kv_cache_config, settings.model_version, settings.load_from_tp_sizes)
        self.layout, self.block_size, self.shards = self.engine.layout, self.engine.block_size, self.engine.shards
        # The stored layouts a lookup asks for, this engine's own first: GQA blocks stored at another TP size load too.
        self.readable, self.readable_shards = list(self.engine.readable), self.engine.readable_shards
        self.loads_enabled = transfer.is_kv_consumer
        self.saves_enabled = transfer.is_kv_producer
        self.load_mode = LoadModeChooser(settings.load_async)
        self.drop_last_hit_block = compat.drops_last_hit_block(vllm_config)
        self.producer_wait_s = settings.producer_wait_ms / 1e3
        # Only an engine that looks up learns sightings; one that only saves (a P/D producer) saves everything.
        admission = Admission(settings.save_admission if self.loads_enabled else "all", self.shards[0])
        self.events = PoolEvents() if self.engine.kv_events else None
        self.reset_policy = settings.reset_cache
        self._reset_pending = False  # tell the workers at the next step
        self.stats = StatsCounter()
        self.explain_once = OncePerReason(logger)
        group_shards = self.engine.group_shards
        self.saves = SavePlanner(
            self.block_size, self._block_hashes, settings.save_decode_cache, group_shards, self.events, self.stats
        )
        self.pool: PoolHandle | None = None
        self.lookup: PrefixLookup | None = None
        if self.loads_enabled:
            self.lookup = PrefixLookup.connect(config, self.readable, self.engine.windows, admission, self.stats)
            self.pool = self.lookup.pool
        self._requests: dict[str, RequestState] = {}
        self._step_loads: list[BlockTransfer] = []
        self._step_async_loads: list[BlockTransfer] = []
        for note in config.notes:
            logger.info("MemcacheConnectorStoreV1 config: %s", note)
        identity = model_identity(vllm_config.model_config, settings.model_version)
        logger.info("KV pool model identity %s: %s", identity.digest, identity.description)
        logger.info(
            "MemcacheConnectorStoreV1 scheduler: backend=%s loads=%s saves=%s %s",
            settings.backend,
            self.loads_enabled,
            self.saves_enabled,
            self.engine.summary(),
        )
        if self.drop_last_hit_block and self.loads_enabled:
            logger.info(
                "speculative decoding with a drafter reading the target's hidden states (%s): the last block of each "
                "pool hit is recomputed, as vLLM's own prefix cache does",
                vllm_config.speculative_config.method,
            )

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        return pool_block_hashes(request, num_blocks, self.block_size, self.engine.hash_block_size)

    def lookup_keys(self, hashes: list[bytes]) -> list[str]:
        """The keys a lookup of ``hashes`` asks for, in the lookup key order (``lookup_math``)."""
        return lookup_keys(self.readable_shards, hashes)

    # -- 1. lookup --------------------------------------------------------------------------------------------
    def _state(self, request: Request) -> RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = RequestState(request)
        return state

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Extra tokens the pool holds past the local hit, and whether they load asynchronously; ``None`` while the
        answer is not in yet (vLLM asks again next step). Asking again changes nothing but the latest answer."""
        if self.pool is None or self.lookup is None:
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
        if state.producer_wait is None:
            params = request.kv_transfer_params
            state.producer_wait = handoff.producer_wait(params, self.readable_shards, self.producer_wait_s)
        wait = state.producer_wait
        if wait is not None and state.lookup is None and time.monotonic() < wait.next_poll:
            return None, False  # not yet: running requests' steps go on, an idle step waits for the poll
        answer = self.lookup.found_blocks(state, start, hashes)
        if answer is None:
            return None, False
        found, found_at = answer
        if wait is not None and start + found < wait.blocks:
            if (now := time.monotonic()) < wait.deadline:
                state.forget_lookup()  # ask again after a pause: the producer's put may land any moment
                wait.pause(now)
                return None, False
            wait.blocks = 0  # waited once: a later ask (say, after a failed allocation) takes what is there
            self.stats.add(Count.PRODUCER_WAIT_EXPIRED)
            self.pool.warn(
                "producer-wait",
                "request %s: its prefill instance's blocks did not reach the pool within %.0f ms; computing them",
                request.request_id,
                self.producer_wait_s * 1e3,
            )
        if self.drop_last_hit_block and found:
            found -= 1  # as vLLM's own prefix cache does, so a pool hit computes what a local hit would
        state.forget_lookup()
        state.asked_tokens = (len(hashes) - start) * self.block_size
        extra = matched_tokens(start, found, self.block_size, request.num_tokens, num_computed_tokens)
        logger.debug(
            "pool lookup %s: %d blocks past %d tokens, %d extra", request.request_id, found, num_computed_tokens, extra
        )
        if extra <= 0:
            return 0, False
        load_async = self.load_mode.load_async(-(-extra // self.block_size))
        sources = self.lookup.sources(found_at)
        state.answer = LoadAnswer(start, found, hashes[start : start + found], load_async, sources)
        return extra, load_async

    def may_load_async(self, request: Request) -> bool:
        """vLLM 0.34 asks this, cheaply and before any lookup, as a request enters the waiting queue: with
        ``--max-num-inflight-kv-loads`` such a request starts loading while the running batch is full. True for a
        decode request whose prefill instance said it is saving the prompt to the pool (the pool's P/D hand-off, as
        ``do_remote_prefill`` is a point-to-point one's) when hits load asynchronously. Any other request's hit is
        unknown until its lookup, and a guess would hold back real loads."""
        notice = handoff.notice_in(request.kv_transfer_params)
        return self.pool is not None and self.load_mode.ever_async and notice is not None

    # -- 2. after allocation ----------------------------------------------------------------------------------
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._state(request)
        answer, state.answer, state.producer_wait = state.answer, None, None
        if self.lookup is not None:
            self.lookup.count(state, num_external_tokens if answer is not None else None)
        state.block_ids = [list(ids) for ids in blocks.get_block_ids()]
        if num_external_tokens <= 0 or answer is None:
            return
        state.loaded, transfer = answer.load(
            request.request_id, state.block_ids, num_external_tokens, self.block_size, self.layout.tp_size
        )
        self.stats.add(Count.ASYNC_LOADS if answer.load_async else "sync_loads")
        if answer.load_async:
            self._step_async_loads.append(transfer)
            state.loading = set(transfer.block_ids)
        else:
            self._step_loads.append(transfer)

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
        if idle_step and self.lookup is not None:
            self.lookup.wait_while_idle(self._requests.values())
        meta = PoolConnectorMetadata(
            loads=self._step_loads,
            async_loads=self._step_async_loads,
            idle_step=idle_step,
            reset=self._reset_pending,
        )
        self._reset_pending = False
        self._step_loads, self._step_async_loads = [], []
        if self.saves_enabled:
            self.saves.plan_step(scheduler_output, self._requests, meta)
        return meta

    # -- 4. finish --------------------------------------------------------------------------------------------
    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Forgets the request. A prefill for a remote decode (the P/D proxy's ``do_remote_decode``) answers with a
        notice of the prompt blocks it is saving (``handoff``), so the decode instance can wait for a put still in
        flight."""
        self.load_mode.finished(request.request_id)
        if (state := self._requests.pop(request.request_id, None)) is not None:
            state.forget_lookup()
        if not self.saves_enabled or not (request.kv_transfer_params or {}).get("do_remote_decode"):
            return False, None
        return False, handoff.saving_params(compat.prompt_length(request) // self.block_size, self.shards)

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
        if self.lookup is not None:
            self.lookup.close()
        if self.pool is not None:
            self.pool.close()
