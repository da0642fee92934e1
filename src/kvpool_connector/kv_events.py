"""KV events for the pool tier: vLLM's ``BlockStored`` / ``AllBlocksCleared`` with medium ``KVPOOL``, so routers
that follow vLLM's KV events (``--kv-events-config``) see which blocks this instance holds in the pool.

Flow, once per step: each worker notes the blocks its saves left in the pool (put now, or already there) and hands
them over as a :class:`StoredInPool` container (vLLM's ``get_kv_connector_kv_cache_events``); vLLM merges the
workers' containers into the step's output; the scheduler (:class:`PoolEvents`) counts each block until every shard
of it is in (a GQA block at TP 2: both ranks' objects; an MLA block: the one rank whose stripe it is), then
publishes it with its parent and tokens from its own save plan. A cache reset publishes ``AllBlocksCleared``.
Blocks the pool evicts by itself are not seen: a router learns of them as misses.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence

from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVCacheEvent, KVConnectorKVEvents
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

MEDIUM = "KVPOOL"
PLANS_KEPT = 1 << 16  # saves planned but not reported stored yet (a dropped save never reports)


def _note(block_hash: bytes, block_size: int) -> BlockStored:
    """A worker's report that one block's object of its shard is in the pool (equal across ranks, so they count)."""
    return BlockStored(
        block_hashes=[block_hash],
        parent_block_hash=None,
        token_ids=[],
        block_size=block_size,
        lora_id=None,
        medium=MEDIUM,
        lora_name=None,
    )


class StoredInPool(KVConnectorKVEvents):
    """What the workers' saves left in the pool this step, one note per (rank, block), merged by vLLM."""

    def __init__(self, notes: Sequence[KVCacheEvent] = ()) -> None:
        self._notes: Counter[KVCacheEvent] = Counter(notes)
        self._workers = 1

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._notes.update(events)

    def aggregate(self) -> StoredInPool:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._notes.elements())

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._notes.clear()
        self._workers = 1


class WorkerStoredLog:
    """Worker side: hashes of blocks the save path left in the pool (from the step's thread and the save thread)."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._lock = threading.Lock()
        self._hashes: list[bytes] = []

    def note(self, block_hashes: Sequence[bytes]) -> None:
        with self._lock:
            self._hashes.extend(block_hashes)

    def take(self) -> StoredInPool | None:
        with self._lock:
            hashes, self._hashes = self._hashes, []
        return StoredInPool([_note(h, self._block_size) for h in hashes]) if hashes else None


class PoolEvents:
    """Scheduler side: turns the workers' notes into published events once every shard of a block is in."""

    def __init__(self, block_size: int, shards_per_block: int) -> None:
        self._block_size = block_size
        self._shards_per_block = shards_per_block
        self._plans: OrderedDict[bytes, tuple[bytes | None, list[int]]] = OrderedDict()  # hash -> (parent, tokens)
        self._counts: Counter[bytes] = Counter()
        self._ready: list[KVCacheEvent] = []

    def planned(self, block_hashes: Sequence[bytes], parents: Sequence[bytes | None], tokens: Sequence[list[int]]):
        for block_hash, parent, block_tokens in zip(block_hashes, parents, tokens, strict=True):
            self._plans[block_hash] = (parent, block_tokens)
            self._plans.move_to_end(block_hash)
        while len(self._plans) > PLANS_KEPT:
            self._counts.pop(self._plans.popitem(last=False)[0], None)

    def stored(self, container: StoredInPool) -> None:
        for note in container.get_all_events():
            if not isinstance(note, BlockStored) or note.medium != MEDIUM:
                continue
            block_hash = bytes(note.block_hashes[0])
            self._counts[block_hash] += 1
            if self._counts[block_hash] < self._shards_per_block or block_hash not in self._plans:
                continue
            del self._counts[block_hash]
            parent, tokens = self._plans.pop(block_hash)
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
