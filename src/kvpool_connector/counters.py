"""Transfer counters the data plane keeps (no vLLM here); ``metrics`` hands them to vLLM's stats path.

Names: see ``metrics``; counts are added from the forward thread and the helper threads alike.
"""

from __future__ import annotations

import threading
from collections import Counter


class StatsCounter:
    """Thread-safe counters with a running total and a "since last taken" window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total: Counter[str] = Counter()
        self._window: Counter[str] = Counter()

    def add(self, name: str, value: float = 1) -> None:
        if value:
            with self._lock:
                self._total[name] += value
                self._window[name] += value

    def take(self) -> dict[str, float]:
        """Counts since the previous take."""
        with self._lock:
            window, self._window = self._window, Counter()
        return dict(window)

    def total(self) -> dict[str, float]:
        with self._lock:
            return dict(self._total)
