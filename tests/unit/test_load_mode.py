"""``load_async: auto``: each hit's load mode from what the scheduler measured (steps, seconds per block)."""

from __future__ import annotations

import pytest

from kvpool_connector.load_mode import SYNC_SHARE, LoadModeChooser
from kvpool_connector.metrics import PoolConnectorStats, pool_counters


def _busy(chooser: LoadModeChooser, step_s: float, steps: int = 30) -> None:
    now = 100.0
    for _ in range(steps):
        chooser.step_planned(["a", "b", "c", "d"], now=now)
        now += step_s


@pytest.mark.parametrize("mode", [True, False])
def test_a_fixed_mode_is_kept_whatever_was_measured(mode):
    chooser = LoadModeChooser(mode)
    _busy(chooser, 0.01)
    chooser.loads_measured({"loaded_blocks": 10, "load_seconds": 10.0})
    assert chooser.load_async(1) is mode and chooser.load_async(1000) is mode
    assert chooser.ever_async is mode


def test_an_idle_engine_loads_synchronously():
    chooser = LoadModeChooser("auto")
    assert chooser.load_async(10_000) is False  # nothing ever ran: no one to delay
    _busy(chooser, 0.05)
    assert chooser.load_async(10_000) is True
    for request in "abcd":  # the batch finished; vLLM plans no step until a request arrives
        chooser.finished(request)
    assert chooser.load_async(10_000) is False
    chooser.step_planned([], now=1e6)  # a step with nothing to compute (say, only loads in flight)
    assert chooser.load_async(10_000) is False


def test_an_idle_gap_is_not_taken_for_a_step():
    chooser = LoadModeChooser("auto")
    _busy(chooser, 0.05)
    for request in "abcd":
        chooser.finished(request)
    chooser.step_planned(["e"], now=5000.0)  # an hour later, a new request
    chooser.step_planned(["e"], now=5000.05)
    assert chooser.step_s == pytest.approx(0.05)


def test_a_busy_engine_loads_asynchronously_until_loads_are_measured():
    chooser = LoadModeChooser("auto")
    _busy(chooser, 0.05)
    assert chooser.step_s == pytest.approx(0.05)
    assert chooser.load_async(1) is True


def test_a_busy_engine_loads_synchronously_only_what_fits_in_a_share_of_a_step():
    chooser = LoadModeChooser("auto")
    _busy(chooser, 0.040)  # 40 ms steps
    chooser.loads_measured({"loaded_blocks": 100, "load_seconds": 0.1})  # 1 ms per block
    fits = int(SYNC_SHARE * 0.040 / 0.001)  # 10 blocks
    assert chooser.load_async(fits) is False
    assert chooser.load_async(fits + 1) is True


def test_measurements_follow_the_recent_past():
    chooser = LoadModeChooser("auto")
    chooser.loads_measured({"loaded_blocks": 10, "load_seconds": 0.01})
    for _ in range(40):  # the pool got slower (a remote node, a busy network)
        chooser.loads_measured({"loaded_blocks": 10, "load_seconds": 0.1})
    assert chooser.seconds_per_block == pytest.approx(0.01, rel=0.01)
    chooser.loads_measured({"loaded_blocks": 0, "load_seconds": 0.0})  # a step without loads changes nothing
    chooser.loads_measured({})
    assert chooser.seconds_per_block == pytest.approx(0.01, rel=0.01)


class _MultiStats:
    """The shape of vLLM's MultiKVConnectorStats: each child connector's stats by name."""

    def __init__(self, data: dict) -> None:
        self.data = data


def test_pool_counters_are_found_alone_or_among_multiconnector_children():
    ours = PoolConnectorStats(data={"loaded_blocks": 3, "load_seconds": 0.5})
    assert pool_counters(ours) == {"loaded_blocks": 3, "load_seconds": 0.5}
    assert pool_counters(_MultiStats({"OtherConnector": object(), "MemcacheConnectorStoreV1": ours}))["loaded_blocks"]
    assert pool_counters(None) == {} and pool_counters(_MultiStats({"OtherConnector": object()})) == {}
