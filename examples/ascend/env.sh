# Variables every script in this folder reads; source it after editing (placeholders from the seed guide).
export MODEL_PATH=${MODEL_PATH:-/path/to/DeepSeek-V2-Lite-Chat}          # model weights
export MMC_INSTALL=${MMC_INSTALL:-/usr/local/mxc/memfabric_hybrid}      # memcache/memfabric install root
export ASCEND_TOOLKIT=${ASCEND_TOOLKIT:-/usr/local/Ascend/ascend-toolkit/latest}
export HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
export MMC_META_CONFIG_PATH=${MMC_META_CONFIG_PATH:-$HERE/mmc-meta.conf}
export MMC_LOCAL_CONFIG_PATH=${MMC_LOCAL_CONFIG_PATH:-$HERE/mmc-local.conf}
export MOONCAKE_CONFIG_PATH=${MOONCAKE_CONFIG_PATH:-$HERE/mooncake.json}  # MooncakeConnectorV1 (P2P) settings
export PREFILL_HOST=${PREFILL_HOST:-127.0.0.1} PREFILL_PORT=${PREFILL_PORT:-8100}
export DECODE_HOST=${DECODE_HOST:-127.0.0.1} DECODE_PORT=${DECODE_PORT:-8200}
export PROXY_PORT=${PROXY_PORT:-8000}
