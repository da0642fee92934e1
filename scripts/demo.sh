#!/usr/bin/env bash
# The main job: set up (first run only) and run the quickstart demo against a local Mooncake Store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${KVPOOL_VENV:-.venv}/bin/python" examples/quickstart.py "$@"
