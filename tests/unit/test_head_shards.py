"""GQA blocks across TP sizes on a real Mooncake Store: blocks put by the real save path from the ranks of a TP s
engine are read by ``HeadShardReader`` into one rank of a TP t engine, for every KV layout the connector supports
(vLLM CPU's, flash-attn's, FlashInfer's, vllm-ascend's K/V pairs with and without kernel blocks) and for ranks that
replicate heads. The reference is the straightforward one: the loading rank's heads sliced out of the whole model's
KV with torch indexing (property-based over head counts, TP sizes, ranks, block and head sizes, dtypes). Also: the
order of stored TP sizes, which shards a rank reads, a block missing one shard object, and the refusals."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvpool_connector import head_shards, keys
from kvpool_connector.backends import Outcome
from kvpool_connector.config import ConfigError
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import CpuRuntime
from kvpool_connector.head_shard_reader import HeadShardReader
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.loading import BlockLoader
from kvpool_connector.metadata import BlockTransfer
from kvpool_connector.pool import PoolHandle
from kvpool_connector.saving import BlockSaver
from kvpool_testkit.mooncake_pool import pool_handle

pytestmark = pytest.mark.processes

LAYERS, NUM_BLOCKS = 2, 6
Tensors = torch.Tensor | tuple[torch.Tensor, ...]


def _kernel_blocks(kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    blocks, tokens, heads, dim = kv.shape[1:]
    return tuple(kv[i].reshape(blocks * 2, tokens // 2, heads, dim).contiguous() for i in range(2))


# name -> (the per-layer KV cache a rank holds, from its logical KV (K/V, block, token, head, dim); the layout's name)
LAYOUTS: dict[str, tuple[Callable[[torch.Tensor], Tensors], str]] = {
    # vLLM's CPU backend: (blocks, heads, block_size, 2*head_size)
    "cpu": (lambda kv: kv.permute(1, 3, 2, 0, 4).reshape(*kv.shape[1:2], kv.shape[3], kv.shape[2], -1), "LBHNC"),
    # flash-attn: (2, blocks, block_size, heads, head_size)
    "flash_attn": (lambda kv: kv.contiguous(), "LBNHC"),
    # FlashInfer HND: (blocks, 2, heads, block_size, head_size)
    "flashinfer": (lambda kv: kv.permute(1, 0, 3, 2, 4).contiguous(), "LBHNC"),
    # vllm-ascend: a (k_cache, v_cache) pair, each (blocks, block_size, heads, head_size); its layout name says nothing
    "ascend": (lambda kv: (kv[0].contiguous(), kv[1].contiguous()), "default@vllm0.23"),
    # vllm-ascend splitting each block into two kernel blocks: (2*blocks, block_size/2, heads, head_size)
    "ascend_kernel_blocks": (_kernel_blocks, "default@vllm0.23"),
}


def model_layout(kind: str, total_heads: int, block: int, head: int, dtype: torch.dtype, tp: int) -> keys.KVLayout:
    elem = torch.empty((), dtype=dtype).element_size()
    whole = keys.KVLayout(
        model=f"tiny-{os.urandom(4).hex()}",  # every example its own keys
        model_dtype=str(dtype),
        kv_dtype=str(dtype),
        device_type="cpu",
        kv_layout=LAYOUTS[kind][1],
        attention="FullAttentionSpec",
        block_size=block,
        num_kv_heads=total_heads,
        head_size=head,
        page_size_bytes=2 * block * total_heads * head * elem,
        num_layers=LAYERS,
        tp_size=1,
        pp_size=1,
    )
    return head_shards.layout_at_tp(whole, tp)


def rank_caches(kind: str, model_kv: list[torch.Tensor], heads: range) -> dict[str, Tensors]:
    """One rank's KV cache: each layer's logical KV (K/V, block, token, head, dim) cut to ``heads``, laid out."""
    make = LAYOUTS[kind][0]
    return {
        f"model.layers.{i}.self_attn.attn": make(kv[:, :, :, heads.start : heads.stop]) for i, kv in enumerate(model_kv)
    }


def flat(caches: dict[str, Tensors]) -> list[torch.Tensor]:
    return [t for value in caches.values() for t in (value if isinstance(value, tuple) else (value,))]


@pytest.fixture(scope="module")
def handle(pool):
    with pool_handle(pool) as h:
        yield h


def save_every_shard(handle: PoolHandle, kind: str, stored: keys.KVLayout, model_kv, hashes: list[bytes]) -> None:
    """What a TP s engine puts: each distinct KV shard once (ranks replicating heads share one), by the save path."""
    for rank in range(0, stored.tp_size, stored.kv_replicas):
        caches = rank_caches(kind, model_kv, head_shards.rank_heads(stored, rank))
        pages = KVPages(caches, NUM_BLOCKS, stored.page_size_bytes)
        saver = BlockSaver(handle, pages, [keys.fingerprint(stored, rank, 0)], CpuRuntime(), StatsCounter())
        saver.save([BlockTransfer("save", list(range(len(hashes))), hashes)])
        assert saver.stats.total()["saved_blocks"] == len(hashes)


def loading_rank(kind: str, layout: keys.KVLayout, model_kv, rank: int) -> tuple[dict[str, Tensors], KVPages]:
    caches = rank_caches(kind, [torch.zeros_like(kv) for kv in model_kv], head_shards.rank_heads(layout, rank))
    pages = KVPages(
        caches,
        NUM_BLOCKS,
        layout.page_size_bytes,
        kv_heads=layout.num_kv_heads,
        block_size=layout.block_size,
        heads_first=head_shards.heads_first(layout),
    )
    return caches, pages


def tp_sizes(heads: int) -> list[int]:
    """TP sizes that split ``heads`` KV heads evenly: its divisors, and twice it (every head on two ranks)."""
    return [s for s in range(1, heads + 1) if heads % s == 0] + [2 * heads]


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    stored_tp, loading_tp = draw(st.lists(st.sampled_from(tp_sizes(heads)), min_size=2, max_size=2, unique=True))
    return dict(
        kind=draw(st.sampled_from(sorted(LAYOUTS))),
        heads=heads,
        stored_tp=stored_tp,
        loading_tp=loading_tp,
        rank=draw(st.integers(0, loading_tp - 1)),
        block=draw(st.sampled_from([4, 8, 16])),
        head=draw(st.sampled_from([4, 8])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        staging_blocks=draw(st.integers(1, 3)),  # the staging area holds this many blocks: loads go in chunks
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_a_rank_at_any_tp_size_loads_exactly_its_heads_of_blocks_stored_at_another(handle, case):
    kind, heads, block, head, dtype = case["kind"], case["heads"], case["block"], case["head"], case["dtype"]
    stored = model_layout(kind, heads, block, head, dtype, case["stored_tp"])
    layout = head_shards.layout_at_tp(stored, case["loading_tp"])
    model_kv = [torch.randn(2, NUM_BLOCKS, block, heads, head).to(dtype) for _ in range(LAYERS)]
    caches, pages = loading_rank(kind, layout, model_kv, case["rank"])
    assume(pages.run_heads is not None)  # the head dimension cannot be told from the shape: refused, tested below
    hashes = [os.urandom(32) for _ in range(4)]
    save_every_shard(handle, kind, stored, model_kv, hashes)

    stored_object = sum(head_shards.object_run_sizes(pages.run_heads, stored.num_kv_heads))
    shards_read = len(head_shards.overlapping_shards(stored, head_shards.rank_heads(layout, case["rank"])))
    staging = case["staging_blocks"] * shards_read * stored_object
    reader = HeadShardReader(handle, pages, layout, (case["rank"], 0), CpuRuntime(), staging)
    into = [5, 2, 0, 3]  # block i of the stored engine lands in block into[i] here
    try:
        assert reader.read(stored.tp_size, into, hashes, [0] * len(hashes)) == [Outcome.OK] * len(hashes)
    finally:
        reader.close()

    expected_kv = [torch.zeros_like(kv) for kv in model_kv]
    for kv, want in zip(model_kv, expected_kv, strict=True):
        want[:, into] = kv[:, : len(into)]
    expected = rank_caches(kind, expected_kv, head_shards.rank_heads(layout, case["rank"]))
    for got, want in zip(flat(caches), flat(expected), strict=True):
        assert torch.equal(got, want), case


def test_a_head_dimension_the_shape_cannot_tell_is_refused_with_the_reason():
    """(block, tokens, heads, dim) with as many heads as tokens, and a layout name that does not say which is which."""
    layout = model_layout("ascend", 8, 8, 4, torch.float32, 1)
    _, pages = loading_rank("ascend", layout, [torch.zeros(2, NUM_BLOCKS, 8, 8, 4)] * LAYERS, 0)
    assert pages.run_heads is None and "2 dimensions below the block dimension look like the 8 KV heads" in str(
        pages.run_heads_problem
    )
    with pytest.raises(ValueError, match="KV heads' place in each page run is not known"):
        HeadShardReader(None, pages, layout, (0, 0), CpuRuntime(), 1 << 20)  # type: ignore[arg-type]
    named = dataclasses.replace(layout, kv_layout="LBNHC")  # the name says tokens come first: no doubt left
    assert loading_rank("ascend", named, [torch.zeros(2, NUM_BLOCKS, 8, 8, 4)] * LAYERS, 0)[1].run_heads is not None


def test_a_block_missing_one_stored_shard_is_recomputed_and_the_rest_load(handle, mooncake_client):
    """Through the worker's loader: own-layout and other-TP blocks in one transfer; one head shard object of one
    other-TP block is gone, so that block (only) is a load error; the others land and are counted."""
    stored = model_layout("cpu", 2, 16, 8, torch.float32, 2)
    layout = head_shards.layout_at_tp(stored, 1)
    model_kv = [torch.randn(2, NUM_BLOCKS, 16, 2, 8) for _ in range(LAYERS)]
    hashes = [os.urandom(32) for _ in range(3)]
    save_every_shard(handle, "cpu", stored, model_kv, hashes)
    own_hash = os.urandom(32)
    save_every_shard(handle, "cpu", layout, model_kv, [own_hash])  # block 0 of the model, in this engine's own layout
    assert mooncake_client.remove(keys.pool_key(keys.fingerprint(stored, 1, 0), hashes[2]), True) == 0

    caches, pages = loading_rank("cpu", layout, model_kv, 0)
    stats = StatsCounter()
    reader = HeadShardReader(handle, pages, layout, (0, 0), CpuRuntime(), 1 << 20)
    loader = BlockLoader(handle, pages, [keys.fingerprint(layout, 0, 0)], stats, own_tp=1, other_tp=reader)
    loader.run_now(BlockTransfer("mixed", [1, 2, 3, 4], [own_hash, *hashes], sources=[1, 2, 2, 2]))
    loader.close(1.0)
    assert loader.take_load_errors() == {4}
    totals = stats.total()
    assert totals["loaded_blocks"] == 3 and totals["loaded_other_tp_blocks"] == 2, totals
    expected_kv = [torch.zeros_like(kv) for kv in model_kv]
    for kv, want in zip(model_kv, expected_kv, strict=True):
        want[:, [1, 2, 3]] = kv[:, [0, 0, 1]]  # the own block and the first two stored ones; block 4 stays as it was
    for got, want in zip(flat(caches), flat(rank_caches("cpu", expected_kv, range(2))), strict=True):
        assert torch.equal(got, want)


def test_stored_tp_sizes_in_order_of_preference():
    at = {tp: model_layout("cpu", 8, 16, 8, torch.float32, tp) for tp in (1, 2, 4, 8, 16)}
    # own first, then larger TP sizes (whole objects, only the needed bytes), then smaller ones (part of an object)
    assert head_shards.readable_tp_sizes(at[2], None) == [2, 4, 8, 1]
    assert head_shards.readable_tp_sizes(at[16], None) == [16, 8, 4, 2, 1]
    assert head_shards.readable_tp_sizes(at[4], []) == [4]
    assert head_shards.readable_tp_sizes(at[4], [16, 1]) == [4, 16, 1]
    with pytest.raises(ConfigError, match="TP 3 does not split this model's 8 KV heads evenly"):
        head_shards.readable_tp_sizes(at[4], [3])
    # which stored shards hold a rank's heads: TP 2's rank 1 (heads 4-7) reads TP 8's shards 4-7
    assert head_shards.overlapping_shards(at[8], head_shards.rank_heads(at[2], 1)) == [4, 5, 6, 7]
    assert head_shards.overlapping_shards(at[1], head_shards.rank_heads(at[16], 5)) == [0]  # head 2, of the one
    assert head_shards.rank_heads(at[16], 5) == range(2, 3)  # ranks 4 and 5 both hold head 2


def test_layouts_whose_objects_do_not_depend_on_the_tp_size_read_their_own_keys_only():
    gqa = model_layout("cpu", 8, 16, 8, torch.float32, 2)
    mla = dataclasses.replace(gqa, attention="MLAAttentionSpec", num_kv_heads=1, tp_size=4, kv_replicas=4)
    assert head_shards.readable_tp_sizes(mla, None) == [4]
    assert head_shards.readable_tp_sizes(mla, [1, 2]) == [4]  # MLA keys leave the TP size out already
    one_head = model_layout("cpu", 1, 16, 8, torch.float32, 1)
    assert head_shards.readable_tp_sizes(one_head, None) == [1]
