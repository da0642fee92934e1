"""KV events for the pool tier: vLLM's ``BlockStored`` / ``AllBlocksCleared`` with medium ``KVPOOL``, so routers
that follow vLLM's KV events (``--kv-events-config``) see which blocks this instance holds in the pool.

Flow, once per step: when the scheduler plans a block's save it builds the event (the one vLLM's own KV cache
publishes for the block, medium aside) and the keys of the block's objects (one per TP/PP shard and KV cache group
holding it: a GQA block at TP 2, both ranks' objects; an MLA block, the one rank's whose stripe it is). Each worker
notes the keys its saves left in the pool (put now, or already there) and hands them over as a
:class:`StoredInPool` report through vLLM's worker-to-scheduler channel (``build_connector_worker_meta``; unlike the
``get_kv_connector_kv_cache_events`` path, MultiConnector forwards it to its children). The scheduler
(:class:`PoolEvents`) ticks the keys off and publishes the event once every object is in; objects are told apart by
key, so two requests saving one block count it once. A cache reset publishes ``AllBlocksCleared``. Blocks the pool
evicts by itself are not seen: a router learns of them as misses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpool_connector import compat
from kvpool_connector.compat import AllBlocksCleared, BlockStored, KVCacheEvent, KVConnectorWorkerMetadata
from kvpool_connector.keys import block_hash_of

if TYPE_CHECKING:
    from vllm.v1.request import Request

MEDIUM = "KVPOOL"
PLANS_KEPT = 1 << 16  # saves planned but not reported stored yet (a dropped save never reports)


def pool_block_stored(
    request: Request, index: int, block_hash: bytes, parent: bytes | None, block_size: int
) -> BlockStored:
    """The ``BlockStored`` vLLM's own KV cache publishes for block ``index`` of ``request`` (tokens, LoRA, the extra
    keys its hash covers: cache salt, multimodal inputs, prompt embeddings; session), with the pool as its medium and
    no KV cache group: one event stands for every group's object of the block."""
    return compat.block_stored_event(request, index * block_size, block_size, block_hash, parent, MEDIUM)


@dataclass
class StoredInPool(KVConnectorWorkerMetadata):
    """The pool keys the ranks' saves left in the pool since the last step. vLLM's output aggregator merges the ranks'
    reports into one (and MultiConnector hands each child its own)."""

    pool_keys: list[str]

    def aggregate(self, other: KVConnectorWorkerMetadata) -> StoredInPool:
        assert isinstance(other, StoredInPool)
        return StoredInPool(self.pool_keys + other.pool_keys)


class WorkerStoredLog:
    """Worker side: keys the save path left in the pool (from the step's thread and the save thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: list[str] = []

    def note(self, pool_keys: Sequence[str]) -> None:
        with self._lock:
            self._keys.extend(pool_keys)

    def take(self) -> StoredInPool | None:
        with self._lock:
            pool_keys, self._keys = self._keys, []
        return StoredInPool(pool_keys) if pool_keys else None


class PoolEvents:
    """Scheduler side: turns the workers' reports into published events once every object of a planned block is in
    (one per TP/PP shard and KV cache group holding it). Reports of blocks no plan waits for are ignored: the second
    of two requests saving one block, or a block whose plan was already published or dropped."""

    def __init__(self) -> None:
        # hash -> (the event to publish, keys of the block's objects not reported yet)
        self._plans: OrderedDict[bytes, tuple[BlockStored, set[str]]] = OrderedDict()
        self._ready: list[KVCacheEvent] = []

    def planned(self, block_hash: bytes, event: BlockStored, object_keys: Collection[str]) -> None:
        if block_hash not in self._plans:  # a second request saving the block waits for the same objects
            self._plans[block_hash] = (event, set(object_keys))
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)

    def stored(self, report: StoredInPool) -> None:
        for key in report.pool_keys:
            block_hash = block_hash_of(key)
            plan = self._plans.get(block_hash)
            if plan is None:
                continue
            event, outstanding = plan
            outstanding.discard(key)
            if not outstanding:
                del self._plans[block_hash]
                self._ready.append(event)

    def cleared(self) -> None:
        """A reset removed this layout's objects and dropped its queued saves: no plan can complete any more."""
        self._plans.clear()
        self._ready.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        ready, self._ready = self._ready, []
        return ready
