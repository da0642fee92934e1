#!/usr/bin/env bash
# Step 1: the memcache meta service, as its own process (seed guide 2.1).
set -euo pipefail
trap 'echo "$(basename "$0"): line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
source "$(dirname "$0")/env.sh"
kvpool_source_vendor_env "$MMC_INSTALL/set_env.sh"
kvpool_need_file "$MMC_META_CONFIG_PATH" "memcache meta-service config (MMC_META_CONFIG_PATH)"
# The Python entry point of memcache-hybrid is equivalent to the mmc_meta_service binary:
exec python3 -c "from memcache_hybrid import MetaService; MetaService.main()"
