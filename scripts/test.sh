#!/usr/bin/env bash
# The test suite: set up (first run only), lint, then unit and end-to-end tests (real vLLM CPU engine, real
# mooncake_master and memcache meta service, all on 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${KVPOOL_VENV:-.venv}/bin/python"
"$PY" -m ruff check src tests benchmarks examples
"$PY" -m ruff format --check src tests benchmarks examples
exec "$PY" -m pytest tests -p no:cacheprovider "$@"
