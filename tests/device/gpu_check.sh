#!/usr/bin/env bash
# The GPU check: the data plane on a real NVIDIA GPU, on a machine with torch and nvcc but no vLLM and no network.
#
#   bash tests/device/gpu_check.sh --prepare   # here, with the project's venv: copies nanobind into build/device-kit
#   bash tests/device/gpu_check.sh             # there (with build/device-kit carried along): build, then check
#
# The native extension is built without pip or cmake (neither can fetch anything there): g++ compiles nanobind's
# single-file build with csrc/ into a copy of the package under build/device-kit/site. nvcc then compiles the CUDA
# backend as CUDA (the driver types it declares checked against cuda.h). gpu_check.py prints "N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=build/device-kit
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  VENV_PY=${KVPOOL_VENV:-.venv}/bin/python
  NB=$("$VENV_PY" -c 'import nanobind, os; print(os.path.dirname(nanobind.__file__))')
  rm -rf "$KIT" && mkdir -p "$KIT"
  cp -r "$NB" "$KIT/nanobind"
  rm -rf "$KIT/nanobind/__pycache__"
  echo "[gpu-check] prepared $KIT ($(du -sh "$KIT" | cut -f1)); carry it with the run"
  exit 0
fi

[ -d "$KIT/nanobind" ] || { echo "[gpu-check] $KIT/nanobind missing: run with --prepare first" >&2; exit 2; }
SITE=$KIT/site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r src/kvpool_connector "$SITE/"
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
NB=$KIT/nanobind
echo "[gpu-check] building the native extension for $("$PY" --version)"
g++ -O2 -std=c++17 -shared -fPIC -fvisibility=hidden -I"$INC" -I"$NB/include" -I"$NB/ext/robin_map/include" \
  -Icsrc "$NB/src/nb_combined.cpp" csrc/module.cpp csrc/cpu_copy.cpp csrc/acl_copy.cpp csrc/cuda_copy.cpp \
  -o "$SITE/kvpool_connector/_native$SUFFIX" -ldl -lpthread
# Compile checks report and go on: the driver-ABI check needs CUDA 13's headers, and a CUDA 12 toolkit must not stop
# the data-plane checks below. gpu_check.py turns each result into a check of its own.
compiled=()
if command -v nvcc >/dev/null; then
  toolkit=$(nvcc --version | tail -1)
  for source in csrc/cuda_copy.cpp tests/native/cuda_abi_check.cpp; do
    if nvcc -std=c++17 -c -x cu "$source" -Icsrc -o "$KIT/$(basename "$source").o" 2>"$KIT/$(basename "$source").log"; then
      compiled+=("PASS $source: $toolkit")
    else
      compiled+=("FAIL $source: $toolkit: $(head -c 300 "$KIT/$(basename "$source").log" | tr '\n;' '  ')")
    fi
  done
else
  compiled+=("FAIL nvcc: not found")
fi
export KVPOOL_GPU_COMPILE
KVPOOL_GPU_COMPILE=$(IFS=';'; echo "${compiled[*]}")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONPATH="$SITE" exec timeout 480 "$PY" tests/device/gpu_check.py
