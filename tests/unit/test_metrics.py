"""Connector stats: windows, aggregation across workers, the log line, and the Prometheus export."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import prometheus_client

from kvpool_connector.counters import StatsCounter
from kvpool_connector.metrics import PoolConnectorStats, PoolPromMetrics


def test_counter_windows_and_totals_across_threads():
    stats = StatsCounter()
    threads = [threading.Thread(target=lambda: [stats.add("saved_blocks") for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.take() == {"saved_blocks": 4000}
    assert stats.take() == {}
    stats.add("saved_blocks", 2)
    assert stats.total() == {"saved_blocks": 4002}


def test_aggregate_and_reduce():
    worker0 = PoolConnectorStats(data={"loaded_bytes": 2**20, "load_seconds": 0.001, "load_failed.missing": 1})
    worker1 = PoolConnectorStats(data={"loaded_bytes": 2**20, "load_seconds": 0.001, "load_failed.wrong_size": 2})
    scheduler = PoolConnectorStats(data={"lookups": 2, "lookup_tokens": 1024, "hit_tokens": 256})
    total = worker0.aggregate(worker1).aggregate(scheduler)
    reduced = total.reduce()
    assert reduced["pool_lookups"] == 2
    assert reduced["pool_hit_rate_pct"] == 25.0
    assert reduced["pool_loaded_MiB"] == 2.0
    assert reduced["pool_loaded_GBps"] == round(2 * 2**20 / 0.002 / 1e9, 2)
    assert reduced["pool_load_failed_blocks"] == 3
    assert PoolConnectorStats(data={}).is_empty()


def test_prometheus_counters(monkeypatch):
    registry = prometheus_client.CollectorRegistry()

    class Counter(prometheus_client.Counter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, registry=registry, **kwargs)

    metrics = PoolPromMetrics(
        SimpleNamespace(kv_transfer_config=None),
        {prometheus_client.Counter: Counter, prometheus_client.Gauge: None, prometheus_client.Histogram: None},
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    metrics.observe({"hit_tokens": 256, "saved_bytes": 4096, "save_failed.pool_full": 3})
    metrics.observe({"hit_tokens": 128})
    get = registry.get_sample_value
    assert get("vllm:kvpool_hit_tokens_total", {"model_name": "m", "engine": "0"}) == 384
    assert get("vllm:kvpool_saved_bytes_total", {"model_name": "m", "engine": "0"}) == 4096
    assert get("vllm:kvpool_save_failed_total", {"model_name": "m", "engine": "0", "reason": "pool_full"}) == 3
