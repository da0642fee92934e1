"""The data plane on a real NVIDIA GPU (run by gpu_check.sh; torch with CUDA, no vLLM, no pytest needed).

1. The CUDA copy backend on torch CUDA tensors: batch and per-copy paths, both directions, poisoned destinations
   (bytes between the pages must stay untouched), copy bandwidth against one contiguous torch copy.
2. A save/load round trip of flash-attn-shaped KV tensors ``(2, num_blocks, block_size, heads, head_dim)`` per
   layer through the connector's save path (``BlockSaver.save``: it records the compute stream's event itself) and
   ``StreamRuntime("cuda")``, against a host-memory pool (a test double of a pool, below) whose engine reads device
   pages on a stream of its own, unordered with the compute stream, as an RDMA engine would: a put that does not
   wait for the forward pass's event reads stale KV. Stream order: the blocks are written by kernels queued behind
   ~0.2 s of matmuls; an asynchronous save must return while they still run (the forward thread is not blocked),
   the staged copy must hold the final values (the copy waited for the event), and a later kernel that overwrites
   the blocks must not change what was staged (the compute stream waited for the copy). A synchronous save must
   wait for the event before the pool reads the pages.
3. A failing copy is reported as CopyError naming the call (in a child process: a CUDA error may kill it).
4. The compile results of gpu_check.sh (``KVPOOL_GPU_COMPILE``), one check each.
Prints one line per check and "N passed, M failed" at the end; exits non-zero if any failed.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvpool_connector.backends.base import Outcome, PoolBackend
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import StreamRuntime
from kvpool_connector.keys import pool_key
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.metadata import BlockTransfer
from kvpool_connector.ops import backend_status, copy_batch
from kvpool_connector.pool import PoolHandle
from kvpool_connector.saving import BlockSaver

RESULTS: list[tuple[str, bool, str]] = []
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}", flush=True)


def check(name: str) -> Callable[[Callable[[], str | None]], None]:
    def run(fn: Callable[[], str | None]) -> None:
        start = time.perf_counter()
        try:
            note = fn() or ""
            RESULTS.append((name, True, note))
            print(f"PASS {name} ({time.perf_counter() - start:.2f} s) {note}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every check, then the summary
            RESULTS.append((name, False, repr(exc)))
            print(f"FAIL {name}: {exc!r}", flush=True)
            traceback.print_exc()

    return run


PAGE = 64 << 10
PAGES = 256


def _ptrs(t: torch.Tensor, offsets: Sequence[int]) -> np.ndarray:
    return np.asarray([t.data_ptr() + o for o in offsets], dtype=np.uint64)


def _copy_round(batch: bool) -> str:
    stream = torch.cuda.current_stream().cuda_stream
    offsets = [2 * i * PAGE for i in range(PAGES)]  # every other page: no two copies merge
    src = torch.randint(0, 255, (2 * PAGES * PAGE,), dtype=torch.uint8, device="cuda")
    host = torch.full((2 * PAGES * PAGE,), 0xCD, dtype=torch.uint8).pin_memory()
    sizes = np.full(PAGES, PAGE, dtype=np.uint64)
    torch.cuda.synchronize()
    start = time.perf_counter()
    copy_batch(_ptrs(host, offsets), _ptrs(src, offsets), sizes, backend="cuda", stream=stream, batch=batch)
    d2h_s = time.perf_counter() - start
    expected = src.cpu()
    for o in offsets:
        assert torch.equal(host[o : o + PAGE], expected[o : o + PAGE]), f"d2h page at {o} differs"
        assert bool((host[o + PAGE : o + 2 * PAGE] == 0xCD).all()), f"d2h wrote between pages at {o + PAGE}"
    back = torch.full_like(src, 0xAB)
    torch.cuda.synchronize()
    start = time.perf_counter()
    copy_batch(_ptrs(back, offsets), _ptrs(host, offsets), sizes, backend="cuda", stream=stream, batch=batch)
    h2d_s = time.perf_counter() - start
    for o in offsets:
        assert torch.equal(back[o : o + PAGE], src[o : o + PAGE]), f"h2d page at {o} differs"
        assert bool((back[o + PAGE : o + 2 * PAGE] == 0xAB).all()), f"h2d wrote between pages at {o + PAGE}"
    mib = PAGES * PAGE / 2**20
    return f"{mib:.0f} MiB in 64 KiB pages: d2h {mib / 1024 / d2h_s:.1f} GB/s, h2d {mib / 1024 / h2d_s:.1f} GB/s"


@check("cuda backend loads")
def _() -> str:
    loadable, has_batch = backend_status("cuda")
    assert loadable, "libcuda.so.1 did not load"
    return f"cuMemcpyBatchAsync: {'yes' if has_batch else 'no (per-copy path only)'}"


check("batched copies, both directions, poisoned destinations")(lambda: _copy_round(batch=True))
check("per-copy path, both directions, poisoned destinations")(lambda: _copy_round(batch=False))


@check("contiguous torch copy (reference)")
def _() -> str:
    src = torch.randint(0, 255, (PAGES * PAGE,), dtype=torch.uint8, device="cuda")
    host = torch.empty(PAGES * PAGE, dtype=torch.uint8).pin_memory()
    torch.cuda.synchronize()
    start = time.perf_counter()
    host.copy_(src)
    torch.cuda.synchronize()
    return f"d2h {PAGES * PAGE / 2**30 / (time.perf_counter() - start):.1f} GB/s"


class HostMemoryPool(PoolBackend):
    """TEST DOUBLE of a pool: objects are host bytes. Device buffers are read and written with the CUDA copy on a
    stream of the pool's own, not ordered with the compute stream (as a device-aware pool client's RDMA engine reads
    HBM); host buffers with memmove."""

    name = "host-memory-double"

    def __init__(self, runtime: StreamRuntime) -> None:
        self.objects: dict[str, bytes] = {}
        self.runtime = runtime
        self.device_reads = 0
        self.engine = torch.cuda.Stream()  # non-blocking: it does not wait for the legacy default stream

    @classmethod
    def from_config(cls, config, **kwargs):
        raise NotImplementedError

    def connect(self) -> None:
        return None

    def register_memory(self, ptr: int, size: int) -> None:
        return None

    def unregister_memory(self, ptr: int, size: int) -> None:
        return None

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.objects for k in keys]

    def _move(self, dsts: list[int], srcs: list[int], sizes: list[int], device_side: int) -> None:
        if self.runtime.is_device_address(device_side):
            copy_batch(dsts, srcs, sizes, backend="cuda", stream=self.engine.cuda_stream, synchronize=True)
        else:
            for d, s, n in zip(dsts, srcs, sizes, strict=True):
                ctypes.memmove(d, s, n)

    def put(self, keys, addrs, sizes) -> list[Outcome]:
        for key, page_addrs, page_sizes in zip(keys, addrs, sizes, strict=True):
            if key in self.objects:
                continue
            out = np.empty(sum(page_sizes), dtype=np.uint8)
            offsets = np.concatenate([[0], np.cumsum(page_sizes)[:-1]]).astype(np.int64)
            if self.runtime.is_device_address(page_addrs[0]):
                self.device_reads += 1
            self._move([out.ctypes.data + int(o) for o in offsets], list(page_addrs), list(page_sizes), page_addrs[0])
            self.objects[key] = out.tobytes()
        return [Outcome.OK] * len(keys)

    def get(self, keys, addrs, sizes) -> list[Outcome]:
        outcomes = []
        for key, page_addrs, page_sizes in zip(keys, addrs, sizes, strict=True):
            data = self.objects.get(key)
            if data is None or len(data) != sum(page_sizes):
                outcomes.append(Outcome.MISSING)
                continue
            buf = np.frombuffer(data, dtype=np.uint8).copy()
            offsets = np.concatenate([[0], np.cumsum(page_sizes)[:-1]]).astype(np.int64)
            self._move(list(page_addrs), [buf.ctypes.data + int(o) for o in offsets], list(page_sizes), page_addrs[0])
            outcomes.append(Outcome.OK)
        return outcomes

    def remove(self, keys: Sequence[str]) -> list[bool]:
        return [self.objects.pop(k, None) is not None for k in keys]

    def close(self) -> None:
        return None


LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 4, 64, 16, 8, 128


def _kv_setup() -> tuple[dict[str, torch.Tensor], KVPages, StreamRuntime, HostMemoryPool, PoolHandle]:
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(
            2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
        )
        for i in range(LAYERS)
    }
    page = 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    pages = KVPages(caches, BLOCKS, page)
    runtime = StreamRuntime("cuda", torch.cuda.current_device())
    for ptr, size in pages.regions:
        runtime.add_device_memory(ptr, size)
    pool = HostMemoryPool(runtime)
    handle = PoolHandle(lambda: pool, 1.0, "gpu-check", bind_thread=runtime.bind_thread)
    assert handle.start(wait_s=5), "the pool double did not connect"
    return caches, pages, runtime, pool, handle


def _busy_then_write(caches: dict[str, torch.Tensor], blocks: list[int], value: float) -> None:
    """Queue ~0.2 s of matmuls on the compute stream, then kernels that write ``blocks`` of every layer."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):
        a = (a @ a).clamp_(-1, 1)
    for t in caches.values():
        t[:, blocks] = value


def _block_values(caches: dict[str, torch.Tensor], block: int) -> torch.Tensor:
    return torch.stack([t[:, block].float().cpu() for t in caches.values()])


def _transfer(blocks: list[int], tag: str) -> BlockTransfer:
    return BlockTransfer(f"req-{tag}", blocks, [f"{tag}{b}".encode().ljust(32, b".") for b in blocks])


def _stored(pool: HostMemoryPool, transfer: BlockTransfer) -> list[np.ndarray]:
    return [np.frombuffer(pool.objects[pool_key("gpu", h)], dtype=np.uint16) for h in transfer.block_hashes]


@check("async save: staged after the event, forward thread not blocked, reuse cannot corrupt the copy")
def _() -> str:
    caches, pages, runtime, pool, handle = _kv_setup()
    saver = BlockSaver(handle, pages, ["gpu"], runtime, StatsCounter(), staging_blocks=16)
    blocks = [3, 4, 9]
    transfer = _transfer(blocks, "a")
    _busy_then_write(caches, blocks, 7.0)
    probe = runtime.record_event()
    start = time.perf_counter()
    saver.save([transfer])  # what wait_for_save runs: records the event itself, queues the copy after it
    save_s = time.perf_counter() - start
    still_running = not probe.query()
    for t in caches.values():  # a later step reuses the blocks: must wait for the copy on the compute stream
        t[:, blocks] = -1.0
    assert saver.drain(30)
    assert still_running, "save() returned only after the forward pass's kernels finished: it blocked"
    assert saver.stats.total()["saved_blocks"] == 3, saver.stats.total()
    for block, stored in zip(blocks, _stored(pool, transfer), strict=True):
        assert bool((stored == np.uint16(0x40E0)).all()), f"block {block}: staged bytes are not the final 7.0s"
    # load them back into other blocks, straight into the device pages
    targets = [20, 21, 22]
    addrs, sizes = pages.addresses(targets)
    keys = [pool_key("gpu", h) for h in transfer.block_hashes]
    assert handle.get(keys, addrs, sizes) == [Outcome.OK] * 3
    torch.cuda.synchronize()
    for block in targets:
        assert bool((_block_values(caches, block) == 7.0).all()), f"loaded block {block} differs"
    saver.close()
    handle.close()
    return f"save() returned in {save_s * 1e3:.1f} ms while the compute stream was still busy"


@check("sync save: waits for the event, then the pool's engine reads the device pages")
def _() -> str:
    caches, pages, runtime, pool, handle = _kv_setup()
    saver = BlockSaver(handle, pages, ["gpu"], runtime, StatsCounter(), staging_blocks=0)
    blocks = [5, 6]
    transfer = _transfer(blocks, "s")
    _busy_then_write(caches, blocks, 3.0)
    saver.save([transfer])  # the pool reads the pages on its own stream: only the event wait orders it
    assert pool.device_reads == 2
    for block, stored in zip(blocks, _stored(pool, transfer), strict=True):
        assert bool((stored == np.uint16(0x4040)).all()), f"block {block}: the put read KV before it was written"
    handle.close()
    return "ok"


@check("the pool double reads stale KV without the event (the sync check above can fail)")
def _() -> str:
    caches, pages, _, pool, handle = _kv_setup()
    blocks = [7]
    _busy_then_write(caches, blocks, 5.0)
    addrs, sizes = pages.addresses(blocks)
    pool.put(["gpu/unfenced"], addrs, sizes)  # no event wait: the engine's stream races the compute stream
    torch.cuda.synchronize()
    stored = np.frombuffer(pool.objects["gpu/unfenced"], dtype=np.uint16)
    assert not bool((stored == np.uint16(0x40A0)).all()), "the double read final values without a fence"
    handle.close()
    return "an unfenced read saw KV still being written"


FAILING_COPY = """
import torch
from kvpool_connector.ops import CopyError, copy_batch
host = torch.zeros(4096, dtype=torch.uint8).pin_memory()
try:
    copy_batch([host.data_ptr()], [0x10], [4096], backend="cuda", batch=False)  # 0x10: not a mapped address
except CopyError as exc:
    print("COPYERROR", exc)
"""


@check("a failing copy is a CopyError naming the call")
def _() -> str:
    done = subprocess.run([sys.executable, "-c", FAILING_COPY], capture_output=True, text=True, timeout=120)
    line = next((x for x in done.stdout.splitlines() if x.startswith("COPYERROR")), "")
    assert line, f"no CopyError (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-1500:]}"
    assert "cuMemcpyAsync" in line or "cuStreamSynchronize" in line, line
    return line


for compiled in filter(None, os.environ.get("KVPOOL_GPU_COMPILE", "").split(";")):
    status, _, what = compiled.partition(" ")

    def _compiled(status: str = status, what: str = what) -> str:
        assert status == "PASS", what
        return what

    check(f"compiles as CUDA: {what.split(':')[0]}")(_compiled)


if __name__ == "__main__":
    passed = sum(ok for _, ok, _ in RESULTS)
    failed = len(RESULTS) - passed
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
