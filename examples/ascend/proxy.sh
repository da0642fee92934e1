#!/usr/bin/env bash
# Step 5: the P/D proxy (no vLLM needed on its host): prefill on P with max_tokens=1, then the answer from D.
set -euo pipefail
trap 'echo "$(basename "$0"): line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
source "$(dirname "$0")/env.sh"
exec python3 -m kvpool_connector.proxy --host 0.0.0.0 --port "$PROXY_PORT" \
  --prefill "http://$PREFILL_HOST:$PREFILL_PORT" --decode "http://$DECODE_HOST:$DECODE_PORT"
