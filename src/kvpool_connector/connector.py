"""MemcacheConnectorStoreV1: the vLLM KV connector that keeps full prompt blocks in a shared KV pool.

A thin facade over vLLM's ``KVConnectorBase_V1``: the scheduler process gets a :class:`PoolScheduler`, each worker
process a :class:`PoolWorker`, and every method delegates to the one its role has.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from kvpool_connector import compat
from kvpool_connector.compat import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from kvpool_connector.config import parse_config
from kvpool_connector.metadata import PoolConnectorMetadata
from kvpool_connector.metrics import PoolConnectorStats, PoolPromMetrics
from kvpool_connector.scheduler import PoolScheduler
from kvpool_connector.worker import PoolWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class MemcacheConnectorStoreV1(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        compat.check_vllm_version()
        config = parse_config(self._kv_transfer_config.kv_connector_extra_config)
        self.connector_scheduler: PoolScheduler | None = None
        self.connector_worker: PoolWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = PoolScheduler(vllm_config, kv_cache_config, config)
        else:
            self.connector_worker = PoolWorker.from_vllm(vllm_config, kv_cache_config, config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, never a lost hand-off

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: KVTransferConfig) -> Any:
        """vLLM 0.34+: workers register the KV cache with the pool client (Mooncake's transfer engine, memcache's
        device RDMA), so each segment of an extensible KV cache must be one physical allocation (``REGISTERS``)."""
        return compat.kv_cache_access_registers()

    # -- worker side ------------------------------------------------------------------------------------------
    def get_mem_pool_context(self) -> AbstractContextManager | None:
        if self.connector_worker is None:
            return None
        return self.connector_worker.kv_cache_allocation()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.connector_worker is not None
        self.connector_worker.register_kv_caches(kv_caches)

    def unregister_kv_caches(self) -> None:
        """vLLM 0.34+, before sleep mode releases the KV cache's memory."""
        assert self.connector_worker is not None
        self.connector_worker.release_kv_memory()

    def restore_kv_caches(self) -> None:
        """vLLM 0.34+, after wake-up backed the KV cache again (same addresses, new pages)."""
        assert self.connector_worker is not None
        self.connector_worker.restore_kv_memory()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.connector_worker is not None and isinstance(connector_metadata, PoolConnectorMetadata):
            # Before this step's forward pass, not after it, as vLLM would call start_load_kv for a step without
            # synchronous loads: queueing costs microseconds, and the load then runs during the forward pass.
            self.connector_worker.begin_step(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.connector_worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PoolConnectorMetadata)
        self.connector_worker.load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole blocks are loaded before the forward pass or asynchronously (use_layerwise=false)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        assert self.connector_worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, PoolConnectorMetadata)
        self.connector_worker.save(meta)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self.connector_worker is not None
        return self.connector_worker.take_stored_report()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.connector_worker is not None
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        idle_step = isinstance(meta, PoolConnectorMetadata) and meta.idle_step
        return None, self.connector_worker.finished_loads(idle_step) or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.connector_worker is not None
        return self.connector_worker.take_load_errors()

    def shutdown(self) -> None:
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
        if self.connector_scheduler is not None:
            self.connector_scheduler.shutdown()

    # -- both sides -------------------------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.connector_worker or self.connector_scheduler
        assert side is not None
        return side.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PoolConnectorStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return PoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side ---------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def may_load_async(self, request: Request) -> bool:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.may_load_async(request)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call with the hybrid KV cache manager (``SupportsHMA``): the same, for every KV cache group."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request)

    def reset_cache(self) -> bool:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.reset_cache()

    def take_events(self) -> Iterable[KVCacheEvent]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.take_events()
