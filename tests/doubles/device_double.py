"""TEST DOUBLE of an accelerator runtime (an Ascend NPU or a GPU behind ``DeviceRuntime``), for machines without one.

Written from how those runtimes behave, not from our code: kernels are queued on a compute stream and finish later;
an event recorded on a stream completes when everything queued before it has; a copy on another stream that waited
for an event sees exactly the writes before that event; a host thread sees them after it synchronised the event.
A pool client (memcache's SDMA/RDMA engine) reads device memory on its own, so it may only read pages whose writes a
host thread has waited for.

Memory the double hands out (``alloc``) is host memory standing in for HBM: copies really move bytes. The double
keeps its own record of these ranges (``holds``), which it and the pymmc double judge device reads and transfer
directions by: the runtime's ``is_device_address`` is code under test, so it is never their oracle. ``alloc`` also
tells the runtime (``add_device_memory``), in place of the worker: torch sees these tensors as CPU tensors, so the
worker cannot tell they stand for device pages. ``launch_write`` plays the forward pass: a queued kernel that
writes a range (the bytes are written at once, but the write counts as incomplete until an event after it has been
waited for). Every read of a range with an incomplete write, by a copy or by the pool, is recorded in ``violations``;
tests assert it stays empty.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np
import torch

from kvpool_connector.devices import DeviceRuntime
from kvpool_connector.ops import CopyError


@dataclass(frozen=True)
class FakeEvent:
    seq: int  # compute-stream position the event was recorded at


class RecordingDevice(DeviceRuntime):
    kind = "npu"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        self.device_index = device_index
        self._buffers: list[np.ndarray] = []
        self._allocated: list[tuple[int, int]] = []  # [start, end) of each alloc: the double's own record of HBM
        self._seq = 0
        self._pending: list[tuple[int, int, int]] = []  # (start, end, seq) of queued writes
        self._host_visible = 0  # writes up to this seq are complete for host threads and the pool
        self._state = threading.Lock()
        self.violations: list[str] = []
        self.bound_threads: set[str] = set()
        self.host_waits: list[str] = []  # thread names that blocked on an event
        self.copies = 0
        self.fail_next_copies = 0  # inject: the next N copy_out calls raise CopyError

    # -- memory ---------------------------------------------------------------------------------------------------
    def alloc(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in 'device' memory (host bytes the double tracks as HBM)."""
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        buffer = np.zeros(nbytes, dtype=np.uint8)
        self._buffers.append(buffer)
        self._allocated.append((buffer.ctypes.data, buffer.ctypes.data + nbytes))
        self.add_device_memory(buffer.ctypes.data, nbytes)
        return torch.from_numpy(buffer).view(dtype).view(*shape)

    def holds(self, ptr: int, size: int = 1) -> bool:
        """Whether every byte of [ptr, ptr+size) is memory this double allocated (device memory, by its own record;
        adjacent allocations count as one range)."""
        covered = ptr
        for start, end in sorted(self._allocated):
            if start <= covered < end:
                covered = end
        return covered >= ptr + size

    def touches(self, ptr: int, size: int) -> bool:
        """Whether any byte of [ptr, ptr+size) is device memory, by the double's own record."""
        return any(start < ptr + size and ptr < end for start, end in self._allocated)

    def launch_write(self, tensor: torch.Tensor, value: float) -> None:
        """A kernel on the compute stream fills ``tensor`` (a view of device memory)."""
        with self._state:
            self._seq += 1
            start = tensor.data_ptr()
            self._pending.append((start, start + tensor.numel() * tensor.element_size(), self._seq))
        tensor.fill_(value)

    def _check(self, ptr: int, size: int, visible: int, reader: str) -> None:
        with self._state:
            for start, end, seq in self._pending:
                if seq > visible and start < ptr + size and ptr < end:
                    self.violations.append(f"{reader} read [{ptr:#x}, +{size}) before write #{seq} completed")
                    return

    def check_pool_read(self, ptr: int, size: int) -> None:
        """The pool's own engine reads device memory: only writes a host thread waited for are complete."""
        self._check(ptr, size, self._host_visible, "pool")

    # -- DeviceRuntime --------------------------------------------------------------------------------------------
    def bind_thread(self) -> None:
        self.bound_threads.add(threading.current_thread().name)

    def record_event(self) -> FakeEvent:
        with self._state:
            return FakeEvent(self._seq)

    def wait_on_host(self, event: FakeEvent | None) -> None:
        if event is None:
            return
        self.host_waits.append(threading.current_thread().name)
        with self._state:
            self._host_visible = max(self._host_visible, event.seq)

    def copy_out(self, after: FakeEvent | None, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> FakeEvent:
        if self.fail_next_copies:
            self.fail_next_copies -= 1
            raise CopyError("fake aclrtMemcpyBatchAsync failed (507011) at copy 0 of 1")
        visible = after.seq if after is not None else 0
        for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
            if self.touches(src, size):
                self._check(src, size, visible, "copy")
            ctypes.memmove(dst, src, size)
        self.copies += 1
        # The copy completes with the writes it waited for; the compute stream waits for it in turn.
        return FakeEvent(visible)

    def copy_in(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        """Host-to-device copies on a side stream, then a synchronize: done on return."""
        if self.fail_next_copies:
            self.fail_next_copies -= 1
            raise CopyError("fake aclrtMemcpyBatchAsync failed (507011) at copy 0 of 1")
        for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
            ctypes.memmove(dst, src, size)
        self.copies += 1
