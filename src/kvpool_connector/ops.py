"""Python face of the native batched block copy (``kvpool_connector._native``, built from ``csrc/``).

Calls, in the order a caller makes them:
1. ``merge_runs``: coalesce copies whose source and destination both continue where the previous copy ended (a run
   of consecutive KV blocks into consecutive staging slots becomes one copy per layer);
2. ``copy_batch``: hand the batch to one backend: ``cpu`` (memcpy on a few threads, always built), ``acl``
   (Ascend, ``libascendcl.so`` opened at run time) or ``cuda`` (``libcuda.so.1`` opened at run time).
Errors: ``ValueError`` for malformed input, ``BackendUnavailable`` when a device runtime cannot be loaded,
``CopyError`` (a RuntimeError whose message names the failing copy) when the runtime reports a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from kvpool_connector._native import (
    BackendUnavailable,
    CopyError,
    acl_available,
    acl_copy_batch,
    cpu_copy_batch,
    cuda_available,
    cuda_copy_batch,
)

__all__ = ["BackendUnavailable", "CopyError", "backend_status", "copy_batch", "merge_runs"]

Backend = Literal["cpu", "acl", "cuda"]
ACL_LIBRARY = "libascendcl.so"
CUDA_LIBRARY = "libcuda.so.1"


def merge_runs(
    dsts: Sequence[int] | np.ndarray, srcs: Sequence[int] | np.ndarray, sizes: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coalesce consecutive copies that continue each other on both sides; order is kept, zero sizes dropped.

    Returns contiguous uint64 arrays, the form the native copy takes without converting element by element.
    """
    d = np.asarray(dsts, dtype=np.uint64)
    s = np.asarray(srcs, dtype=np.uint64)
    n = np.asarray(sizes, dtype=np.uint64)
    if not (len(d) == len(s) == len(n)):
        raise ValueError(f"dsts, srcs and sizes must have the same length (got {len(d)}, {len(s)}, {len(n)})")
    keep = n > 0
    d, s, n = d[keep], s[keep], n[keep]
    if len(n) == 0:
        return d, s, n
    continues = (d[1:] == d[:-1] + n[:-1]) & (s[1:] == s[:-1] + n[:-1])
    if not continues.any():
        return d, s, n
    starts = np.flatnonzero(np.concatenate([[True], ~continues]))
    return d[starts], s[starts], np.add.reduceat(n, starts)


def backend_status(backend: Backend, library: str | None = None) -> tuple[bool, bool]:
    """(loadable, has a native batch call) for a device backend; ``cpu`` is always (True, True)."""
    if backend == "cpu":
        return True, True
    if backend == "acl":
        return acl_available(library or ACL_LIBRARY)
    if backend == "cuda":
        return cuda_available(library or CUDA_LIBRARY)
    raise ValueError(f"unknown copy backend {backend!r}; use 'cpu', 'acl' or 'cuda'")


def copy_batch(
    dsts: Sequence[int] | np.ndarray,
    srcs: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    *,
    backend: Backend = "cpu",
    threads: int = 1,
    direction: Literal["h2d", "d2h"] = "d2h",
    device_id: int = 0,
    stream: int = 0,
    synchronize: bool = True,
    batch: bool = True,
    library: str | None = None,
) -> None:
    """Copy ``sizes[i]`` bytes from address ``srcs[i]`` to ``dsts[i]`` for every i.

    Runs are merged first; a CopyError's copy index counts the merged batch. ``synchronize=False`` leaves device
    copies in flight on ``stream`` (the caller synchronizes); the CPU backend always returns when done.
    ``batch=False`` makes a device backend issue one runtime call per copy even where a batch call exists (the
    fallback when the batch call fails).
    """
    d, s, n = merge_runs(dsts, srcs, sizes)
    if backend == "cpu":
        cpu_copy_batch(d, s, n, threads)
    elif backend == "acl":
        acl_copy_batch(d, s, n, direction, device_id, stream, synchronize, batch, library or ACL_LIBRARY)
    elif backend == "cuda":
        cuda_copy_batch(d, s, n, stream, synchronize, batch, library or CUDA_LIBRARY)
    else:
        raise ValueError(f"unknown copy backend {backend!r}; use 'cpu', 'acl' or 'cuda'")
