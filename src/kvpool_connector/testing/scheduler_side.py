"""The connector's scheduler side on its own, for tests and benchmarks: a :class:`PoolScheduler` built from a real
``VllmConfig``, and real vLLM ``Request`` objects with vLLM's own block hashes, so lookups run exactly as in the
engine's scheduler loop, without an engine."""

from __future__ import annotations

from typing import Any

import torch

from kvpool_connector.config import parse_config
from kvpool_connector.scheduler import PoolScheduler

BLOCK = 128


def pool_scheduler(model_dir: str, extra_config: dict[str, Any], kv_role: str = "kv_both") -> PoolScheduler:
    """A scheduler-side connector for ``model_dir`` (fp32, one KV group of 2 heads x 64, 128-token blocks)."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    transfer = KVTransferConfig(
        kv_connector="MemcacheConnectorStoreV1", kv_role=kv_role, kv_connector_extra_config=extra_config
    )
    vllm_config = EngineArgs(
        model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024, kv_transfer_config=transfer
    ).create_engine_config()
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=64,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in range(4)], spec)],
    )
    return PoolScheduler(vllm_config, kv_cache_config, parse_config(extra_config, env={}))


class Requests:
    """vLLM ``Request`` objects whose block hashes are computed as the engine computes them."""

    def __init__(self) -> None:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(BLOCK, sha256)

    def make(
        self, request_id: str, tokens: list[int], kv_transfer_params: dict | None = None, **request_args: Any
    ) -> Any:
        """``request_args``: more of ``Request``'s arguments (``cache_salt``, ``lora_request`` ...)."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": kv_transfer_params})
        return Request(request_id, tokens, params, None, block_hasher=self._hasher, **request_args)
