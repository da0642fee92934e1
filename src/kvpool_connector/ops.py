"""Python face of the native batched block copy (``kvpool_connector._native``, built from ``csrc/``).

The CPU backend is always built; device backends (ACL, CUDA) slot in beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpool_connector._native import copy_batch as _copy_batch


def copy_batch(dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int], threads: int = 1) -> None:
    """Copy ``sizes[i]`` bytes from address ``srcs[i]`` to ``dsts[i]`` for every i; raises ValueError on bad input."""
    _copy_batch(list(dsts), list(srcs), list(sizes), threads)
