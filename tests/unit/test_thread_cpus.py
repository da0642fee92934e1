"""On vLLM's CPU backend the connector's background threads leave the forward pass's cores alone."""

from __future__ import annotations

import os
import threading

import pytest

from kvpool_connector import compat
from kvpool_connector.devices import pin_current_thread

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


def _in_thread(fn):
    out: dict = {}

    def run() -> None:
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_helper_threads_go_to_the_cores_the_forward_pass_leaves_free():
    compute = min(os.sched_getaffinity(0))

    def as_a_bound_worker_thread():
        os.sched_setaffinity(0, {compute})  # what vLLM does to the worker thread that calls the connector
        cpus = compat.helper_thread_cpus()

        def helper():
            pin_current_thread(cpus)
            return os.sched_getaffinity(0), _in_thread(lambda: os.sched_getaffinity(0))

        return cpus, _in_thread(helper)

    cpus, (helper_cpus, grandchild_cpus) = _in_thread(as_a_bound_worker_thread)
    assert cpus and compute not in cpus
    assert helper_cpus == cpus
    assert grandchild_cpus == cpus  # threads the pool client starts inherit the binding


def test_no_free_core_means_no_pinning(monkeypatch):
    """When the forward pass holds every core (e.g. OpenMP bound to all of them), helper threads stay unpinned."""
    from vllm.platforms import current_platform

    compute = min(os.sched_getaffinity(0))
    monkeypatch.setattr(current_platform, "discover_numa_topology", lambda: [[compute]])

    def bound_to_every_core():
        os.sched_setaffinity(0, {compute})
        return compat.helper_thread_cpus()

    assert _in_thread(bound_to_every_core) is None
