#!/usr/bin/env bash
# The prepared GPU check: one call on a lent GPU machine (an H200: sm_90) that
# builds the extension for the chip, runs every CUDA test and times NF4
# dequantize against the device's copy bandwidth and bitsandbytes. It runs in
# the repo root and writes under $OUT (default results/gpu); expect ~4 minutes,
# each step has its own time limit so the whole stays under 8.
#
#   bash bench/gpu_check.sh
#
# Nothing can be downloaded there: the image's CUDA torch is used (pip is tried
# only if it has none). bitsandbytes, the peer, is used if installed or carried
# as a wheel in .whl/ (name .whl in the call's carry; see the device README for
# the pip download line), else the benchmark times pykernels alone.
#
# $OUT: summary.txt (one line per step), env.txt (GPU, versions, kernel resource
# usage), build.log, run.log (pytest and benchmark output), junit-cuda.xml,
# nf4_cuda.json and nf4_cuda.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

# ---- what is needed ----
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  timeout 120 $PY -m pip install -q --retries 0 --timeout 10 torch numpy pytest \
    || summary "torch: no CUDA torch and none installable"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import bitsandbytes" 2>/dev/null \
  || timeout 60 $PY -m pip install -q --retries 0 --timeout 10 bitsandbytes==0.50.2 \
    >/dev/null 2>&1 \
  || summary "bitsandbytes: not available, the benchmark times pykernels alone"

if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  [ -x $CUDA_HOME/bin/nvcc ] || CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST=9.0 PYKERNELS_CUDA=1 MAX_JOBS=$(nproc)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
} > "$OUT/env.txt" 2>&1

# ---- build for sm_90 ----
start=$(date +%s)
timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
summary "build: rc=$rc in $(( $(date +%s) - start )) s (sm_90, CUDA_HOME=$CUDA_HOME)"
with_cuda="import pykernels, sys; sys.exit(not pykernels._C.cuda_compiled())"
if [ $rc != 0 ] || ! $PY -c "$with_cuda" >> "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  summary "stopped: the extension did not build with its CUDA kernels"
  exit 1
fi
# Registers, shared memory and stack per kernel: local-memory use shows up here.
command -v cuobjdump >/dev/null && cuobjdump --dump-resource-usage pykernels/_C*.so 2>&1 \
  | grep -A1 "pykernels4cuda" | sed 's/^ *//' >> "$OUT/env.txt"

# ---- every CUDA test, the >2^31-element one included ----
start=$(date +%s)
timeout 200 $PY -m pytest -m cuda tests -q -rs -p no:cacheprovider \
  --junitxml="$OUT/junit-cuda.xml" > "$OUT/run.log" 2>&1
rc=$?
summary "tests: rc=$rc in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/run.log")"

# ---- dequantize bandwidth ----
start=$(date +%s)
timeout 120 $PY bench/bench_nf4_cuda.py --out "$OUT" >> "$OUT/run.log" 2>&1
rc=$?
summary "benchmark: rc=$rc in $(( $(date +%s) - start )) s"
sed -n '/^\[limit\]/,$p' "$OUT/run.log"
