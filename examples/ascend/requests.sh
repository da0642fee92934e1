#!/usr/bin/env bash
# Step 6: the seed's short and long requests through the proxy (greedy), each answer printed on one line.
# Needs bash and curl only. `bash requests.sh --dry-run` prints the request bodies instead of sending them.
# REQUESTS_URL overrides the address (default: the proxy of env.sh), e.g. http://$DECODE_HOST:$DECODE_PORT.
set -euo pipefail
trap 'echo "$(basename "$0"): line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
source "$(dirname "$0")/env.sh"
URL=${REQUESTS_URL:-http://127.0.0.1:$PROXY_PORT}/v1/completions

SHORT_PROMPT="Hello. I have a question. The president of the United States is"
LONG_PROMPT="Given the accelerating impacts of climate change—including rising sea levels, increasing frequency of \
extreme weather events, loss of biodiversity, and adverse effects on agriculture and human health—there is an urgent \
need for a robust, globally coordinated response. However, international efforts are complicated by a range of \
factors: economic disparities between high-income and low-income countries, differing levels of \
industrialization, varying access to clean energy technologies, and divergent political systems that influence \
climate policy implementation. In this context, how can global agreements like the Paris Accord be redesigned or \
strengthened to not only encourage but effectively enforce emission reduction targets? Furthermore, what \
mechanisms can be introduced to promote fair and transparent technology transfer, provide adequate financial \
support for climate adaptation in vulnerable regions, and hold nations accountable without exacerbating existing \
geopolitical tensions or disproportionately burdening those with historically lower emissions?"

json_string() {  # a JSON string literal: backslashes and quotes escaped (the prompts hold no control characters)
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

body() {  # body PROMPT MAX_TOKENS
  printf '{"model": %s, "prompt": %s, "max_tokens": %d, "temperature": 0.0}' \
    "$(json_string "$MODEL_PATH")" "$(json_string "$1")" "$2"
}

send() {  # send NAME BODY: print the answer; stop on a refused connection, an HTTP error or an errored request
  local answer status
  answer=$(mktemp)
  status=$(curl -sS -o "$answer" -w '%{http_code}' "$URL" -H "Content-Type: application/json" -d "$2") ||
    kvpool_fail "$1 request: no answer from $URL (is the proxy up? REQUESTS_URL / PROXY_PORT)"
  cat "$answer"
  echo
  if [[ $status != 200 ]] || ! grep -q '"choices"' "$answer" || grep -q '"finish_reason": *"error"' "$answer"; then
    rm -f "$answer"
    kvpool_fail "$1 request failed (HTTP $status), answer above"
  fi
  rm -f "$answer"
}

SHORT=$(body "$SHORT_PROMPT" 200)
LONG=$(body "$LONG_PROMPT" 256)
if [[ ${1:-} == --dry-run ]]; then
  printf '%s\n' "$SHORT" "$LONG"
  exit 0
fi
command -v curl >/dev/null || kvpool_fail "curl not found"
send short "$SHORT"
send long "$LONG"
