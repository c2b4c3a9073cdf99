#!/usr/bin/env bash
# The GPU check, for the GPU test machine (H200 now; no network; torch with CUDA,
# cmake, ninja, pybind11 and scikit-build-core preinstalled). From a fresh checkout:
#   1. build the extension in place against the installed torch (only the GPU's arch),
#   2. the CUDA tests of the Newton-Schulz ops first (symmetric kernels, Gram
#      Newton-Schulz (orthogonalize_gram, not yet run on a GPU),
#      LIPSCHITZ_NS_BACKEND=symmetric, and orthogonalize on the default cuBLAS path),
#      then every other CUDA test,
#   3. the orthogonalize / constraints / optim benchmark suites with both
#      Newton-Schulz backends: cublas -> bench/results/, symmetric ->
#      bench/results/ns-symmetric/ (same file names, so the two runs sit side by side),
#   4. fp8 attention: its CUDA tests, then the fp8_attention suite at
#      N=4096 (every N with GPU_CHECK_FP8_ATTN_FULL=1): forward with bf16 inputs
#      (quantization included) and with e4m3 inputs as separate cases, forward +
#      backward on the default FlashAttention-2 backward -> bench/results/, and
#      the forward + backward cases again with LIPSCHITZ_FP8_ATTN_BWD=cudnn ->
#      bench/results/fp8-bwd-cudnn/ (same file name),
#   5. every other CUDA test, then the rest of the suite (CPU tests) with
#      whatever time is left, unless GPU_CHECK_SKIP_CPU_TESTS=1.
# GPU_CHECK_PARTS (default "ns fp8_attention other cpu") picks the parts: "ns"
# is steps 2-3, "fp8_attention" step 4, "other" / "cpu" the two halves of step 5
# (e.g. GPU_CHECK_PARTS=fp8_attention for a short run of the fp8 attention checks).
# Everything runs under one time budget (GPU_CHECK_BUDGET_S, default 480 s): each
# step gets at most what is left, and a step cut short counts as a failure.
# JSON and the log are copied to $OUT when set. Exits non-zero if the build, any
# test or any benchmark fails; later steps still run after a test failure so one
# run yields all the evidence.
#
# Without a CUDA device it stops at the device check with exit 1, unless
# GPU_CHECK_DRY_RUN=1: then it runs what a CPU can (the host-side tests of the
# symmetric kernels and of fp8 attention, the CUDA test files collected and
# skipped, and each benchmark step in --smoke form on the CPU for both backends,
# into a temporary folder) to check the script's plumbing, and exits 0 if that passes.
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
NS_TESTS=(python_tests/test_triangle_tiles.py python_tests/test_orthogonalize.py
          python_tests/test_orthogonalize_gram.py)
FP8_TESTS=(python_tests/test_fp8_attention.py)
PARTS=" ${GPU_CHECK_PARTS:-ns fp8_attention other cpu} "
has() { [[ "$PARTS" == *" $1 "* ]]; }
for p in $PARTS; do
  case $p in ns|fp8_attention|other|cpu) ;; *) echo "gpu_check: unknown part '$p' in GPU_CHECK_PARTS"; exit 1 ;; esac
done
# The fp8 attention cases timed: the acceptance shape N=4096 unless told otherwise.
FP8_FILTER=(--filter x4096x)
[ "${GPU_CHECK_FP8_ATTN_FULL:-0}" = 1 ] && FP8_FILTER=()

step "device"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
    echo "gpu_check: torch sees no CUDA device (set GPU_CHECK_DRY_RUN=1 to check the script on a CPU)"; exit 1
  fi
  step "dry run on the CPU: build and GPU-only steps skipped"
  "$PY" -c "import lipschitz_ext._C" || { echo "gpu_check: the extension is not built here"; exit 1; }
  tmp=$(mktemp -d)
  if has ns; then
    run 300 "$PY" -m pytest -q "${NS_TESTS[@]}" -rs -p no:cacheprovider || status=1
    for backend in cublas symmetric; do
      for suite in $SUITES; do
        step "bench smoke $suite ($backend, CPU)"
        LIPSCHITZ_NS_BACKEND=$backend run 120 "$PY" -m lipschitz_ext.bench --smoke --suite "$suite" \
          --device cpu --out "$tmp/$backend" || status=1
      done
    done
  fi
  if has fp8_attention; then
    step "fp8 attention: host-side tests, CUDA tests collected and skipped"
    run 300 "$PY" -m pytest -q python_tests/test_fp8_attention.py -rs -p no:cacheprovider || status=1
    run 120 "$PY" -m pytest -q python_tests/test_fp8_attention.py -m cuda -rs -p no:cacheprovider || status=1
    for bwd in flash cudnn; do
      step "bench smoke fp8_attention (LIPSCHITZ_FP8_ATTN_BWD=$bwd, CPU)"
      LIPSCHITZ_FP8_ATTN_BWD=$bwd run 120 "$PY" -m lipschitz_ext.bench --smoke --suite fp8_attention \
        --device cpu --out "$tmp/fp8-bwd-$bwd" || status=1
    done
  fi
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

before=$(mktemp)
touch "$before"
if has ns; then
  step "CUDA tests of the Newton-Schulz ops (symmetric kernels + orthogonalize)"
  ns_ok=1
  run 150 "$PY" -m pytest -q "${NS_TESTS[@]}" -rs -p no:cacheprovider || { status=1; ns_ok=0; }
  echo "gpu_check: symmetric Newton-Schulz CUDA tests: $([ $ns_ok = 1 ] && echo PASSED || echo FAILED)"

  for backend in cublas symmetric; do
    out=$RESULTS
    [ $backend = symmetric ] && out=$RESULTS/ns-symmetric
    mkdir -p "$out"
    for suite in $SUITES; do
      step "bench $suite (LIPSCHITZ_NS_BACKEND=$backend -> $out)"
      LIPSCHITZ_NS_BACKEND=$backend run 90 "$PY" -m lipschitz_ext.bench --suite "$suite" --out "$out" || status=1
    done
  done
fi

if has fp8_attention; then
  step "CUDA tests of fp8 attention (e4m3 inputs, per-row error, cuDNN backward)"
  fp8_ok=1
  run 150 "$PY" -m pytest -q "${FP8_TESTS[@]}" -m cuda -rs -p no:cacheprovider || { status=1; fp8_ok=0; }
  echo "gpu_check: fp8 attention CUDA tests: $([ $fp8_ok = 1 ] && echo PASSED || echo FAILED)"
  step "bench fp8_attention ${FP8_FILTER[*]} (bf16 and e4m3 inputs; FlashAttention-2 backward -> $RESULTS)"
  run 150 "$PY" -m lipschitz_ext.bench --suite fp8_attention "${FP8_FILTER[@]}" --out "$RESULTS" || status=1
  mkdir -p "$RESULTS/fp8-bwd-cudnn"
  step "bench fp8_attention forward + backward, LIPSCHITZ_FP8_ATTN_BWD=cudnn -> $RESULTS/fp8-bwd-cudnn"
  # --filter takes one substring: the N=4096 restriction is applied by the name + shape prefix.
  cudnn_filter=fp8_attention_fwd_bwd
  [ "${#FP8_FILTER[@]}" -gt 0 ] && cudnn_filter="fp8_attention_fwd_bwd 4x16x4096x"
  LIPSCHITZ_FP8_ATTN_BWD=cudnn run 120 "$PY" -m lipschitz_ext.bench --suite fp8_attention \
    --filter "$cudnn_filter" --out "$RESULTS/fp8-bwd-cudnn" || status=1
fi

if has other; then
  step "the other CUDA tests"
  run 200 "$PY" -m pytest -q python_tests -m cuda -rs -p no:cacheprovider \
    $(printf -- '--ignore=%s ' "${NS_TESTS[@]}" "${FP8_TESTS[@]}") || status=1
fi

if has cpu && [ "${GPU_CHECK_SKIP_CPU_TESTS:-0}" != 1 ]; then
  step "the rest of the suite (CPU tests, what time is left)"
  run 100000 "$PY" -m pytest -q python_tests -m "not cuda" -x -rs -p no:cacheprovider || status=1
fi

if [ -n "${OUT:-}" ]; then
  find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$before" -exec cp {} "$OUT"/ \;
  for sub in ns-symmetric fp8-bwd-cudnn; do
    [ -d "$RESULTS/$sub" ] || continue
    mkdir -p "$OUT/$sub"
    find "$RESULTS/$sub" -maxdepth 1 -name '*.json' -newer "$before" -exec cp {} "$OUT/$sub"/ \;
  done
fi
rm -f "$before"

step "done: exit $status"
exit $status
