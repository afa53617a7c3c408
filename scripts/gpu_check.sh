#!/usr/bin/env bash
# GPU check, one command on a CUDA machine (about 5 minutes on an H100, under 8 at most):
#   1. the gpu-marked tests: compiled Triton kernels against the torch path in float32, float16
#      and bfloat16 (MRA-2, MRA-2-s, 32/64/128-row query tiles, gathered loop steps, a
#      65,536-token run), FlexAttention;
#   2. the attention benchmark: MRA-2 and MRA-2-s on Triton against SDPA (flash) and softmax,
#      n = 1k..64k, bfloat16 and float32, forward and forward+backward;
#   3. flex_mra (FlexAttention over MRA's blocks, compiled) in bfloat16 with 128-token
#      BlockMask tiles: the "faster than FlexAttention on the same blocks" comparison;
#   4. the published code's profiling setup (one layer, 12 x 64 heads, float32, n = 4096);
#   5. MRA replayed from a CUDA graph, a profile of one step, and MRA at batch 16 (bf16,
#      fwd+bwd, 1, 2 and 4 chosen blocks per kernel loop step): the kernels' own time and
#      where the rest goes; then flex_mra with 32-token tiles, only on torch >= 2.12 (torch
#      2.11's compiled backward has no kernel for them in half precision, pytorch#176025).
# Steps run in this order of importance (every target is measured by step 4); when the budget
# runs out, the last ones are skipped.
# Needs python3 with torch, triton, numpy, pytest, pyyaml and matplotlib; no install step (the
# package is used from this checkout through PYTHONPATH). Writes gpu_check.log, attention.csv,
# attention.png, graph.csv, profile_mra.txt/json, batch16.csv, flex128.csv, flex.csv,
# published.csv and targets.md (the issue's targets, met or missed: mra_lra.bench.targets) to $OUT
# (default ./bench_out).
# Each step runs under `timeout` within a total budget, so one hang cannot eat the rest.
# A CPU dry run of the plumbing:
#   DEVICE=cpu BENCH_N=256,512 BATCH_N=256 PROFILE_N=256 bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-./bench_out}
# The measuring steps share BUDGET_S; the plot and targets.md (at most 25 + 15 s) always run
# after them, so the whole stays under 8 minutes.
BUDGET_S=${BUDGET_S:-430}
DEVICE=${DEVICE:-cuda}
BENCH_N=${BENCH_N:-1024,4096,16384,65536}
PROFILE_N=${PROFILE_N:-4096}
BATCH_N=${BATCH_N:-4096,16384}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0

source scripts/steps.sh

log "=== GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
step versions 60 "$PYTHON" -c "
import torch, triton
print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
"

# The test files with gpu-marked tests; pyproject's addopts deselect gpu tests and -m gpu on the
# command line replaces that. A file that imports a training-only package (hydra, omegaconf,
# lightning) at module level cannot be collected on a bare image: the others still run.
mapfile -t GPU_TESTS < <(grep -rl --include='*.py' "pytest.mark.gpu" tests | sort)
log "=== gpu test files: ${GPU_TESTS[*]}"
step "gpu tests" 240 "$PYTHON" -m pytest "${GPU_TESTS[@]}" -m gpu -p no:cacheprovider \
    --continue-on-collection-errors -q -s -rfEs

BENCH=("$PYTHON" -m mra_lra.bench.attention --device "$DEVICE" --d 64 --heads 8 --batch 1
    --n "$BENCH_N" --repeats 5 --warmup 2 --max-seconds 10 --out "$OUT")
step "benchmark: MRA on Triton vs SDPA" 120 "${BENCH[@]}" --name attention \
    --attn mra,mra_s,sdpa_flash,softmax --dtype bfloat16,float32 --query-rows 1,2
# 128-token BlockMask tiles (same function): torch 2.11's compiled backward has no kernel for
# 32-token tiles in half precision (pytorch#176025).
step "benchmark: flex_mra, 128-token mask tiles" 60 "${BENCH[@]}" --name flex128 \
    --attn flex_mra --set flex_mra.mask_block_size=128 --dtype bfloat16
step "benchmark: published profiling setup" 90 "$PYTHON" -m mra_lra.bench.attention \
    --device "$DEVICE" --profile-published --profile-n "$PROFILE_N" --attn mra,mra_s,softmax \
    --repeats 3 --out "$OUT"
# The same kernels replayed from a CUDA graph: their own time, without Python and launch cost.
step "benchmark: CUDA graph" 45 "$PYTHON" -m mra_lra.bench.attention --device "$DEVICE" --d 64 \
    --heads 8 --batch 1 --n "$BATCH_N" --repeats 5 --warmup 2 --max-seconds 10 --out "$OUT" \
    --name graph --attn mra,mra_s,sdpa_flash --dtype bfloat16 --passes fwd+bwd --cuda-graph \
    --blocks-per-step 1,4
# Where the B=1 step's time goes: kernels launched, their device time, the ops with the most
# host time (profile_mra.txt, and profile_mra.json for chrome://tracing).
step "profile: MRA-2 fwd+bwd" 40 "$PYTHON" -m mra_lra.bench.profile_mra --device "$DEVICE" \
    --n "${BATCH_N%%,*}" --batch 1 --heads 8 --d 64 --dtype bfloat16 --out "$OUT"
# At B=1 x H=8 the MRA path was launch-bound (docs/benchmarks.md); a training-sized batch shows
# what the kernels do once the fixed cost is shared, with 32, 64 and 128 keys per loop step.
step "benchmark: batch 16" 90 "$PYTHON" -m mra_lra.bench.attention --device "$DEVICE" --d 64 \
    --heads 8 --batch 16 --n "$BATCH_N" --repeats 5 --warmup 2 --max-seconds 10 --out "$OUT" \
    --name batch16 --attn mra,mra_s,sdpa_flash --dtype bfloat16 --passes fwd+bwd \
    --blocks-per-step 1,2,4
if "$PYTHON" -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 12))" 2>>"$LOG"; then
    step "benchmark: flex_mra" 60 "${BENCH[@]}" --name flex --attn flex_mra --dtype bfloat16
else
    log "=== skipped: flex_mra with 32-token mask tiles (torch < 2.12 has no half-precision backward for them)"
fi
# One plot of everything measured, also when a benchmark step was cut short.
CSVS=()
for f in "$OUT/attention.csv" "$OUT/graph.csv" "$OUT/flex.csv" "$OUT/flex128.csv"; do [[ -s $f ]] && CSVS+=("$f"); done
if ((${#CSVS[@]})); then
    ALWAYS=1 step plot 25 "$PYTHON" -m mra_lra.bench.attention --out "$OUT" --name attention \
        --plot-from "${CSVS[@]}"
fi

# The issue's targets judged from whatever tables the steps above wrote (targets.md).
ALWAYS=1 step targets 15 "$PYTHON" -m mra_lra.bench.targets "$OUT" --out "$OUT/targets.md"

finish "$OUT"
