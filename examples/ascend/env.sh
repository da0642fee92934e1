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
# vLLM seeds its block hashes, and so the pool's keys, with PYTHONHASHSEED. vLLM 0.23 (vllm-ascend 0.23) picks random
# bytes when it is unset, and the connector then refuses to start; two instances with different values never find
# each other's blocks (the decode node would recompute every prompt). Hence one fixed value, set here and not taken
# from the caller's shell, for every instance of the fleet: if you change it, change it on every node at once.
export PYTHONHASHSEED=0

# For the scripts (harmless when sourced by hand): stop with a message naming what is missing.
kvpool_fail() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}
kvpool_need_file() {  # kvpool_need_file PATH WHAT
  [[ -f $1 ]] || kvpool_fail "$2 not found: $1 (edit env.sh or export the variable)"
}
kvpool_source_vendor_env() {  # kvpool_source_vendor_env PATH: a vendor's set_env.sh
  # Such scripts read unset variables (LD_LIBRARY_PATH) and may end on a false test: source them without -e and -u.
  kvpool_need_file "$1" "vendor environment script"
  set +eu
  # shellcheck disable=SC1090
  source "$1"
  set -eu
}
