#!/usr/bin/env bash
# Compile-check every CUDA source (csrc/cuda/*.cu and csrc/bench/*.cu, with the csrc/cuda/*.cuh
# headers they include) for the configured targets
# (default sm_80 and sm_90a) with nvcc, against the installed (CPU) torch's
# headers. Nothing is linked or run. Used by CI; works on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BUILD=${LIPSCHITZ_CHECK_BUILD_DIR:-build/cuda-check}
ARCHS=${LIPSCHITZ_CUDA_ARCH_LIST:-8.0;9.0a}
CMAKE=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null || echo cmake)
GEN=()
"$PY" -c "import ninja" 2>/dev/null && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$("$PY" -c "import ninja, os; print(os.path.join(ninja.BIN_DIR, 'ninja'))")")
"$CMAKE" -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -DLIPSCHITZ_CUDA_COMPILE_CHECK=ON -DLIPSCHITZ_BUILD_EXTENSION=OFF \
  -DLIPSCHITZ_CUDA_ARCH_LIST="$ARCHS" >"$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
"$CMAKE" --build "$BUILD" --target lipschitz_cuda_check -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "CUDA compile-check passed for: $ARCHS ($(ls csrc/cuda/*.cu csrc/bench/*.cu | wc -l) sources)"
