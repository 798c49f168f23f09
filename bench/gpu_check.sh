#!/usr/bin/env bash
# The prepared GPU check: one call on a lent GPU machine (an H200: sm_90) that
# builds the extension for the chip, runs every CUDA test, times NF4 dequantize
# against the device's copy bandwidth and bitsandbytes, and times the LoRA
# training step (vs peft and the base layer), the NF4 linear layer (vs the
# copy bandwidth, a dense layer and bitsandbytes), the QLoRA training step (vs
# dense LoRA and peft over bitsandbytes) and multi-LoRA serving (16 adapters vs
# one vs peft's adapter_names). It runs in the repo root and
# writes under $OUT (default results/gpu); expect ~5 minutes. Each step has its
# own time limit, cut to what is left of 8 minutes from the start.
#
#   bash bench/gpu_check.sh
#
# Nothing can be downloaded there: the image's CUDA torch is used (pip is tried
# only if it has none). bitsandbytes, the peer, is used if installed or carried
# as a wheel in .whl/ (name .whl in the call's carry; see the device README for
# the pip download line), else the benchmarks time pykernels alone; peft, the
# LoRA peer, likewise if installed.
#
# $OUT: summary.txt (one line per step), env.txt (GPU, versions, kernel resource
# usage), build.log, run.log (pytest and benchmark output), junit-cuda.xml,
# bench_*.log, nf4_cuda, lora_cuda, qlora_cuda, multi_lora_cuda, bottleneck_cuda and ia3_cuda
# .json / .csv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
deadline=$(( $(date +%s) + 480 ))
# limit N: N seconds, or what is left before the deadline if less (at least 10).
limit() {
  local left=$(( deadline - $(date +%s) ))
  (( left < 10 )) && left=10
  echo $(( $1 < left ? $1 : left ))
}

# ---- what is needed ----
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  timeout "$(limit 120)" $PY -m pip install -q --retries 0 --timeout 10 torch numpy pytest \
    || summary "torch: no CUDA torch and none installable"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import bitsandbytes" 2>/dev/null \
  || timeout "$(limit 60)" $PY -m pip install -q --retries 0 --timeout 10 bitsandbytes==0.50.2 \
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
timeout "$(limit 240)" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
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
# One line per test (-v): if the process dies mid-run (an H200 run once
# segfaulted), run.log still names every test that failed before it.
start=$(date +%s)
timeout "$(limit 240)" $PY -m pytest -m cuda tests -v -rfEs -p no:cacheprovider \
  --junitxml="$OUT/junit-cuda.xml" > "$OUT/run.log" 2>&1
rc=$?
summary "tests: rc=$rc in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/run.log")"
grep -E "(FAILED|ERROR)( |$)" "$OUT/run.log" | grep "::" | sort -u | tee -a "$OUT/summary.txt"

# ---- benchmarks: NF4 dequantize bandwidth; the LoRA step and NF4 linear; QLoRA; the adapters ----
for bench in nf4_cuda lora_cuda qlora_cuda multi_lora_cuda bottleneck_cuda ia3_cuda; do
  start=$(date +%s)
  timeout "$(limit 120)" $PY bench/bench_$bench.py --out "$OUT" > "$OUT/bench_$bench.log" 2>&1
  rc=$?
  cat "$OUT/bench_$bench.log" >> "$OUT/run.log"
  summary "benchmark $bench: rc=$rc in $(( $(date +%s) - start )) s"
  sed -n '/^\[limit\]/,$p' "$OUT/bench_$bench.log"
done
