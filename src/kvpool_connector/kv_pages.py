"""Where each KV block's bytes live in this worker's KV cache, derived from the tensors vLLM registers.

Layouts differ by platform and attention backend: the CPU backend gives one tensor per layer shaped
``(num_blocks, kv_heads, block_size, 2*head_size)`` (a block is one contiguous page), flash-attn gives
``(2, num_blocks, block_size, kv_heads, head_size)`` (a block is a K page and a V page), Ascend registers a
``(k_cache, v_cache)`` pair per layer. Rather than knowing them all, find the block dimension in each tensor (the
one of size ``num_blocks``, or a multiple of it when vllm-ascend splits blocks into kernel blocks, with contiguous
memory below it and at most a K/V split above it) and describe a block as the contiguous runs under it; the runs must
add up to the KV spec's page size. A block's object in the pool is
the concatenation of those runs over all layers, in layer order.

With several KV cache groups (vLLM's hybrid KV cache manager) a block id means a page of the layers of one group
(vLLM's hybrid allocator lets a layer of each group share one tensor), so a block's object is the runs over that
group's layers, and every address takes the group along.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvpool_connector.head_shards import RunHeads


@dataclass(frozen=True)
class _Run:
    """One contiguous run of a block's bytes: block b's run starts at ``base + b * block_stride``."""

    base: int
    block_stride: int
    nbytes: int


def _layer_index(name: str) -> tuple[int, str]:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    return (digits[0] if digits else -1, name)


def _block_dim(tensor: torch.Tensor, num_blocks: int, name: str) -> tuple[int, int]:
    """(the block dimension, kernel blocks per block) of ``tensor``: the block dimension has ``num_blocks`` entries
    (or a multiple: vllm-ascend splits a block into kernel blocks), everything after it is contiguous, and at most a
    K/V split (2) comes before it. Every layout vLLM and vllm-ascend use fits that."""
    exact, scaled = [], []
    for dim, size in enumerate(tensor.shape):
        outer = int(np.prod(tensor.shape[:dim])) if dim else 1
        if size % num_blocks or outer > 2 or not tensor[(0,) * dim].select(0, 0).is_contiguous():
            continue
        (exact if size == num_blocks else scaled).append(dim)
    candidates = exact or scaled
    if len(candidates) != 1:
        what = "no dimension" if not candidates else f"dimensions {candidates} all"
        raise ValueError(
            f"KV cache tensor {name} {tuple(tensor.shape)} (stride {tensor.stride()}, {tensor.dtype}): {what} "
            f"look like the block dimension (size num_blocks={num_blocks} or a multiple, contiguous below, at most a "
            "K/V split above); this layout is not supported"
        )
    dim = candidates[0]
    return dim, tensor.shape[dim] // num_blocks


def _runs_of(tensor: torch.Tensor, num_blocks: int, name: str) -> list[_Run]:
    """The runs of one block in ``tensor`` (``_block_dim``)."""
    elem = tensor.element_size()
    dim, scale = _block_dim(tensor, num_blocks, name)  # kernel blocks per vLLM block: adjacent, one run
    inner_bytes = (int(np.prod(tensor.shape[dim + 1 :])) if dim + 1 < tensor.dim() else 1) * elem
    if scale > 1 and tensor.stride(dim) * elem != inner_bytes:
        raise ValueError(
            f"KV cache tensor {name} {tuple(tensor.shape)}: {scale} kernel blocks per block are not adjacent in memory "
            f"(stride {tensor.stride()}); this layout is not supported"
        )
    outer_ranges = [range(n) for n in tensor.shape[:dim]]
    runs = []
    for index in itertools.product(*outer_ranges):
        offset = sum(i * s for i, s in zip(index, tensor.stride(), strict=False)) * elem
        runs.append(_Run(tensor.data_ptr() + offset, scale * tensor.stride(dim) * elem, scale * inner_bytes))
    return runs


def _run_heads(
    tensor: torch.Tensor, num_blocks: int, name: str, heads: int, block_size: int, heads_first: bool | None
) -> RunHeads | str:
    """How each of this tensor's runs lays out its ``heads`` KV heads, or why that cannot be told: the dimension
    under the block dimension of size ``heads``; where several are, the one with the token dimension beside it, on
    the side the layout's name puts it (``heads_first``: heads before tokens; None: not named)."""
    dim, scale = _block_dim(tensor, num_blocks, name)
    tail = [int(n) for n in tensor.shape[dim + 1 :]]
    found = [d for d, n in enumerate(tail) if n == heads]
    if len(found) > 1:
        tokens = block_size // scale
        before = {d for d in found if d > 0 and tail[d - 1] == tokens}
        after = {d for d in found if d + 1 < len(tail) and tail[d + 1] == tokens}
        beside = after if heads_first else before if heads_first is False else before | after
        found = sorted(beside)
    if len(found) != 1:
        return (
            f"KV cache tensor {name} {tuple(tensor.shape)}: {len(found) or 'no'} dimensions below the block dimension "
            f"look like the {heads} KV heads"
        )
    d = found[0]
    return RunHeads(outer=scale * int(np.prod(tail[:d])), inner=int(np.prod(tail[d + 1 :])) * tensor.element_size())


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) ranges with overlapping or touching ones merged, as (start, size), in address order."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


class KVPages:
    """Page addresses and sizes of any set of blocks, for every layer this worker holds."""

    def __init__(
        self,
        kv_caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
        num_blocks: int,
        page_size_bytes: int,
        groups: Sequence[Sequence[str]] | None = None,
        kv_heads: int = 0,
        block_size: int = 0,
        heads_first: bool | None = None,
    ) -> None:
        """``groups``: the layer names of each KV cache group (vLLM's ``kv_cache_groups``); None: one group.
        ``kv_heads`` (per rank), ``block_size`` and ``heads_first`` (the layout's name puts heads before tokens;
        None: it does not say): given, ``run_heads`` tells where the heads sit in each run."""
        spans: list[tuple[int, int]] = []
        self.layer_names = sorted(kv_caches, key=_layer_index)
        self.device = torch.device("cpu")
        runs_of_layer: dict[str, list[_Run]] = {}
        heads_of_layer: dict[str, list[RunHeads | str]] = {}
        for name in self.layer_names:
            value = kv_caches[name]
            tensors = [value] if isinstance(value, torch.Tensor) else list(value)
            runs_of_layer[name], heads_of_layer[name] = [], []
            for tensor in tensors:
                tensor_runs = _runs_of(tensor, num_blocks, name)
                runs_of_layer[name] += tensor_runs
                if kv_heads:
                    heads = _run_heads(tensor, num_blocks, name, kv_heads, block_size, heads_first)
                    heads_of_layer[name] += [heads] * len(tensor_runs)
                # From the tensor's first byte to its last block's end, as production registers it: not the raw
                # storage, whose start vllm-ascend pads for 2 MiB alignment.
                spans += [(r.base, r.base + (num_blocks - 1) * r.block_stride + r.nbytes) for r in tensor_runs]
                self.device = tensor.device
        self.regions: list[tuple[int, int]] = _merged(spans)
        """(start, size) of the memory holding every block: what a pool client registers (shared tensors once)."""
        self.on_device = self.device.type != "cpu"
        group_layers = [self.layer_names] if groups is None else [sorted(g, key=_layer_index) for g in groups]
        group_runs = [[run for name in layers for run in runs_of_layer[name]] for layers in group_layers]
        self.run_sizes: list[int] = [r.nbytes for r in group_runs[0]]
        """Bytes of each of a block's runs, in object order (layer-major); equal in every group."""
        if any([r.nbytes for r in runs] != self.run_sizes for runs in group_runs):
            raise ValueError(
                f"KV cache groups differ in their page runs ({[len(r) for r in group_runs]} runs per block): one "
                "object size per block is needed"
            )
        self._bases = np.array([[r.base for r in runs] for runs in group_runs], dtype=np.int64)  # (groups, runs)
        self._strides = np.array([[r.block_stride for r in runs] for runs in group_runs], dtype=np.int64)
        self.block_bytes = sum(self.run_sizes)
        if self.block_bytes != page_size_bytes * len(group_layers[0]):
            raise ValueError(
                f"KV cache tensors hold {self.block_bytes} bytes per block over {len(group_layers[0])} layers; "
                f"vLLM's KV spec says {page_size_bytes} per layer"
            )
        self.num_blocks = num_blocks
        self.num_groups = len(group_layers)
        heads = [h for name in group_layers[0] for h in heads_of_layer.get(name, [])]
        problems = [h for h in heads if isinstance(h, str)]
        self.run_heads: list[RunHeads] | None = None if problems or not heads else heads  # type: ignore[assignment]
        """Where each run (object order) keeps its KV heads; None when not asked for or not told."""
        self.run_heads_problem: str | None = problems[0] if problems else None

    def address_array(self, block_ids: Sequence[int], groups: Sequence[int] | None = None) -> np.ndarray:
        """(blocks, runs) array of run start addresses, runs in object order (layer-major); ``groups``: the KV cache
        group of each block (None: group 0)."""
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise IndexError(f"block id out of range 0..{self.num_blocks - 1}: {block_ids}")
        group = np.zeros(ids.size, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        return self._bases[group] + ids[:, None] * self._strides[group]

    def addresses(
        self, block_ids: Sequence[int], groups: Sequence[int] | None = None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Per block: the start of each of its runs, and the runs' sizes (the pool clients' multi-buffer form)."""
        return self.address_array(block_ids, groups).tolist(), [self.run_sizes] * len(block_ids)
