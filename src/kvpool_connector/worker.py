"""Worker side: move planned blocks between this worker's KV cache and the pool.

Calls, in the order vLLM makes them:
0. ``kv_cache_allocation`` (vLLM's ``get_mem_pool_context``, before it allocates the KV cache): with a Mooncake
   node attached through shared memory on vLLM's CPU backend, attach now and have the KV cache placed in memory the
   node maps (``kv_allocation``), so loads make one copy.
1. ``register_kv_caches``: derive page geometry from the KV tensors, register their memory with the pool client
   (zero-copy transfers), and connect in the background.
2. each step, ``begin_step`` (when vLLM binds the step's plan, before the forward pass) queues asynchronous
   loads on the loader thread, reported through ``finished_loads``; ``load`` (from ``start_load_kv``) reads
   synchronous ones before the forward pass. Every planned block of every layer lands straight in the pages vLLM
   allocated; blocks that did not arrive whole become load errors (``loading``).
3. ``save`` (from ``wait_for_save``, after the forward pass queued the step's KV writes): record an event on the
   compute stream, then queue the copy of the planned full blocks to the staging area after it and let the staging
   thread put those the pool does not hold yet (``async_save``, the default), or wait for the event and put them
   synchronously. No page is read before its writes completed (vllm-ascend #4412), and later kernels cannot
   overwrite a page before the copy read it, so vLLM may free or reuse the blocks when the step ends. Ranks that
   hold the same KV (MLA) share keys and stripe the step's puts: rank r puts every tp_size-th block.
4. ``take_load_errors`` (``get_block_ids_with_load_errors``): hands failed blocks to vLLM, which recomputes them.
5. ``shutdown``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from kvpool_connector import compat, keys
from kvpool_connector.backends import PoolBackend, PoolUnavailable, create_backend, max_buffers_per_object
from kvpool_connector.config import ResolvedConfig, check_pool_fits_device
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import DeviceRuntime, pin_current_thread, runtime_for
from kvpool_connector.kv_allocation import KVCacheAt
from kvpool_connector.kv_events import StoredInPool, WorkerStoredLog
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.loading import BlockLoader
from kvpool_connector.logs import init_logger
from kvpool_connector.metadata import PoolConnectorMetadata
from kvpool_connector.metrics import PoolConnectorStats
from kvpool_connector.pool import PoolHandle
from kvpool_connector.staging import StagingSaver

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger(__name__)

IDLE_STEP_WAIT_S = 0.005  # longest wait for a load to end in a step with nothing to compute


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
    ) -> None:
        """``shards``: this worker's fingerprint of each KV cache group (one string: one group), ``group_layers``:
        the layer names of each group (None: one group of every layer)."""
        self.layout = layout
        self.shards = [shards] if isinstance(shards, str) else list(shards)
        self.group_layers = group_layers
        self.num_blocks = num_blocks
        self.saves_enabled = saves_enabled  # kv_producer / kv_both: the scheduler plans saves only then
        self._config = config
        self._device_id = device_id  # the device the pool client binds (memcache's init)
        self._kv_cache_bytes = kv_cache_bytes
        self.stripe_index, self.stripe_count = stripe  # this rank puts the step's blocks stripe_index::stripe_count
        self.runtime = runtime  # from the KV tensors' device at register_kv_caches unless given
        self._attached: PoolBackend | None = None  # connected early to place the KV cache; the pool handle takes it
        self.kv_cache_placement: KVCacheAt | None = None
        self.pages: KVPages | None = None
        self.pool: PoolHandle | None = None
        self.saver: StagingSaver | None = None
        self.loader: BlockLoader | None = None
        self.stats = StatsCounter()
        self.stored_log = WorkerStoredLog() if kv_events else None  # for vLLM's KV events
        self._kv_released = False  # vLLM's sleep mode released the KV cache: its regions are not registered

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: ResolvedConfig) -> PoolWorker:
        """The worker of this process's (tp, pp) shard."""
        layout = keys.KVLayout.from_vllm(vllm_config, kv_cache_config)
        tp_rank, pp_rank = compat.worker_parallel_ranks()
        configured_device = config.memcache.device_id if config.memcache is not None else None
        groups = kv_cache_config.kv_cache_groups
        return cls(
            layout,
            [keys.fingerprint(layout, tp_rank, pp_rank, g) for g in range(layout.num_groups)],
            num_blocks=kv_cache_config.num_blocks,
            config=config,
            saves_enabled=vllm_config.kv_transfer_config is None or vllm_config.kv_transfer_config.is_kv_producer,
            device_id=compat.worker_local_rank() if configured_device is None else configured_device,
            kv_cache_bytes=compat.kv_cache_backing_bytes(kv_cache_config),
            # Ranks that hold identical KV (MLA, replicated KV heads) share keys: they split the writes.
            stripe=layout.stripe(tp_rank),
            kv_events=compat.kv_events_enabled(vllm_config),
            group_layers=[g.layer_names for g in groups] if len(groups) > 1 else None,
        )

    def kv_cache_allocation(self) -> KVCacheAt | None:
        """Where vLLM should allocate the KV cache: in memory the pool node maps, when this worker attaches to one
        through shared memory on vLLM's CPU backend and the node answers now; None leaves it to vLLM."""
        if not self._wants_kv_cache_placement():
            return None
        if not self._kv_cache_bytes:
            return None
        if not compat.on_cpu_platform():
            return None  # refused with the reason at register_kv_caches
        backend = create_backend(self._config, holds_data=True, kv_cache_bytes=self._kv_cache_bytes)
        # The client's threads inherit the connecting thread's CPUs: connect from one off the forward pass's cores.
        with concurrent.futures.ThreadPoolExecutor(
            1, initializer=pin_current_thread, initargs=(compat.helper_thread_cpus(),)
        ) as connector:
            try:
                connector.submit(backend.connect).result()
            except (PoolUnavailable, OSError, RuntimeError) as exc:
                logger.warning(
                    "KV cache stays in private memory, so transfers copy through the shared areas: the pool node "
                    "could not be attached at start-up (%s)",
                    exc,
                )
                return None
        memory = getattr(backend, "kv_cache_memory", None)
        if memory is None:
            return None
        self._attached = backend
        self.kv_cache_placement = KVCacheAt(memory.base, memory.nbytes)
        return self.kv_cache_placement

    def _wants_kv_cache_placement(self) -> bool:
        mooncake = self._config.mooncake
        return mooncake is not None and bool(mooncake.real_client_address) and mooncake.kv_cache_in_shared_memory

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]) -> None:
        self.pages = KVPages(kv_caches, self.num_blocks, self.layout.page_size_bytes, self.group_layers)
        on_device = self.pages.on_device
        check_pool_fits_device(self._config, self.pages.device.type)
        limit = max_buffers_per_object(self._config)
        if limit is not None and len(self.pages.run_sizes) > limit:
            raise ValueError(
                f"backend {self._config.pool.backend!r} stores at most {limit} buffers per object, and one KV block of "
                f"this worker is {len(self.pages.run_sizes)} page runs ({len(self.pages.layer_names)} layers); use "
                '"backend": "mooncake", or pipeline parallelism to give each worker fewer layers'
            )
        mooncake = self._config.mooncake
        shared_memory = mooncake is not None and bool(mooncake.real_client_address)
        if on_device and shared_memory:
            raise ValueError(
                f"`real_client_address` (Mooncake through shared memory) needs the KV cache in host memory; this "
                f"worker's is on {self.pages.device}. Remove it: on GPU/NPU hosts the client transfers KV pages itself."
            )
        if shared_memory and self.pages.block_bytes > mooncake.shared_buffer_bytes:
            raise ValueError(
                f"`shared_buffer_size` ({mooncake.shared_buffer_size}) is smaller than one KV block object "
                f"({self.pages.block_bytes} bytes), so every transfer would fail; set it to at least "
                f"{self.pages.block_bytes} bytes in the Mooncake settings"
            )
        if self.runtime is None:
            helper_cpus = compat.helper_thread_cpus() if self.pages.device.type == "cpu" else None
            self.runtime = runtime_for(self.pages.device.type, self.pages.device.index or 0, helper_cpus)
        runtime = self.runtime
        if on_device:
            for ptr, size in self.pages.regions:
                runtime.add_device_memory(ptr, size)
        attached, self._attached = self._attached, None

        def backend() -> PoolBackend:
            nonlocal attached
            if attached is not None:  # the client the KV cache was placed with: its memory lives as long as it does
                early, attached = attached, None
                return early
            return create_backend(self._config, holds_data=True, device_id=self._device_id, runtime=runtime)

        self.pool = PoolHandle(
            backend,
            self._config.pool.reconnect_interval_s,
            label=f"worker shard {self.shards[0]}",
            bind_thread=runtime.bind_thread,
        )
        for ptr, size in self.pages.regions:
            self.pool.register_memory(ptr, size)
        self.loader = BlockLoader(self.pool, self.pages, self.shards, self.stats, bind_thread=runtime.bind_thread)
        if self._config.pool.async_save and self.saves_enabled:
            capacity = max(1, (self._config.pool.staging_buffer_mb << 20) // self.pages.block_bytes)
            on_stored = self.stored_log.note if self.stored_log is not None else None
            self.saver = StagingSaver(self.pool, self.pages, capacity, runtime, self.stats, on_stored)
        self.pool.start(wait_s=self._config.pool.startup_wait_s)
        if self._wants_kv_cache_placement() and not compat.places_kv_cache():
            logger.info(
                "KV cache placement in the pool node's shared memory (kv_cache_in_shared_memory) is off: vLLM %s does "
                "not let a connector choose where the KV cache is allocated (get_mem_pool_context, vLLM 0.32+); "
                "transfers copy through the shared areas",
                compat.VLLM_VERSION,
            )
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
        helper_cpus = getattr(runtime, "helper_cpus", None)
        if helper_cpus:
            logger.info("pool client and save threads on CPUs %s, off the forward pass's", sorted(helper_cpus))
        if self.kv_cache_placement is not None:
            if self.kv_cache_placement.served:
                logger.info(
                    "KV cache (%.2f GiB) placed in the pool node's shared memory: loads land in its pages in one copy",
                    self.kv_cache_placement.nbytes / 2**30,
                )
            else:
                logger.warning(
                    "vLLM did not allocate the KV cache inside the connector's allocation context (a vLLM version "
                    "that allocates differently): transfers copy through the shared areas, and the %.2f GiB of shared "
                    "memory set aside for it stay unused",
                    self.kv_cache_placement.nbytes / 2**30,
                )

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
        logger.info("KV cache registered again after wake-up (%d regions)", len(self.pages.regions))

    def load(self, meta: PoolConnectorMetadata) -> None:
        """Synchronous loads, now: the forward pass reads them next."""
        if not meta.loads:
            return
        assert self.loader is not None, "register_kv_caches must run first"
        for transfer in meta.loads:
            self.loader.load_now(transfer)

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

    def _reset(self) -> None:
        """After vLLM's cache reset (the scheduler removed this layout's objects): a save staged before it must not
        land after that removal, so drop the queued ones, let the one in progress end, and remove this shard's
        objects once more."""
        dropped = self.saver.drop_queued(timeout_s=10.0) if self.saver is not None else 0
        counts = [self.pool.remove_prefix(keys.shard_prefix(s)) if self.pool is not None else None for s in self.shards]
        removed = None if None in counts else sum(c for c in counts if c is not None)
        logger.info(
            "KV pool cache reset: %d queued block saves dropped, %s more objects of shard %s removed",
            dropped,
            "no" if removed is None else removed,
            ", ".join(self.shards),
        )

    def finished_loads(self, idle_step: bool) -> set[str]:
        """Requests whose asynchronous loads ended (their failed blocks are in the load errors by now). In a step
        with nothing to compute, wait a little for one: vLLM is only waiting for loads then (``loading``)."""
        if self.loader is None:
            return set()
        return self.loader.take_finished(IDLE_STEP_WAIT_S if idle_step else 0.0)

    def save(self, meta: PoolConnectorMetadata) -> None:
        if not meta.saves or not self.saves_enabled:
            return
        assert self.pages is not None and self.pool is not None and self.runtime is not None, (
            "register_kv_caches must run first"
        )
        mine = slice(self.stripe_index, None, self.stripe_count)
        block_ids = [b for t in meta.saves for b in t.block_ids][mine]
        hashes = [h for t in meta.saves for h in t.block_hashes][mine]
        groups = [g for t in meta.saves for g in t.block_groups()][mine]
        pool_keys = keys.group_keys(self.shards, hashes, groups)  # this rank's stripe only
        if not block_ids:
            return
        written = self.runtime.record_event()  # after every kernel that writes this step's KV
        if self.saver is not None:
            self.saver.stage(pool_keys, block_ids, written, groups)
            return
        self.runtime.wait_on_host(written)
        addrs, sizes = self.pages.addresses(block_ids, groups)
        held = self.pool.put_missing(pool_keys, addrs, sizes, self.stats)
        if self.stored_log is not None:
            self.stored_log.note(held)

    def take_stored_report(self) -> StoredInPool | None:
        """The pool keys this rank's saves left in the pool since the last step, for the scheduler's KV events (vLLM
        merges the ranks' reports)."""
        return self.stored_log.take() if self.stored_log is not None else None

    def take_stats(self) -> PoolConnectorStats | None:
        window = self.stats.take()
        return PoolConnectorStats(data=window) if window or compat.workers_report_stats_every_step() else None

    def take_load_errors(self) -> set[int]:
        return self.loader.take_load_errors() if self.loader is not None else set()

    def settled_totals(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Everything this rank moved since start-up, once its queued saves reached the pool: what a caller asking
        every rank (vLLM's ``collective_rpc``) should see, rather than a count racing a background save."""
        if self.saver is not None:
            self.saver.flush(timeout_s)
        return self.stats.total()

    def shutdown(self) -> None:
        if self.loader is not None:
            self.loader.close(timeout_s=10.0)  # their blocks belong to requests vLLM still holds
        if self.saver is not None:
            self.saver.close(timeout_s=10.0)  # let queued saves reach the pool before the process goes
        totals = {k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(self.stats.total().items())}
        logger.info("MemcacheConnectorStoreV1 worker stats: %s", totals or "no transfers")
        if self.pool is not None:
            self.pool.close()
