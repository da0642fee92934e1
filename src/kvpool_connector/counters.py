"""The connector's counters (no vLLM here): their names, meanings, and the thread-safe store the data plane and the
scheduler add to; ``metrics`` hands them to vLLM's stats path as ``vllm:kvpool_<name>_total``.

Every name is a ``Count`` member, so a misspelled counter is an error where it is written, not a series that never
moves. A ``reasoned`` counter is kept per reason, as ``<name>.<reason>`` (``Count.SAVE_DROPPED.by("shutdown")``),
and exported with a ``reason`` label. Counts are added from the forward thread and the helper threads alike.
"""

from __future__ import annotations

import threading
from collections import Counter
from enum import Enum


class Count(str, Enum):
    """Every counter, with the text its metric is documented by."""

    doc: str
    reasoned: bool

    def __new__(cls, name: str, doc: str, reasoned: bool = False) -> Count:
        member = str.__new__(cls, name)
        member._value_ = name
        member.doc = doc
        member.reasoned = reasoned
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def by(self, reason: str) -> str:
        """The key of this counter for one reason."""
        assert self.reasoned, f"{self.value} is not kept by reason"
        return f"{self.value}.{reason}"

    LOOKUPS = "lookups", "Prompts looked up in the KV pool."
    LOOKUP_TOKENS = "lookup_tokens", "Prompt tokens looked up in the KV pool beyond vLLM's local prefix hit."
    HIT_TOKENS = "hit_tokens", "Prompt tokens the KV pool supplied."
    SYNC_LOADS = "sync_loads", "Pool hits loaded before the forward pass (load_async false, or auto's choice)."
    ASYNC_LOADS = (
        "async_loads",
        "Pool hits loaded on the loader thread while the batch ran (load_async true, or auto's choice).",
    )
    LOADED_BLOCKS = "loaded_blocks", "KV blocks loaded from the pool."
    LOADED_OTHER_TP_BLOCKS = (
        "loaded_other_tp_blocks",
        "KV blocks loaded from objects stored at another TP size (GQA head shards).",
    )
    LOADED_BYTES = "loaded_bytes", "Bytes loaded from the pool."
    LOAD_SECONDS = "load_seconds", "Seconds spent loading from the pool."
    SAVED_BLOCKS = "saved_blocks", "KV blocks stored in the pool."
    SAVED_BYTES = "saved_bytes", "Bytes stored in the pool."
    SAVE_SECONDS = "save_seconds", "Seconds spent storing to the pool."
    SAVE_SKIPPED_PRESENT = "save_skipped_present", "KV blocks not stored because the pool already held them."
    LOOKUP_TIMEOUTS = (
        "lookup_timeouts",
        "Lookups counted as misses: the pool did not answer within lookup_timeout_ms.",
    )
    PRODUCER_WAIT_EXPIRED = (
        "producer_wait_expired",
        "Decode requests whose prefill instance's blocks did not reach the pool in time.",
    )
    OUTAGES = (
        "outages",
        "Times the KV pool became unreachable; each opens a back-off window of reconnect_interval_s.",
    )
    SIGHTINGS_RECORDED = (
        "sightings_recorded",
        "Blocks computed for the first time in the fleet, recorded in the pool (save_admission).",
    )
    LOAD_FAILED = "load_failed", "KV blocks whose load failed (recomputed), by reason.", True
    SAVE_FAILED = "save_failed", "KV blocks the pool refused to store, by reason.", True
    SAVE_DROPPED = (
        "save_dropped",
        "KV blocks not saved (staging_full, unavailable, shutdown), by reason.",
        True,
    )
    SAVE_NOT_ADMITTED = (
        "save_not_admitted",
        "KV blocks not saved by save_admission (first_sight: never computed before), by reason.",
        True,
    )
    MISSED_BLOCKS = (
        "missed_blocks",
        "Looked-up blocks not served, by why (pool_unavailable; with second_sight: first_sight, seen_before).",
        True,
    )


class StatsCounter:
    """Thread-safe counters with a running total and a "since last taken" window, keyed by plain strings (what
    crosses vLLM's process boundaries)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total: Counter[str] = Counter()
        self._window: Counter[str] = Counter()

    def add(self, name: Count | str, value: float = 1) -> None:
        """``name``: a ``Count``, or a reasoned one's ``Count.X.by(reason)``."""
        if value:
            key = str(name)
            with self._lock:
                self._total[key] += value
                self._window[key] += value

    def take(self) -> dict[str, float]:
        """Counts since the previous take."""
        with self._lock:
            window, self._window = self._window, Counter()
        return dict(window)

    def total(self) -> dict[str, float]:
        with self._lock:
            return dict(self._total)
