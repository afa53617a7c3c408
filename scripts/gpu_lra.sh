#!/usr/bin/env bash
# The first LRA numbers on one GPU (issue 22), in one device command of about 7 minutes (BUDGET_S
# 420 s for the data and the trainings, then the report; give the device call timeout_s=510):
#   1. hydra, omegaconf and rich unpacked from .whl/ when the image lacks them (steps.sh's
#      training_env; `make gpu-wheels` first, where PyPI is reachable);
#   2. the ListOps set at the release's sizes (96k / 2k / 2k, seed 0, the generator's lengths),
#      generated on all cores and cached once (mra_lra.data.prepare);
#   3. train.py task=listops attn=<attn> trainer=gpu seed=0 logger=csv: the MRA paper's recipe
#      (length 2048, 2 layers, width 64, batch 32, 5,000 steps, bf16-mixed, MRA on Triton), for
#      ATTNS in this order, so that the first ones always run. Each run has at most RUN_TIMEOUT_S
#      and the budget left; Lightning's max_time ends its training RESERVE_S before that, so that
#      it still tests and writes results.json (whose `steps` then says how far it got). A run with
#      less than MIN_RUN_S left is skipped;
#   4. each run's results.json, metrics.csv (csv/version_0), config.yaml and train.log to
#      $OUT/<attn>/, and `python -m mra_lra.bench.report` over the runs to $OUT/report.md.
# Knobs: STEPS, NUM_TRAIN, NUM_EVAL (val and test), ATTNS, RUN_TIMEOUT_S, RESERVE_S, MIN_RUN_S,
# BUDGET_S, TRAINER, DEVICE, GEN_WORKERS (default: all cores), ARGS (more overrides, for the data
# preparation and every run), PYTHON. The CPU dry run of the same path at toy size (2-3 minutes
# on two cores; a PYTHON without hydra and rich exercises the unpacking of .whl/ too):
#   PYTHON=.venv/bin/python TRAINER=cpu DEVICE=cpu STEPS=4 NUM_TRAIN=200 NUM_EVAL=32 GEN_WORKERS=2 \
#     ARGS="data.gen_min_length=20 data.gen_max_length=200 data.max_length=256 \
#     trainer.val_check_interval=2" OUT=/tmp/gpu_lra_dry bash scripts/gpu_lra.sh
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-./bench_out}
TRAINER=${TRAINER:-gpu}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-5000}
NUM_TRAIN=${NUM_TRAIN:-96000}
NUM_EVAL=${NUM_EVAL:-2000}
ATTNS=${ATTNS:-softmax mra mra_s}
BUDGET_S=${BUDGET_S:-420}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-190}
RESERVE_S=${RESERVE_S:-45}
MIN_RUN_S=${MIN_RUN_S:-90}
GEN_WORKERS=${GEN_WORKERS:-null}
read -ra EXTRA <<<"${ARGS:-}"
source scripts/steps.sh
open_run gpu_lra
training_env "$WORK/site"

DATA=(task=listops data.data_dir="$WORK/data" data.num_train="$NUM_TRAIN" data.num_val="$NUM_EVAL"
    data.num_test="$NUM_EVAL" data.gen_workers="$GEN_WORKERS" "${EXTRA[@]}")
step "generate and cache ListOps" 150 "$PYTHON" -m mra_lra.data.prepare "${DATA[@]}" ||
    finish "$OUT"

for attn in $ATTNS; do
    left=$((BUDGET_S - (SECONDS - START)))
    limit=$((RUN_TIMEOUT_S < left ? RUN_TIMEOUT_S : left))
    if ((limit < MIN_RUN_S)); then
        log "=== train $attn: skipped, ${left}s of the ${BUDGET_S}s budget left"
        FAILED+=("train $attn (skipped)")
        continue
    fi
    run="$WORK/runs/$attn"
    max_time=$(printf "00:00:%02d:%02d" $(((limit - RESERVE_S) / 60)) $(((limit - RESERVE_S) % 60)))
    step "train $attn" "$limit" "$PYTHON" train.py "${DATA[@]}" attn="$attn" trainer="$TRAINER" \
        seed=0 logger=csv trainer.max_steps="$STEPS" trainer.enable_progress_bar=false \
        +trainer.max_time="$max_time" hydra.run.dir="$run"
    mkdir -p "$OUT/$attn"
    for file in results.json csv/version_0/metrics.csv config.yaml train.log; do
        cp "$run/$file" "$OUT/$attn/" || FAILED+=("train $attn (no $file)")
    done
    steps=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['steps'])" \
        "$run/results.json" 2>/dev/null) || continue
    if ((steps < STEPS)); then
        log "=== train $attn: max_time stopped it at step $steps of $STEPS"
        FAILED+=("train $attn (stopped at step $steps)")
    fi
done

ALWAYS=1 step report 60 "$PYTHON" -m mra_lra.bench.report "$WORK/runs" --out "$OUT/report.md"
finish "$OUT"
