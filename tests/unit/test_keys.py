import dataclasses

import pytest

from kvpool_connector.keys import KVLayout, block_hashes, fingerprint, pool_key, shard_fingerprints, shard_groups

pytestmark = pytest.mark.vllm_api

LAYOUT = KVLayout(
    model="/models/llama",
    model_dtype="torch.float32",
    kv_dtype="torch.float32",
    device_type="cpu",
    kv_layout="NHD",
    attention="FullAttentionSpec",
    block_size=128,
    num_kv_heads=2,
    head_size=64,
    page_size_bytes=131072,
    num_layers=4,
    tp_size=2,
    pp_size=1,
    kv_replicas=1,
)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2
    if isinstance(value, tuple):
        return (*value, "SlidingWindowSpec:window=256:layers=2")
    return value + "-other"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(KVLayout)])
def test_every_layout_input_changes_the_fingerprint(field):
    other = dataclasses.replace(LAYOUT, **{field: _changed(getattr(LAYOUT, field))})
    assert fingerprint(other, 0, 0) != fingerprint(LAYOUT, 0, 0)


def test_rank_changes_the_fingerprint_unless_kv_is_shared():
    assert fingerprint(LAYOUT, 0, 0) != fingerprint(LAYOUT, 1, 0)
    assert fingerprint(LAYOUT, 0, 0) != fingerprint(LAYOUT, 0, 1)
    mla = dataclasses.replace(LAYOUT, kv_replicas=LAYOUT.tp_size)
    assert fingerprint(mla, 0, 0) == fingerprint(mla, 1, 0)


def test_mla_keys_do_not_depend_on_the_tp_size():
    """The latent cache is replicated on every rank and computed alike at every TP size: TP 1, 2, 4 share entries."""
    mla = [dataclasses.replace(LAYOUT, attention="MLAAttentionSpec", tp_size=tp, kv_replicas=tp) for tp in (1, 2, 4)]
    assert len({fingerprint(layout, rank, 0) for layout in mla for rank in range(layout.tp_size)}) == 1
    assert fingerprint(mla[1], 0, 0) != fingerprint(mla[1], 0, 1)  # pipeline stages hold other layers
    assert [layout.stripe(rank) for layout in mla[1:2] for rank in range(2)] == [(0, 2), (1, 2)]


def test_replicated_kv_heads_share_keys_between_the_ranks_that_hold_them():
    """GQA with more TP ranks than KV heads: vLLM gives ranks r and r+1 the same head when tp = 2 x heads."""
    layout = dataclasses.replace(LAYOUT, tp_size=4, num_kv_heads=1, kv_replicas=2)  # 2 KV heads in all
    shards = [fingerprint(layout, rank, 0) for rank in range(4)]
    assert shards[0] == shards[1] != shards[2] == shards[3]
    assert shard_fingerprints(layout) == [shards[0], shards[2]]
    assert [layout.stripe(rank) for rank in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_fingerprint_is_stable_text():
    """Same inputs, same output in every process and release: literals, so a change in the derivation (which would
    make every object stored so far a miss) is caught."""
    assert fingerprint(LAYOUT, 0, 0) == "e1e88a4cdad4c2e2"
    assert fingerprint(LAYOUT, 0, 1) == "337f0da980532d95"  # another pipeline stage


def test_shard_fingerprints_cover_every_rank():
    layout = dataclasses.replace(LAYOUT, tp_size=2, pp_size=2)
    shards = shard_fingerprints(layout)
    assert shards == [fingerprint(layout, tp, pp) for pp in range(2) for tp in range(2)]
    assert len(set(shards)) == 4
    assert len(shard_fingerprints(dataclasses.replace(layout, kv_replicas=2))) == 2


def test_pool_key_format():
    assert pool_key("0123456789abcdef", b"\x01\xff") == "kvp1/0123456789abcdef/01ff"


def test_block_hashes_at_block_granularity():
    hashes = [bytes([i]) for i in range(5)]
    assert block_hashes(hashes, 128, 128, 3) == hashes[:3]
    assert block_hashes(hashes, 128, 128, 10) == hashes


def test_block_hashes_from_finer_hash_blocks():
    hashes = [bytes([i]) for i in range(8)]  # hash every 32 tokens, KV block of 128: every 4th hash names a block
    assert block_hashes(hashes, 128, 32, 5) == [hashes[3], hashes[7]]
    with pytest.raises(ValueError, match="multiple"):
        block_hashes(hashes, 100, 32, 1)


def test_context_parallelism_is_refused_until_supported():
    """With DCP/PCP each rank holds another token shard of a block; keys would serve rank 0's."""
    import torch
    from vllm.config import ParallelConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvpool_connector.engine_layout import check_supported

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)
    check_supported(spec, ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match=r"context parallelism.*decode_context_parallel_size': 2"):
        check_supported(spec, ParallelConfig(tensor_parallel_size=2, decode_context_parallel_size=2))


def test_layers_with_their_own_page_sizes_are_refused():
    """UniformTypeKVCacheSpecs' page size is already summed over layers (indexer caches...)."""
    import torch
    from vllm.config import ParallelConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

    from kvpool_connector.engine_layout import check_supported

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)
    mixed = UniformTypeKVCacheSpecs(block_size=16, kv_cache_specs={"a": spec, "b": spec})
    with pytest.raises(ValueError, match=r"one page size for every layer.*UniformTypeKVCacheSpecs"):
        check_supported(mixed, ParallelConfig())


def test_one_group_keeps_the_keys_earlier_releases_wrote():
    assert fingerprint(LAYOUT, 1, 0) == "c800e0e1b3d7c3f5"  # computed by the release before hybrid models


def test_each_kv_cache_group_has_its_own_objects_and_a_lookup_asks_for_all():
    hybrid = dataclasses.replace(
        LAYOUT, groups=("FullAttentionSpec:window=None:layers=2", "SlidingWindowSpec:window=256:layers=2")
    )
    assert fingerprint(hybrid, 0, 0, group=0) != fingerprint(hybrid, 0, 0, group=1)
    assert shard_fingerprints(hybrid) == [fingerprint(hybrid, tp, 0, g) for tp in range(2) for g in range(2)]
    for shard, group in zip(shard_fingerprints(hybrid), shard_groups(hybrid), strict=True):
        assert shard in shard_fingerprints(hybrid, group)


def test_only_sliding_window_groups_let_a_lookup_miss_their_older_blocks():
    import torch
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec, SlidingWindowSpec

    from kvpool_connector.engine_layout import group_windows

    shape = dict(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32)
    specs = [
        FullAttentionSpec(**shape),
        FullAttentionSpec(**shape, sliding_window=256),  # vLLM's view with its hybrid manager off: keeps every block
        SlidingWindowSpec(**shape, sliding_window=256),  # a hit recomputing its last token reads 256 tokens back
        SlidingWindowSpec(**shape, sliding_window=200),
        ChunkedLocalAttentionSpec(**shape, attention_chunk_size=512),
    ]
    assert group_windows(specs, 128) == [None, None, 2, 2, None]


def test_kv_cache_groups_other_than_attention_pages_are_refused_with_the_reason():
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

    from kvpool_connector.engine_layout import check_kv_cache_groups

    full = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=256)
    check_kv_cache_groups([full, window])  # Gemma 3, gpt-oss: accepted
    mamba = MambaSpec(block_size=128, shapes=((4, 64),), dtypes=(torch.float32,))
    with pytest.raises(ValueError, match=r"MambaSpec.*one state per request"):
        check_kv_cache_groups([full, mamba])
    with pytest.raises(ValueError, match=r"MambaSpec"):
        check_kv_cache_groups([mamba])  # a pure Mamba model too
    wider = FullAttentionSpec(block_size=256, num_kv_heads=2, head_size=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="one block size and page size"):
        check_kv_cache_groups([wider, window])
