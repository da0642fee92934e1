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
up, each worker for its own shard when it saves or loads. The layout comes from vLLM's config through
``engine_layout``; this module never imports vLLM, so the data plane keys its blocks without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

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
