#!/usr/bin/env bash
# `make gpu-check`: check a GPU machine for loragen, offline, in a few minutes (loragen.bench.gpu_check):
# `pytest -m gpu`, then one timed training step of each GPU experiment at its real shapes next to the README's
# Scaling estimates; results in bench/gpu_check.json. Exit 0: passed; 1: a check failed; 3: no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" SWANLAB_MODE="${SWANLAB_MODE:-disabled}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if [ -z "${LORAGEN_DATA_DIR:-}" ] && [ -d ../shared/data/commonsense ]; then
    LORAGEN_DATA_DIR="$(cd ../shared/data/commonsense && pwd)"
    export LORAGEN_DATA_DIR
fi
exec "$PY" -m loragen.bench.gpu_check "$@"
