#!/usr/bin/env bash
# GPU check of the triton backend: run its GPU test tier and, per op family that passes,
# record its kernels as verified on CUDA (fastmeta/backends/verified.json), so that the
# `auto` backend may choose them there (DESIGN.md). Then run the op microbenchmarks.
#
#   bash bench/gpu_check_triton.sh [RESULTS_DIR]     (default: bench/results)
#
# Needs a CUDA GPU. Exits non-zero if any family failed; the families that passed are
# still recorded. Commit verified.json with the results (bench/RESULTS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR="${1:-bench/results}"
mkdir -p "$RESULTS_DIR"
PYTHON="${PYTHON:-python}"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check_triton: no CUDA GPU; nothing verified" >&2
    exit 2
fi
"$PYTHON" -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"

# Pytest must report passes and no skips: a skipped GPU test verifies nothing.
run_tier() {  # name, pytest -k expression
    local name="$1" expr="$2" log="$RESULTS_DIR/triton_${1}.log"
    "$PYTHON" -m pytest tests/test_triton_ops.py -k "$expr" -q -rs -p no:randomly >"$log" 2>&1
    local rc=$?
    tail -n 3 "$log"
    if [ $rc -ne 0 ] || grep -q "SKIPPED" "$log" || ! grep -q " passed" "$log"; then
        echo "FAILED: $name (see $log)"
        return 1
    fi
    echo "passed: $name"
}

failed=0
# Shared harness paths first (declines, float64 fallback, tile-size paths, learners, AOT
# compile): if these fail, nothing is recorded.
if ! run_tier common "decline or float64 or small_tiles or maml or bad_label"; then
    echo "the common tier failed; recording nothing" >&2
    exit 1
fi
"$PYTHON" -m pytest tests/test_triton_compile.py -q >"$RESULTS_DIR/triton_compile.log" 2>&1 || { echo "AOT compile failed" >&2; exit 1; }

declare -A FAMILY_TESTS=(
    [inner_step]="test_inner_step"
    [task_linear]="test_task_linear or test_activation_grad"
    [task_conv2d]="test_task_conv2d"
    [task_batch_norm]="test_task_batch_norm"
    [task_loss]="test_task_loss"
)
declare -A FAMILY_KERNELS=(
    [inner_step]="inner_step inner_step_backward"
    [task_linear]="task_linear task_linear_input_grad task_linear_weight_grad activation_grad"
    [task_conv2d]="task_conv2d task_conv2d_input_grad task_conv2d_weight_grad"
    [task_batch_norm]="task_batch_norm task_batch_norm_backward"
    [task_loss]="task_loss task_loss_grad"
)
for family in inner_step task_linear task_conv2d task_batch_norm task_loss; do
    if run_tier "$family" "${FAMILY_TESTS[$family]}"; then
        # shellcheck disable=SC2086  # the kernel names are separate arguments
        "$PYTHON" -m fastmeta.backends.verification record triton cuda ${FAMILY_KERNELS[$family]}
    else
        failed=1
    fi
done

# Microbenchmarks: triton against the torch reference at W1–W4 shapes.
"$PYTHON" -m pytest bench/bench_ops.py -q -p no:randomly \
    --benchmark-json="$RESULTS_DIR/triton_ops.json" --benchmark-columns=median,iqr >"$RESULTS_DIR/triton_bench.log" 2>&1 \
    || { echo "benchmarks failed (see $RESULTS_DIR/triton_bench.log)"; failed=1; }
if [ -f "$RESULTS_DIR/triton_ops.json" ]; then
    "$PYTHON" - "$RESULTS_DIR/triton_ops.json" <<'PY'
import json, sys
from collections import defaultdict
data = json.load(open(sys.argv[1]))
rows = defaultdict(dict)
for b in data["benchmarks"]:
    name = b["name"].replace("[", " [").split(" ")[0]
    params = {k: v for k, v in b["params"].items() if k != "backend"}
    key = (name, b["param"].replace(f"-{b['params']['backend']}", "").replace(f"{b['params']['backend']}-", ""))
    rate = b["extra_info"].get("TFLOP/s")
    rate = f"{rate} TFLOP/s" if rate is not None else f"{b['extra_info'].get('GB/s')} GB/s"
    rows[key][b["params"]["backend"]] = (b["stats"]["median"] * 1e6, rate)
print(f"\n{data['machine_info'].get('node', '')} {data['benchmarks'][0]['extra_info'].get('device', '')} {data['datetime']}")
print("| benchmark | case | torch µs | triton µs | speed-up | triton rate |")
print("|---|---|---|---|---|---|")
for (name, case), r in sorted(rows.items()):
    if "torch" in r and "triton" in r:
        print(f"| {name} | {case} | {r['torch'][0]:.1f} | {r['triton'][0]:.1f} | {r['torch'][0] / r['triton'][0]:.2f}x | {r['triton'][1]} |")
PY
fi
"$PYTHON" -c "from fastmeta.backends import verification as v; print('verified on cuda:', v.verified_ops('triton').get('cuda', []))"
exit $failed
