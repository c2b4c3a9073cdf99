#!/usr/bin/env bash
# The GPU batch behind docs/results.md, sized for one call on a lent H100/H200
# (about 9 minutes, no network). From a fresh checkout (corpus: $DATA, default the built-in tiny-shakespeare):
#   1. build the extension in place for this GPU,
#   2. start, all at once on the one GPU: the CUDA test suite, the Shakespeare
#      headline candidates (paper model, certified bound <= 2), an AdamW BaselineGPT,
#      an sdpa/fp8 attention pair, a constraint-method frontier and the lr-sensitivity
#      proxy; every training run stops by the shared deadline (--time-budget),
#   3. evaluate: robustness (best headline run vs the baseline), activations,
#      frontier plot,
#   4. pack everything but the optimizer state into $OUT (or runs/gpu-pack).
# DRY=1 runs the same plumbing on the CPU with tiny sizes (a check before using a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${DATA:-tiny-shakespeare}
R=${RUNS:-runs/gpu}
PACK=${OUT:-runs/gpu-pack}
DEADLINE=${DEADLINE:-420}   # seconds after the start by which every training run has stopped
T0=$(date +%s)
mkdir -p "$R" "$PACK"
exec > >(tee "$PACK/gpu_experiments.log") 2>&1
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(now)s] $*"; }
left() { local s=$(( DEADLINE - $(now) )); [ $s -lt 20 ] && s=20; echo $s; }

if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; HEAD_STEPS=12; BASE_STEPS=12; FP8_STEPS=6; FR_STEPS=6; BATCH=4; EVAL=6; LR_STEPS=4
  SIZE=(--d-model 32 --n-layers 2 --seq-len 32 --threads 1); FR_SIZE=(--d-model 16 --n-layers 2 --seq-len 16)
  SEQ=32
else
  DEV=cuda; HEAD_STEPS=2000; BASE_STEPS=2000; FP8_STEPS=1000; FR_STEPS=1000; BATCH=128; EVAL=100; LR_STEPS=300
  SIZE=(); FR_SIZE=(); SEQ=256
  log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  a=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a >= 9 else ''))")
  export LIPSCHITZ_CUDA_ARCH_LIST=${LIPSCHITZ_CUDA_ARCH_LIST:-$a} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  log "build for $LIPSCHITZ_CUDA_ARCH_LIST"
  if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$PACK/build.log" 2>&1; then
    tail -40 "$PACK/build.log"; exit 1
  fi
  $PY -c "import lipschitz_ext._bench as b; assert b.has_cuda()" || exit 1
  log "built"
  # the CUDA tests, beside the runs (correctness only: timings come from bench/)
  (OMP_NUM_THREADS=2 $PY -m pytest -q python_tests -m cuda -rs -p no:cacheprovider > "$PACK/cuda_tests.log" 2>&1;
   echo "exit $?" >> "$PACK/cuda_tests.log") &
fi
export OMP_NUM_THREADS=1

train() {  # train NAME [flags...]: one run in $R/NAME, stopped by the deadline
  local name=$1; shift
  $PY -m lipschitz_ext.cli.train --data "$DATA" --device $DEV --quiet --out "$R/$name" \
      --time-budget "$(left)" "$@" > "$R/$name.log" 2>&1
  echo "[$(now)s] $name: exit $? $(grep -o '"val_accuracy": [0-9.]*' "$R/$name/summary.json" 2>/dev/null)"
}

# The recipe (docs/results.md): learned positional bias (free in the certificate),
# residual scale 2, and the head cap set to 2 / (the model's certified bound with every
# weight at its cap, head 1) so bound <= 2 holds; the loss temperature and the head lr
# follow the head cap (training is equivariant under head cap x k, logit scale / k,
# head lr x k). head-s2-r2 is the previous best (s = 2, caps 1); the pos-* runs are the
# CPU finding of 2026-11-30: softmax scale 0.01 (attention positional through the learned
# bias: content logits <= 0.03, the Q.K terms of the bound vanish) and the bound spent on
# MLP / attention caps instead; since the night of 2026-11-30 they use softmax scale 0
# (positional attention: no W_q, W_k, the bias alone mixes the values), and since
# 2026-12-01 --target-bound (below) instead of hand-picked head caps.
PAPER=(--preset shakespeare --batch-size $BATCH --eval-every $EVAL --eval-batches 20 --lr 0.1 --embed-lr 0.05
       "${SIZE[@]}")
HL=(--pos-bias learned --steps $HEAD_STEPS)
POS=("${PAPER[@]}" "${HL[@]}" --softmax-scale 0 --residual-scale 2)
train head-s1-r2 "${PAPER[@]}" "${HL[@]}" --softmax-scale 1 --residual-scale 2 --head-sigma-max 0.34 --logit-scale 53 --head-lr 0.034 &
train head-s2-r2 "${PAPER[@]}" "${HL[@]}" --softmax-scale 2 --residual-scale 2 --head-sigma-max 0.098 --logit-scale 184 --head-lr 0.0098 &
# --target-bound 2 scales head cap, head lr and temperature from (1, 0.1, 16) by
# k = 2 / worst case of the caps (certify.worst_case_certificate): bound <= 2 whatever the
# weights. Worst cases at head 1: MLP cap 1: 0.70, 1.5: 2.00, 2: 5.62. head-pos-cpu is the
# shakespeare-cpu recipe's caps and width (attention 1.5, MLP 2, MLP 8d) on the paper's model.
TB=(--head-sigma-max 1 --logit-scale 16 --head-lr 0.1 --target-bound 2)
train head-pos-m1 "${POS[@]}" "${TB[@]}" &
train head-pos-m15 "${POS[@]}" --mlp-sigma-max 1.5 "${TB[@]}" &
train head-pos-m2 "${POS[@]}" --mlp-sigma-max 2 "${TB[@]}" &
train head-pos-cpu "${POS[@]}" --mlp-sigma-max 2 --attn-sigma-max 1.5 --mlp-ratio 8 "${TB[@]}" &
train baseline "${PAPER[@]}" --model baseline --steps $BASE_STEPS &
# fp8 vs sdpa attention, same seed and recipe (no positional bias: the fp8 kernel has none)
FP=("${PAPER[@]}" --steps $FP8_STEPS --batch-size $(( BATCH / 2 )) --softmax-scale 4 --residual-scale 2
    --head-sigma-max 1 --logit-scale 16 --head-lr 0.1)
if [ "$DEV" = cuda ]; then
  train attn-sdpa "${FP[@]}" --attention sdpa &
  train attn-fp8 "${FP[@]}" --attention fp8 &
fi
# frontier: constraint methods x caps on the small model (shakespeare-cpu shape)
FR=(--preset shakespeare-cpu --steps $FR_STEPS --eval-every $FR_STEPS --pos-bias learned --residual-scale 2
    --logit-scale 16 --head-sigma-max 1 "${FR_SIZE[@]}")
mkdir -p "$R/frontier"
for c in soft_cap hard_cap normalize hammer; do
  for s in 0.5 1 2; do
    train "frontier/$c-s$s" "${FR[@]}" --constraint $c --sigma-max $s &
  done
done
for wd in 0.05 0.2; do
  train "frontier/weight_decay-wd$wd" "${FR[@]}" --constraint weight_decay --weight-decay $wd &
done
# lr sensitivity (Lipschitz vs baseline, two sizes, 7 lr multipliers)
(OMP_NUM_THREADS=1 $PY -m lipschitz_ext.cli.eval lr-sensitivity --device $DEV --steps $LR_STEPS --data "$DATA" \
   --out "$R/lr-sensitivity" > "$R/lr-sensitivity.log" 2>&1; log "lr-sensitivity: exit $?") &
# keep waiting while training runs are active; the test job and lr-sensitivity may outlive them
while pgrep -f "lipschitz_ext.cli.train" > /dev/null; do sleep 3; done
log "training runs done"

best=$($PY - "$R" <<'EOF'
import json, glob, os, sys
best = None
for d in sorted(glob.glob(os.path.join(sys.argv[1], "head-*"))):
    try:
        s = json.load(open(os.path.join(d, "summary.json")))
    except OSError:
        continue
    print(f"{os.path.basename(d)}: acc {s['val_accuracy']:.4f} loss {s['val_loss']:.4f} "
          f"bound {s['certified_bound']:.4f} steps {s['steps']} status {s.get('status')}", file=sys.stderr)
    if s["certified_bound"] is not None and s["certified_bound"] <= 2.0:
        if best is None or s["val_accuracy"] > best[0]:
            best = (s["val_accuracy"], d)
print(best[1] if best else "")
EOF
)
log "best headline run: ${best:-none}"
EV=(--device $DEV --batches 8)
if [ -n "$best" ]; then
  $PY -m lipschitz_ext.cli.eval robustness --checkpoint "$best" --checkpoint "$R/baseline" \
      --eps 0.01,0.02,0.05,0.1,0.2,0.5 --out "$R/eval-robustness" "${EV[@]}" || log "robustness failed"
  $PY -m lipschitz_ext.cli.eval activations --checkpoint "$best" --baseline "$R/baseline" \
      --out "$R/eval-activations" "${EV[@]}" || log "activations failed"
fi
$PY -m lipschitz_ext.cli.eval frontier "$R"/frontier/*/ --out "$R/eval-frontier" || log "frontier failed"

# pack: summaries, metrics, curves, samples, configs, eval outputs; the best headline
# model's weights (no optimizer state) for CPU-side checks. Packed once now and again
# after the remaining jobs (tests, lr-sensitivity), so a timeout still returns the runs.
if [ -n "$best" ]; then
  $PY -c "import torch,sys; c=torch.load(sys.argv[1]+'/best.pt', weights_only=True); torch.save({'config': c['config'], 'model': c['model'], 'step': c['step']}, sys.argv[2])" \
      "$best" "$PACK/headline_model.pt" || true
fi
tar czf "$PACK/runs.tgz" --exclude='*.pt' "$R"
log "packed; waiting for the remaining jobs until ${JOBS_DEADLINE:=540}s"
while [ "$(jobs -rp | wc -l)" -gt 0 ] && [ "$(now)" -lt "$JOBS_DEADLINE" ]; do sleep 3; done
tar czf "$PACK/runs.tgz" --exclude='*.pt' "$R"
ls -la "$PACK"
log "done"
