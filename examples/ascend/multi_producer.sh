#!/usr/bin/env bash
# Step 3: the prefill (P) node: MultiConnector = MooncakeConnectorV1 (P2P) + MemcacheConnectorStoreV1 (pool).
set -euo pipefail
trap 'echo "$(basename "$0"): line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
source "$(dirname "$0")/env.sh"
kvpool_source_vendor_env "$MMC_INSTALL/set_env.sh"
kvpool_need_file "$MMC_LOCAL_CONFIG_PATH" "memcache local-service config (MMC_LOCAL_CONFIG_PATH)"
kvpool_need_file "$MOONCAKE_CONFIG_PATH" "MooncakeConnectorV1 config (MOONCAKE_CONFIG_PATH)"
[[ -e $MODEL_PATH ]] || kvpool_fail "model not found: MODEL_PATH=$MODEL_PATH (edit env.sh or export it)"
KV_TRANSFER_CONFIG=$(cat "$HERE/kv_transfer_producer.json")  # a failed read stops here, not in vLLM
export LD_LIBRARY_PATH=$ASCEND_TOOLKIT/python/site-packages:${LD_LIBRARY_PATH:-}
export VLLM_USE_V1=1
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3}
exec python3 -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_PATH" --host "$PREFILL_HOST" --port "$PREFILL_PORT" \
  --trust-remote-code --enforce-eager --enable-expert-parallel \
  --tensor-parallel-size 2 --data-parallel-size 1 \
  --max-model-len 10000 --block-size 128 --max-num-batched-tokens 4096 \
  --kv-transfer-config "$KV_TRANSFER_CONFIG"
