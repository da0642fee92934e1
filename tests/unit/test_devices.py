"""The device runtime seam: ``StreamRuntime`` binding every helper thread of a pool client to the worker's device (on
a stand-in for ``torch.npu``: its ``set_device`` is all that runs), and the device double's own fence check."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from doubles.device_double import RecordingDevice

from kvpool_connector.backends.mooncake import MooncakeBackend
from kvpool_connector.backends.mooncake_settings import MooncakeSettings
from kvpool_connector.config import parse_config
from kvpool_connector.counters import StatsCounter
from kvpool_connector.devices import StreamRuntime
from kvpool_connector.kv_pages import KVPages
from kvpool_connector.loading import BlockLoader
from kvpool_connector.lookups import LookupBatcher
from kvpool_connector.metadata import BlockTransfer
from kvpool_connector.pool import PoolHandle
from kvpool_testkit.inspection import wait_connected


class TorchNpuSetDevice:
    """What ``torch.npu`` (torch_npu) offers StreamRuntime.bind_thread: ``set_device``, recorded per thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def set_device(self, index: int) -> None:
        self.calls.append((threading.current_thread().name, index))


@pytest.fixture
def npu(monkeypatch) -> TorchNpuSetDevice:
    fake = TorchNpuSetDevice()
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    return fake


@pytest.mark.processes
def test_connect_lookup_and_load_threads_set_the_workers_device(pool, npu):
    runtime = StreamRuntime("npu", 3)
    settings = MooncakeSettings(**pool.client_config())
    handle = PoolHandle(lambda: MooncakeBackend(settings, holds_data=True), 1.0, "npu", bind_thread=runtime.bind_thread)
    handle.start()
    assert wait_connected(handle, 10)
    lookups = LookupBatcher(handle)
    assert lookups.exists_within(["kvp1/npu/00"], 5.0) == [False]
    caches = {"model.layers.0.self_attn.attn": torch.zeros(4, 2, 16, 32)}
    loader = BlockLoader(handle, KVPages(caches, 4, 2 * 16 * 32 * 4), ["npu"], StatsCounter(), runtime.bind_thread)
    loader.submit(BlockTransfer("r", [1], [b"\x01" * 32]))
    assert loader.drain(10)
    bound = {name.split("-")[1] for name, index in npu.calls if index == 3}
    assert bound >= {"connect", "lookup", "load"}, npu.calls
    loader.close(5)
    lookups.close()
    handle.close()


def test_the_scheduler_side_ascend_client_binds_device_zero_and_other_transports_none(npu):
    ascend = parse_config(
        {"backend": "mooncake", "mooncake": {"master_server_address": "10.0.0.1:50051", "protocol": "ascend"}}
    )
    binding = MooncakeBackend.lookup_thread_binding(ascend)
    assert binding is not None
    thread = threading.Thread(target=binding, name="kvpool-lookup-test")
    thread.start()
    thread.join()
    assert npu.calls == [("kvpool-lookup-test", 0)]
    tcp = parse_config({"backend": "mooncake", "mooncake": {"master_server_address": "127.0.0.1:50051"}})
    assert MooncakeBackend.lookup_thread_binding(tcp) is None  # no device context (nor its memory) in a CPU scheduler


def test_the_device_double_catches_a_read_before_the_event():
    """The double itself: a copy ordered after an event recorded before the write is a violation."""
    device = RecordingDevice()
    page = device.alloc(4, 4)
    early = device.record_event()
    device.launch_write(page, 1.0)
    out = np.zeros(64, dtype=np.uint8)
    device.copy_out(early, np.array([out.ctypes.data]), np.array([page.data_ptr()]), np.array([64]))
    assert device.violations
