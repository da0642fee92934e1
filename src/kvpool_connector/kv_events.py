"""KV events for the pool tier: vLLM's ``BlockStored`` / ``AllBlocksCleared`` with medium ``KVPOOL``, so routers
that follow vLLM's KV events (``--kv-events-config``) see which blocks this instance holds in the pool.

Flow, once per step: each worker notes the pool keys its saves left in the pool (put now, or already there) and hands
them over as a :class:`StoredInPool` report (vLLM's worker-to-scheduler channel, ``build_connector_worker_meta``;
unlike the ``get_kv_connector_kv_cache_events`` path, MultiConnector forwards it to its children); vLLM merges the
workers' reports into the step's output; the scheduler (:class:`PoolEvents`) counts each block until every shard
of it is in (a GQA block at TP 2: both ranks' objects; an MLA block: the one rank whose stripe it is), then
publishes it with its parent and tokens from its own save plan. A cache reset publishes ``AllBlocksCleared``.
Blocks the pool evicts by itself are not seen: a router learns of them as misses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvpool_connector.compat import KVConnectorWorkerMetadata
from kvpool_connector.keys import block_hash_of

MEDIUM = "KVPOOL"
PLANS_KEPT = 1 << 16  # saves planned but not reported stored yet (a dropped save never reports)


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

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        # hash -> (parent, tokens, keys of the block's objects not reported yet)
        self._plans: OrderedDict[bytes, tuple[bytes | None, list[int], set[str]]] = OrderedDict()
        self._ready: list[KVCacheEvent] = []

    def planned(
        self,
        block_hashes: Sequence[bytes],
        parents: Sequence[bytes | None],
        tokens: Sequence[list[int]],
        object_keys: Sequence[Collection[str]],
    ) -> None:
        for block_hash, parent, block_tokens, expected in zip(block_hashes, parents, tokens, object_keys, strict=True):
            if block_hash not in self._plans:  # a second request saving the block waits for the same objects
                self._plans[block_hash] = (parent, block_tokens, set(expected))
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)

    def stored(self, report: StoredInPool) -> None:
        for key in report.pool_keys:
            block_hash = block_hash_of(key)
            plan = self._plans.get(block_hash)
            if plan is None:
                continue
            parent, tokens, outstanding = plan
            outstanding.discard(key)
            if outstanding:
                continue
            del self._plans[block_hash]
            self._ready.append(
                BlockStored(
                    block_hashes=[maybe_convert_block_hash(block_hash)],
                    parent_block_hash=maybe_convert_block_hash(parent) if parent is not None else None,
                    token_ids=tokens,
                    block_size=self._block_size,
                    lora_id=None,
                    medium=MEDIUM,
                    lora_name=None,
                )
            )

    def cleared(self) -> None:
        """A reset removed this layout's objects and dropped its queued saves: no plan can complete any more."""
        self._plans.clear()
        self._ready.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        ready, self._ready = self._ready, []
        return ready
