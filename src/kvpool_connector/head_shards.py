"""GQA blocks across tensor-parallel sizes: which stored objects hold a rank's KV heads, and where each head range of
such an object goes in the rank's pages.

An engine at TP s stores a GQA block as one object per KV shard: shard j holds KV heads ``[j*h_s, (j+1)*h_s)``
(``h_s`` heads per shard), every layer's page runs concatenated. An engine at TP t (t != s) reads, for each block,
the stored shards that overlap its own heads: several whole objects when t < s, a part of one when t > s (and, when
ranks replicate heads, t > KV heads, the shard holding its one head). Everything else that changes a page's bytes
(model, dtypes, KV layout, block size, page layout per head) is the same at both sizes, which ``layout_at_tp`` keeps.

A page run lays its heads out as ``outer`` repetitions of ``heads x inner`` bytes (``RunHeads``): vLLM's CPU backend
puts the heads outermost in a page (``outer`` 1), flash-attn and vllm-ascend put them inside every token (``outer``
= block size). ``head_pieces`` turns that into byte ranges once per (stored layout, stored shard): the load path
moves them with one native batched copy per chunk of blocks, with no Python loop over heads or layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from kvpool_connector import keys
from kvpool_connector.config import ConfigError


@dataclass(frozen=True)
class RunHeads:
    """One page run as ``outer`` repetitions of (this rank's heads x ``inner`` bytes)."""

    outer: int
    inner: int


@dataclass(frozen=True)
class HeadPieces:
    """Byte ranges carrying one stored object's share of a rank's heads into the rank's pages: piece i copies
    ``size[i]`` bytes from ``src[i]`` in the object to ``dst[i]`` in page run ``run[i]``."""

    run: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    size: np.ndarray


def total_kv_heads(layout: keys.KVLayout) -> int:
    """KV heads of the whole model (1 for MLA's latent cache)."""
    return layout.num_kv_heads * layout.kv_shards


def splits_heads(layout: keys.KVLayout) -> bool:
    """Whether the TP size changes what a block's objects hold: GQA heads split over ranks. MLA's latent cache, and a
    model with one KV head, store the same object at every TP size: their keys leave the TP size out already."""
    return total_kv_heads(layout) > 1


def layout_at_tp(layout: keys.KVLayout, tp_size: int) -> keys.KVLayout:
    """The layout an engine of the same deployment has at TP ``tp_size``: its heads per rank, page size and
    replication. Refuses a TP size that does not split the KV heads evenly (vLLM refuses to run at it, too)."""
    heads = total_kv_heads(layout)
    if tp_size < 1 or (heads % tp_size and tp_size % heads):
        raise ConfigError(
            f"load_from_tp_sizes: TP {tp_size} does not split this model's {heads} KV heads evenly (ranks at TP "
            f"{tp_size} would hold {heads / max(tp_size, 1):.2f} heads each); give TP sizes that divide {heads} or "
            f"are multiples of it"
        )
    if layout.page_size_bytes % layout.num_kv_heads:
        raise ConfigError(
            f"load_from_tp_sizes: this layout's page ({layout.page_size_bytes} bytes) is not a whole number of bytes "
            f"per KV head ({layout.num_kv_heads} heads), so its pages cannot be split by head"
        )
    per_rank = max(1, heads // tp_size)
    return replace(
        layout,
        tp_size=tp_size,
        num_kv_heads=per_rank,
        page_size_bytes=layout.page_size_bytes // layout.num_kv_heads * per_rank,
        kv_replicas=max(1, tp_size // heads),
    )


def readable_tp_sizes(layout: keys.KVLayout, configured: Sequence[int] | None) -> list[int]:
    """The TP sizes whose stored blocks this engine reads, in order of preference: its own (one object per page),
    then larger ones ascending (whole objects, only the bytes it needs), then smaller ones descending (a part of each
    object). ``configured`` None: every TP size that divides the KV heads. A layout whose objects do not depend on
    the TP size (``splits_heads`` false) reads its own keys only: every TP size already shares them."""
    own = layout.tp_size
    if not splits_heads(layout):
        return [own]
    heads = total_kv_heads(layout)
    sizes = {s for s in range(1, heads + 1) if heads % s == 0} if configured is None else set(configured)
    for size in sizes:
        layout_at_tp(layout, size)  # refuses a size that does not split the heads evenly
    others = sizes - {own}
    return [own, *sorted(s for s in others if s > own), *sorted((s for s in others if s < own), reverse=True)]


def heads_first(layout: keys.KVLayout) -> bool | None:
    """Whether the layout's name puts KV heads before tokens inside a block (vLLM 0.32+'s ``LBHNC`` and kin, 0.23's
    ``HND``); None when the name does not say (a platform's ``default``)."""
    name = layout.kv_layout.split("@")[0]
    return name.index("H") < name.index("N") if "H" in name and "N" in name else None


def rank_heads(layout: keys.KVLayout, tp_rank: int) -> range:
    """The KV heads TP rank ``tp_rank`` holds."""
    shard = layout.kv_shard(tp_rank)
    return range(shard * layout.num_kv_heads, (shard + 1) * layout.num_kv_heads)


def overlapping_shards(stored: keys.KVLayout, heads: range) -> list[int]:
    """The stored layout's KV shards that hold any of ``heads``, ascending."""
    per = stored.num_kv_heads
    return list(range(heads.start // per, -(-heads.stop // per)))


def head_pieces(runs: Sequence[RunHeads], own: range, stored: range) -> HeadPieces:
    """The pieces that carry the heads of ``own`` found in an object holding heads ``stored`` into this rank's pages.

    The object is the page runs in order, each with ``len(stored)`` heads; the page runs hold ``len(own)``."""
    first, stop = max(own.start, stored.start), min(own.stop, stored.stop)
    if first >= stop:
        empty = np.zeros(0, dtype=np.int64)
        return HeadPieces(empty, empty, empty, empty)
    outer = np.array([r.outer for r in runs], dtype=np.int64)
    inner = np.array([r.inner for r in runs], dtype=np.int64)
    object_run_bytes = outer * len(stored) * inner
    object_run_start = np.concatenate([[0], np.cumsum(object_run_bytes)[:-1]])
    run = np.repeat(np.arange(len(runs), dtype=np.int64), outer)
    rep = np.arange(run.size, dtype=np.int64) - np.repeat(np.cumsum(outer) - outer, outer)  # index within its run
    step = inner[run]
    src = object_run_start[run] + (rep * len(stored) + first - stored.start) * step
    dst = (rep * len(own) + first - own.start) * step
    return HeadPieces(run, src, dst, (stop - first) * step)


def object_run_sizes(runs: Sequence[RunHeads], heads: int) -> list[int]:
    """Bytes of each page run of an object holding ``heads`` heads: the buffers a read of it scatters into."""
    return [r.outer * heads * r.inner for r in runs]
