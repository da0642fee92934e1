"""The connector's scheduler side on its own, for tests and benchmarks: a :class:`PoolScheduler` built from a real
``VllmConfig``, and real vLLM ``Request`` objects with vLLM's own block hashes, so lookups run exactly as in the
engine's scheduler loop, without an engine.

Calls, in the order a test makes them:
1. ``vllm_config(model_dir, extra_config)`` and ``kv_cache_config(config, num_blocks)``: what an engine would hand
   the connector, built directly, so they work on every vLLM release in the tested range, including a CUDA build on
   a host without a GPU (``EngineArgs.create_engine_config()`` needs a platform there);
2. ``pool_scheduler(model_dir, extra_config)``: the scheduler side on those (128-token blocks, fp32, 1024 tokens);
3. ``Requests().make(...)``: requests whose block hashes are the engine's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kvpool_connector.config import parse_config
from kvpool_connector.scheduler import PoolScheduler

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

BLOCK = 128
MAX_MODEL_LEN = 1024


def vllm_config(
    model_dir: str,
    extra_config: dict[str, Any],
    kv_role: str = "kv_both",
    block_size: int = BLOCK,
    num_blocks: int = 64,
    max_model_len: int = MAX_MODEL_LEN,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int | None = None,
    kv_transfer_config: dict[str, Any] | None = None,
) -> VllmConfig:
    """The ``VllmConfig`` an fp32 engine of ``model_dir`` with MemcacheConnectorStoreV1 would run on, built from its
    parts rather than through ``EngineArgs``: that path asks the platform (CPU kernels, a GPU) for defaults, and fails
    with a CUDA build of vLLM on a host without one, while the scheduler side needs none of it. ``kv_transfer_config``:
    a whole ``--kv-transfer-config`` (MultiConnector, say) in place of ours alone with ``extra_config``."""
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # registers the connector's name, which VllmConfig checks (EngineArgs loads them too)
    transfer = KVTransferConfig(
        **(
            kv_transfer_config
            or {
                "kv_connector": "MemcacheConnectorStoreV1",
                "kv_role": kv_role,
                "kv_connector_extra_config": extra_config,
            }
        )
    )
    model = ModelConfig(model=model_dir, dtype="float32", max_model_len=max_model_len, seed=0, enforce_eager=True)
    scheduler = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens or max_model_len,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        async_scheduling=False,  # one step in flight, as the scheduler loops of tests drive it
    )
    config = VllmConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True),
        scheduler_config=scheduler,
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=transfer,
    )
    config.cache_config.num_gpu_blocks = num_blocks  # what the engine sets once it sized the KV cache
    return config


def kv_cache_config(config: VllmConfig, num_blocks: int) -> KVCacheConfig:
    """One full-attention KV cache group of every layer of the model, with ``num_blocks`` blocks, as vLLM's CPU
    backend gives an fp32 decoder (layer names as vLLM's Llama names them)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    model = config.model_config
    parallel = config.parallel_config
    spec = FullAttentionSpec(
        block_size=config.cache_config.block_size,
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_size=model.get_head_size(),
        dtype=torch.float32,
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(model.get_num_layers(parallel))]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])


def pool_scheduler(model_dir: str, extra_config: dict[str, Any], kv_role: str = "kv_both") -> PoolScheduler:
    """A scheduler-side connector for ``model_dir`` (fp32, one KV group of the model's heads, 128-token blocks)."""
    config = vllm_config(model_dir, extra_config, kv_role)
    return PoolScheduler(config, kv_cache_config(config, num_blocks=64), parse_config(extra_config, env={}))


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
