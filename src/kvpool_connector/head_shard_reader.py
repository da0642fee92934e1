"""Loads of GQA blocks an engine at another TP size stored: the stored head shards that hold this rank's KV heads are
read whole into a staging area, then one native batched copy per chunk of blocks places every head range of every
layer into the rank's pages (``head_shards`` works out the ranges once per stored TP size).

Calls: ``HeadShardReader(pool, pages, layout, ranks, runtime, staging_bytes)``; ``read(tp, block_ids, hashes,
groups)`` from the loader (``loading``), on its thread or the forward thread; ``close()`` drops the staging area.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvpool_connector import head_shards, keys
from kvpool_connector.backends.base import Outcome
from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.ops import CopyError
from kvpool_connector.pool import PoolHandle
from kvpool_connector.staging import StagingArea


@dataclass(frozen=True)
class _StoredShards:
    """How this rank reads blocks stored at one other TP size: the stored shards that hold its heads."""

    fingerprints: list[list[str]]  # [group][k]: the k-th such shard's fingerprint
    run_sizes: list[int]  # the buffers of one stored object (its page runs)
    pieces: list[head_shards.HeadPieces]  # [k]: what the k-th shard's object gives this rank's pages

    @property
    def block_run_sizes(self) -> list[int]:
        """The runs of every object one block needs, back to back: one staging slot."""
        return self.run_sizes * len(self.pieces)


class HeadShardReader:
    """Loads GQA blocks stored at another TP size into this rank's pages: the stored objects that hold its heads are
    read into a staging area (set aside at the first such load, one slot per block), then one native batched
    copy per chunk of blocks places every head range of every layer."""

    def __init__(
        self,
        pool: PoolHandle,
        pages: KVPages,
        layout: keys.KVLayout,
        ranks: tuple[int, int],
        runtime: DeviceRuntime,
        staging_bytes: int,
    ) -> None:
        """``ranks``: this worker's (tp, pp) rank; ``staging_bytes``: the staging area's size (at least a block)."""
        if pages.run_heads is None:
            raise ValueError(f"the KV heads' place in each page run is not known: {pages.run_heads_problem}")
        self._pool = pool
        self._pages = pages
        self._run_heads = pages.run_heads
        self._layout = layout
        self._ranks = ranks
        self._runtime = runtime
        self._staging_bytes = staging_bytes
        self._staging: StagingArea | None = None
        self._plans: dict[int, _StoredShards] = {}
        self._lock = threading.Lock()  # synchronous and asynchronous loads may overlap; they share the staging area

    def _plan(self, tp: int) -> _StoredShards:
        plan = self._plans.get(tp)
        if plan is None:
            tp_rank, pp_rank = self._ranks
            stored = head_shards.layout_at_tp(self._layout, tp)
            own = head_shards.rank_heads(self._layout, tp_rank)
            shards = head_shards.overlapping_shards(stored, own)
            plan = self._plans[tp] = _StoredShards(
                fingerprints=[
                    [keys.fingerprint(stored, j * stored.kv_replicas, pp_rank, g) for j in shards]
                    for g in range(self._layout.num_groups)
                ],
                run_sizes=head_shards.object_run_sizes(self._run_heads, stored.num_kv_heads),
                pieces=[
                    head_shards.head_pieces(
                        self._run_heads, own, head_shards.rank_heads(stored, j * stored.kv_replicas)
                    )
                    for j in shards
                ],
            )
        return plan

    def _staging_for(self, plan: _StoredShards) -> StagingArea:
        """The staging area cut into slots of one block's objects of ``plan``: at least one slot."""
        block_bytes = sum(plan.block_run_sizes)
        if self._staging is None or self._staging.nbytes < block_bytes:
            if self._staging is not None:
                self._staging.close()
            self._staging = StagingArea(self._pool, self._runtime, max(block_bytes, self._staging_bytes))
        self._staging.shape(plan.block_run_sizes, layer_major=False)
        return self._staging

    def close(self) -> None:
        """Drop the staging area's registration (the area goes with this reader)."""
        with self._lock:
            if self._staging is not None:
                self._staging.close()
                self._staging = None

    def read(self, tp: int, block_ids: Sequence[int], hashes: Sequence[bytes], groups: Sequence[int]) -> list[Outcome]:
        """Load blocks stored at TP ``tp``; each block's outcome (OK only if all of its objects arrived and were
        placed)."""
        plan = self._plan(tp)
        with self._lock:
            staging = self._staging_for(plan)
            chunk = staging.capacity
            outcomes: list[Outcome] = []
            for first in range(0, len(block_ids), chunk):
                end = first + chunk
                part = slice(first, end)
                outcomes += self._read_chunk(plan, staging, block_ids[part], hashes[part], groups[part])
        return outcomes

    def _read_chunk(
        self,
        plan: _StoredShards,
        staging: StagingArea,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        groups: Sequence[int],
    ) -> list[Outcome]:
        per_block = len(plan.pieces)
        pool_keys = [
            keys.pool_key(plan.fingerprints[g][k], h)
            for h, g in zip(hashes, groups, strict=True)
            for k in range(per_block)
        ]
        # Block b's slot holds its objects back to back: object b * per_block + k is the k-th shard's.
        object_runs = staging.slot_addresses(np.arange(len(block_ids))).reshape(len(pool_keys), len(plan.run_sizes))
        objects = object_runs[:, 0]
        read = self._pool.get(pool_keys, object_runs.tolist(), [plan.run_sizes] * len(pool_keys))
        outcomes = [
            next((o for o in read[b * per_block : (b + 1) * per_block] if o is not Outcome.OK), Outcome.OK)
            for b in range(len(block_ids))
        ]
        arrived = np.flatnonzero([o is Outcome.OK for o in outcomes])
        if not arrived.size:
            return outcomes
        pages = self._pages.address_array([block_ids[b] for b in arrived], [groups[b] for b in arrived])
        dsts, srcs, sizes = [], [], []
        for k, pieces in enumerate(plan.pieces):
            dsts.append(pages[:, pieces.run] + pieces.dst)
            srcs.append(objects[arrived * per_block + k][:, None] + pieces.src)
            sizes.append(np.broadcast_to(pieces.size, (arrived.size, pieces.size.size)))
        try:
            self._runtime.copy_in(
                np.concatenate(dsts, axis=1).ravel(),
                np.concatenate(srcs, axis=1).ravel(),
                np.concatenate(sizes, axis=1).ravel(),
            )
        except CopyError as exc:
            self._pool.warn("copy", "KV pool load: placing %d blocks' head shards failed: %s", arrived.size, exc)
            for b in arrived:
                outcomes[b] = Outcome.FAILED
        return outcomes
