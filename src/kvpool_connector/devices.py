"""The device runtime seam: what the worker, the staging saver and the backends need from CPU, CUDA or an Ascend NPU.

Everything device-specific sits behind one small interface, so the data plane is written once and never branches
on the device. Calls, in the order a worker makes them:
1. ``bind_thread()`` first thing on every helper thread that calls a device-bound client (connect, lookup, save):
   ACL and CUDA contexts are per thread, so a thread that never set the device registers memory or copies on the
   wrong one (or none); on vLLM's CPU backend it moves the thread off the forward pass's cores instead;
2. ``add_device_memory(ptr, size)`` for the KV tensors, so ``is_device_address`` can tell where a call's buffers
   live (a memcache transfer's direction follows its buffers, not the KV cache);
3. at ``wait_for_save``, ``record_event()`` on the compute stream, after the forward pass queued its writes;
4. a save then either waits for it on the host (``wait_on_host``: a synchronous put straight from the pages) or
   queues ``copy_out(event, ...)``: a device-to-host copy on a side stream that starts only once the event has
   completed, so the forward thread does not block; the compute stream in turn waits for the copy before it can
   overwrite those pages in a later step. The thread that puts the staged copy waits for the copy's event first.

On the CPU the forward pass has finished writing when ``wait_for_save`` runs, so events are already complete and a
copy is synchronous.
"""

from __future__ import annotations

import bisect
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np
import torch

from kvpool_connector.logs import init_logger
from kvpool_connector.ops import CopyError, copy_batch

logger = init_logger(__name__)

CopyDirection = Literal["d2h", "h2d"]


class DeviceRuntime(ABC):
    """One worker's device: streams, events, thread binding, and where an address lives."""

    kind: str = "cpu"
    helper_cpus: set[int] | None = None
    """CPUs the helper threads are bound to (vLLM's CPU backend: those the forward pass leaves free); None: unbound."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._lock = threading.Lock()

    # -- memory ----------------------------------------------------------------------------------------------
    def add_device_memory(self, ptr: int, size: int) -> None:
        """Record [ptr, ptr+size) as device memory (the KV tensors); ranges must not overlap."""
        with self._lock:
            i = bisect.bisect(self._starts, ptr)
            self._starts.insert(i, ptr)
            self._ends.insert(i, ptr + size)

    def is_device_address(self, ptr: int) -> bool:
        with self._lock:
            i = bisect.bisect(self._starts, ptr) - 1
            return i >= 0 and ptr < self._ends[i]

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Zero-filled host memory that device copies can target (zeros, not empty: its pages fault in now rather
        than on the forward pass of the first saves)."""
        return torch.zeros(nbytes, dtype=torch.uint8)

    # -- threads and ordering ------------------------------------------------------------------------------------
    @abstractmethod
    def bind_thread(self) -> None:
        """Make the calling helper thread use this worker's device (or, on the CPU, the helper cores)."""

    @abstractmethod
    def record_event(self) -> Any:
        """An event on the current compute stream: completes once every kernel queued before it has run."""

    @abstractmethod
    def wait_on_host(self, event: Any) -> None:
        """Block the calling thread until ``event`` completed."""

    @abstractmethod
    def copy_out(self, after: Any, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> Any:
        """Queue device-to-host copies that start once ``after`` completed; returns the event of their end.

        Raises CopyError when the runtime refuses the copies.
        """

    @abstractmethod
    def copy_in(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        """Host-to-device copies (a load re-assembling head shards from its staging area), ended on return.

        Raises CopyError when the runtime refuses the copies.
        """


class CpuRuntime(DeviceRuntime):
    """vLLM's CPU backend: the KV cache is host memory and the forward pass is done when ``wait_for_save`` runs."""

    kind = "cpu"

    def __init__(self, helper_cpus: set[int] | None = None, copy_threads: int = 2) -> None:
        super().__init__()
        self.helper_cpus = helper_cpus
        self._copy_threads = copy_threads

    def bind_thread(self) -> None:
        pin_current_thread(self.helper_cpus)

    def record_event(self) -> None:
        return None

    def wait_on_host(self, event: Any) -> None:
        return None

    def copy_out(self, after: Any, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        copy_batch(dsts, srcs, sizes, backend="cpu", threads=self._copy_threads)

    def copy_in(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        copy_batch(dsts, srcs, sizes, backend="cpu", threads=self._copy_threads)


class StreamRuntime(DeviceRuntime):
    """A torch device with streams and events: CUDA (``torch.cuda``) or Ascend (``torch.npu`` from torch_npu).

    The two differ only in the torch module, the native copy backend and the attribute holding a stream's raw handle.
    """

    def __init__(self, kind: Literal["cuda", "npu"], device_index: int, copy_library: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.device_index = device_index
        self._copy_backend = "cuda" if kind == "cuda" else "acl"
        self._stream_handle = "cuda_stream" if kind == "cuda" else "npu_stream"
        self.copy_library = copy_library  # the runtime library the native copy opens (None: the platform's)
        self._copy_stream: Any = None
        self._batch_copies = True  # until the runtime's batch call fails once; then one call per copy

    @property
    def _torch(self) -> Any:
        """``torch.cuda``, or ``torch.npu`` (present once torch_npu is imported, as vllm-ascend does)."""
        import torch

        return getattr(torch, self.kind)

    def bind_thread(self) -> None:
        self._torch.set_device(self.device_index)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)  # asynchronous copies need pinned memory

    def record_event(self) -> Any:
        event = self._torch.Event()
        event.record(self._torch.current_stream())
        return event

    def wait_on_host(self, event: Any) -> None:
        event.synchronize()

    def copy_out(self, after: Any, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> Any:
        if self._copy_stream is None:
            self._copy_stream = self._torch.Stream(device=self.device_index)
        stream = self._copy_stream
        stream.wait_event(after)
        self._queue_copies(dsts, srcs, sizes, getattr(stream, self._stream_handle))
        done = self._torch.Event()
        done.record(stream)
        # The pages may be freed and rewritten by a later step's kernels: those wait until the copy has read them.
        self._torch.current_stream().wait_event(done)
        return done

    def copy_in(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        if self._copy_stream is None:
            self._copy_stream = self._torch.Stream(device=self.device_index)
        self._queue_copies(dsts, srcs, sizes, getattr(self._copy_stream, self._stream_handle), direction="h2d")
        self._copy_stream.synchronize()

    def _queue_copies(
        self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int, direction: CopyDirection = "d2h"
    ) -> None:
        kwargs = dict(
            backend=self._copy_backend,
            direction=direction,
            device_id=self.device_index,
            stream=stream,
            synchronize=False,
            library=self.copy_library,
        )
        if self._batch_copies:
            try:
                copy_batch(dsts, srcs, sizes, batch=True, **kwargs)
                return
            except CopyError as exc:
                # CANN marks aclrtMemcpyBatchAsync experimental; one copy per call always works where the device does.
                self._batch_copies = False
                logger.warning("batched device copy failed (%s); using one copy call per page from now on", exc)
        copy_batch(dsts, srcs, sizes, batch=False, **kwargs)


def runtime_for(device_type: str, device_index: int = 0, helper_cpus: set[int] | None = None) -> DeviceRuntime:
    """The runtime of a worker whose KV cache is on ``device_type`` (``cpu``, ``cuda``, ``npu``)."""
    if device_type == "cpu":
        return CpuRuntime(helper_cpus)
    if device_type in ("cuda", "npu"):
        return StreamRuntime(device_type, device_index)  # type: ignore[arg-type]
    raise ValueError(f"no device runtime for device type {device_type!r} (cpu, cuda, npu)")


def pin_current_thread(cpus: set[int] | None) -> None:
    """Bind the calling thread (and the threads it starts later) to ``cpus``; best effort."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            logger.debug("could not bind a helper thread to CPUs %s: %s", sorted(cpus), exc)
