"""Place vLLM's CPU KV cache in shared memory the pool node maps, so a load makes one copy, not two.

A Mooncake shared-memory client moves data only through memory it handed out itself, so by default every load
goes node -> shared area -> KV pages. vLLM lets a connector choose where the KV cache is allocated
(``KVConnectorBase_V1.get_mem_pool_context``: the allocation runs inside the context it returns; vLLM's own Mooncake
store connector uses it for a CUDA memory pool). On the CPU that allocation is one ``torch.zeros(nbytes, int8)``
backing every layer's views (``vllm.v1.worker.utils.allocate_kv_cache``); :class:`KVCacheAt` serves exactly that call
from the given memory and lets every other call through. Should vLLM allocate differently, nothing is intercepted,
the KV cache stays in private memory, and transfers keep going through the shared areas: slower, never wrong.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


class KVCacheAt(TorchFunctionMode):
    """Serve the KV cache's one ``torch.zeros(nbytes, dtype=torch.int8)`` CPU allocation from ``[base, base+nbytes)``
    (memory already zero-filled); ``served`` says whether it happened."""

    def __init__(self, base: int, nbytes: int) -> None:
        super().__init__()
        self._memory = (ctypes.c_int8 * nbytes).from_address(base)
        self.nbytes = nbytes
        self.served = False

    def _is_kv_allocation(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        size = args[0] if len(args) == 1 else kwargs.get("size", args)
        if isinstance(size, (tuple, list, torch.Size)):
            size = size[0] if len(size) == 1 else None
        device = kwargs.get("device")
        return (
            size == self.nbytes
            and kwargs.get("dtype") == torch.int8
            and (device is None or torch.device(device).type == "cpu")
            and not kwargs.get("requires_grad", False)
        )

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.zeros and not self.served and self._is_kv_allocation(args, kwargs):
            self.served = True
            return torch.frombuffer(self._memory, dtype=torch.int8)
        return func(*args, **kwargs)
