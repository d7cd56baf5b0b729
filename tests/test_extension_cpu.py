"""The ``cpu`` backend (csrc/cpu): every kernel against its reference, and every public op
on it through opcheck, gradcheck and gradgradcheck in float64.

Two levels:
- each kernel's launcher is called directly (so a decline cannot hide behind the
  reference) and compared with the op module's reference, in float64 and float32, with
  odd sizes that exercise the GEMM's row and column tails;
- the public ops run under ``fm.use_backend("cpu")``: outputs, gradients and double
  backward then run through the C++ kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.activation import reference_activation_grad
from fastmeta.ops.inner_step import reference_inner_step, reference_inner_step_backward
from fastmeta.ops.task_batch_norm import reference_task_batch_norm, reference_task_batch_norm_backward
from fastmeta.ops.task_linear import (
    reference_task_linear,
    reference_task_linear_input_grad,
    reference_task_linear_weight_grad,
)
from fastmeta.ops.task_loss import reference_task_loss, reference_task_loss_grad
from test_extension_build import assert_fresh, build_or_skip, direct

D = torch.float64
KERNEL_ACTS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")


@pytest.fixture(scope="module", autouse=True)
def extension():
    return build_or_skip()


def r(*shape, dtype=D, grad=False):
    return torch.randn(shape, dtype=dtype).requires_grad_(grad)


def kernel_cases(dtype):
    """(kernel name, reference, args): odd sizes — 7 rows (one 6-row tile + 1), 21 columns
    (one 16-wide tile + 5), 19 inputs — and every layout the launchers normalise."""
    T, N, I, O = 3, 7, 19, 21
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1])
    P = seg.numel()

    def t(*shape):
        return r(*shape, dtype=dtype)

    flat = t(T, 2 * P)
    cases = []
    for act in KERNEL_ACTS:
        cases.append((f"task_linear-{act}", "task_linear", reference_task_linear, (t(T, N, I), t(T, O, I), t(T, O), act, 0.2)))
    base_w, base_b = t(O, I), t(O)
    cases += [
        ("task_linear-shared", "task_linear", reference_task_linear, (t(T, N, I), base_w, base_b, "tanh", 0.0)),
        ("task_linear-expanded", "task_linear", reference_task_linear,
         (t(T, N, I), base_w.expand(T, O, I), base_b.expand(T, O), "relu", 0.0)),
        ("task_linear-nobias-bigN", "task_linear", reference_task_linear, (t(T, 100, I), t(T, O, I), None, "none", 0.0)),
        ("task_linear-noncontiguous", "task_linear", reference_task_linear,
         (t(T, I, N).transpose(1, 2), t(T, I, O).transpose(1, 2), t(O, T).t(), "leaky_relu", 0.01)),
        ("input_grad", "task_linear_input_grad", reference_task_linear_input_grad, (t(T, N, O), t(T, O, I))),
        ("input_grad-shared", "task_linear_input_grad", reference_task_linear_input_grad, (t(T, N, O), t(O, I))),
        ("input_grad-expanded", "task_linear_input_grad", reference_task_linear_input_grad, (t(T, N, O), base_w.expand(T, O, I))),
        ("weight_grad", "task_linear_weight_grad", reference_task_linear_weight_grad, (t(T, N, O), t(T, N, I), False)),
        ("weight_grad-shared", "task_linear_weight_grad", reference_task_linear_weight_grad, (t(T, N, O), t(T, N, I), True)),
        ("weight_grad-shared-bigO", "task_linear_weight_grad", reference_task_linear_weight_grad, (t(T, N, 100), t(T, N, I), True)),
        ("bn-1d", "task_batch_norm", reference_task_batch_norm, (t(T, N, 5), t(T, 5), t(T, 5), 1e-5, "relu", 0.0)),
        ("bn-2d", "task_batch_norm", reference_task_batch_norm, (t(T, N, 4, 3, 5), t(4), t(4), 1e-3, "tanh", 0.0)),
        ("bn-noaffine", "task_batch_norm", reference_task_batch_norm, (t(T, N, 4, 2, 2), None, None, 1e-5, "leaky_relu", 0.1)),
        ("bn-expanded", "task_batch_norm", reference_task_batch_norm,
         (t(T, N, 4, 3), t(4).expand(T, 4), t(4).expand(T, 4), 1e-5, "sigmoid", 0.0)),
        ("bn_backward", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 3, 5), t(T, N, 4, 3, 5), t(T, 4), 1e-5, [True, True, True])),
        ("bn_backward-partial", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4), t(T, N, 4), t(4), 1e-5, [True, False, True])),
        ("bn_backward-nogamma", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 2), t(T, N, 4, 2), None, 1e-5, [True, False, False])),
        ("loss-ce", "task_loss", reference_task_loss, (t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy")),
        ("loss-mse", "task_loss", reference_task_loss, (t(T, N, 3), t(T, N, 3), "mse")),
        ("loss-mse-4d", "task_loss", reference_task_loss, (t(T, N, 2, 3), t(T, N, 2, 3), "mse")),
        ("loss_grad-ce", "task_loss_grad", reference_task_loss_grad, (t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy")),
        ("loss_grad-mse", "task_loss_grad", reference_task_loss_grad, (t(T, N, 3), t(T, N, 3), "mse")),
        ("inner_step-shared-segments", "inner_step", reference_inner_step, (t(P), t(T, P), t(3), t(P), t(P), seg)),
        ("inner_step-scalar", "inner_step", reference_inner_step, (t(T, P), t(T, P), t(1)[0], None, None, None)),
        ("inner_step-param-view", "inner_step", reference_inner_step, (flat[:, :P], flat[:, P:], t(P), None, t(P), None)),
        ("inner_step-expanded", "inner_step", reference_inner_step, (t(P).expand(T, P), t(T, P), t(P), t(P), None, None)),
        ("inner_step_backward", "inner_step_backward", reference_inner_step_backward,
         (t(T, P), t(T, P), t(3), t(P), t(P), seg, True, [True] * 5)),
        ("inner_step_backward-scalar", "inner_step_backward", reference_inner_step_backward,
         (t(T, P), t(T, P), t(1)[0], None, None, None, False, [True, True, True, False, False])),
        ("inner_step_backward-partial", "inner_step_backward", reference_inner_step_backward,
         (t(T, P), t(T, P), t(P), None, t(P), None, False, [False, True, True, False, True])),
    ]
    for act in KERNEL_ACTS:
        y = t(T, N, 6)
        y = {"tanh": torch.tanh(y), "sigmoid": torch.sigmoid(y), "relu": torch.relu(y)}.get(act, y)
        cases.append((f"activation_grad-{act}", "activation_grad", reference_activation_grad, (t(T, N, 6), y, act, 0.3)))
    return cases


CASES64 = kernel_cases(torch.float64)
CASES32 = kernel_cases(torch.float32)


@pytest.mark.parametrize("name, kernel, reference, args", CASES64, ids=[c[0] for c in CASES64])
def test_kernel_equals_reference_float64(name, kernel, reference, args):
    got = direct("cpu", kernel, *args)
    want = reference(*args)
    assert_fresh(got, args)
    if isinstance(want, torch.Tensor):
        got, want = [got], [want]
    assert len(got) == len(want)
    # The reference's leaky_relu derivative is torch.where(y > 0, 1.0, slope): Python
    # scalars, so float32 whatever y's dtype; its slope is off by ~1e-8 relative in float64.
    rtol = 1e-7 if name == "activation_grad-leaky_relu" else 1e-10
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape)
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-11)


@pytest.mark.parametrize("name, kernel, reference, args", CASES32, ids=[c[0] for c in CASES32])
def test_kernel_equals_reference_float32(name, kernel, reference, args):
    got = direct("cpu", kernel, *args)
    want = reference(*args)
    if isinstance(want, torch.Tensor):
        got, want = [got], [want]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_kernels_decline_what_they_do_not_compile():
    x = torch.randn(2, 3, 4, dtype=torch.float16)
    w = torch.randn(5, 4, dtype=torch.float16)
    from fastmeta.backends import extension

    assert extension.kernels("cpu")["task_linear"](x, w, None, "none", 0.0) is NotImplemented
    mixed = extension.kernels("cpu")["task_linear"](x.float(), w.double(), None, "none", 0.0)
    assert mixed is NotImplemented
    # Through the public op, a decline runs the reference: still right.
    with fm.use_backend("cpu"):
        y = ops.task_linear(x, w, None, "none", 0.0)
    torch.testing.assert_close(y, x @ w.t())


# ---------------------------------------------------------------------------------------
# Public ops on the cpu backend: opcheck, gradcheck, gradgradcheck (float64)
# ---------------------------------------------------------------------------------------


def public_cases():
    """(name, op, args) with the differentiable args first; small and odd sizes."""
    T, N = 2, 3

    def g(*shape):
        return r(*shape, grad=True)

    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    cases = []
    for act in KERNEL_ACTS:
        cases.append((f"task_linear-{act}", ops.task_linear, (g(T, N, 4), g(T, 5, 4), g(T, 5), act, 0.1)))
    cases += [
        ("task_linear-shared", ops.task_linear, (g(T, N, 4), g(5, 4), g(5), "tanh", 0.0)),
        ("task_linear_input_grad", ops.task_linear_input_grad, (g(T, N, 5), g(T, 5, 4))),
        ("task_linear_weight_grad-shared", ops.task_linear_weight_grad, (g(T, N, 5), g(T, N, 4), True)),
        ("task_linear_weight_grad", ops.task_linear_weight_grad, (g(T, N, 5), g(T, N, 4), False)),
        ("task_batch_norm-2d", ops.task_batch_norm, (g(T, 4, 3, 2, 2), g(T, 3), g(T, 3), 1e-5, "relu", 0.0)),
        ("task_batch_norm-1d-tanh", ops.task_batch_norm, (g(T, 5, 3), g(3), g(3), 1e-5, "tanh", 0.0)),
        ("task_batch_norm_backward", ops.task_batch_norm_backward,
         (g(T, 4, 3, 2), g(T, 4, 3, 2), g(T, 3), 1e-5, [True, True, True])),
        ("task_loss-ce", ops.task_loss, (g(T, 4, 5), torch.randint(0, 5, (T, 4)), "cross_entropy")),
        ("task_loss-mse", ops.task_loss, (g(T, 4, 2), g(T, 4, 2), "mse")),
        ("task_loss_grad-ce", ops.task_loss_grad, (g(T, 4, 5), torch.randint(0, 5, (T, 4)), "cross_entropy")),
        ("task_loss_grad-mse", ops.task_loss_grad, (g(T, 4, 2), g(T, 4, 2), "mse")),
        ("activation_grad-tanh", ops.activation_grad, (g(T, 3, 4), torch.tanh(r(T, 3, 4)).requires_grad_(), "tanh", 0.0)),
        ("inner_step-segments", ops.inner_step, (g(7), g(T, 7), g(3), g(7), g(7), seg)),
        ("inner_step-scalar", ops.inner_step, (g(T, 7), g(T, 7), r(1)[0].requires_grad_(), None, None, None)),
        ("inner_step_backward", ops.inner_step_backward, (g(T, 7), g(T, 7), g(3), g(7), g(7), seg, True, [True] * 5)),
    ]
    return cases


PUBLIC = public_cases()


def _as_function(op, args):
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*xs):
        full = list(args)
        for i, x in zip(idx, xs):
            full[i] = x
        return op(*full)

    return f, [args[i] for i in idx]


@pytest.mark.parametrize("name, op, args", PUBLIC, ids=[c[0] for c in PUBLIC])
def test_public_op_on_cpu_backend_opcheck_gradcheck_gradgradcheck(name, op, args):
    with fm.use_backend("cpu"):
        # test_aot_dispatch_dynamic is left out: it compiles the op with dynamo (~5 s per
        # case on 2 cores) and exercises torch, not the kernel; test_ops.py runs it.
        opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        f, inputs = _as_function(op, args)
        assert gradcheck(f, inputs)
        assert gradgradcheck(f, inputs)


def test_public_ops_on_cpu_backend_run_the_cpp_kernels(monkeypatch):
    # Guard against a test above passing because every kernel declined: count the calls.
    from fastmeta.backends import get_backend

    backend = get_backend("cpu")
    calls = []
    for name in list(backend.kernels):
        fn = backend.kernels[name]
        monkeypatch.setitem(backend.kernels, name, (lambda fn, name: lambda *a: calls.append(name) or fn(*a))(fn, name))
    x, w, b = r(2, 3, 4, grad=True), r(2, 5, 4, grad=True), r(2, 5, grad=True)
    with fm.use_backend("cpu"):
        y = ops.task_linear(x, w, b, "tanh", 0.0)
        loss = ops.task_loss(y, r(2, 3, 5), "mse").sum()
        loss.backward()
    assert {"task_linear", "task_loss", "activation_grad", "task_linear_input_grad",
            "task_linear_weight_grad", "task_loss_grad"} <= set(calls)
