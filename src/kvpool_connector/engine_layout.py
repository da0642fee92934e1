"""The engine's KV layout, read from vLLM's config: the one vLLM-facing step between vLLM's config objects and the
vLLM-free data plane (``keys``, ``head_shards``, ``kv_pages``, ``loading``, ``saving``), which take the resulting
``KVLayout`` and never import vLLM.

Calls:
1. ``describe_engine(vllm_config, kv_cache_config, model_version, load_from_tp_sizes)``: everything both sides of the
   connector key, look up and move blocks by (``EngineLayout``), read once per process; the scheduler and every
   worker call it with the same inputs and so hold the same description.
2. ``engine_layout(vllm_config, kv_cache_config, model_version)``: refuses KV specs and parallel layouts the pool's
   keys do not describe, then returns the ``KVLayout`` both the scheduler and every worker key their blocks by.
3. ``group_windows(specs, block_size)``: how far back a lookup needs each KV cache group's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from kvpool_connector import compat, head_shards, keys
from kvpool_connector.keys import KVLayout
from kvpool_connector.model_identity import model_identity

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class EngineLayout:
    """This engine's KV cache as the connector keys, looks up and moves it: the scheduler asks for every shard's keys
    in each readable layout, each worker keys, places and re-assembles its own shard's blocks."""

    layout: KVLayout  # every input that changes a stored block's bytes: what the keys' fingerprints cover
    hash_block_size: int  # tokens per entry of a request's block_hashes (the block size is a multiple of it)
    windows: tuple[int | None, ...]  # per KV cache group, the blocks a lookup needs back from a hit's end; None: all
    readable: tuple[KVLayout, ...]  # the stored layouts this engine loads from, its own first (GQA: other TP sizes)
    num_blocks: int  # blocks of this engine's KV cache
    group_layers: tuple[tuple[str, ...], ...] | None  # each KV cache group's layer names; None: one group of all
    kv_cache_bytes: int  # the one allocation backing every layer's KV cache; 0: several allocations
    kv_events: bool  # vLLM publishes KV cache events: saves report what they leave in the pool

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @cached_property
    def shards(self) -> list[str]:
        """Every shard's fingerprint (``keys.shard_fingerprints``): a block is in the pool when all of them hold it."""
        return keys.shard_fingerprints(self.layout)

    @cached_property
    def group_shards(self) -> list[list[str]]:
        """Per KV cache group, its shards' fingerprints."""
        return [keys.shard_fingerprints(self.layout, g) for g in range(self.layout.num_groups)]

    @cached_property
    def readable_shards(self) -> list[list[str]]:
        """Per readable layout, its shards' fingerprints: what a lookup asks for (``lookup_math.lookup_keys``)."""
        return [keys.shard_fingerprints(stored) for stored in self.readable]

    def summary(self) -> str:
        """What this engine's keys name, for the start-up log: an engine that differs in any of it shares no block."""
        layout = self.layout
        other_tp = [stored.tp_size for stored in self.readable[1:]]
        return (
            f"block_size={layout.block_size} shards={len(self.shards)}; keys name model {layout.model}, "
            f"{layout.attention} KV in {layout.kv_dtype}, {layout.num_layers} layers, TP {layout.tp_size} "
            f"PP {layout.pp_size}" + (f"; loads blocks stored at TP sizes {other_tp} too" if other_tp else "")
        )

    def worker_shards(self, tp_rank: int, pp_rank: int) -> list[str]:
        """The fingerprints the worker at (``tp_rank``, ``pp_rank``) keys its blocks by, one per KV cache group."""
        return [keys.fingerprint(self.layout, tp_rank, pp_rank, g) for g in range(self.layout.num_groups)]


def describe_engine(
    vllm_config: VllmConfig,
    kv_cache_config: KVCacheConfig,
    model_version: str = "",
    load_from_tp_sizes: Sequence[int] | None = None,
) -> EngineLayout:
    """This engine's ``EngineLayout``. Raises ``ValueError`` for a KV cache the keys cannot describe and
    ``ConfigError`` for ``load_from_tp_sizes`` that do not split the model's KV heads (``head_shards``)."""
    layout = engine_layout(vllm_config, kv_cache_config, model_version)
    groups = kv_cache_config.kv_cache_groups
    readable = head_shards.readable_tp_sizes(layout, load_from_tp_sizes)
    return EngineLayout(
        layout=layout,
        hash_block_size=compat.hash_block_size(kv_cache_config, layout.block_size),
        windows=tuple(group_windows([g.kv_cache_spec for g in groups], layout.block_size)),
        readable=tuple(head_shards.layout_at_tp(layout, tp) for tp in readable),
        num_blocks=kv_cache_config.num_blocks,
        group_layers=tuple(tuple(g.layer_names) for g in groups) if len(groups) > 1 else None,
        kv_cache_bytes=compat.kv_cache_backing_bytes(kv_cache_config),
        kv_events=compat.kv_events_enabled(vllm_config),
    )


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
    """The target model's identity, and, when speculative decoding runs a drafter with layers of its own (a draft
    model, an EAGLE head, MTP layers of the same checkpoint), its method and identity: the drafter's layers' KV is
    stored beside the target's in the same blocks, so such blocks never serve an engine without that drafter."""
    digest = model_identity(vllm_config.model_config, model_version).digest
    speculative = getattr(vllm_config, "speculative_config", None)
    if speculative is not None and (speculative.use_eagle() or speculative.uses_draft_model()):
        draft = model_identity(speculative.draft_model_config, model_version).digest
        digest = f"{digest}+{speculative.method}:{draft}"
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
