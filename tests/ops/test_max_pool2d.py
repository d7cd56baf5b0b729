"""``max_pool2d`` and its backward ops (fastmeta/ops/max_pool2d.py) against aten's max
pooling, on the reference, the C++ CPU kernels and the Triton kernels (interpreted on the
CPU, compiled on a GPU), and nn.MaxPool2d traced through them.

Max pooling is kinked where two values of a window tie: float64 gradchecks use inputs
without ties (a permutation of distinct values), and the meta-gradient is compared with the
per-task loop, which picks the same maxima.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm
from fastmeta import ops
from fastmeta.engine import TracedProgram
from fastmeta.ops.max_pool2d import (
    reference_max_pool2d,
    reference_max_pool2d_backward,
    reference_max_pool2d_double_backward,
)
from fastmeta.testing.reference_loop import constant_coefficient, flat_grad, per_task_query_losses, relative_error
from harness import backend_params, check_kernel, kernel_log, to

TRITON = backend_params("triton")

KERNELS = ["max_pool2d", "max_pool2d_backward", "max_pool2d_double_backward"]
# (kernel_size, stride, padding): W4's 2×2 pool, overlapping windows with padding, a
# rectangular window with a ragged edge.
CONFIGS = [([2, 2], [2, 2], [0, 0]), ([3, 3], [2, 2], [1, 1]), ([3, 2], [1, 2], [1, 0])]
CONFIG_IDS = ["2x2", "3x3-s2-p1", "3x2-s1x2-p1x0"]


def distinct(*shape, dtype=torch.float64, requires_grad=False):
    """Values without ties: a shuffled arithmetic sequence, centred."""
    n = 1
    for s in shape:
        n *= s
    x = (torch.randperm(n, dtype=dtype) - n / 2).view(shape) / n
    return x.requires_grad_(requires_grad)


def kernel_cases():
    cases = []
    for (k, s, p), cid in zip(CONFIGS, CONFIG_IDS):
        x = torch.randn(3, 4, 9, 7)
        x[0, 0] = 1.0  # a plane of ties: the first maximum in row-major order
        x[2, 1, :2, :2] = float("-inf")
        y, indices = reference_max_pool2d(x, k, s, p)
        cases += [
            (f"{cid}-forward", "max_pool2d", reference_max_pool2d, (x, k, s, p)),
            (f"{cid}-backward", "max_pool2d_backward", reference_max_pool2d_backward,
             (torch.randn(y.shape), indices, [9, 7], k, s, p)),
            (f"{cid}-double_backward", "max_pool2d_double_backward", reference_max_pool2d_double_backward,
             (torch.randn(x.shape), indices, k, s, p)),
        ]
    return cases


CASES = kernel_cases()


def _to(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference(name, kernel, reference, args):
    """Outputs and indices exactly as aten's (ties, NaN, -inf), float32 and float64."""
    check_kernel("cpu", kernel, reference, _to(args, torch.float32), rtol=0, atol=0 if kernel == "max_pool2d" else 1e-6)
    check_kernel("cpu", kernel, reference, _to(args, torch.float64), rtol=0,
                 atol=0 if kernel == "max_pool2d" else 1e-12)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_triton_kernel_equals_reference(backend, device, name, kernel, reference, args):
    """The Triton kernels (fp32): the forward's maxima and indices exactly aten's (ties,
    -inf, padding); the backward's gather form sums the same gradients as the scatter."""
    check_kernel(backend, kernel, reference, to(_to(args, torch.float32), device), rtol=0,
                 atol=0 if kernel == "max_pool2d" else 1e-6)


@pytest.mark.parametrize("backend,device", backend_params("cpu") + TRITON)
def test_kernel_picks_nans_as_aten_does(backend, device):
    """A NaN wins its windows (the last NaN of a window where there are several)."""
    from harness import direct

    for dtype in (torch.float32, torch.float64) if backend == "cpu" else (torch.float32,):
        _picks_nans_as_aten_does(backend, device, dtype)


def _picks_nans_as_aten_does(backend, device, dtype):
    from harness import direct

    x = torch.randn(2, 3, 9, 7, dtype=dtype)
    x[1, 2, 3, 3] = x[1, 2, 4, 4] = x[0, 0, 0, 0] = float("nan")
    x = x.to(device)
    for k, s, p in CONFIGS:
        y, indices = direct(backend, "max_pool2d", x, k, s, p)
        want_y, want_indices = F.max_pool2d(x, k, s, p, return_indices=True)
        assert y.isnan().any()
        # The backward's gather puts each gradient where the scatter does, NaN windows included.
        grad_y = torch.randn(y.shape, dtype=dtype, device=device)
        torch.testing.assert_close(direct(backend, "max_pool2d_backward", grad_y, indices, list(x.shape[2:]), k, s, p),
                                   reference_max_pool2d_backward(grad_y, want_indices, list(x.shape[2:]), k, s, p),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(y, want_y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(indices, want_indices)


@pytest.mark.parametrize("backend,device", backend_params("cpu") + TRITON)
def test_kernel_on_rows_wide_enough_for_a_vector_loop(backend, device):
    """The C++ inner columns run tap by tap in a vectorised loop (several vectors per row
    here, with a remainder); the Triton forward spans planes in one block: exactly aten's
    maxima and indices, with ties, -inf and NaN inside."""
    for dtype in (torch.float32, torch.float64) if backend == "cpu" else (torch.float32,):
        _wide_rows(backend, device, dtype)


def _wide_rows(backend, device, dtype):
    from harness import direct

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 45, dtype=dtype, generator=g)
    x[0, 0, :, :20] = 0.5  # ties: the first maximum in row-major order
    x[0, 1, :3, 10:30] = float("-inf")
    x[1, 2, 2, 17] = x[1, 2, 3, 18] = x[1, 0, 0, 40] = float("nan")
    x = x.to(device)
    for k, s, p in CONFIGS:
        y, indices = direct(backend, "max_pool2d", x, k, s, p)
        want_y, want_indices = F.max_pool2d(x, k, s, p, return_indices=True)
        torch.testing.assert_close(y, want_y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(indices, want_indices)


def test_reference_matches_aten_and_its_gradients():
    """The reference's three ops are aten's max pooling, its backward and its double
    backward (the gather), on tie-free float64 inputs."""
    for k, s, p in CONFIGS:
        x = distinct(2, 3, 8, 7, requires_grad=True)
        y, indices = reference_max_pool2d(x.detach(), k, s, p)
        want_y, want_indices = F.max_pool2d(x, k, s, p, return_indices=True)
        assert torch.equal(y, want_y.detach()) and torch.equal(indices, want_indices)
        grad_y = torch.randn(y.shape, dtype=torch.float64, requires_grad=True)
        (want_x,) = torch.autograd.grad(want_y, x, grad_y, create_graph=True)
        got_x = reference_max_pool2d_backward(grad_y.detach(), indices, [8, 7], k, s, p)
        torch.testing.assert_close(got_x, want_x.detach(), rtol=0, atol=1e-15)
        upstream = torch.randn(x.shape, dtype=torch.float64)
        (want_gg,) = torch.autograd.grad(want_x, grad_y, upstream)
        torch.testing.assert_close(reference_max_pool2d_double_backward(upstream, indices, k, s, p), want_gg, rtol=0,
                                   atol=0)


@pytest.mark.parametrize("backend,device",
                         backend_params("cpu") + TRITON + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_public_op_outputs_and_every_gradient_against_aten(backend, device, config):
    """The public op on the backend: y and indices, the gradient at x, and second order (the
    gradient of ⟨grad_x, v⟩ at grad_y) as aten's autograd gives them; the C++ or Triton
    kernels run."""
    k, s, p = config
    x = distinct(2, 3, 8, 7, dtype=torch.float32).to(device).requires_grad_(True)
    grad_y = torch.randn(2, 3, *F.max_pool2d(x.detach(), k, s, p).shape[2:], device=device, requires_grad=True)
    v = torch.randn(x.shape, device=device)
    logged = backend if backend != "torch" else "cpu"
    with fm.use_backend(backend), kernel_log(logged) as (ran, declined):
        y, indices = ops.max_pool2d(x, k, s, p)
        (got_x,) = torch.autograd.grad(y, x, grad_y, create_graph=True)
        (got_gg,) = torch.autograd.grad(got_x, grad_y, v)
    want_y, want_indices = F.max_pool2d(x, k, s, p, return_indices=True)
    (want_x,) = torch.autograd.grad(want_y, x, grad_y, create_graph=True)
    (want_gg,) = torch.autograd.grad(want_x, grad_y, v)
    assert torch.equal(y, want_y) and torch.equal(indices, want_indices)
    assert not indices.requires_grad
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_gg, want_gg, rtol=0, atol=0)
    if backend != "torch":
        assert all(ran[name] for name in KERNELS), dict(ran)
        assert not any(declined.values()), dict(declined)


def _pool_y(x, k, s, p):
    return ops.max_pool2d(x, k, s, p)[0]


def r(*shape):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(True)


def _grad_cases():
    x = distinct(2, 2, 6, 5)
    _, indices = reference_max_pool2d(x, [3, 3], [2, 2], [1, 1])
    return [
        ("forward", _pool_y, lambda: (distinct(2, 2, 6, 5, requires_grad=True), [3, 3], [2, 2], [1, 1])),
        ("forward-2x2", _pool_y, lambda: (distinct(1, 3, 4, 6, requires_grad=True), [2, 2], [2, 2], [0, 0])),
        ("backward", ops.max_pool2d_backward, lambda: (r(*indices.shape), indices, [6, 5], [3, 3], [2, 2], [1, 1])),
        ("double_backward", ops.max_pool2d_double_backward, lambda: (r(2, 2, 6, 5), indices, [3, 3], [2, 2], [1, 1])),
    ]


GRAD_CASES = _grad_cases()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,fn,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, fn, make):
    """float64, tie-free: gradcheck and gradgradcheck of each op (the forward's y; the
    backward and the gather, linear in their gradient argument), on the reference and the
    C++ kernels; opcheck of the operators (below, for the forward's two outputs)."""
    from torch.autograd import gradcheck, gradgradcheck

    args = make()
    if fn is _pool_y:
        with fm.use_backend(backend):
            assert gradcheck(lambda x: fn(x, *args[1:]), args[:1])
            assert gradgradcheck(lambda x: fn(x, *args[1:]), args[:1])
        return
    gradchecks(fn, args, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck_of_the_forward(backend):
    from torch.library import opcheck

    args = (distinct(2, 2, 6, 5, requires_grad=True), [3, 3], [2, 2], [1, 1])
    tests = None if backend == "torch" else ("test_schema", "test_autograd_registration", "test_faketensor")
    with fm.use_backend(backend):
        if tests is None:
            opcheck(ops.max_pool2d.default, args)
        else:
            opcheck(ops.max_pool2d.default, args, test_utils=tests)


def test_the_checks_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        ops.max_pool2d(torch.randn(2, 3, 4), [2, 2], [2, 2], [0, 0])
    with pytest.raises(ValueError, match="padding must be at most half the kernel size"):
        ops.max_pool2d(torch.randn(1, 1, 4, 4), [2, 2], [2, 2], [2, 0])
    with pytest.raises(ValueError, match="the output would be empty"):
        ops.max_pool2d(torch.randn(1, 1, 1, 4), [2, 2], [2, 2], [0, 0])
    window = ([2, 2], [2, 2], [0, 0])
    with pytest.raises(TypeError, match="indices must be int64"):
        ops.max_pool2d_backward(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int32), [4, 4], *window)
    indices = torch.zeros(1, 1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"max_pool2d_backward: the pooled maps must be 3x3 for a 6x6 plane"):
        ops.max_pool2d_backward(torch.randn(1, 1, 2, 2), indices, [6, 6], *window)
    with pytest.raises(ValueError, match=r"max_pool2d_double_backward: the pooled maps must be 2x1"):
        ops.max_pool2d_double_backward(torch.randn(1, 1, 4, 3), indices, *window)
    with pytest.raises(ValueError, match="max_pool2d_backward: stride must have two values"):
        ops.max_pool2d_backward(torch.randn(1, 1, 2, 2), indices, [4, 4], [2, 2], [2], [0, 0])


def test_the_cuda_backend_declines_it():
    """The CUDA sources have no max pooling: the C++ backends take it on the CPU only, and
    the reference runs on a GPU under the cuda backend."""
    from fastmeta.backends.table import TABLE

    for name in KERNELS:
        assert TABLE[name].native.takes("cpu")
        assert not TABLE[name].native.takes("cuda")


class PoolNet(nn.Module):
    """W4's block structure at a toy size: conv → BatchNorm → ReLU → MaxPool, twice."""

    def __init__(self, ways=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * 2 * 2, ways)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_traced_max_pool_runs_the_op_and_matches_the_reference_loop(backend):
    """nn.MaxPool2d in a traced conv net: the program runs max_pool2d (never vmap), and
    MAML's second-order meta-gradient in float64 equals the per-task loop's (aten's max
    pooling and its double backward)."""
    torch.manual_seed(0)
    model = PoolNet().double()
    T, ways = 3, 3
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(T, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    qx = torch.randn(T, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    sy = torch.arange(6).remainder(ways).expand(T, 6).contiguous()
    qy = sy.clone()
    lr, steps = 0.1, 2
    learner = fm.MAML(model, lr, steps=steps, loss="cross_entropy")
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fm.use_backend(backend), kernel_log("cpu") as (ran, declined):
            got = flat_grad(learner.meta_batch(sx, sy, qx, qy).loss, params)
    program = learner._engine.program
    assert isinstance(program, TracedProgram)
    assert not program._generic_strategy, f"ran outside the ops: {program._generic_strategy}"
    if backend == "cpu":
        assert all(ran[name] for name in KERNELS), dict(ran)
        assert not any(declined[name] for name in KERNELS), dict(declined)
    losses = per_task_query_losses(model, sx, sy, qx, qy, steps, False, constant_coefficient(model, lr))
    want = flat_grad(losses.mean(), params)
    assert relative_error(got, want) < 1e-10


def test_max_pool_configurations_the_op_lacks_run_the_module():
    """Dilation, ceil mode: not the op's; nn.MaxPool2d itself runs, tasks folded into the batch."""
    for pool in (nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(3, stride=2, ceil_mode=True)):
        model = nn.Sequential(nn.Conv2d(1, 2, 3), pool)
        program = fm.trace(model)
        layout = fm.Layout.of_module(model)
        weights = layout.views(layout.pack(model.parameters()))
        x = torch.randn(2, 3, 1, 9, 9)
        with kernel_log("torch") as (ran, _):
            out = program(x, weights)
        want = torch.stack([model(x[t]) for t in range(2)])
        torch.testing.assert_close(out, want)
        assert not ran["max_pool2d"], dict(ran)


class PoolsABuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.register_buffer("offset", torch.randn(1, 2, 6, 6))

    def forward(self, x):
        return self.pool(self.conv(x)) + self.pool(self.offset)


def test_a_max_pool_of_a_value_without_tasks_stays_without_tasks():
    """A MaxPool2d of a buffer (no task dim): one plain call, its result broadcast over the
    tasks as in the model, not taken for a [T, N, ...] value."""
    model = PoolsABuffer()
    program = fm.trace(model)
    layout = fm.Layout.of_module(model)
    weights = layout.views(layout.pack(model.parameters()))
    x = torch.randn(3, 2, 1, 6, 6)
    out = program(x, weights)
    want = torch.stack([model(x[t]) for t in range(3)])
    torch.testing.assert_close(out, want)
