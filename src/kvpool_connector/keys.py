"""Pool keys: ``kvp1/<layout fingerprint>/<vLLM block hash>``.

A model with several KV cache groups (vLLM's hybrid KV cache manager: sliding-window and full-attention layers, say)
stores one object per block and group: the group is part of the fingerprint, so each group's objects hold its own
layers, and a lookup asks for every group's (a sliding-window group's only within its window of the hit's end).

vLLM's block hash already chains the whole token prefix plus LoRA, multimodal inputs and ``cache_salt``. What it
does not cover is everything that changes the *bytes* of a stored block: the model (its weights and config, not its
path: ``model_identity``), dtypes, KV layout and page geometry, block size, layer count and which shard of the
heads/layers a worker holds. Those go into the fingerprint, so two models, two versions of one model's weights,
dtypes or parallel layouts sharing one pool never read each other's blocks.

Both sides compute fingerprints from the same inputs: the scheduler for every (tp, pp) shard when it looks a prompt
up, each worker for its own shard when it saves or loads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kvpool_connector import compat
from kvpool_connector.model_identity import model_identity

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

KEY_FORMAT = "kvp1"


@dataclass(frozen=True)
class KVLayout:
    """Every input that changes the bytes of a stored block, for one model deployment (not one rank)."""

    model: str
    """The model's identity digest (weights, config, ``model_version``: ``model_identity``), never its path."""
    model_dtype: str
    kv_dtype: str
    device_type: str
    kv_layout: str
    attention: str  # KV spec class: full attention, MLA, sliding window ... store different bytes
    block_size: int
    num_kv_heads: int
    head_size: int
    page_size_bytes: int
    num_layers: int
    tp_size: int
    pp_size: int
    kv_replicas: int = 1
    """TP ranks that hold the same KV: tp_size with MLA (the latent cache is replicated on every rank), tp_size //
    KV heads when there are fewer KV heads than ranks (vLLM replicates them), else 1. Such ranks share keys and
    split the writes."""
    groups: tuple[str, ...] = ()
    """With several KV cache groups, each one's kind, window and layer count; empty with one group."""

    @property
    def num_groups(self) -> int:
        return max(1, len(self.groups))

    @property
    def kv_shards(self) -> int:
        """Distinct KV shards across the TP group: one object per block and shard."""
        return self.tp_size // self.kv_replicas

    def kv_shard(self, tp_rank: int) -> int:
        """The shard TP rank ``tp_rank`` holds (vLLM gives rank r the heads of shard r // replicas)."""
        return tp_rank // self.kv_replicas

    def stripe(self, tp_rank: int) -> tuple[int, int]:
        """(index, count): this rank puts every count-th block of a step, starting at index."""
        return tp_rank % self.kv_replicas, self.kv_replicas

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, model_version: str = "") -> KVLayout:
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
        return cls(
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


def fingerprint(layout: KVLayout, tp_rank: int, pp_rank: int, group: int = 0) -> str:
    """16 hex digits naming one shard's byte layout; equal inputs give equal output in every process.

    When every TP rank holds all of the KV (MLA's latent cache, or fewer KV heads than ranks), what a block stores
    does not depend on the TP size: engines at TP 1, 2, 4 then share entries. Otherwise the TP size and the rank's
    head shard are part of it. The pipeline rank always is (its layers differ), and so is the KV cache group when
    there are several.
    """
    fields = asdict(layout)
    if layout.kv_shards == 1:
        del fields["tp_size"], fields["kv_replicas"]
    shard = {"kv_shard": layout.kv_shard(tp_rank), "pp_rank": pp_rank}
    if layout.groups:
        shard["group"] = group
    else:
        del fields["groups"]  # one group: the keys every earlier release wrote
    blob = json.dumps({"format": KEY_FORMAT, **fields, **shard}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shard_groups(layout: KVLayout) -> list[int]:
    """The KV cache group of each of ``shard_fingerprints(layout)``, in its order."""
    return [g for _ in range(layout.pp_size) for _ in range(layout.kv_shards) for g in range(layout.num_groups)]


def shard_fingerprints(layout: KVLayout, group: int | None = None) -> list[str]:
    """Fingerprints of every shard whose blocks a lookup must find (one per distinct (KV shard, pp, group)), or of
    one KV cache group's shards."""
    groups = range(layout.num_groups) if group is None else [group]
    return [
        fingerprint(layout, shard * layout.kv_replicas, pp, g)
        for pp in range(layout.pp_size)
        for shard in range(layout.kv_shards)
        for g in groups
    ]


def pool_key(shard_fingerprint: str, block_hash: bytes) -> str:
    return f"{shard_prefix(shard_fingerprint)}{block_hash.hex()}"


def sighting_key(shard_fingerprint: str, block_hash: bytes) -> str:
    """The marker that a block was computed once (``admission``): beside the blocks, under the same prefix, so a
    cache reset removes it with them."""
    return f"{shard_prefix(shard_fingerprint)}seen/{block_hash.hex()}"


def block_hash_of(pool_key_: str) -> bytes:
    """The vLLM block hash a pool key names (its last part)."""
    return bytes.fromhex(pool_key_.rsplit("/", 1)[1])


def group_keys(group_shards: Sequence[str], block_hashes: Sequence[bytes], groups: Sequence[int]) -> list[str]:
    """The key of each block, in its KV cache group's shard (``group_shards[g]``: one worker's fingerprint of g)."""
    return [pool_key(group_shards[g], h) for g, h in zip(groups, block_hashes, strict=True)]


def shard_prefix(shard_fingerprint: str) -> str:
    """What every key of one (layout, shard) starts with: what a cache reset removes."""
    return f"{KEY_FORMAT}/{shard_fingerprint}/"


def adapter_block_hashes(hashes: Sequence[bytes], adapter: str) -> list[bytes]:
    """A LoRA request's block hashes chained with its adapter's weight digest (``model_identity.adapter_digest``):
    each still names the whole prefix, now also the adapter's weights, which vLLM's own hash does not."""
    salt = f"lora:{adapter}".encode()
    return [hashlib.sha256(salt + bytes(h)).digest() for h in hashes]


def block_hashes(hashes: Sequence[bytes], block_size: int, hash_block_size: int, num_blocks: int) -> list[bytes]:
    """The hash of each of the first ``num_blocks`` KV blocks, from ``request.block_hashes``.

    vLLM may hash at a finer grain than its KV block; each hash chains the whole prefix, so the hash at a KV
    block's last sub-block names that block.
    """
    if block_size % hash_block_size:
        raise ValueError(f"block_size {block_size} is not a multiple of hash_block_size {hash_block_size}")
    step = block_size // hash_block_size
    num_blocks = min(num_blocks, len(hashes) // step)
    return [bytes(hashes[(i + 1) * step - 1]) for i in range(num_blocks)]
