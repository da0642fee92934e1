"""The KV cache placement serves vLLM's one KV-cache allocation from the given memory and nothing else."""

import numpy as np
import torch

from kvpool_connector.kv_allocation import KVCacheAt


def test_only_the_kv_cache_allocation_is_served_once():
    memory = np.zeros(4096, dtype=np.int8)  # stands in for the pool's shared memory
    placement = KVCacheAt(memory.ctypes.data, memory.nbytes)
    with placement:
        other_dtype = torch.zeros(4096, dtype=torch.float32)
        other_size = torch.zeros(16, dtype=torch.int8)
        kv = torch.zeros(4096, dtype=torch.int8, device=torch.device("cpu"))
        second = torch.zeros(4096, dtype=torch.int8)
        views = kv.view(torch.float32).view(16, 64)  # what vLLM makes of it: views share the memory
        doubled = views * 2  # ordinary ops still run inside the mode
    assert placement.served
    assert kv.data_ptr() == views.data_ptr() == memory.ctypes.data
    assert memory.ctypes.data not in {other_dtype.data_ptr(), other_size.data_ptr(), second.data_ptr()}
    views[1, :] = 1.5
    assert np.frombuffer(memory.tobytes(), dtype=np.float32)[64:128].tolist() == [1.5] * 64
    assert not doubled.any()
    after = torch.zeros(4096, dtype=torch.int8)  # outside the context nothing is intercepted
    assert after.data_ptr() != memory.ctypes.data


def test_nothing_matching_leaves_the_allocation_to_torch():
    memory = np.zeros(1024, dtype=np.int8)
    placement = KVCacheAt(memory.ctypes.data, memory.nbytes)
    with placement:
        t = torch.zeros((2, 512), dtype=torch.int8)  # same bytes, another shape: not vLLM's one backing buffer
        g = torch.zeros(1024, dtype=torch.int8, requires_grad=False, device="cpu")
    assert t.data_ptr() != memory.ctypes.data
    assert g.data_ptr() == memory.ctypes.data and placement.served
