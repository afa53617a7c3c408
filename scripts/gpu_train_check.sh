#!/usr/bin/env bash
# GPU end-to-end check, one CUDA machine command (a 5-minute budget, BUDGET_S; after gpu_check.sh):
#   1. hydra-core, omegaconf, rich and their dependencies unpacked from the wheels in .whl/ when
#      the image lacks them (steps.sh's training_env; `make gpu-wheels` fetches the wheels on a
#      machine with PyPI, and the device tool carries .whl/ along);
#   2. train.py: the paper's ListOps recipe (task=listops attn=<attn>, bf16-mixed, MRA on
#      Triton) for softmax, mra and mra_s on a small generated ListOps set at length 2048;
#   3. eval.py on mra's best checkpoint twice: as trained (Triton) and with attn.backend=torch
#      (the same function computed by the other path: the accuracies must agree);
#   4. bench.efficiency: LRA's efficiency table (text recipe, batch 32, n = 1k..4k) for softmax,
#      mra and mra_s, training steps per second and memory.
# Writes gpu_train_check.log, train_<attn>.json (results.json), eval_triton.json, eval_torch.json,
# efficiency.csv, efficiency.md and efficiency.png to $OUT (default ./bench_out). Every step runs
# under a timeout within BUDGET_S (300 s), so the whole stays near 5 minutes.
# A CPU dry run of the plumbing:
#   TRAINER=cpu DEVICE=cpu ATTNS="mra mra_s" STEPS=6 EFF_N=256 EFF_BATCH=2 OUT=/tmp/x \
#     bash scripts/gpu_train_check.sh
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-./bench_out}
TRAINER=${TRAINER:-gpu}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-60}
ATTNS=${ATTNS:-softmax mra mra_s}
BUDGET_S=${BUDGET_S:-300}
EFF_N=${EFF_N:-1024,2048,3072,4096}
EFF_BATCH=${EFF_BATCH:-32}
source scripts/steps.sh
open_run gpu_train_check
training_env "$WORK/site"

# A small ListOps set of the paper's lengths (500-2000 tokens, padded to 2048), generated once.
DATA=(data.data_dir="$WORK/data" data.num_train=2000 data.num_val=256 data.num_test=256
    data.num_workers=2)
for attn in $ATTNS; do
    if step "train $attn" 150 "$PYTHON" train.py task=listops attn=$attn trainer=$TRAINER \
        "${DATA[@]}" trainer.max_steps="$STEPS" trainer.val_check_interval=$((STEPS / 2)) \
        scheduler.warmup_steps=$((STEPS / 6 > 2 ? STEPS / 6 : 2)) trainer.enable_progress_bar=false logger=csv \
        hydra.run.dir="$WORK/run_$attn"; then
        cp "$WORK/run_$attn/results.json" "$OUT/train_$attn.json" ||
            FAILED+=("train $attn (no results.json)")
    fi
done

if [[ -f "$WORK/run_mra/checkpoints/best.ckpt" ]]; then
    step "eval mra (as trained)" 90 "$PYTHON" eval.py run_dir="$WORK/run_mra" "split=[val,test]" \
        out="$OUT/eval_triton.json"
    step "eval mra (attn.backend=torch)" 90 "$PYTHON" eval.py run_dir="$WORK/run_mra" \
        "split=[val,test]" run.attn.backend=torch out="$OUT/eval_torch.json"
    step "eval: both paths agree" 30 "$PYTHON" -c "
import json, sys
a, b = (json.load(open(f'$OUT/eval_{p}.json')) for p in ('triton', 'torch'))
for key in ('val_acc', 'test_acc', 'test_loss'):
    print(f'{key}: as trained {a[key]:.6f}, torch path {b[key]:.6f}')
# bf16 autocast around the projections; the attention itself accumulates in float32.
sys.exit(0 if abs(a['test_acc'] - b['test_acc']) <= 0.02 and abs(a['test_loss'] - b['test_loss']) <= 0.02 else 1)
"
fi

step "efficiency: LRA's table, text recipe" 180 "$PYTHON" -m mra_lra.bench.efficiency \
    --device "$DEVICE" --attn softmax,mra,mra_s --n "$EFF_N" --batch "$EFF_BATCH" --repeats 5 \
    --warmup 2 --max-seconds 10 --out "$OUT"

finish "$OUT"
