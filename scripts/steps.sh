# Shared by the GPU scripts (sourced, not run): a log, steps under one time budget, a summary,
# and the Python environment of the training scripts. The sourcing script sets OUT (or LOG) and
# BUDGET_S (seconds for all measuring steps); training_env also PYTHON and DEVICE.
START=$SECONDS
FAILED=()

log() { echo "$@" | tee -a "$LOG"; }

# open_run NAME: OUT made absolute, a fresh $OUT/NAME.log as LOG, and a WORK folder removed on exit.
open_run() {
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    LOG="$OUT/$1.log"
    : >"$LOG"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
}

# step NAME CAP_SECONDS COMMAND...: run under timeout min(CAP, budget left), log, remember failures;
# returns the command's exit code. ALWAYS=1 step ...: run under CAP alone, even when the budget
# is spent (the cheap last steps).
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((${ALWAYS:-0})); then
        limit=$cap
    elif ((limit < 10)); then
        log "=== $name: skipped, the ${BUDGET_S}s budget is spent"
        FAILED+=("$name (skipped)")
        return 1
    fi
    log "=== $name (at most ${limit}s; $((SECONDS - START))s elapsed)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        log "=== $name: timed out after ${limit}s"
        FAILED+=("$name (timeout)")
    elif ((rc != 0)); then
        log "=== $name: exit code $rc"
        FAILED+=("$name (exit $rc)")
    fi
    return "$rc"
}

# finish OUT_DIR: list what was written, name the failed steps, exit 1 if there were any.
finish() {
    log "=== done in $((SECONDS - START))s; files in $1:"
    ls -l "$1" | tee -a "$LOG"
    if ((${#FAILED[@]})); then
        log "=== FAILED: ${FAILED[*]}"
        exit 1
    fi
    log "=== all steps passed"
}

# training_env DIR: train.py's environment on a GPU image, which carries torch, triton and
# Lightning but not hydra, omegaconf or rich: their pure-Python wheels, which `make gpu-wheels`
# puts in .whl/ where PyPI is reachable (the device tool carries .whl/ along), are unpacked into
# DIR. Then a step logs the versions and the device; exits when DEVICE=cuda finds no GPU.
training_env() {
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
    export WANDB_MODE=disabled
    if ! "$PYTHON" -c "import hydra, omegaconf, rich" 2>/dev/null; then
        shopt -s nullglob
        local wheels=(.whl/*.whl)
        shopt -u nullglob
        if ((${#wheels[@]} == 0)); then
            log "=== no hydra or rich here and no wheels in .whl/: run \`make gpu-wheels\` where PyPI is reachable"
            exit 1
        fi
        # Pure-Python wheels are zip files: unpacking them is all an install would do.
        "$PYTHON" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$1" "${wheels[@]}"
        export PYTHONPATH="$PYTHONPATH:$1"
        log "=== unpacked ${wheels[*]}"
    fi
    step versions 60 "$PYTHON" -c "
import sys, torch, pytorch_lightning, hydra, omegaconf
print('torch', torch.__version__, '| lightning', pytorch_lightning.__version__, '| hydra',
      hydra.__version__, '| omegaconf', omegaconf.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
sys.exit('$DEVICE' == 'cuda' and not torch.cuda.is_available())
" || exit 1
}
