"""What the scheduler tells the workers each step: which blocks to load from the pool, which to save to it."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpool_connector.compat import KVConnectorMetadata


@dataclass(frozen=True)
class BlockTransfer:
    """Blocks of one request to move between the pool and the KV cache in this step."""

    req_id: str
    block_ids: list[int]  # where in this worker's KV cache
    block_hashes: list[bytes]  # vLLM's chained hash of each block: the pool key's variable part
    groups: list[int] = field(default_factory=list)  # each block's KV cache group (hybrid models); empty: all group 0
    sources: list[int] = field(default_factory=list)
    """The TP size each block was stored at, where some differ from this engine's (GQA loads across TP sizes); empty:
    every block is this engine's own layout."""

    def block_groups(self) -> list[int]:
        return self.groups or [0] * len(self.block_ids)


@dataclass
class PoolConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)  # before the forward pass
    async_loads: list[BlockTransfer] = field(default_factory=list)  # on the loader thread; vLLM waits for get_finished
    idle_step: bool = False  # nothing scheduled to compute: vLLM is only waiting (for loads, say)
    saves: list[BlockTransfer] = field(default_factory=list)  # after it, once these blocks are written
    reset: bool = False  # the cache was reset since the last step: drop queued saves, remove this shard's objects
    sightings: list[bytes] = field(default_factory=list)  # blocks computed for the first time: record, do not save
