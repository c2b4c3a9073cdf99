#!/usr/bin/env bash
# The GPU check, for the GPU test machine (H200 now; no network; torch with CUDA,
# cmake, ninja, pybind11 and scikit-build-core preinstalled). From a fresh checkout:
#   1. build the extension in place against the installed torch (only the GPU's arch),
#   2. the CUDA tests of the Newton-Schulz ops first (symmetric kernels of issue 21,
#      LIPSCHITZ_NS_BACKEND=symmetric, and orthogonalize on the default cuBLAS path),
#      then every other CUDA test,
#   3. the orthogonalize / constraints / optim benchmark suites with both
#      Newton-Schulz backends: cublas -> bench/results/, symmetric ->
#      bench/results/ns-symmetric/ (same file names, so the two runs sit side by side),
#   4. the rest of the suite (CPU tests) with whatever time is left, unless
#      GPU_CHECK_SKIP_CPU_TESTS=1.
# Everything runs under one time budget (GPU_CHECK_BUDGET_S, default 480 s): each
# step gets at most what is left, and a step cut short counts as a failure.
# JSON and the log are copied to $OUT when set. Exits non-zero if the build, any
# test or any benchmark fails; later steps still run after a test failure so one
# run yields all the evidence.
#
# Without a CUDA device it stops at the device check with exit 1, unless
# GPU_CHECK_DRY_RUN=1: then it runs what a CPU can (the host-side tests of the
# symmetric kernels, the CUDA test files collected and skipped, and each
# benchmark step in --smoke form on the CPU for both backends, into a temporary
# folder) to check the script's plumbing, and exits 0 if that passes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=bench/results
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-bench/gpu_check.log}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$RESULTS" "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
status=0
START=$SECONDS
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), $((SECONDS - START)) s of $BUDGET)"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# run CAP_S CMD...: at most min(CAP_S, time left); 124 = cut short by the budget
run() {
  local cap=$1; shift
  local t; t=$(left)
  [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -le 5 ]; then echo "gpu_check: no time left for: $*"; return 124; fi
  timeout --signal=TERM --kill-after=10 "$t" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "gpu_check: cut short after $t s: $*"
  return $rc
}
SUITES="orthogonalize constraints optim"
NS_TESTS=(python_tests/test_ns_symmetric_cuda.py python_tests/test_triangle_tiles.py python_tests/test_orthogonalize.py)

step "device"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
    echo "gpu_check: torch sees no CUDA device (set GPU_CHECK_DRY_RUN=1 to check the script on a CPU)"; exit 1
  fi
  step "dry run on the CPU: build and GPU-only steps skipped"
  "$PY" -c "import lipschitz_ext._C" || { echo "gpu_check: the extension is not built here"; exit 1; }
  run 300 "$PY" -m pytest -q "${NS_TESTS[@]}" -rs -p no:cacheprovider || status=1
  tmp=$(mktemp -d)
  for backend in cublas symmetric; do
    for suite in $SUITES; do
      step "bench smoke $suite ($backend, CPU)"
      LIPSCHITZ_NS_BACKEND=$backend run 120 "$PY" -m lipschitz_ext.bench --smoke --suite "$suite" \
        --device cpu --out "$tmp/$backend" || status=1
    done
  done
  ls -R "$tmp"; rm -rf "$tmp"
  step "dry run done: exit $status"
  exit $status
fi
# Build only for the GPU at hand (sm_90 -> 9.0a for wgmma/TMA), unless told otherwise.
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a >= 9 else ''))")
export LIPSCHITZ_CUDA_ARCH_LIST=${LIPSCHITZ_CUDA_ARCH_LIST:-$ARCH}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

step "build (CUDA arch $LIPSCHITZ_CUDA_ARCH_LIST)"
if ! run 300 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
  echo "gpu_check: build failed"; exit 1
fi
"$PY" -c "import lipschitz_ext._bench as b; assert b.has_cuda(), '_bench was built without CUDA'" || exit 1

step "CUDA tests of the Newton-Schulz ops (symmetric kernels + orthogonalize)"
ns_ok=1
run 150 "$PY" -m pytest -q "${NS_TESTS[@]}" -rs -p no:cacheprovider || { status=1; ns_ok=0; }
echo "gpu_check: symmetric Newton-Schulz CUDA tests: $([ $ns_ok = 1 ] && echo PASSED || echo FAILED)"

before=$(mktemp)
touch "$before"
for backend in cublas symmetric; do
  out=$RESULTS
  [ $backend = symmetric ] && out=$RESULTS/ns-symmetric
  mkdir -p "$out"
  for suite in $SUITES; do
    step "bench $suite (LIPSCHITZ_NS_BACKEND=$backend -> $out)"
    LIPSCHITZ_NS_BACKEND=$backend run 90 "$PY" -m lipschitz_ext.bench --suite "$suite" --out "$out" || status=1
  done
done

step "the other CUDA tests"
run 200 "$PY" -m pytest -q python_tests -m cuda -rs -p no:cacheprovider \
  $(printf -- '--ignore=%s ' "${NS_TESTS[@]}") || status=1

if [ "${GPU_CHECK_SKIP_CPU_TESTS:-0}" != 1 ]; then
  step "the rest of the suite (CPU tests, what time is left)"
  run 100000 "$PY" -m pytest -q python_tests -m "not cuda" -x -rs -p no:cacheprovider || status=1
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/ns-symmetric"
  find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$before" -exec cp {} "$OUT"/ \;
  find "$RESULTS/ns-symmetric" -maxdepth 1 -name '*.json' -newer "$before" -exec cp {} "$OUT"/ns-symmetric/ \;
fi
rm -f "$before"

step "done: exit $status"
exit $status
