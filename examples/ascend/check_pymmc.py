"""Step 2: check a worker can reach the memcache pool through pymmc (seed guide 2.2), before starting vLLM.

Client-only calls (meta service reachable, batch_is_exist) work anywhere; the data round trip (a local service
holding pool memory, put/get) needs the Ascend driver and CANN. Run with MMC_LOCAL_CONFIG_PATH set (source env.sh).
"""

import os
import sys

import numpy as np

from kvpool_connector.backends import PoolUnavailable
from kvpool_connector.backends.memcache import MemcacheBackend
from kvpool_connector.config import parse_config


def main() -> int:
    settings = parse_config({}, env=dict(os.environ)).backend_settings
    lookup = MemcacheBackend(settings, holds_data=False)
    lookup.connect()
    print("meta service", settings.meta_service_url, "reachable; batch_is_exist ->", lookup.exists(["kvp1/check/0"]))
    data = MemcacheBackend(settings, holds_data=True, device_id=int(os.environ.get("DEVICE_ID", "0")))
    try:
        data.connect()
    except PoolUnavailable as exc:
        print("data path unavailable:", exc)
        return 1
    page = np.arange(1 << 16, dtype=np.uint8)
    out = np.zeros_like(page)
    for buf in (page, out):
        data.register_memory(buf.ctypes.data, buf.nbytes)
    print("put", data.put(["kvp1/check/0"], [[page.ctypes.data]], [[page.nbytes]]))
    print("get", data.get(["kvp1/check/0"], [[out.ctypes.data]], [[out.nbytes]]), "equal:", bool((page == out).all()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
