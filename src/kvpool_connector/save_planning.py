"""Which blocks each step saves: the scheduler side's save plan, handed to the workers in the step's metadata.

A block is saved in the step that computes its last token (a block is hashed once all its tokens are known), once:
prompt blocks, and with ``save_decode_cache`` blocks of generated tokens too; never a block that came from the pool,
never the partial tail. Admission (``admission``) may hold a block back as a first sighting instead. A preempted
request needs nothing here: a save leaves its blocks inside the step that planned it, and a resumed one is not saved
twice.

Calls, once per step from ``build_connector_meta``:
1. ``plan_step(scheduler_output, requests, meta)``: follows each scheduled request's block ids (new, resumed, grown)
   and plans the saves of the blocks this step completes (``plan``) into ``meta.saves`` and ``meta.sightings``;
   with vLLM's KV events on, notes what each save will leave in the pool (``kv_events.PoolEvents.planned``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from kvpool_connector import compat, keys
from kvpool_connector.admission import Admission
from kvpool_connector.counters import Count
from kvpool_connector.kv_events import PoolEvents, pool_block_stored
from kvpool_connector.metadata import PoolConnectorMetadata, group_blocks

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from kvpool_connector.counters import StatsCounter
    from kvpool_connector.request_state import RequestState


class SavePlanner:
    """``block_hashes(request, n)``: the hashes of a request's first n blocks' pool keys; ``group_shards[g]``: KV
    cache group g's shard fingerprints (for KV events); ``events``: vLLM's KV events, when on."""

    def __init__(
        self,
        block_size: int,
        block_hashes: Callable[[Request, int], list[bytes]],
        save_decode_cache: bool,
        group_shards: Sequence[Sequence[str]],
        events: PoolEvents | None,
        stats: StatsCounter,
    ) -> None:
        self.block_size = block_size
        self.block_hashes = block_hashes
        self.save_decode_cache = save_decode_cache
        self.group_shards = group_shards
        self.events = events
        self.stats = stats

    def plan_step(
        self, scheduler_output: SchedulerOutput, requests: Mapping[str, RequestState], meta: PoolConnectorMetadata
    ) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:  # on vLLM 0.34+ also resumed ones, with all their blocks
            if (state := requests.get(new.req_id)) is not None:
                state.block_ids = [list(ids) for ids in new.block_ids]
                self.plan(state, new.num_computed_tokens + scheduled[new.req_id], meta)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = compat.resumed_request_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            if (state := requests.get(req_id)) is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                state.block_ids = [list(ids) for ids in new_ids] if new_ids else [[] for _ in state.block_ids]
            elif new_ids:
                for group_ids, added in zip(state.block_ids, new_ids, strict=True):
                    group_ids.extend(added)
            self.plan(state, cached.num_computed_tokens[i] + scheduled[req_id], meta)

    def plan(self, state: RequestState, computed_after_step: int, meta: PoolConnectorMetadata) -> None:
        """Save the blocks this step completes: prompt blocks, and with ``save_decode_cache`` blocks of generated
        tokens too (a block is hashed once all its tokens are known, which the step computing its last one is)."""
        request = state.request
        if not self.save_decode_cache:
            computed_after_step = min(computed_after_step, compat.prompt_length(request))
        full_blocks = computed_after_step // self.block_size
        if full_blocks <= state.next_save_block:
            return
        hashes = self.block_hashes(request, full_blocks)
        todo = [i for i in range(state.next_save_block, len(hashes)) if i not in state.loaded]
        state.next_save_block = len(hashes)
        if not todo:
            return
        remote_decode = bool((request.kv_transfer_params or {}).get("do_remote_decode"))
        admit_until = None if state.sighting is None or remote_decode else state.sighting.admit_until
        todo, first_sight = Admission.split(todo, admit_until, compat.prompt_length(request) // self.block_size)
        if first_sight:
            meta.sightings.extend(hashes[i] for i in first_sight)
            self.stats.add(Count.SAVE_NOT_ADMITTED.by("first_sight"), len(first_sight))
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
