"""Connector metrics through vLLM's own connector-stats path: the periodic log line and the server's ``/metrics``.

Flow, per vLLM: each step the worker's (and the scheduler's) ``get_kv_connector_stats`` hands over what happened
since the last call as a :class:`PoolConnectorStats`; vLLM aggregates them, logs ``reduce()`` periodically
("KV Transfer metrics: ...") and feeds the same data to :class:`PoolPromMetrics`, which exports counters named
``vllm:kvpool_*``.

Counter names (``data`` keys) and what each counts: ``counters.Count``; a reasoned counter's keys are
``<name>.<reason>`` and its metric has a ``reason`` label.
"""

from __future__ import annotations

from typing import Any

from kvpool_connector.compat import ConnectorStatsBase, KVConnectorPromMetrics, KVConnectorStats
from kvpool_connector.counters import Count, StatsCounter

PLAIN_COUNTERS = tuple(c for c in Count if not c.reasoned)
REASON_COUNTERS = tuple(c for c in Count if c.reasoned)  # exported with a ``reason`` label


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
            "pool_lookups": int(d.get(Count.LOOKUPS, 0)),
            "pool_hit_tokens": int(d.get(Count.HIT_TOKENS, 0)),
            "pool_hit_rate_pct": round(100 * d.get(Count.HIT_TOKENS, 0) / d[Count.LOOKUP_TOKENS], 1)
            if d.get(Count.LOOKUP_TOKENS)
            else 0.0,
            "pool_loaded_MiB": round(d.get(Count.LOADED_BYTES, 0) / 2**20, 1),
            "pool_saved_MiB": round(d.get(Count.SAVED_BYTES, 0) / 2**20, 1),
        }
        for op, moved, seconds in (
            ("loaded", Count.LOADED_BYTES, Count.LOAD_SECONDS),
            ("saved", Count.SAVED_BYTES, Count.SAVE_SECONDS),
        ):
            if d.get(seconds):
                out[f"pool_{op}_GBps"] = round(d.get(moved, 0) / d[seconds] / 1e9, 2)
        for counter in REASON_COUNTERS:
            failed = sum(v for k, v in d.items() if k.startswith(f"{counter}."))
            if failed:
                out[f"pool_{counter}_blocks"] = int(failed)
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
            c.value: self._counter_cls(name=f"vllm:kvpool_{c}", documentation=c.doc, labelnames=labelnames)
            for c in PLAIN_COUNTERS
        }
        self._by_reason = {
            c.value: self._counter_cls(name=f"vllm:kvpool_{c}", documentation=c.doc, labelnames=[*labelnames, "reason"])
            for c in REASON_COUNTERS
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
