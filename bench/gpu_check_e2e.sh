#!/usr/bin/env bash
# The full GPU run of the end-to-end benchmark (fastmeta bench): W1–W4 second order, then
# W1 and W4 first order, each workload in one process against every peer, time-boxed so
# that the whole script ends within BUDGET seconds (default 480).
#
#   bash bench/gpu_check_e2e.sh            (JSON into $OUT if set, else bench/results)
#   BUDGET=570 ITERATIONS=20 bash bench/gpu_check_e2e.sh
#
# Runs in priority order (W1, W2, W3, W4 second order; W1, W4 first order); a run that
# would start with under 20 s left is skipped and says so. Prints each workload's table
# as it finishes, then a summary against the targets of ../shared/BENCHMARKS.md.
# Progress lines (one per contender) go to e2e-progress.log beside the JSON; the tail of
# it is printed when a run times out or crashes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
RESULTS_DIR="${OUT:-bench/results}"
BUDGET="${BUDGET:-480}"
ITERATIONS="${ITERATIONS:-20}"
mkdir -p "$RESULTS_DIR"
LOG="$RESULTS_DIR/e2e-progress.log"
: >"$LOG"
unset TRITON_INTERPRET  # compiled Triton kernels, not the interpreter
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX must not take 75% of the GPU from torch
START=$(date +%s)
remaining() { echo $((BUDGET - ($(date +%s) - START))); }

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check_e2e: no CUDA GPU visible to torch" >&2
    exit 2
fi

# Load (and, for the C++/CUDA extension, build) every backend once, in its own time box:
# an nvcc build must not eat a workload's time box. If it does not finish, the extension's
# backends are left out of the runs below.
echo "=== backends (time box 90 s) ==="
BACKENDS=""
if ! timeout --kill-after=5 90 "$PYTHON" -c "
import torch, fastmeta as fm
print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
for r in fm.backends():
    print(f\"  {r['name']:7} available={r['available']} {r['reason']}\")
" 2>&1 | tail -n 12; then
    echo "backend probe failed or timed out: timing torch, triton and auto only"
    BACKENDS="--backends torch,triton,auto"
fi

failed=0
run() {  # label, time box (s), bench arguments...
    local label="$1" box="$2"
    shift 2
    local left
    left=$(remaining)
    if [ "$left" -lt 20 ]; then
        echo "=== $label: SKIPPED, out of time (BUDGET=$BUDGET s) ==="
        return
    fi
    [ "$box" -gt "$left" ] && box=$left
    echo "=== $label (time box $box s) ==="
    echo "=== $label" >>"$LOG"
    # shellcheck disable=SC2086  # BACKENDS is empty or two words
    timeout --kill-after=10 "$box" "$PYTHON" -m fastmeta.benchmarks "$@" --iterations "$ITERATIONS" \
        --json "$RESULTS_DIR/e2e-$label.json" $BACKENDS 2>>"$LOG"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$label: TIMED OUT after $box s; the tables above are complete, the last lines of progress:"
        tail -n 4 "$LOG"
        failed=1
    elif [ $rc -gt 128 ]; then
        echo "$label: CRASHED (signal $((rc - 128))); the last lines of progress:"
        tail -n 4 "$LOG"
        failed=1
    elif [ $rc -ne 0 ]; then
        echo "$label: exit $rc (a fastmeta contender is WRONG or broke; see FAILED lines in $LOG)"
        grep FAILED "$LOG" | tail -n 5
        failed=1
    fi
}

# compile runs on W1 and W2 only: it takes ~30 s to compile each (BENCHMARKS.md), and its
# figures there are for those two.
run W1-second 90 --workloads W1 --peers loop,vmap,compile,graph,jax
run W2-second 120 --workloads W2 --peers loop,vmap,compile,graph,jax
run W3-second 100 --workloads W3 --peers loop,vmap,graph,jax
run W4-second 80 --workloads W4 --peers loop,vmap,graph,jax
run W1-first 45 --workloads W1 --first-order --peers loop,vmap,graph,jax
run W4-first 60 --workloads W4 --first-order --peers loop,vmap,graph,jax

echo "=== summary against the targets (BENCHMARKS.md) ==="
"$PYTHON" -m fastmeta.benchmarks --summarize "$RESULTS_DIR"/e2e-*.json
echo "total $(($(date +%s) - START)) s of BUDGET=$BUDGET s"
exit $failed
