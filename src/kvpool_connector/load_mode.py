"""Per hit, the faster load mode (``load_async: auto``): synchronous when it delays no one much, else asynchronous.

A synchronous load runs before the step's forward pass: the hit is computed in the same step, but every running
request waits for the load. An asynchronous load runs on the loader thread while the batch goes on: running requests
barely notice, but the hit waits at least one more step (vLLM learns the load ended at a step's end). So:
- nothing else is running: load synchronously (no one to delay, one step saved);
- the expected load time (blocks x the recent seconds per block) is at most ``SYNC_SHARE`` of a recent step: load
  synchronously (running requests see one step at most that much longer);
- otherwise, or before any load has been measured: asynchronously.

What it reads, all from vLLM's own calls on the scheduler side: the requests each step runs and the step's length
(``build_connector_meta``), the requests that finished (``request_finished``: a request that finished leaves the
engine idle once no other runs), and the workers' ``loaded_blocks``/``load_seconds`` counters, which reach the
scheduler every step in ``KVConnectorOutput.kv_connector_stats`` (summed over ranks: each rank loads its own shard
of a block, in parallel, so seconds per block is per rank).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from kvpool_connector.counters import Count

LoadMode = Literal["auto"] | bool

SYNC_SHARE = 0.25  # a synchronous load may make one step this much longer
SMOOTHING = 0.2  # weight of the newest sample in the moving averages


class LoadModeChooser:
    def __init__(self, mode: LoadMode) -> None:
        self.mode = mode
        self.step_s: float | None = None  # moving average of a step with work scheduled
        self.seconds_per_block: float | None = None  # moving average, per rank
        self._running: set[str] = set()  # requests the last step ran that have not finished since
        self._last_step: float | None = None

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def ever_async(self) -> bool:
        return self.mode is not False

    def load_async(self, num_blocks: int) -> bool:
        """Whether a hit of ``num_blocks`` blocks loads asynchronously."""
        if self.mode != "auto":
            return bool(self.mode)
        if not self.busy:
            return False
        if self.seconds_per_block is None or self.step_s is None:
            return True
        return num_blocks * self.seconds_per_block > SYNC_SHARE * self.step_s

    def step_planned(self, scheduled: Iterable[str], now: float | None = None) -> None:
        """Called as each step is planned with the requests it runs: when a request of the previous step still runs,
        the time since the previous plan is that step's length (else the engine may have been idle meanwhile)."""
        now = time.monotonic() if now is None else now
        if self._running and self._last_step is not None:
            self.step_s = _average(self.step_s, now - self._last_step)
        self._running = set(scheduled)
        self._last_step = now

    def finished(self, request_id: str) -> None:
        self._running.discard(request_id)

    def loads_measured(self, stats: Mapping[str, Any]) -> None:
        """The workers' counters of one step (``loaded_blocks``, ``load_seconds``), summed over ranks."""
        blocks, seconds = stats.get(Count.LOADED_BLOCKS, 0), stats.get(Count.LOAD_SECONDS, 0.0)
        if blocks > 0 and seconds > 0:
            self.seconds_per_block = _average(self.seconds_per_block, seconds / blocks)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - SMOOTHING) * current + SMOOTHING * sample
