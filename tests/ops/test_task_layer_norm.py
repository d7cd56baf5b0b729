"""``task_layer_norm`` and its backward (fastmeta/ops/task_layer_norm.py) on every backend,
and nn.LayerNorm traced by fm.trace through it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm
from fastmeta import ops
from fastmeta.engine import TracedProgram
from fastmeta.testing.reference_loop import constant_coefficient, flat_grad, per_task_query_losses, relative_error
from fastmeta.ops.task_layer_norm import reference_task_layer_norm, reference_task_layer_norm_backward
from harness import backend_params, check_kernel, check_op, kernel_log

KERNELS = ["task_layer_norm", "task_layer_norm_backward"]


def ln_param(kind, T, D, device, dtype=torch.float32):
    if kind == "none":
        return None
    if kind == "expanded":
        return (torch.randn(D, device=device, dtype=dtype) + 1).expand(T, D)
    shape = (T, D) if kind == "per_task" else (D,)
    return torch.randn(shape, device=device, dtype=dtype) + 1


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu"))
@pytest.mark.parametrize(
    "shape,gamma_kind,beta_kind",
    [
        ((2, 3, 7), "per_task", "per_task"),
        ((3, 2, 5, 4), "shared", "shared"),  # a middle dim: rows of every (n, position)
        ((2, 5, 13), "none", "none"),
        ((1, 4, 3), "per_task", "shared"),
        ((2, 3, 1), "expanded", "per_task"),  # D = 1: x̂ = 0, only β reaches the output
    ],
)
def test_task_layer_norm(backend, device, shape, gamma_kind, beta_kind):
    """Outputs, every first-order gradient (the backend's backward kernel) and second order
    (the backward's reference VJP) against the reference, fp32."""
    T, D = shape[0], shape[-1]
    x = torch.randn(*shape, device=device) * 2 + 3  # |μ| ≫ 0 catches one-pass variance
    args = [x, ln_param(gamma_kind, T, D, device), ln_param(beta_kind, T, D, device), 1e-5]
    diff = [0] + [i for i in (1, 2) if args[i] is not None]
    check_op(backend, ops.task_layer_norm, args, diff, KERNELS, rtol=1e-4)


def kernel_cases():
    t = torch.randn
    T, N = 3, 5
    return [
        ("per_task", "task_layer_norm", reference_task_layer_norm, (t(T, N, 9) * 2 + 3, t(T, 9), t(T, 9), 1e-5)),
        ("shared-4d", "task_layer_norm", reference_task_layer_norm, (t(T, N, 2, 6), t(6), t(6), 1e-3)),
        ("noaffine", "task_layer_norm", reference_task_layer_norm, (t(T, N, 17), None, None, 1e-5)),
        ("expanded", "task_layer_norm", reference_task_layer_norm,
         (t(T, N, 4), t(4).expand(T, 4), t(4).expand(T, 4), 1e-5)),
        ("backward", "task_layer_norm_backward", reference_task_layer_norm_backward,
         (t(T, N, 9), t(T, N, 9) * 2 + 3, t(T, 9), 1e-5, [True, True, True])),
        ("backward-4d-shared", "task_layer_norm_backward", reference_task_layer_norm_backward,
         (t(T, N, 3, 5), t(T, N, 3, 5), t(5), 1e-5, [True, True, True])),
        ("backward-partial", "task_layer_norm_backward", reference_task_layer_norm_backward,
         (t(T, N, 6), t(T, N, 6), t(T, 6), 1e-5, [True, False, True])),
        ("backward-nogamma", "task_layer_norm_backward", reference_task_layer_norm_backward,
         (t(T, N, 7), t(T, N, 7), None, 1e-5, [True, False, False])),
        ("backward-params-only", "task_layer_norm_backward", reference_task_layer_norm_backward,
         (t(T, N, 300), t(T, N, 300), t(T, 300), 1e-5, [False, True, True])),  # D past one feature block
    ]


CASES = kernel_cases()


def on_device(args, device, dtype=None):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            b = a[0] if a.dim() == 2 and a.stride(0) == 0 else a
            b = b.to(device, dtype or a.dtype)
            out.append(b.expand(a.shape) if b is not a and b.dim() == 1 and a.dim() == 2 else b)
        else:
            out.append(a)
    return out


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference(name, kernel, reference, args):
    check_kernel("cpu", kernel, reference, on_device(args, "cpu", torch.float32), rtol=2e-5)
    check_kernel("cpu", kernel, reference, on_device(args, "cpu", torch.float64), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_triton_kernel_equals_reference(backend, device, name, kernel, reference, args):
    check_kernel(backend, kernel, reference, on_device(args, device), rtol=2e-5)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_triton_declines_rows_past_its_registers_and_empty_tensors(backend, device):
    from fastmeta.backends import get_backend
    from fastmeta.kernels.task_layer_norm import MAX_D

    kernel = get_backend("triton").kernel("task_layer_norm")
    assert kernel(torch.randn(1, 1, MAX_D + 1, device=device), None, None, 1e-5) is NotImplemented
    assert kernel(torch.randn(0, 3, 4, device=device), None, None, 1e-5) is NotImplemented


def r(*shape, grad=True):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(grad)


GRAD_CASES = [
    ("per_task", ops.task_layer_norm, lambda: (r(2, 3, 4), r(2, 4), r(2, 4), 1e-5)),
    ("shared-4d", ops.task_layer_norm, lambda: (r(2, 2, 3, 5), r(5), r(5), 1e-3)),
    ("noaffine", ops.task_layer_norm, lambda: (r(2, 3, 4), None, None, 1e-5)),
    ("backward", ops.task_layer_norm_backward, lambda: (r(2, 3, 4), r(2, 3, 4), r(2, 4), 1e-5, [True] * 3)),
    ("backward-partial", ops.task_layer_norm_backward,
     lambda: (r(2, 3, 5), r(2, 3, 5), r(5), 1e-5, [True, False, True])),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, op, make):
    """float64: opcheck, gradcheck and gradgradcheck (second order through the backward op,
    third through its reference VJP) on the reference and on the C++ kernels."""
    gradchecks(op, make(), backend=backend)


def test_reference_matches_torch_functional():
    x, g, b = r(2, 4, 6, grad=False), r(2, 6, grad=False), r(2, 6, grad=False)
    with fm.use_backend("torch"):
        got = ops.task_layer_norm(x, g, b, 1e-5)
    want = torch.stack([F.layer_norm(x[t], (6,), g[t], b[t], 1e-5) for t in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_cuda_backend_declines_it():
    """The CUDA sources have no LayerNorm: the C++ backends take it on the CPU only, and the
    reference runs on a GPU under the cuda backend."""
    from fastmeta.backends.table import TABLE

    for name in KERNELS:
        takes = TABLE[name].native.takes
        args = (torch.randn(2, 3, 4), None, None, 1e-5) if name == "task_layer_norm" else (
            torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, 1e-5, [True] * 3)
        assert takes("cpu", *args)
        assert not takes("cuda", *args)


class LayerNormNet(nn.Module):
    def __init__(self, hidden=6):
        super().__init__()
        self.inp = nn.Linear(1, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.Tanh()
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(self.act(self.norm(self.inp(x))))


def sine_tasks(T=3, shots=4, queries=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(T, shots, 1, generator=g, dtype=dtype) * 10 - 5
    qx = torch.rand(T, queries, 1, generator=g, dtype=dtype) * 10 - 5
    amp = torch.rand(T, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
    return sx, amp * torch.sin(sx), qx, amp * torch.sin(qx)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_traced_layer_norm_runs_the_op_and_matches_the_reference_loop(backend):
    """nn.LayerNorm in a traced model: the program runs task_layer_norm (never vmap), and
    MAML's second-order meta-gradient in float64 equals the per-task reference loop's."""
    torch.manual_seed(0)
    model = LayerNormNet().double()
    tasks = sine_tasks()
    lr, steps = 0.1, 2
    learner = fm.MAML(model, lr, steps=steps)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fm.use_backend(backend), kernel_log("cpu") as (ran, declined):
            got = flat_grad(learner.meta_batch(*tasks).loss, params)
    program = learner._engine.program
    assert isinstance(program, TracedProgram)
    assert not program._generic_strategy, f"ran outside the ops: {program._generic_strategy}"
    if backend == "cpu":
        assert ran["task_layer_norm"] and ran["task_layer_norm_backward"], dict(ran)
        assert not declined["task_layer_norm"], dict(declined)
    losses = per_task_query_losses(model, *tasks, steps, False, constant_coefficient(model, lr))
    want = flat_grad(losses.mean(), params)
    assert relative_error(got, want) < 1e-10


def test_layer_norm_over_several_dims_runs_under_vmap():
    """A LayerNorm over more than the last dim is not the op's: the module runs under vmap."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(-1, (2, 2)), nn.LayerNorm((2, 2)))
    program = fm.trace(model)
    layout = fm.Layout.of_module(model)
    weights = layout.views(layout.pack(model.parameters()))
    x = torch.randn(2, 5, 3)
    out = program(x, weights)
    want = torch.stack([model(x[t]) for t in range(2)])
    torch.testing.assert_close(out, want)
    assert program._generic_strategy.get("_2") == "vmap", program._generic_strategy
