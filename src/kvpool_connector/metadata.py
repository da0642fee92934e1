"""What the scheduler tells the workers each step: which blocks to load from the pool, which to save to it.

``group_blocks`` builds a request's ``BlockTransfer`` from vLLM's block ids per KV cache group; workers read it
(``loading``, ``saving``) and never see vLLM's per-group lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvpool_connector import compat
from kvpool_connector.compat import KVConnectorMetadata


@dataclass(frozen=True)
class BlockTransfer:
    """Blocks of one request to move between the pool and the KV cache in this step; block k is ``block_ids[k]``,
    ``block_hashes[k]``, and, where given, ``groups[k]`` and ``sources[k]``."""

    req_id: str
    block_ids: list[int]  # where in this worker's KV cache
    block_hashes: list[bytes]  # vLLM's chained hash of each block: the pool key's variable part
    groups: list[int] | None = None
    """Each block's KV cache group (a hybrid model's full-attention and sliding-window groups). None: every block is
    in group 0 (a model with one group, or a transfer none of whose blocks is in another)."""
    sources: list[int] | None = None
    """The TP size each block was stored at (a GQA engine loading blocks an engine at another TP size stored). None:
    every block is in this engine's own layout (always so for saves)."""

    def __post_init__(self) -> None:
        for name, values in (("groups", self.groups), ("sources", self.sources)):
            if values is not None and len(values) != len(self.block_ids):
                raise ValueError(f"BlockTransfer.{name}: {len(values)} values for {len(self.block_ids)} blocks")

    def block_groups(self) -> list[int]:
        """Each block's KV cache group, filled in where ``groups`` is None."""
        return self.groups if self.groups is not None else [0] * len(self.block_ids)


def group_blocks(
    req_id: str,
    block_ids: Sequence[Sequence[int]],
    indices: Iterable[int],
    hashes: Sequence[bytes],
    sources: Sequence[Sequence[int]] | None = None,
    own_tp: int = 0,
) -> BlockTransfer:
    """The transfer of the blocks at ``indices`` (``hashes[k]`` is the k-th index's) in every KV cache group that
    holds them (``block_ids[g]``: group g's blocks, as vLLM allocated them). A group holds no block where vLLM gave it
    the null block: a sliding-window group outside its window, so a load fills only the window and a save skips
    blocks the group already dropped. ``sources[k][g]``: the stored TP size the k-th block of group g loads from
    (None, or ``own_tp`` everywhere: this engine's own layout)."""
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
        groups if any(groups) else None,
        stored_tp if any(tp != own_tp for tp in stored_tp) else None,
    )


@dataclass
class PoolConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)  # before the forward pass
    async_loads: list[BlockTransfer] = field(default_factory=list)  # on the loader thread; vLLM waits for get_finished
    idle_step: bool = False  # nothing scheduled to compute: vLLM is only waiting (for loads, say)
    saves: list[BlockTransfer] = field(default_factory=list)  # after it, once these blocks are written
    reset: bool = False  # the cache was reset since the last step: drop queued saves, remove this shard's objects
    sightings: list[bytes] = field(default_factory=list)  # blocks computed for the first time: record, do not save
