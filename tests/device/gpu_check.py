"""The data plane on a real NVIDIA GPU (run by gpu_check.sh; torch with CUDA, no vLLM, no pytest needed).

1. The CUDA copy backend on torch CUDA tensors: batch and per-copy paths, both directions, poisoned destinations
   (bytes between the pages must stay untouched), copy bandwidth against one contiguous torch copy.
2. A save/load round trip of flash-attn-shaped KV tensors ``(2, num_blocks, block_size, heads, head_dim)`` per
   layer through the staging saver and ``StreamRuntime("cuda")``, against a host-memory pool (a test double of a
   pool, below). Stream order: the blocks are written by kernels queued behind ~0.2 s of matmuls; ``stage`` must
   return while they still run (the forward thread is not blocked), the staged copy must hold the final values
   (the copy waited for the event), and a later kernel that overwrites the blocks must not change what was staged
   (the compute stream waited for the copy). The synchronous path (wait for the event, put from the pages) too.
3. A failing copy is reported as CopyError naming the call (last: a CUDA error may poison the context).
Prints one line per check and "N passed, M failed" at the end; exits non-zero if any failed.
"""

from __future__ import annotations

import ctypes
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvpool_connector.backends.base import Outcome, PoolBackend
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import StreamRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.ops import CopyError, backend_status, copy_batch
from kvpool_connector.pool import PoolHandle
from kvpool_connector.staging import StagingSaver

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
    """TEST DOUBLE of a pool: objects are host bytes; device buffers are read and written with the CUDA copy (as a
    device-aware pool client's own engine would), host buffers with memmove."""

    name = "host-memory-double"

    def __init__(self, runtime: StreamRuntime) -> None:
        self.objects: dict[str, bytes] = {}
        self.runtime = runtime
        self.device_reads = 0

    def connect(self) -> None:
        return None

    def register_memory(self, ptr: int, size: int) -> None:
        return None

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.objects for k in keys]

    def _move(self, dsts: list[int], srcs: list[int], sizes: list[int], device_side: int) -> None:
        if self.runtime.is_device_address(device_side):
            torch.cuda.synchronize()
            copy_batch(dsts, srcs, sizes, backend="cuda")
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
    handle.start(wait_s=5)
    assert handle.wait_connected(5)
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


@check("async save: staged after the event, forward thread not blocked, reuse cannot corrupt the copy")
def _() -> str:
    caches, pages, runtime, pool, handle = _kv_setup()
    saver = StagingSaver(handle, pages, capacity_blocks=16, runtime=runtime, stats=StatsCounter())
    blocks = [3, 4, 9]
    _busy_then_write(caches, blocks, 7.0)
    written = runtime.record_event()
    start = time.perf_counter()
    saver.stage([f"b{b}" for b in blocks], blocks, written)
    stage_s = time.perf_counter() - start
    still_running = not written.query()
    for t in caches.values():  # a later step reuses the blocks: must wait for the copy on the compute stream
        t[:, blocks] = -1.0
    assert saver.flush(30)
    assert still_running, "stage() returned only after the forward pass's kernels finished: it blocked"
    assert saver.stats["saved_blocks"] == 3, saver.stats.total()
    for key, block in zip([f"b{b}" for b in blocks], blocks, strict=True):
        stored = np.frombuffer(pool.objects[key], dtype=np.uint16)  # bf16 bits
        assert bool((stored == np.uint16(0x40E0)).all()), f"block {block}: staged bytes are not the final 7.0s"
    # load them back into other blocks, straight into the device pages
    targets = [20, 21, 22]
    addrs, sizes = pages.addresses(targets)
    assert handle.get([f"b{b}" for b in blocks], addrs, sizes) == [Outcome.OK] * 3
    for block in targets:
        assert bool((_block_values(caches, block) == 7.0).all()), f"loaded block {block} differs"
    saver.close()
    handle.close()
    return f"stage() returned in {stage_s * 1e3:.1f} ms while the compute stream was still busy"


@check("sync save: waits for the event, then the pool reads the device pages")
def _() -> str:
    caches, pages, runtime, pool, handle = _kv_setup()
    blocks = [5, 6]
    _busy_then_write(caches, blocks, 3.0)
    written = runtime.record_event()
    runtime.wait_on_host(written)
    addrs, sizes = pages.addresses(blocks)
    handle.put_missing([f"s{b}" for b in blocks], addrs, sizes, StatsCounter())
    assert pool.device_reads == 2
    for block in blocks:
        stored = np.frombuffer(pool.objects[f"s{block}"], dtype=np.uint16)
        assert bool((stored == np.uint16(0x4040)).all()), f"block {block}: put read KV before it was written"
    handle.close()
    return "ok"


@check("a failing copy is a CopyError naming the call")
def _() -> str:
    host = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    bogus = 0x10  # not a mapped address
    try:
        copy_batch([host.data_ptr()], [bogus], [4096], backend="cuda", batch=False)
    except CopyError as exc:
        assert "cuMemcpyAsync" in str(exc) or "cuStreamSynchronize" in str(exc), str(exc)
        return str(exc)
    raise AssertionError("a copy from an unmapped address was not reported")


if __name__ == "__main__":
    passed = sum(ok for _, ok, _ in RESULTS)
    failed = len(RESULTS) - passed
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
