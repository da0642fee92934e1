"""The data plane (KV pages, loading, saving, the pool handle, the backends) imports without vLLM: a device check on
an NPU or GPU host runs it where no vLLM is installed. Each module is imported in a fresh interpreter where any
``import vllm`` fails, and a failure names the chain of this package's modules that reached for it."""

import subprocess
import sys
from pathlib import Path

import pytest

import kvpool_connector

BACKENDS = sorted(
    f"kvpool_connector.backends.{path.stem}"
    for path in (Path(kvpool_connector.__file__).parent / "backends").glob("*.py")
    if path.stem != "__init__"
)
DATA_PLANE = [
    "kvpool_connector.keys",
    "kvpool_connector.head_shards",
    "kvpool_connector.kv_pages",
    "kvpool_connector.transfers",
    "kvpool_connector.staging",
    "kvpool_connector.head_shard_reader",
    "kvpool_connector.loading",
    "kvpool_connector.saving",
    "kvpool_connector.pool",
    "kvpool_connector.backends",
    *BACKENDS,  # every pool's module, a new one included
]

# Refuses every vllm module, then prints the modules of this package on the import stack at the refusal (outermost
# first) and exits 3, so the test can name which import pulled vLLM in.
NO_VLLM = """
import importlib, os, sys, traceback

class NoVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"vLLM is not installed here ({name})", name=name)
        return None

sys.meta_path.insert(0, NoVllm())
try:
    importlib.import_module(sys.argv[1])
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("vllm"):
        raise
    chain = []
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if "/kvpool_connector/" in path:
            module = "kvpool_connector." + path.rpartition("/kvpool_connector/")[2][:-3].replace("/", ".")
            module = module.removesuffix(".__init__")
            if not chain or chain[-1] != module:
                chain.append(module)
    print(" -> ".join(chain) + f" -> {exc.name}")
    sys.exit(3)
"""


@pytest.mark.parametrize("module", DATA_PLANE)
def test_imports_without_vllm(module):
    done = subprocess.run([sys.executable, "-c", NO_VLLM, module], capture_output=True, text=True, timeout=120)
    assert done.returncode != 3, f"{module} needs vLLM: {done.stdout.strip()}"
    assert done.returncode == 0, done.stderr


def test_a_module_that_needs_vllm_is_named():
    """The check itself: the connector facade needs vLLM, and the failure says through which import."""
    done = subprocess.run(
        [sys.executable, "-c", NO_VLLM, "kvpool_connector.connector"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("kvpool_connector.connector -> "), done.stdout
    assert done.stdout.strip().endswith(" -> vllm"), done.stdout
