#!/usr/bin/env bash
# GPU check of the C++/CUDA extension, for a machine with a CUDA GPU and nvcc (the lead runs
# it; CI has no GPU). Steps, each must pass before the next:
#   1. build the extension (CUDA sources for this GPU's arch) and report the build time;
#   2. the CUDA tests (-m gpu) of the extension and the fused meta-step;
#   3. the same tests under compute-sanitizer --tool memcheck (out-of-bounds and misaligned
#      accesses in every kernel; FASTMETA_BACKEND stays explicit in the tests);
#   4. the W1 benchmark on the GPU (fused-cuda against the peers, one run);
#   5. record the kernels that passed as verified on cuda, for `auto`
#      (fastmeta/backends/verified.json; commit it with the figures).
# Usage: bench/gpu_check_extension.sh [--no-record]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RECORD=1
[[ "${1:-}" == "--no-record" ]] && RECORD=0

$PY - <<'PYEOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check_extension.sh: no CUDA GPU visible")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF

echo "== 1. build"
START=$(date +%s)
$PY -c "
from fastmeta.backends import extension as e
ok, info = e.build(verbose=True)
assert ok, info
assert e.build_info()['with_cuda'], 'built without CUDA sources: is nvcc on PATH / CUDA_HOME set?'
print(e.build_info())
ok, why = e.availability('cuda'); assert ok, why
"
echo "build: $(( $(date +%s) - START )) s"

TESTS="tests/test_extension_cuda.py tests/test_mlp_meta_step.py"
echo "== 2. GPU tests"
$PY -m pytest -q -m gpu $TESTS

echo "== 3. compute-sanitizer memcheck"
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# PyTorch's caching allocator hides out-of-bounds accesses inside its own blocks; the
# sanitizer sees every cudaMalloc'd buffer exactly only with caching off.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 --leak-check no \
    $PY -m pytest -q -x -m gpu $TESTS

echo "== 4. W1 on the GPU"
$PY bench/bench_mlp_meta_step.py --device cuda --iters 50
$PY bench/bench_mlp_meta_step.py --device cuda --iters 50 --first-order

if [[ $RECORD == 1 ]]; then
  echo "== 5. record verified kernels"
  $PY -m fastmeta.backends.verification record cuda cuda \
      inner_step inner_step_backward task_linear task_linear_input_grad task_linear_weight_grad \
      task_loss task_loss_grad mlp_meta_step mlp_meta_step_backward
  git diff --stat fastmeta/backends/verified.json || true
fi
echo "gpu_check_extension.sh: all steps passed"
