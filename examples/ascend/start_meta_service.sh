#!/usr/bin/env bash
# Step 1: the memcache meta service, as its own process (seed guide 2.1).
set -euo pipefail
source "$(dirname "$0")/env.sh"
source "$MMC_INSTALL/set_env.sh"
# The Python entry point of memcache-hybrid is equivalent to the mmc_meta_service binary:
exec python3 -c "from memcache_hybrid import MetaService; MetaService.main()"
