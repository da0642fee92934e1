"""Worker side: move planned blocks between this worker's KV cache and the pool.

Calls, in the order vLLM makes them:
0. ``kv_cache_allocation`` (vLLM 0.32+'s ``get_mem_pool_context``, before it allocates the KV cache): when the pool
   client offers memory for it (``PoolBackend.places_kv_cache``: a Mooncake node attached through shared memory on
   vLLM's CPU backend), connect now and have the KV cache placed in that memory (``kv_allocation``): one copy a load.
1. ``register_kv_caches``: derive page geometry from the KV tensors (``kv_pages``), refuse pool settings that could
   move none of them, register their memory with the pool client and connect in the background; wire the loader
   (``loading``) and the saver (``saving``).
2. each step, ``begin_step`` (when vLLM binds the step's plan, before the forward pass) applies a cache reset and
   queues asynchronous loads, reported through ``finished_loads``; ``load`` (``start_load_kv``) reads synchronous ones
   before the forward pass; ``save`` (``wait_for_save``, after the forward pass queued the step's KV writes) saves
   the planned full blocks. No page is read before its writes completed, and vLLM may free or reuse the blocks once
   the step ends.
3. ``take_load_errors`` (``get_block_ids_with_load_errors``): failed blocks, which vLLM recomputes;
   ``take_stored_report`` (``build_connector_worker_meta``): what the saves left in the pool, for KV events.
4. ``release_kv_memory`` / ``restore_kv_memory`` around vLLM 0.34's sleep mode; ``shutdown``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from kvpool_connector import compat, head_shards, keys
from kvpool_connector.backends import ClientRole, PoolBackend, PoolUnavailable, backend_class, create_backend
from kvpool_connector.config import ConfigError, ResolvedConfig
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import DeviceRuntime, pin_current_thread, runtime_for
from kvpool_connector.engine_layout import describe_engine
from kvpool_connector.head_shard_reader import HeadShardReader
from kvpool_connector.kv_allocation import KVCacheAt
from kvpool_connector.kv_events import StoredInPool, WorkerStoredLog
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.loading import BlockLoader
from kvpool_connector.logs import init_logger
from kvpool_connector.metadata import PoolConnectorMetadata
from kvpool_connector.metrics import PoolConnectorStats, take_stats
from kvpool_connector.pool import PoolHandle, open_pool
from kvpool_connector.saving import BlockSaver

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger(__name__)

IDLE_STEP_LOAD_WAIT_S = 0.005
"""Longest a step with nothing to compute waits on each worker for an asynchronous load to end. Shorter than the
scheduler's wait for a lookup (``lookups.IDLE_STEP_LOOKUP_WAIT_S``): it comes on top of that one in the same step, on
every rank, and a load of a few blocks ends within milliseconds; one still running is reported a step later."""
DRAIN_TIMEOUT_S = 10.0  # shutdown, cache reset: how long queued loads and saves may take to end


class PoolWorker:
    def __init__(
        self,
        layout: keys.KVLayout,
        shards: str | Sequence[str],
        saves_enabled: bool,
        num_blocks: int,
        config: ResolvedConfig,
        device_id: int = 0,
        kv_cache_bytes: int = 0,
        stripe: tuple[int, int] = (0, 1),
        runtime: DeviceRuntime | None = None,
        kv_events: bool = False,
        group_layers: Sequence[Sequence[str]] | None = None,
        ranks: tuple[int, int] = (0, 0),
    ) -> None:
        """``shards``: this worker's fingerprint of each KV cache group (one string: one group), ``group_layers``:
        the layer names of each group (None: one group of every layer), ``ranks``: this worker's (tp, pp) rank."""
        self.layout = layout
        self.shards = [shards] if isinstance(shards, str) else list(shards)
        self.group_layers = group_layers
        self.num_blocks = num_blocks
        self.saves_enabled = saves_enabled  # kv_producer / kv_both: the scheduler plans saves only then
        self._config = config
        self._backend_type = backend_class(config)
        self._device_id = device_id  # the worker's local rank: the device its pool client binds, unless configured
        self._kv_cache_bytes = kv_cache_bytes
        self.stripe = stripe  # (index, count): this rank puts the step's blocks index::count
        self.ranks = ranks
        # GQA: the other TP sizes whose stored blocks this worker re-assembles (the scheduler plans such loads)
        self.other_tp_sizes = head_shards.readable_tp_sizes(layout, config.pool.load_from_tp_sizes)[1:]
        self.runtime = runtime  # from the KV tensors' device at register_kv_caches unless given
        self._attached: PoolBackend | None = None  # connected early to place the KV cache; the pool handle takes it
        self.kv_cache_placement: KVCacheAt | None = None
        self.pages: KVPages | None = None
        self.pool: PoolHandle | None = None
        self.saver: BlockSaver | None = None
        self.loader: BlockLoader | None = None
        self.stats = StatsCounter()
        self.stored_log = WorkerStoredLog() if kv_events else None  # for vLLM's KV events
        self._kv_released = False  # vLLM's sleep mode released the KV cache: its regions are not registered

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: ResolvedConfig) -> PoolWorker:
        """The worker of this process's (tp, pp) shard."""
        settings = config.pool
        engine = describe_engine(vllm_config, kv_cache_config, settings.model_version, settings.load_from_tp_sizes)
        tp_rank, pp_rank = compat.worker_parallel_ranks()
        return cls(
            engine.layout,
            engine.worker_shards(tp_rank, pp_rank),
            num_blocks=engine.num_blocks,
            config=config,
            saves_enabled=vllm_config.kv_transfer_config is None or vllm_config.kv_transfer_config.is_kv_producer,
            device_id=compat.worker_local_rank(),
            kv_cache_bytes=engine.kv_cache_bytes,
            # Ranks that hold identical KV (MLA, replicated KV heads) share keys: they split the writes.
            stripe=engine.layout.stripe(tp_rank),
            kv_events=engine.kv_events,
            group_layers=engine.group_layers,
            ranks=(tp_rank, pp_rank),
        )

    # -- 0. where the KV cache is allocated ------------------------------------------------------------------
    def kv_cache_allocation(self) -> KVCacheAt | None:
        """Where vLLM should allocate the KV cache: in memory the pool client hands out, when it offers that on
        vLLM's CPU backend and answers now; None leaves it to vLLM."""
        if not self._backend_type.places_kv_cache(self._config) or not self._kv_cache_bytes:
            return None
        if not compat.on_cpu_platform():
            return None  # refused with the reason at register_kv_caches
        backend = create_backend(self._config, ClientRole(holds_data=True, kv_cache_bytes=self._kv_cache_bytes))
        # The client's threads inherit the connecting thread's CPUs: connect from one off the forward pass's cores.
        with concurrent.futures.ThreadPoolExecutor(
            1, initializer=pin_current_thread, initargs=(compat.helper_thread_cpus(),)
        ) as connector:
            try:
                connector.submit(backend.connect).result()
            except (PoolUnavailable, OSError, RuntimeError) as exc:
                backend.close()
                logger.warning(
                    "KV cache stays in private memory, so transfers copy through the pool client's own buffers: the "
                    "pool could not be attached at start-up (%s)",
                    exc,
                )
                return None
        memory = backend.kv_cache_memory
        if memory is None:
            backend.close()
            return None
        self._attached = backend
        self.kv_cache_placement = KVCacheAt(memory.base, memory.nbytes)
        return self.kv_cache_placement

    # -- 1. start-up ----------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]) -> None:
        heads = self.layout.num_kv_heads if self.other_tp_sizes else 0  # where the heads sit: for other TP sizes
        pages = self.pages = KVPages(
            kv_caches,
            self.num_blocks,
            self.layout.page_size_bytes,
            self.group_layers,
            heads,
            self.layout.block_size,
            head_shards.heads_first(self.layout),
        )
        self._backend_type.check_worker(self._config, pages.device.type, pages.block_bytes, len(pages.run_sizes))
        runtime = self.runtime = self.runtime or self._runtime_for(pages.device)
        if pages.on_device:
            for ptr, size in pages.regions:
                runtime.add_device_memory(ptr, size)
        self.pool = self._pool_handle(runtime)
        for ptr, size in pages.regions:
            self.pool.register_memory(ptr, size)
        self.loader = BlockLoader(
            self.pool,
            pages,
            self.shards,
            self.stats,
            bind_thread=runtime.bind_thread,
            own_tp=self.layout.tp_size,
            other_tp=self._head_shard_reader(pages, runtime),
        )
        if self.saves_enabled:
            staging = max(1, (self._config.pool.staging_buffer_mb << 20) // pages.block_bytes)
            self.saver = BlockSaver(
                self.pool,
                pages,
                self.shards,
                runtime,
                self.stats,
                stripe=self.stripe,
                staging_blocks=staging if self._config.pool.async_save else 0,
                on_stored=self.stored_log.note if self.stored_log is not None else None,
                sighting_shard=self.shards[0] if self.ranks == (0, 0) else None,
            )
        self.pool.start(wait_s=self._config.pool.startup_wait_s)
        self._log_startup()

    def _head_shard_reader(self, pages: KVPages, runtime: DeviceRuntime) -> HeadShardReader | None:
        """The reader of blocks stored at other TP sizes, when this layout reads any. Where the heads sit in a page
        cannot be told from the KV tensors, such blocks are refused: an error when ``load_from_tp_sizes`` asked for
        them, else a warning (the scheduler still finds them; their loads fail and vLLM recomputes them)."""
        if not self.other_tp_sizes:
            return None
        assert self.pool is not None
        if pages.run_heads is None:
            reason = (
                f"loads of blocks stored at TP sizes {self.other_tp_sizes} need each KV head's place in a page, and "
                f"{pages.run_heads_problem}"
            )
            if self._config.pool.load_from_tp_sizes:
                raise ConfigError(f"load_from_tp_sizes: {reason}; leave them out of load_from_tp_sizes")
            logger.warning(
                "%s: such blocks are recomputed (set load_from_tp_sizes: [] to stop looking them up)", reason
            )
            return None
        staging = self._config.pool.staging_buffer_mb << 20
        return HeadShardReader(self.pool, pages, self.layout, self.ranks, runtime, staging)

    @staticmethod
    def _runtime_for(device: torch.device) -> DeviceRuntime:
        helper_cpus = compat.helper_thread_cpus() if device.type == "cpu" else None
        return runtime_for(device.type, device.index or 0, helper_cpus)

    def _pool_handle(self, runtime: DeviceRuntime) -> PoolHandle:
        attached, self._attached = self._attached, None  # its memory holds the KV cache: it serves first
        role = ClientRole(holds_data=True, device_id=self._device_id, runtime=runtime)
        return open_pool(self._config, role, f"worker shard {self.shards[0]}", self.stats, attached=attached)

    def _log_startup(self) -> None:
        assert self.pages is not None and self.runtime is not None
        groups = zip(self.shards, self.layout.groups, strict=False)  # empty with one group
        groups_note = ", ".join(f"{shard} {kind}" for shard, kind in groups)
        logger.info(
            "MemcacheConnectorStoreV1 worker: %d layers, %d blocks, %d bytes per block object, shard %s%s",
            len(self.pages.layer_names),
            self.num_blocks,
            self.pages.block_bytes,
            self.shards[0],
            f" (KV cache group 0 of {len(self.shards)}; groups: {groups_note})" if groups_note else "",
        )
        if self.loader is not None and self.loader.other_tp is not None:
            logger.info(
                "blocks stored at TP sizes %s load too: the stored head shards holding this rank's KV heads are read "
                "and placed by head range",
                self.other_tp_sizes,
            )
        if self.runtime.helper_cpus:
            logger.info(
                "pool client and save threads on CPUs %s, off the forward pass's", sorted(self.runtime.helper_cpus)
            )
        placement = self.kv_cache_placement
        if self._backend_type.places_kv_cache(self._config) and not compat.places_kv_cache():
            logger.info(
                "KV cache placement in the pool client's memory is off: vLLM %s does not let a connector choose where "
                "the KV cache is allocated (get_mem_pool_context, vLLM 0.32+); transfers copy through the client's "
                "own buffers",
                compat.VLLM_VERSION,
            )
        elif placement is not None and placement.served:
            logger.info(
                "KV cache (%.2f GiB) placed in the pool client's memory: loads land in its pages in one copy",
                placement.nbytes / 2**30,
            )
        elif placement is not None:
            logger.warning(
                "vLLM did not allocate the KV cache inside the connector's allocation context (a vLLM version that "
                "allocates differently): transfers copy through the client's own buffers, and the %.2f GiB set aside "
                "for it stay unused",
                placement.nbytes / 2**30,
            )

    # -- 2. each step ---------------------------------------------------------------------------------------
    def begin_step(self, meta: PoolConnectorMetadata) -> None:
        """Before the step's forward pass: apply a cache reset, then queue the step's asynchronous loads on the loader
        thread (vLLM waits for them through ``finished_loads``)."""
        if meta.reset:
            self._reset()
        if not meta.async_loads:
            return
        assert self.loader is not None, "register_kv_caches must run first"
        for transfer in meta.async_loads:
            self.loader.submit(transfer)

    def load(self, meta: PoolConnectorMetadata) -> None:
        """Synchronous loads, now: the forward pass reads them next."""
        if not meta.loads:
            return
        assert self.loader is not None, "register_kv_caches must run first"
        for transfer in meta.loads:
            self.loader.run_now(transfer)

    def save(self, meta: PoolConnectorMetadata) -> None:
        if (meta.saves or meta.sightings) and self.saver is not None:
            self.saver.save(meta.saves, meta.sightings)

    def finished_loads(self, idle_step: bool) -> set[str]:
        """Requests whose asynchronous loads ended (their failed blocks are in the load errors by now). In a step
        with nothing to compute, wait a little for one: vLLM is only waiting for loads then (``loading``)."""
        if self.loader is None:
            return set()
        return self.loader.take_finished(IDLE_STEP_LOAD_WAIT_S if idle_step else 0.0)

    def _reset(self) -> None:
        """After vLLM's cache reset (the scheduler removed this layout's objects): a save staged before it must not
        land after that removal, so drop the queued ones, let the one in progress end, and remove this shard's
        objects once more."""
        dropped = self.saver.drop_queued(DRAIN_TIMEOUT_S) if self.saver is not None else []
        removed = self.pool.remove_shards([keys.shard_prefix(s) for s in self.shards]) if self.pool else None
        logger.info(
            "KV pool cache reset: %d queued block saves dropped, %s more objects of shard %s removed",
            sum(len(job.keys) for job in dropped),
            "no" if removed is None else removed,
            ", ".join(self.shards),
        )

    # -- 3. reports -----------------------------------------------------------------------------------------
    def take_load_errors(self) -> set[int]:
        return self.loader.take_load_errors() if self.loader is not None else set()

    def take_stored_report(self) -> StoredInPool | None:
        """The pool keys this rank's saves left in the pool since the last step, for the scheduler's KV events (vLLM
        merges the ranks' reports)."""
        return self.stored_log.take() if self.stored_log is not None else None

    def take_stats(self) -> PoolConnectorStats | None:
        return take_stats(self.stats, every_step=compat.workers_report_stats_every_step())

    # -- 4. sleep mode and shutdown -------------------------------------------------------------------------
    def release_kv_memory(self, timeout_s: float = 30.0) -> None:
        """Before vLLM's sleep mode releases the KV cache's memory: let loads in flight land, then drop the KV regions'
        registrations, which would otherwise point the pool client's RDMA engine at released pages. Staged saves go
        on (they read the staging area, not the KV cache). Idempotent."""
        if self.pool is None or self.pages is None or self._kv_released:
            return
        if self.loader is not None and not self.loader.drain(timeout_s):
            logger.warning("sleep: KV pool loads still running after %.0f s; releasing the KV cache anyway", timeout_s)
        for ptr, size in self.pages.regions:
            self.pool.unregister_memory(ptr, size)
        self._kv_released = True
        logger.info("KV cache registrations dropped for sleep mode (%d regions)", len(self.pages.regions))

    def restore_kv_memory(self) -> None:
        """After wake-up backed the KV cache again (same addresses, new pages): register it again. Idempotent."""
        if self.pool is None or self.pages is None or not self._kv_released:
            return
        for ptr, size in self.pages.regions:
            self.pool.register_memory(ptr, size)
        self._kv_released = False
        logger.info(
            "KV cache registered again after wake-up (%d regions); pool keys still name the model this engine started "
            "with: if wake-up brought other weights, restart with another model_version, or its hits are wrong",
            len(self.pages.regions),
        )

    def shutdown(self) -> None:
        if self.loader is not None:
            self.loader.close(DRAIN_TIMEOUT_S)  # their blocks belong to requests vLLM still holds
        if self.saver is not None:
            self.saver.close(DRAIN_TIMEOUT_S)  # let queued saves reach the pool before the process goes
        totals = {k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(self.stats.total().items())}
        logger.info("MemcacheConnectorStoreV1 worker stats: %s", totals or "no transfers")
        if self.pool is not None:
            self.pool.close()
