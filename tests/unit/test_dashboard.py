"""The Grafana dashboard that ships (``examples/grafana/kvpool-dashboard.json``): every expression names series that
exist, the connector's as it exports them and vLLM's as this release of vLLM exports them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import vllm

from kvpool_connector.counters import Count
from kvpool_connector.metrics import REASON_COUNTERS

pytestmark = pytest.mark.vllm_api

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "kvpool-dashboard.json"
SERIES = re.compile(r"vllm:[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def base_name(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def test_every_pool_series_of_the_dashboard_is_one_the_connector_exports():
    exported = {f"vllm:kvpool_{counter}_total" for counter in Count}
    used = {s for e in expressions() for s in SERIES.findall(e) if s.startswith("vllm:kvpool_")}
    assert used and used <= exported, used - exported
    reasons = {f"vllm:kvpool_{counter}_total" for counter in REASON_COUNTERS}
    for expr in expressions():  # a reason counter is summed or shown by its reason, never added across reasons blind
        if any(name in expr for name in reasons):
            assert "reason" in expr, expr


def test_every_vllm_series_of_the_dashboard_exists_in_this_vllm():
    source = (Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    declared = set(re.findall(r'"(vllm:[a-z_]+)"', source))
    used = {base_name(s) for e in expressions() for s in SERIES.findall(e) if not s.startswith("vllm:kvpool_")}
    assert used and used <= declared, used - declared


def test_the_expressions_are_balanced_and_every_panel_has_a_target():
    dashboard = json.loads(DASHBOARD.read_text())
    assert all(panel["targets"] for panel in dashboard["panels"])
    for expr in expressions():
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr
        assert expr.count("{") == expr.count("}"), expr
