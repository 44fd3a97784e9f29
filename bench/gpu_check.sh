#!/usr/bin/env bash
# The one device check (see bench/gpu_check.py): builds, tests and benchmarks everything on a GPU in one go.
#   bash bench/gpu_check.sh              # on the GPU machine; results in $OUT and bench/results/gpu_*.json
#   bash bench/gpu_check.sh --rehearse   # every stage on the CPU at tiny shapes (run by the test suite)
cd "$(dirname "$0")/.." && exec python bench/gpu_check.py "$@"
