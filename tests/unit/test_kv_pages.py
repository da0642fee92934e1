import ctypes

import numpy as np
import pytest
import torch

from kvpool_connector.kv_pages import KVPages


def _read(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


def _expected_block_bytes(tensors, block_dim, block_id) -> bytes:
    return b"".join(t.select(block_dim, block_id).contiguous().numpy().tobytes() for t in tensors)


def _check(pages: KVPages, per_layer, block_dim, num_blocks):
    for block in (0, 3, num_blocks - 1):
        (addrs,), (sizes,) = pages.addresses([block])
        got = b"".join(_read(a, s) for a, s in zip(addrs, sizes, strict=True))
        assert got == _expected_block_bytes(per_layer, block_dim, block)
        assert sum(sizes) == pages.block_bytes


def test_cpu_layout_one_page_per_block():
    num_blocks, heads, bs, head = 7, 2, 16, 8
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(num_blocks, heads, bs, 2 * head) for i in (1, 0, 2)}
    page = heads * bs * 2 * head * 4
    pages = KVPages(caches, num_blocks, page)
    assert pages.layer_names == [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    _check(pages, [caches[n] for n in pages.layer_names], 0, num_blocks)
    assert len(pages.regions) == 3


def test_flash_layout_k_and_v_pages():
    num_blocks, bs, heads, head = 5, 16, 2, 8
    caches = {f"layers.{i}.attn": torch.randn(2, num_blocks, bs, heads, head) for i in range(2)}
    page = 2 * bs * heads * head * 4
    pages = KVPages(caches, num_blocks, page)
    _check(pages, [caches[n] for n in pages.layer_names], 1, num_blocks)
    (addrs,), _ = pages.addresses([0])
    assert len(addrs) == 4  # K and V run for each of 2 layers


def test_ascend_style_k_v_tuple_per_layer():
    num_blocks, bs, heads, head = 6, 16, 2, 8
    caches = {
        f"layers.{i}.attn": (torch.randn(num_blocks, bs, heads, head), torch.randn(num_blocks, bs, heads, head))
        for i in range(2)
    }
    page = 2 * bs * heads * head * 4
    pages = KVPages(caches, num_blocks, page)
    flat = [t for n in pages.layer_names for t in caches[n]]
    _check(pages, flat, 0, num_blocks)


def test_layers_sharing_one_buffer_register_it_once():
    num_blocks, bs = 4, 16
    raw = torch.zeros(2 * num_blocks * bs * 4)
    views = raw.view(2, num_blocks, bs * 4)
    pages = KVPages({"layers.0.attn": views[0], "layers.1.attn": views[1]}, num_blocks, bs * 4 * 4)
    assert pages.regions == [(raw.data_ptr(), raw.numel() * 4)]


def test_wrong_page_size_is_a_clear_error():
    caches = {"layers.0.attn": torch.zeros(4, 2, 16, 16)}
    with pytest.raises(ValueError, match="KV spec says 12345"):
        KVPages(caches, 4, 12345)
    with pytest.raises(ValueError, match="num_blocks=5"):
        KVPages(caches, 5, 2 * 16 * 16 * 4)


@pytest.mark.parametrize("num_blocks", [16, 32])
def test_num_blocks_equal_to_another_dimension(num_blocks):
    """num_blocks == block_size (16) or == 2*head_size (32): the block dimension is still the outer one."""
    caches = {f"layers.{i}.attn": torch.randn(num_blocks, 2, 16, 32) for i in range(2)}
    pages = KVPages(caches, num_blocks, 2 * 16 * 32 * 4)
    assert pages.run_sizes == [2 * 16 * 32 * 4] * 2
    _check(pages, [caches[n] for n in pages.layer_names], 0, num_blocks)


def test_flash_layout_with_num_blocks_equal_to_block_size():
    caches = {"layers.0.attn": torch.randn(2, 16, 16, 2, 8)}  # (K/V, num_blocks=16, block_size=16, heads, dim)
    pages = KVPages(caches, 16, 2 * 16 * 2 * 8 * 4)
    assert pages.run_sizes == [16 * 2 * 8 * 4] * 2
    _check(pages, [caches["layers.0.attn"]], 1, 16)


def test_block_id_out_of_range():
    pages = KVPages({"layers.0.attn": torch.zeros(4, 2, 16, 16)}, 4, 2 * 16 * 16 * 4)
    with pytest.raises(IndexError):
        pages.addresses([4])
    assert pages.addresses([]) == ([], [])


def test_addresses_vectorised_over_blocks():
    pages = KVPages({"layers.0.attn": torch.zeros(9, 1, 4, 4)}, 9, 64)
    addrs, sizes = pages.addresses(np.arange(9).tolist())
    assert [a[0] - addrs[0][0] for a in addrs] == [64 * i for i in range(9)]
    assert sizes == [[64]] * 9


def test_registered_regions_are_the_tensors_not_their_padded_storage():
    """vllm-ascend allocates size + 2 MiB and slices an aligned start; production registers from the
    tensor's first byte to its last block's end."""
    num_blocks, page = 4, 2 * 16 * 16 * 4
    raw = torch.zeros(num_blocks * page // 4 + 4096)
    tensor = raw[1000 : 1000 + num_blocks * page // 4].view(num_blocks, 2, 16, 16)
    pages = KVPages({"layers.0.attn": tensor}, num_blocks, page)
    assert pages.regions == [(tensor.data_ptr(), num_blocks * page)]


def test_kernel_blocks_fold_into_the_block_they_split():
    """vllm-ascend may split each block into kernel blocks (shape[0] = num_blocks * scale)."""
    num_blocks, scale, kernel_bs, heads, dim = 4, 2, 8, 2, 8
    k = torch.randn(num_blocks * scale, kernel_bs, heads, dim)
    v = torch.randn(num_blocks * scale, kernel_bs, heads, dim)
    page = 2 * scale * kernel_bs * heads * dim * 4
    pages = KVPages({"layers.0.attn": (k, v)}, num_blocks, page)
    (addrs,), (sizes,) = pages.addresses([2])
    got = b"".join(_read(a, s) for a, s in zip(addrs, sizes, strict=True))
    assert got == k[4:6].numpy().tobytes() + v[4:6].numpy().tobytes()


def test_ascend_mla_nope_and_rope_caches_per_layer():
    """vllm-ascend's MLA layout: (nope (N, bs, 1, 512), rope (N, bs, 1, 64)) per layer, runs of two sizes."""
    num_blocks, bs = 5, 16
    caches = {
        f"layers.{i}.attn": (torch.randn(num_blocks, bs, 1, 512), torch.randn(num_blocks, bs, 1, 64)) for i in range(2)
    }
    pages = KVPages(caches, num_blocks, bs * 576 * 4)
    assert pages.run_sizes == [bs * 512 * 4, bs * 64 * 4] * 2
    _check(pages, [t for n in pages.layer_names for t in caches[n]], 0, num_blocks)
