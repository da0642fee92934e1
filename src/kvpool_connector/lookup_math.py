"""A lookup's keys and what its answers mean: which pool keys one existence query asks, in which order, and how the
longest hit (in blocks, and where each of its blocks loads from) is read back from the answers. Pure functions, no
pool and no vLLM, so the order is written and read in one place.

The key order, "layout, block-major, shard-minor": for each readable stored layout in turn (this engine's own
first, then the other TP sizes it reads, ``head_shards.readable_tp_sizes``), for each block of the question, the
block's key on each of that layout's shards (``keys.shard_fingerprints`` order: one per distinct pipeline rank, KV
head shard and KV cache group, nested in that order). Each answer is True when the pool holds that object.

Calls, in the order the scheduler makes them:
1. ``lookup_keys(readable_shards, hashes)``: the keys of one question;
2. ``present_prefix_by_layout(found, layout_groups, windows)``: the answers read back as the hit, in blocks, and the
   layout each of its blocks loads from (``present_prefix_blocks`` for one layout);
3. ``matched_tokens(...)``: that hit as the tokens the pool adds beyond vLLM's local prefix hit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvpool_connector import keys


def lookup_keys(readable_shards: Sequence[Sequence[str]], hashes: Sequence[bytes]) -> list[str]:
    """The keys asked for ``hashes``: each readable layout's (``readable_shards[l]``: its shard fingerprints) in turn,
    block-major, shard-minor."""
    return [keys.pool_key(shard, h) for shards in readable_shards for h in hashes for shard in shards]


def present_prefix_blocks(found: list[bool], num_shards: int, windows: Sequence[int | None] | None = None) -> int:
    """The longest hit, in blocks, from exists() answers laid out block-major, shard-minor: every shard holds each
    of its blocks, except that a shard with a window (``windows[s]`` blocks: a sliding-window group's) needs only the
    blocks that far back from the hit's end, as vLLM's own lookup of such a group does."""
    blocks = len(found) // num_shards
    windows = windows or [None] * num_shards
    everywhere = [s for s, w in enumerate(windows) if w is None]
    prefix = next((b for b in range(blocks) if not all(found[b * num_shards + s] for s in everywhere)), blocks)
    windowed = [(s, w) for s, w in enumerate(windows) if w is not None]
    for end in range(prefix, 0, -1):  # the longest hit whose windows are whole (no window: the first)
        if all(found[b * num_shards + s] for s, w in windowed for b in range(max(0, end - w), end)):
            return end
    return 0


def present_prefix_by_layout(
    found: Sequence[bool], layout_groups: Sequence[Sequence[int]], windows: Sequence[int | None]
) -> tuple[int, list[list[int]]]:
    """The longest hit, in blocks, across readable stored layouts, and where each of its blocks loads from.

    ``found``: exists() answers in the lookup key order (``lookup_keys``); ``layout_groups[l]``: the KV cache group of
    each of layout l's shards (``keys.shard_groups``); ``windows``: each group's window (``present_prefix_blocks``).
    A block of a group is there when some layout holds every shard of that group; it loads from the first such
    layout (the order is the preference). Returns the hit and, per block of it and per group, that layout's index."""
    num_groups = len(windows)
    blocks = len(found) // max(1, sum(len(groups) for groups in layout_groups))
    present = np.zeros((len(layout_groups), blocks, num_groups), dtype=bool)
    offset = 0
    for index, groups in enumerate(layout_groups):
        answers = np.asarray(found[offset : offset + blocks * len(groups)], dtype=bool).reshape(blocks, len(groups))
        offset += blocks * len(groups)
        shard_group = np.asarray(groups)
        for g in range(num_groups):
            present[index, :, g] = answers[:, shard_group == g].all(axis=1)
    hit = present_prefix_blocks(present.any(axis=0).ravel().tolist(), num_groups, windows)
    return hit, present.argmax(axis=0)[:hit].tolist()


def matched_tokens(start_block: int, found_blocks: int, block_size: int, num_tokens: int, num_computed: int) -> int:
    """Tokens the pool adds beyond the local hit; a full-prompt hit still leaves the last token to compute."""
    hit = min((start_block + found_blocks) * block_size, num_tokens - 1)
    return max(hit - num_computed, 0)
