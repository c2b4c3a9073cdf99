#!/usr/bin/env bash
# The GPU check, for the H100 test machine (no network; torch with CUDA, cmake,
# ninja, pybind11 and scikit-build-core preinstalled). From a fresh checkout:
#   1. build the extension in place against the installed torch,
#   2. run the CUDA tests, then the rest of the suite,
#   3. run every benchmark suite present (lipschitz-bench --suite all),
# leaving the JSON in bench/results/ and copying it (and the log) to $OUT when set.
# Exits non-zero if the build, any test or any benchmark case fails; the later
# steps still run after a test failure so one run yields all the evidence.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=bench/results
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-bench/gpu_check.log}
mkdir -p "$RESULTS" "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device"; exit 1
fi
# Build only for the GPU at hand (sm_90 -> 9.0a for wgmma/TMA), unless told otherwise.
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a >= 9 else ''))")
export LIPSCHITZ_CUDA_ARCH_LIST=${LIPSCHITZ_CUDA_ARCH_LIST:-$ARCH}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

step "build (CUDA arch $LIPSCHITZ_CUDA_ARCH_LIST)"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e .; then
  echo "gpu_check: build failed"; exit 1
fi
"$PY" -c "import lipschitz_ext._bench as b; assert b.has_cuda(), '_bench was built without CUDA'" || exit 1

step "CUDA tests"
"$PY" -m pytest -q python_tests -m cuda -rs || status=1
step "the rest of the suite"
"$PY" -m pytest -q python_tests -m "not cuda" -rs || status=1

step "benchmarks"
before=$(mktemp)
touch "$before"
"$PY" -m lipschitz_ext.bench --suite all --out "$RESULTS" || status=1
if [ -n "${OUT:-}" ]; then
  find "$RESULTS" -name '*.json' -newer "$before" -exec cp {} "$OUT"/ \;
fi
rm -f "$before"

step "done: exit $status"
exit $status
