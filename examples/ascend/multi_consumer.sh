#!/usr/bin/env bash
# Step 4: the decode (D) node: same connectors as consumers; vLLM's own prefix cache off, as in the seed.
set -euo pipefail
source "$(dirname "$0")/env.sh"
source "$MMC_INSTALL/set_env.sh"
export LD_LIBRARY_PATH=$ASCEND_TOOLKIT/python/site-packages:${LD_LIBRARY_PATH:-}
export VLLM_USE_V1=1
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-4,5,6,7}
exec python3 -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_PATH" --host "$DECODE_HOST" --port "$DECODE_PORT" \
  --trust-remote-code --enforce-eager --enable-expert-parallel --no_enable_prefix_caching \
  --tensor-parallel-size 2 --data-parallel-size 1 \
  --max-model-len 10000 --block-size 128 --max-num-batched-tokens 4096 \
  --kv-transfer-config "$(cat "$HERE/kv_transfer_consumer.json")"
