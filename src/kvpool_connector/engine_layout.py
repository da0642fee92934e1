"""The engine's KV layout, read from vLLM's config: the one vLLM-facing step between vLLM's config objects and the
vLLM-free data plane (``keys``, ``head_shards``, ``kv_pages``, ``loading``, ``saving``), which take the resulting
``KVLayout`` and never import vLLM.

Calls:
1. ``engine_layout(vllm_config, kv_cache_config, model_version)``: refuses KV specs and parallel layouts the pool's
   keys do not describe, then returns the ``KVLayout`` both the scheduler and every worker key their blocks by.
2. ``group_windows(specs, block_size)``: how far back a lookup needs each KV cache group's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvpool_connector import compat
from kvpool_connector.keys import KVLayout
from kvpool_connector.model_identity import model_identity

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, model_version: str = "") -> KVLayout:
    """Every input that changes the bytes of this engine's stored blocks (``keys.KVLayout``)."""
    device_type = compat.platform_device_type()
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    for group in groups:
        check_supported(group.kv_cache_spec, parallel)
    check_kv_cache_groups([g.kv_cache_spec for g in groups])
    use_mla = bool(getattr(model_config, "use_mla", False))
    tp_size = int(parallel.tensor_parallel_size)
    total_kv_heads = 1 if use_mla else int(model_config.get_total_num_kv_heads())
    replicas = tp_size if use_mla else max(1, tp_size // total_kv_heads)
    return KVLayout(
        model=_model_digest(vllm_config, model_version),
        model_dtype=str(model_config.dtype),
        kv_dtype=str(spec.dtype),
        device_type=device_type,
        kv_layout=compat.page_format(vllm_config, kv_cache_config, device_type),
        attention=type(spec).__name__,
        block_size=int(spec.block_size),
        num_kv_heads=int(getattr(spec, "num_kv_heads", 0)),
        head_size=int(getattr(spec, "head_size", 0)),
        page_size_bytes=int(spec.page_size_bytes),
        num_layers=int(model_config.get_total_num_hidden_layers())
        if hasattr(model_config, "get_total_num_hidden_layers")
        else int(model_config.hf_config.num_hidden_layers),
        tp_size=tp_size,
        pp_size=int(parallel.pipeline_parallel_size),
        kv_replicas=replicas,
        groups=tuple(_group_description(g) for g in groups) if len(groups) > 1 else (),
    )


def _model_digest(vllm_config: VllmConfig, model_version: str) -> str:
    """The target model's identity, and a draft model's when speculative decoding runs one: its layers' KV is stored
    beside the target's in the same blocks."""
    digest = model_identity(vllm_config.model_config, model_version).digest
    draft = getattr(getattr(vllm_config, "speculative_config", None), "draft_model_config", None)
    if draft is not None and (draft_digest := model_identity(draft, model_version).digest) != digest:
        digest = f"{digest}+draft:{draft_digest}"
    return digest


def _group_description(group: Any) -> str:
    spec = group.kv_cache_spec
    window = getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None)
    return f"{type(spec).__name__}:window={window}:layers={len(group.layer_names)}"


def check_kv_cache_groups(specs: Sequence[Any]) -> None:
    """Every KV cache group must be attention over per-token KV pages (full, MLA, sliding window, chunked local):
    a block's object holds its pages. A Mamba or linear-attention state is one running state per request, not a
    page per block, so it is refused with the reason. Several groups (vLLM's hybrid KV cache manager) must share one
    block size and page size, as vLLM's hybrid allocator gives attention groups (a layer of each shares a tensor)."""
    paged = compat.paged_kv_specs()
    kinds = [type(s).__name__ for s in specs]
    if other := sorted({type(s).__name__ for s in specs if not isinstance(s, paged)}):
        raise ValueError(
            f"MemcacheConnectorStoreV1 stores KV pages per block; this model's KV cache groups include {other} "
            f"(groups: {kinds}): a recurrent state (Mamba, linear attention) is one state per request, not per "
            "block. Supported: full attention (incl. MLA), sliding window and chunked local attention"
        )
    shapes = {(int(s.block_size), int(s.page_size_bytes)) for s in specs}
    if len(shapes) > 1:
        raise ValueError(
            f"MemcacheConnectorStoreV1 needs one block size and page size across KV cache groups; this model's "
            f"groups have (block_size, page_size_bytes) {sorted(shapes)}"
        )


def group_windows(specs: Sequence[Any], block_size: int) -> list[int | None]:
    """Per KV cache group, how many blocks back from the end of a hit its layers still read: a sliding window's
    ceil(window / block_size) (the window of the first token computed after the hit, which is the hit's last token
    when it covers the whole prompt: one block more than vLLM's own lookup needs at most), so a lookup may miss the
    group's older blocks. None: every block (full attention, MLA, chunked local attention)."""
    return [-(-int(s.sliding_window) // block_size) if isinstance(s, compat.SlidingWindowSpec) else None for s in specs]


def check_supported(spec: Any, parallel: Any) -> None:
    """Refuse KV specs and parallel layouts whose blocks these keys and this block arithmetic do not describe."""
    if hasattr(spec, "kv_cache_specs"):  # UniformTypeKVCacheSpecs: layers of one type, but their own page sizes
        raise ValueError(
            "MemcacheConnectorStoreV1 needs one page size for every layer; this model's layers differ "
            f"({type(spec).__name__}, e.g. separate indexer caches)"
        )
    context_parallel = {
        "decode_context_parallel_size": int(getattr(parallel, "decode_context_parallel_size", 1) or 1),
        "prefill_context_parallel_size": int(getattr(parallel, "prefill_context_parallel_size", 1) or 1),
    }
    if wider := {k: v for k, v in context_parallel.items() if v > 1}:
        raise ValueError(
            f"MemcacheConnectorStoreV1 does not support context parallelism yet ({wider}): each rank then holds a "
            "different token shard of a block and a scheduler block spans block_size x cp tokens, which its keys "
            "and block arithmetic do not cover; run with context parallel size 1"
        )
