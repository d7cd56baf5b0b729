#!/usr/bin/env bash
# The one prepared GPU run for a session with ~10 minutes of device time, in priority order:
#   1. install (no network there) and build the extension;
#   2. GPU correctness: the learners' whole-step CUDA graph test, the extension's CUDA tests
#      (+ memcheck) and the triton GPU tier, each recording what passed in verified.json;
#   3. the end-to-end benchmark against the peers, time-boxed by what is left.
# Copies verified.json and the JSON results into $OUT (or bench/results) so they can be
# committed with bench/RESULTS.md.
#
#   bash bench/gpu_check_all.sh            # run on the device with timeout_s ≈ 600
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt"

timeout 120 python -m pytest -q -m gpu tests/test_whole_step.py tests/test_learners.py 2>&1 | tail -5
timeout 200 bash bench/gpu_check_extension.sh 2>&1 | tail -40
timeout 200 bash bench/gpu_check_triton.sh "$RESULTS" 2>&1 | tail -40
cp fastmeta/backends/verified.json "$RESULTS/verified.json"

left=$(( 570 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
    BUDGET=$left bash bench/gpu_check_e2e.sh 2>&1 | tail -80
else
    echo "gpu_check_all: ${left}s left, end-to-end benchmark skipped"
fi
