#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the native kernel tests
# (CMake + ctest) and the Python test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CUDA_FLAG=""
[ -x /usr/local/cuda/bin/nvcc ] && CUDA_FLAG="-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"
cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release $CUDA_FLAG > build-native.log 2>&1 || { cat build-native.log; exit 1; }
cmake --build build/native -j2 >> build-native.log 2>&1 || { cat build-native.log; exit 1; }
ctest --test-dir build/native --output-on-failure
.venv/bin/python -m pytest -q tests "$@"
