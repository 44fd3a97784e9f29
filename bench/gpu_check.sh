#!/usr/bin/env bash
# The one device check (see bench/gpu_check.py): builds, tests and benchmarks everything on a GPU in one go.
#   bash bench/gpu_check.sh              # on the GPU machine; results in $OUT and bench/results/gpu_*.json
#   bash bench/gpu_check.sh --rehearse   # every stage on the CPU at tiny shapes (run by the test suite)
# The interpreter: $PYTHON, else python3 (the device image's python3 is the one that holds PyTorch), else python.
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
