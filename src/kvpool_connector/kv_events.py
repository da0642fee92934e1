"""KV events for the pool tier: vLLM's ``BlockStored`` / ``AllBlocksCleared`` with medium ``KVPOOL``, so routers
that follow vLLM's KV events (``--kv-events-config``) see which blocks this instance holds in the pool.

Flow, once per step: each worker notes the blocks its saves left in the pool (put now, or already there) and hands
them over as a :class:`StoredInPool` report (vLLM's worker-to-scheduler channel, ``build_connector_worker_meta``;
unlike the ``get_kv_connector_kv_cache_events`` path, MultiConnector forwards it to its children); vLLM merges the
workers' reports into the step's output; the scheduler (:class:`PoolEvents`) counts each block until every shard
of it is in (a GQA block at TP 2: both ranks' objects; an MLA block: the one rank whose stripe it is), then
publishes it with its parent and tokens from its own save plan. A cache reset publishes ``AllBlocksCleared``.
Blocks the pool evicts by itself are not seen: a router learns of them as misses.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvpool_connector.compat import KVConnectorWorkerMetadata

MEDIUM = "KVPOOL"
PLANS_KEPT = 1 << 16  # saves planned but not reported stored yet (a dropped save never reports)


@dataclass
class StoredInPool(KVConnectorWorkerMetadata):
    """The blocks the ranks' saves left in the pool since the last step: one entry per (rank, block). vLLM's output
    aggregator merges the ranks' reports into one (and MultiConnector hands each child its own)."""

    block_hashes: list[bytes]

    def aggregate(self, other: KVConnectorWorkerMetadata) -> StoredInPool:
        assert isinstance(other, StoredInPool)
        return StoredInPool(self.block_hashes + other.block_hashes)


class WorkerStoredLog:
    """Worker side: hashes of blocks the save path left in the pool (from the step's thread and the save thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: list[bytes] = []

    def note(self, block_hashes: Sequence[bytes]) -> None:
        with self._lock:
            self._hashes.extend(block_hashes)

    def take(self) -> StoredInPool | None:
        with self._lock:
            hashes, self._hashes = self._hashes, []
        return StoredInPool(hashes) if hashes else None


class PoolEvents:
    """Scheduler side: turns the workers' reports into published events once every object of a block is in (one per
    TP/PP shard and KV cache group holding it)."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        # hash -> (parent, tokens, objects the saves put: one per (TP/PP shard, KV cache group holding the block))
        self._plans: OrderedDict[bytes, tuple[bytes | None, list[int], int]] = OrderedDict()
        self._counts: Counter[bytes] = Counter()
        self._ready: list[KVCacheEvent] = []

    def planned(
        self,
        block_hashes: Sequence[bytes],
        parents: Sequence[bytes | None],
        tokens: Sequence[list[int]],
        objects: Sequence[int],
    ) -> None:
        for block_hash, parent, block_tokens, count in zip(block_hashes, parents, tokens, objects, strict=True):
            self._plans[block_hash] = (parent, block_tokens, count)
            self._plans.move_to_end(block_hash)
        while len(self._plans) > PLANS_KEPT:
            self._counts.pop(self._plans.popitem(last=False)[0], None)

    def stored(self, report: StoredInPool) -> None:
        for block_hash in report.block_hashes:
            self._counts[block_hash] += 1
            plan = self._plans.get(block_hash)
            if plan is None or self._counts[block_hash] < plan[2]:
                continue
            del self._counts[block_hash], self._plans[block_hash]
            parent, tokens, _ = plan
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
        self._counts.clear()
        self._ready.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        ready, self._ready = self._ready, []
        return ready
