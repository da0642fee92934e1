"""Read what a run left behind: the worker's shard fingerprint from its log, and the pool keys of a prompt derived
independently of the connector (with vLLM's own block hash), so tests can look at the pool directly; and wait for a
pool client to connect."""

from __future__ import annotations

import re
import time
from typing import Any

WORKER_SHARD = re.compile(r"MemcacheConnectorStoreV1 worker: .* shard ([0-9a-f]{16})")


def worker_shard(log: str) -> str:
    match = WORKER_SHARD.search(log)
    assert match, "worker did not log its shard fingerprint"
    return match.group(1)


def worker_shards(log: str) -> list[str]:
    """Every rank's shard fingerprint, sorted and each once (ranks that replicate heads share one)."""
    shards = sorted(set(WORKER_SHARD.findall(log)))
    assert shards, "no worker logged its shard fingerprint"
    return shards


def worker_block_bytes(log: str) -> int:
    match = re.search(r"MemcacheConnectorStoreV1 worker: .* (\d+) bytes per block object", log)
    assert match, "worker did not log its block size"
    return int(match.group(1))


def prompt_block_keys(shard: str, prompt: list[int], block_size: int = 128) -> list[str]:
    """Pool keys of a prompt's full blocks (no LoRA, no multimodal input, no cache_salt)."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    kv_cache_utils.init_none_hash(sha256)
    parent, out = kv_cache_utils.NONE_HASH, []
    for start in range(0, len(prompt) // block_size * block_size, block_size):
        parent = kv_cache_utils.hash_block_tokens(sha256, parent, prompt[start : start + block_size], None)
        out.append(f"kvp1/{shard}/{bytes(parent).hex()}")
    return out


def wait_connected(handle: Any, timeout_s: float = 30.0) -> bool:
    """Whether ``handle`` (a ``PoolHandle``) connects within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not handle.connected:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
