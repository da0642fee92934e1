"""Connector metrics through vLLM's own connector-stats path: the periodic log line and the server's ``/metrics``.

Flow, per vLLM: each step the worker's (and the scheduler's) ``get_kv_connector_stats`` hands over what happened
since the last call as a :class:`PoolConnectorStats`; vLLM aggregates them, logs ``reduce()`` periodically
("KV Transfer metrics: ...") and feeds the same data to :class:`PoolPromMetrics`, which exports counters named
``vllm:kvpool_*``.

Counter names (``data`` keys): ``lookups``, ``lookup_tokens`` (prompt tokens looked up past the local hit),
``hit_tokens``, ``sync_loads``/``async_loads`` (hits by load mode), ``loaded_blocks`` (``loaded_other_tp_blocks``
of them from another TP size's objects), ``loaded_bytes``,
``load_seconds``, ``saved_blocks``, ``saved_bytes``, ``save_seconds``, ``save_skipped_present``,
``producer_wait_expired``, ``outages``, ``sightings_recorded``, and per reason ``load_failed.<reason>``,
``save_failed.<reason>``, ``save_dropped.<reason>`` (``staging_full``, ``unavailable``, ``shutdown``),
``save_not_admitted.<reason>`` and ``missed_blocks.<reason>`` (``pool_unavailable``: the pool gave no answer; with
``second_sight`` admission also ``first_sight``, ``seen_before``).
"""

from __future__ import annotations

from typing import Any

from kvpool_connector.compat import ConnectorStatsBase, KVConnectorPromMetrics, KVConnectorStats
from kvpool_connector.counters import StatsCounter

PLAIN_COUNTERS = (
    ("lookups", "Prompts looked up in the KV pool."),
    ("lookup_tokens", "Prompt tokens looked up in the KV pool beyond vLLM's local prefix hit."),
    ("hit_tokens", "Prompt tokens the KV pool supplied."),
    ("sync_loads", "Pool hits loaded before the forward pass (load_async false, or auto's choice)."),
    ("async_loads", "Pool hits loaded on the loader thread while the batch ran (load_async true, or auto's choice)."),
    ("loaded_blocks", "KV blocks loaded from the pool."),
    ("loaded_other_tp_blocks", "KV blocks loaded from objects stored at another TP size (GQA head shards)."),
    ("loaded_bytes", "Bytes loaded from the pool."),
    ("load_seconds", "Seconds spent loading from the pool."),
    ("saved_blocks", "KV blocks stored in the pool."),
    ("saved_bytes", "Bytes stored in the pool."),
    ("save_seconds", "Seconds spent storing to the pool."),
    ("save_skipped_present", "KV blocks not stored because the pool already held them."),
    ("lookup_timeouts", "Lookups counted as misses: the pool did not answer within lookup_timeout_ms."),
    ("producer_wait_expired", "Decode requests whose prefill instance's blocks did not reach the pool in time."),
    ("outages", "Times the KV pool became unreachable; each opens a back-off window of reconnect_interval_s."),
    ("sightings_recorded", "Blocks computed for the first time in the fleet, recorded in the pool (save_admission)."),
)
REASON_COUNTERS = (
    ("load_failed", "KV blocks whose load failed (recomputed), by reason."),
    ("save_failed", "KV blocks the pool refused to store, by reason."),
    ("save_dropped", "KV blocks not saved (staging full, pool unavailable, shutdown), by reason."),
    ("save_not_admitted", "KV blocks not saved by save_admission (first_sight: never computed before), by reason."),
    (
        "missed_blocks",
        "Looked-up blocks not served, by why (pool_unavailable; with second_sight: first_sight, seen_before).",
    ),
)


class PoolConnectorStats(ConnectorStatsBase):
    """A window of counters, summed across workers and the scheduler."""

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in (other.data or {}).items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {
            "pool_lookups": int(d.get("lookups", 0)),
            "pool_hit_tokens": int(d.get("hit_tokens", 0)),
            "pool_hit_rate_pct": round(100 * d.get("hit_tokens", 0) / d["lookup_tokens"], 1)
            if d.get("lookup_tokens")
            else 0.0,
            "pool_loaded_MiB": round(d.get("loaded_bytes", 0) / 2**20, 1),
            "pool_saved_MiB": round(d.get("saved_bytes", 0) / 2**20, 1),
        }
        for op, seconds in (("loaded", "load_seconds"), ("saved", "save_seconds")):
            if d.get(seconds):
                out[f"pool_{op}_GBps"] = round(d.get(f"{op}_bytes", 0) / d[seconds] / 1e9, 2)
        for prefix, _ in REASON_COUNTERS:
            failed = sum(v for k, v in d.items() if k.startswith(prefix + "."))
            if failed:
                out[f"pool_{prefix}_blocks"] = int(failed)
        return out


def take_stats(counter: StatsCounter, every_step: bool = False) -> PoolConnectorStats | None:
    """What ``counter`` counted since the last call, as vLLM's stats object; None when nothing happened, unless
    ``every_step`` (a vLLM that needs a report from the workers every step: ``compat``)."""
    window = counter.take()
    return PoolConnectorStats(data=window) if window or every_step else None


def pool_counters(stats: KVConnectorStats | None) -> dict[str, Any]:
    """This connector's counters in the stats vLLM hands the scheduler (the workers' of one step): ours alone, or
    ours among MultiConnector's children's."""
    if isinstance(stats, PoolConnectorStats):
        return stats.data
    children = getattr(stats, "data", None)
    if isinstance(children, dict):
        for child in children.values():
            if isinstance(child, PoolConnectorStats):
                return child.data
    return {}


class PoolPromMetrics(KVConnectorPromMetrics):
    """``vllm:kvpool_<counter>_total`` per engine; reason counters carry a ``reason`` label."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._plain = {
            name: self._counter_cls(name=f"vllm:kvpool_{name}", documentation=doc, labelnames=labelnames)
            for name, doc in PLAIN_COUNTERS
        }
        self._by_reason = {
            name: self._counter_cls(name=f"vllm:kvpool_{name}", documentation=doc, labelnames=[*labelnames, "reason"])
            for name, doc in REASON_COUNTERS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, value in (transfer_stats_data or {}).items():
            if not value:
                continue
            name, _, reason = key.partition(".")
            if reason and name in self._by_reason:
                self._by_reason[name].labels(*labels, reason).inc(value)
            elif name in self._plain:
                self._plain[name].labels(*labels).inc(value)
