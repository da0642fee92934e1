"""The vLLM-release seam on the installed release (every leg runs it: 0.23, 0.32, 0.34): the start-up check of the
tested range, and each difference compat.py answers, checked against this release's own classes."""

from __future__ import annotations

import logging

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
from vllm.v1.core.sched.output import CachedRequestData

from kvpool_connector import compat
from kvpool_connector.connector import MemcacheConnectorStoreV1

pytestmark = pytest.mark.vllm_api


@pytest.mark.parametrize("version", ["0.23.0", "0.23.0.post1", "0.27.1", "0.32.0+cpu", "0.34.0"])
def test_releases_inside_the_tested_range_pass(version):
    assert compat.version_outside_tested_range(version) is None


@pytest.mark.parametrize("version", ["0.22.9", "0.35.0", "1.0.0", "0.11.2+cpu", "unknown"])
def test_a_release_outside_the_range_is_named_with_the_range(version):
    reason = compat.version_outside_tested_range(version)
    assert reason is not None
    assert f"this is vLLM {version}" in reason
    assert "tested with vLLM 0.23.0 through 0.34.0" in reason


def test_the_installed_release_is_inside_and_the_check_warns_once_at_most(monkeypatch, caplog):
    assert compat.version_outside_tested_range() is None, compat.VLLM_VERSION
    monkeypatch.setattr(compat, "VLLM_VERSION", "0.40.0")
    monkeypatch.setattr(compat, "version_outside_tested_range", lambda: "outside: 0.40.0")
    monkeypatch.setattr(compat, "_version_checked", False)
    with caplog.at_level(logging.WARNING):
        compat.check_vllm_version()
        compat.check_vllm_version()
    assert [r.getMessage() for r in caplog.records].count("outside: 0.40.0") == 1


def test_resumed_requests_are_read_where_this_release_sends_them():
    cached = CachedRequestData.make_empty()
    if hasattr(cached, "resumed_req_ids"):  # 0.23 - 0.32: flagged among the cached requests
        cached.resumed_req_ids = {"r1"}
        assert compat.resumed_request_ids(cached) == {"r1"}
    else:  # 0.34+: resumed requests come in scheduled_new_reqs with all their blocks
        assert compat.resumed_request_ids(cached) == ()


def test_kv_cache_placement_is_offered_only_where_vllm_asks_for_it():
    assert compat.places_kv_cache() == ("get_mem_pool_context" in vars(KVConnectorBase_V1))


def test_the_connector_declares_that_it_registers_kv_memory_where_vllm_asks():
    access = MemcacheConnectorStoreV1.kv_cache_access(None)
    if not hasattr(KVConnectorBase_V1, "kv_cache_access"):  # before 0.34 nobody asks
        assert access is None
        return
    from vllm.config.kv_transfer import KVCacheAccess

    assert access == KVCacheAccess.REGISTERS
    assert access.needs_single_chunk()  # one physical allocation per segment: what an RDMA registration needs
    assert MemcacheConnectorStoreV1.supports_sleep_mode(None)  # registrations dropped on sleep, made again on wake


def test_the_page_format_names_the_release_only_off_the_cpu(monkeypatch):
    monkeypatch.setattr(compat, "kv_cache_layout", lambda vllm_config, kv_cache_config: "LBHNC")
    assert compat.page_format(None, None, "cpu") == "LBHNC"
    major, minor = compat._release(compat.VLLM_VERSION)[:2]
    assert compat.page_format(None, None, "npu") == f"LBHNC@vllm{major}.{minor}"
    assert compat.page_format(None, None, "cuda") == f"LBHNC@vllm{major}.{minor}"
