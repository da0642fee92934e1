"""Transfers through a shared-memory area, for a pool client that reaches only memory it handed out itself.

Mooncake's shared-memory ("dummy") client, attached to a ``mooncake_client`` process on the same host, moves objects
through shared memory that both processes map; that process holds the segment and does any network transfer. It
cannot reach vLLM's KV pages, so a batch goes through the area in chunks: a get fills one contiguous slot per object
and a single batched copy scatters the slots into the pages; a put gathers the pages into slots first.

The two copies of a chunk are serial, but a load overlaps those of neighbouring chunks: the area is split in two
halves and chunks alternate between them, so while the pool client fills one half, a helper thread scatters the
other. Both the Mooncake calls and the native copy release the GIL. The overlap pays only when the helper has a core
of its own: on vLLM's CPU backend it runs on the cores the forward pass leaves free (measured in the engine, 64 MiB
loads: 12.5 ms serial, 10.4 ms overlapped there, no faster overlapped on the forward pass's core). A save runs in the
background, off the request's critical path, and is not overlapped (see ``put``). Slots are packed per chunk, so any
mix of object sizes works.

Codes pass through untouched (the backend reads them): for a get, the bytes read or a negative error; an object is
scattered only when exactly its expected size arrived.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import numpy as np

from kvpool_connector import ops
from kvpool_connector.compat import pin_current_thread

# (keys, slot addresses, slot sizes) -> one code per key
ContiguousCall = Callable[[list[str], list[int], list[int]], list[int]]

# Smaller chunks overlap more of the two copies but pay the pool client's per-call round trip (a master query and an
# IPC) more often: 64 MiB fetched as 2 MiB calls took 13 ms, as 16 MiB calls 5.5 ms, as one call 5.8 ms (this host).
DEFAULT_CHUNK_BYTES = 16 << 20

T = TypeVar("T")


class ObjectTooLarge(ValueError):
    """One object is larger than half the area (two chunks are in flight at once)."""


class _Chunk(NamedTuple):
    """Consecutive objects of a batch that travel together, with their packed slots in one half of the area."""

    span: range
    object_sizes: list[int]
    slots: np.ndarray


class SharedArea:
    def __init__(self, base: int, nbytes: int, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.base, self.nbytes, self.name = base, nbytes, name
        self.half = nbytes // 2
        self.chunk_bytes = min(chunk_bytes, self.half)
        # The helper runs on the CPUs of the thread that builds the area (the pool's connecting thread, kept off the
        # forward pass's cores), not on those of the thread that first calls get: one core copying each way.
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self._helper = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"kvpool-shared-{name}", initializer=pin_current_thread, initargs=(cpus,)
        )

    def close(self) -> None:
        self._helper.shutdown(wait=True)

    def _chunks(self, sizes: Sequence[Sequence[int]]) -> Iterator[_Chunk]:
        """Consecutive objects up to ``chunk_bytes`` together (or one larger object), alternating halves."""
        object_sizes = [sum(page_sizes) for page_sizes in sizes]
        if too_large := [size for size in object_sizes if size > self.half]:
            raise ObjectTooLarge(
                f"a KV block object of {too_large[0]} bytes does not fit half of the {self.nbytes}-byte shared "
                f"{self.name} area (two chunks are in flight at once); raise `shared_buffer_size` in the Mooncake "
                "settings to at least twice the object"
            )
        spans, start, used = [], 0, 0
        for i, size in enumerate(object_sizes):
            if used + size > self.chunk_bytes and i > start:
                spans.append(range(start, i))
                start, used = i, 0
            used += size
        if object_sizes:
            spans.append(range(start, len(object_sizes)))
        for k, span in enumerate(spans):
            chunk_sizes = object_sizes[span.start : span.stop]
            offsets = np.concatenate([[0], np.cumsum(chunk_sizes[:-1], dtype=np.int64)]).astype(np.int64)
            yield _Chunk(span, chunk_sizes, self.base + (k % 2) * self.half + offsets)

    def _pipelined(
        self, chunks: Iterator[_Chunk], first: Callable[[_Chunk], T], then: Callable[[_Chunk, T], list[int]]
    ) -> list[int]:
        """``first`` of chunk k+1 (here) runs while ``then`` of chunk k runs on the helper thread; ``then``'s codes in
        order. A half is reused only after ``then`` of the chunk before has finished with it, and nothing is left
        running when this returns or raises."""
        codes: list[int] = []
        pending: Future[list[int]] | None = None
        try:
            for chunk in chunks:
                done_first = first(chunk)
                if pending is not None:
                    codes.extend(pending.result())
                pending = self._helper.submit(then, chunk, done_first)
            if pending is not None:
                codes.extend(pending.result())
                pending = None
        finally:
            if pending is not None:
                pending.exception()  # wait: its half may still be in use; the first error is the one raised
        return codes

    @staticmethod
    def _page_copies(slots: np.ndarray, sizes: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(slot-side address, length) of every page, in the order the pages are listed."""
        lengths = np.fromiter((n for page_sizes in sizes for n in page_sizes), dtype=np.int64)
        within = [np.concatenate([[0], np.cumsum(page_sizes[:-1])]) for page_sizes in sizes]
        offsets = np.concatenate(within).astype(np.int64) if within else np.zeros(0, dtype=np.int64)
        starts = np.repeat(slots, [len(page_sizes) for page_sizes in sizes])
        return starts + offsets, lengths

    def get(
        self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]], fetch: ContiguousCall
    ) -> list[int]:
        """Fetch each key's object into the area, then scatter those that arrived whole into their pages."""

        def fetch_chunk(c: _Chunk) -> list[int]:
            return fetch(list(keys[c.span.start : c.span.stop]), c.slots.tolist(), c.object_sizes)

        def scatter(c: _Chunk, got: list[int]) -> list[int]:
            whole = [i for i, (n, want) in enumerate(zip(got, c.object_sizes, strict=True)) if n == want]
            if whole:
                srcs, lengths = self._page_copies(c.slots[whole], [sizes[c.span.start + i] for i in whole])
                ops.copy_batch([a for i in whole for a in addrs[c.span.start + i]], srcs, lengths)
            return got

        return self._pipelined(self._chunks(sizes), fetch_chunk, scatter)

    def put(
        self, keys: Sequence[str], addrs: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]], store: ContiguousCall
    ) -> list[int]:
        """Gather each chunk's pages into the area, then store its slots as objects; chunk after chunk.

        Not overlapped: saves run in the background, and overlapping their two copies would only take memory bandwidth
        and a core from the forward pass (all-miss throughput measured 0.94x with the overlap)."""
        codes: list[int] = []
        for c in self._chunks(sizes):
            dsts, lengths = self._page_copies(c.slots, sizes[c.span.start : c.span.stop])
            ops.copy_batch(dsts, [a for page_addrs in addrs[c.span.start : c.span.stop] for a in page_addrs], lengths)
            codes.extend(store(list(keys[c.span.start : c.span.stop]), c.slots.tolist(), c.object_sizes))
        return codes
