"""CUDA backend: compile-only here (no GPU). The source builds with nvcc, and the driver types it declares match
cuda.h / cudaTypedefs.h (CUDA 12.8's failIdx signature and CUDA 13's, cuMemcpyAsync, cuGetProcAddress)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed on this machine")
@pytest.mark.parametrize("source", ["csrc/cuda_copy.cpp", "tests/native/cuda_abi_check.cpp"])
def test_compiles_with_nvcc(source, tmp_path):
    cmd = [
        NVCC,
        "-std=c++17",
        "-c",
        "-x",
        "cu",
        str(ROOT / source),
        "-I",
        str(ROOT / "csrc"),
        "-o",
        str(tmp_path / "out.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
