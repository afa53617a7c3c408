# Shared by the GPU scripts (sourced, not run): a log, steps under one time budget, a summary.
# The sourcing script sets LOG (the log file) and BUDGET_S (seconds for all measuring steps).
START=$SECONDS
FAILED=()

log() { echo "$@" | tee -a "$LOG"; }

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
