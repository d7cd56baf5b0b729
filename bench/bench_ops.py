"""Microbenchmarks per op: the triton backend against the torch reference (pytest-benchmark).

    pytest bench/bench_ops.py --benchmark-columns=median,ops --benchmark-sort=name

GPU only: every benchmark skips cleanly without CUDA. Not part of the default test run
(``testpaths = ["tests"]``). Each benchmark times one call of the public op (forward), or
of its backward op, with the backend forced by ``fm.use_backend``, and writes the achieved
rate into ``extra_info``: TFLOP/s for the GEMM-shaped ops (2 FLOPs per multiply-add), GB/s
for the memory-bound ones (bytes that must cross HBM at least once: every input read and
every output written once). fp32 throughout with TF32 off (BENCHMARKS.md).

``WORKLOAD_OP_SHAPES`` is the one place that turns the W1–W4 workloads of
../shared/BENCHMARKS.md into per-op shapes; tests/test_triton_ops.py reads its GPU tier's
sizes from here.
"""

from __future__ import annotations

import pytest
import torch

# ---------------------------------------------------------------------------------------
# W1–W4 as per-op shapes. T tasks; N is the larger of the support and query sets (what a
# query forward sees). Conv layers: (C_in, H, W) → C_out with kernel 3, and the stride and
# padding of the workload; conv4-strided halves 28 → 14 → 7 → 4 → 2, conv4-pool keeps the
# size and max-pools 84 → 42 → 21 → 10 → 5.
# ---------------------------------------------------------------------------------------


def _conv4_strided_params(ways: int) -> int:
    convs = (1 * 64 * 9 + 64) + 3 * (64 * 64 * 9 + 64)
    return convs + 4 * 2 * 64 + (256 * ways + ways)


def _conv4_pool_params(ways: int) -> int:
    convs = (3 * 32 * 9 + 32) + 3 * (32 * 32 * 9 + 32)
    return convs + 4 * 2 * 32 + (800 * ways + ways)


WORKLOAD_OP_SHAPES = {
    "W1": {
        "inner_step": {"T": 25, "P": (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1)},
        "task_linear": [{"T": 25, "N": 10, "I": 40, "O": 40, "act": "relu"},
                        {"T": 25, "N": 10, "I": 1, "O": 40, "act": "relu"}],
        "task_loss": [{"kind": "mse", "T": 25, "N": 10, "K": 1}],
    },
    "W2": {
        "inner_step": {"T": 32, "P": _conv4_strided_params(5)},
        "task_linear": [{"T": 32, "N": 5, "I": 256, "O": 5, "act": "none"}],
        "task_conv2d": [{"T": 32, "N": 5, "C": 1, "H": 28, "W": 28, "O": 64, "stride": 2, "padding": 1},
                        {"T": 32, "N": 5, "C": 64, "H": 14, "W": 14, "O": 64, "stride": 2, "padding": 1}],
        "task_batch_norm": [{"T": 32, "N": 5, "C": 64, "H": 14, "W": 14, "act": "relu"}],
        "task_loss": [{"kind": "cross_entropy", "T": 32, "N": 5, "K": 5}],
    },
    "W3": {
        "inner_step": {"T": 16, "P": _conv4_strided_params(20)},
        "task_linear": [{"T": 16, "N": 20, "I": 256, "O": 20, "act": "none"}],
        "task_conv2d": [{"T": 16, "N": 20, "C": 64, "H": 14, "W": 14, "O": 64, "stride": 2, "padding": 1}],
        "task_batch_norm": [{"T": 16, "N": 20, "C": 64, "H": 7, "W": 7, "act": "relu"}],
        "task_loss": [{"kind": "cross_entropy", "T": 16, "N": 20, "K": 20}],
    },
    "W4": {
        "inner_step": {"T": 4, "P": _conv4_pool_params(5)},
        "task_linear": [{"T": 4, "N": 75, "I": 800, "O": 5, "act": "none"}],
        "task_conv2d": [{"T": 4, "N": 75, "C": 3, "H": 84, "W": 84, "O": 32, "stride": 1, "padding": 1},
                        {"T": 4, "N": 75, "C": 32, "H": 42, "W": 42, "O": 32, "stride": 1, "padding": 1}],
        "task_batch_norm": [{"T": 4, "N": 75, "C": 32, "H": 84, "W": 84, "act": "relu"}],
        "task_loss": [{"kind": "cross_entropy", "T": 4, "N": 75, "K": 5}],
    },
}


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
