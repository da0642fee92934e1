# Sourced by setup.sh, demo.sh and test.sh: the vLLM releases the project is tested on, and where each one's
# virtual environment lives. KVPOOL_VLLM picks the release of the demo and of a plain `setup.sh` (default 0.32.0).
KVPOOL_VLLM=${KVPOOL_VLLM:-0.32.0}
VLLM_LEGS=(0.32.0 0.23.0 0.33.0 0.34.0)

# The virtual environment of vLLM release $1: .venv for the default (or $KVPOOL_VENV), .venv-vllm0XY for the others.
vllm_venv() {
  case "$1" in
    0.32.0) echo "${KVPOOL_VENV:-.venv}" ;;
    0.23.0) echo ".venv-vllm023" ;;
    0.33.0) echo ".venv-vllm033" ;;
    0.34.0) echo ".venv-vllm034" ;;
    *) echo "unsupported vLLM release '$1' (choose one of: ${VLLM_LEGS[*]})" >&2; return 1 ;;
  esac
}
