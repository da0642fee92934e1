#!/usr/bin/env bash
# Step 6: the seed's short and long requests through the proxy (greedy).
set -euo pipefail
source "$(dirname "$0")/env.sh"
URL=http://127.0.0.1:$PROXY_PORT/v1/completions
curl -s "$URL" -H "Content-Type: application/json" -d "{\"model\": \"$MODEL_PATH\", \"prompt\": \"Hello. I have a question. The president of the United States is\", \"max_tokens\": 200, \"temperature\": 0.0}"
echo
curl -s "$URL" -H "Content-Type: application/json" -d "{\"model\": \"$MODEL_PATH\", \"prompt\": \"$(python3 -c 'from kvpool_testkit.workloads import SEED_LONG_PROMPT as p; print(p)')\", \"max_tokens\": 256, \"temperature\": 0.0}"
echo
