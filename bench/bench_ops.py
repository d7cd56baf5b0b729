"""Microbenchmarks per op: the triton backend against the torch reference (pytest-benchmark).

    pytest bench/bench_ops.py --benchmark-columns=median,ops --benchmark-sort=name

GPU only: every benchmark skips cleanly without CUDA. Not part of the default test run
(``testpaths = ["tests"]``). Each benchmark times one call of the public op (forward), or
of its backward op, with the backend forced by ``fm.use_backend``, and writes the achieved
rate into ``extra_info``: TFLOP/s for the GEMM-shaped ops (2 FLOPs per multiply-add), GB/s
for the memory-bound ones (bytes that must cross HBM at least once: every input read and
every output written once). fp32 throughout with TF32 off (docs/benchmarks.md).

The per-op shapes of W1–W4 come from ``fastmeta.tools.workloads.WORKLOAD_OP_SHAPES``
(their one home; the GPU tier of tests/ops/ uses them too).
"""

from __future__ import annotations

import pytest
import torch

from fastmeta.tools.workloads import WORKLOAD_OP_SHAPES

def _cases(op: str):
    for workload, ops in WORKLOAD_OP_SHAPES.items():
        shapes = ops.get(op)
        if shapes is None:
            continue
        for i, shape in enumerate(shapes if isinstance(shapes, list) else [shapes]):
            yield pytest.param(shape, id=f"{workload}-{i}")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _fp32_no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _bench(benchmark, backend, fn, *, flops=None, bytes_moved=None):
    """Time fn() on ``backend`` (synchronised), and record the achieved rate."""
    import fastmeta as fm

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    with fm.use_backend(backend):
        run()  # compile / autotune / cuDNN heuristics outside the timing
        benchmark.pedantic(run, rounds=50, iterations=5, warmup_rounds=3)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = round(flops / seconds / 1e12, 3)
    if bytes_moved is not None:
        benchmark.extra_info["GB/s"] = round(bytes_moved / seconds / 1e9, 1)


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# inner_step: memory bound
# ---------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(_cases("inner_step")))
def test_inner_step(benchmark, backend, shape):
    from fastmeta.ops import inner_step

    T, P = shape["T"], shape["P"]
    theta, grad, lr = _randn(T, P), _randn(T, P), torch.tensor(0.1, device="cuda")
    _bench(benchmark, backend, lambda: inner_step(theta, grad, lr, None, None, None), bytes_moved=3 * T * P * 4)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(_cases("inner_step")))
def test_inner_step_backward(benchmark, backend, shape):
    from fastmeta.ops import inner_step_backward

    T, P = shape["T"], shape["P"]
    grad_out, grad = _randn(T, P), _randn(T, P)
    lr, mask, precond = torch.rand(P, device="cuda"), torch.rand(P, device="cuda"), torch.rand(P, device="cuda")
    needs = [True, True, True, True, True]
    # reads grad_out, g, lr, mask, precond; writes dθ (shared [P]), dg, dlr, dmask, dprecond
    moved = (2 * T * P + 3 * P + P + T * P + 3 * P) * 4
    _bench(benchmark, backend, lambda: inner_step_backward(grad_out, grad, lr, mask, precond, None, True, needs),
           bytes_moved=moved)


# ---------------------------------------------------------------------------------------
# task_linear: GEMMs
# ---------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["forward", "input_grad", "weight_grad"])
@pytest.mark.parametrize("shape", list(_cases("task_linear")))
def test_task_linear(benchmark, backend, which, shape):
    from fastmeta.ops import task_linear, task_linear_input_grad, task_linear_weight_grad

    T, N, I, O = shape["T"], shape["N"], shape["I"], shape["O"]
    x, w, b, g = _randn(T, N, I), _randn(T, O, I), _randn(T, O), _randn(T, N, O)
    fn = {
        "forward": lambda: task_linear(x, w, b, shape["act"], 0.0),
        "input_grad": lambda: task_linear_input_grad(g, w),
        "weight_grad": lambda: task_linear_weight_grad(g, x, False),
    }[which]
    _bench(benchmark, backend, fn, flops=2 * T * N * I * O)


# ---------------------------------------------------------------------------------------
# task_conv2d: implicit GEMMs
# ---------------------------------------------------------------------------------------


def _conv_out(size, stride, padding):
    return (size + 2 * padding - 3) // stride + 1


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["forward", "input_grad", "weight_grad"])
@pytest.mark.parametrize("shape", list(_cases("task_conv2d")))
def test_task_conv2d(benchmark, backend, which, shape):
    from fastmeta.ops import task_conv2d, task_conv2d_input_grad, task_conv2d_weight_grad

    T, N, C, H, W, O = (shape[k] for k in ("T", "N", "C", "H", "W", "O"))
    s, p = shape["stride"], shape["padding"]
    HO, WO = _conv_out(H, s, p), _conv_out(W, s, p)
    x, w, b, g = _randn(T, N, C, H, W), _randn(T, O, C, 3, 3), _randn(T, O), _randn(T, N, O, HO, WO)
    fn = {
        "forward": lambda: task_conv2d(x, w, b, [s, s], [p, p]),
        "input_grad": lambda: task_conv2d_input_grad(g, w, [H, W], [s, s], [p, p]),
        "weight_grad": lambda: task_conv2d_weight_grad(g, x, [3, 3], [s, s], [p, p], False),
    }[which]
    # The useful FLOPs (the same for all three): one multiply-add per output pixel, output
    # channel and (input channel, tap).
    _bench(benchmark, backend, fn, flops=2 * T * N * HO * WO * O * C * 9)


# ---------------------------------------------------------------------------------------
# task_batch_norm, task_loss, activation_grad: memory bound
# ---------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("shape", list(_cases("task_batch_norm")))
def test_task_batch_norm(benchmark, backend, which, shape):
    from fastmeta.ops import task_batch_norm, task_batch_norm_backward

    T, N, C, H, W = (shape[k] for k in ("T", "N", "C", "H", "W"))
    x, gz, gamma, beta = _randn(T, N, C, H, W), _randn(T, N, C, H, W), _randn(T, C), _randn(T, C)
    numel = x.numel()
    if which == "forward":
        fn, moved = (lambda: task_batch_norm(x, gamma, beta, 1e-5, shape["act"], 0.0)), 2 * numel * 4
    else:
        fn, moved = (lambda: task_batch_norm_backward(gz, x, gamma, 1e-5, [True, True, True])), 3 * numel * 4
    _bench(benchmark, backend, fn, bytes_moved=moved)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(_cases("task_batch_norm")))
def test_activation_grad(benchmark, backend, shape):
    from fastmeta.ops import activation_grad

    T, N, C, H, W = (shape[k] for k in ("T", "N", "C", "H", "W"))
    gy, y = _randn(T, N, C, H, W), torch.relu(_randn(T, N, C, H, W))
    _bench(benchmark, backend, lambda: activation_grad(gy, y, "relu", 0.0), bytes_moved=3 * y.numel() * 4)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["loss", "grad"])
@pytest.mark.parametrize("shape", list(_cases("task_loss")))
def test_task_loss(benchmark, backend, which, shape):
    from fastmeta.ops import task_loss, task_loss_grad

    T, N, K, kind = shape["T"], shape["N"], shape["K"], shape["kind"]
    pred = _randn(T, N, K)
    target = torch.randint(0, K, (T, N), device="cuda") if kind == "cross_entropy" else _randn(T, N, K)
    op = task_loss if which == "loss" else task_loss_grad
    moved = (pred.numel() + target.numel() + (pred.numel() if which == "grad" else T)) * 4
    _bench(benchmark, backend, lambda: op(pred, target, kind), bytes_moved=moved)
