"""Every public op and backward op: opcheck, gradcheck and gradgradcheck in float64.

These run on the reference (``torch``) backend. The backend test files compare each
fast kernel against these references.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import fastmeta as fm
from fastmeta import ops

D = torch.float64


def r(*shape, grad=True):
    return torch.randn(shape, dtype=D).requires_grad_(grad)


def sample_inputs():
    """(name, op, args) with the differentiable args first; odd sizes on purpose."""
    T, N = 2, 3
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    cases = []
    for act in ops.ACTIVATIONS:
        cases.append((f"task_linear-{act}", ops.task_linear, (r(T, N, 4), r(T, 5, 4), r(T, 5), act, 0.1)))
    cases += [
        ("task_linear-shared", ops.task_linear, (r(T, N, 4), r(5, 4), r(5), "tanh", 0.0)),
        ("task_linear-nobias", ops.task_linear, (r(T, N, 4), r(T, 5, 4), None, "sigmoid", 0.0)),
        ("task_linear_input_grad", ops.task_linear_input_grad, (r(T, N, 5), r(T, 5, 4))),
        ("task_linear_input_grad-shared", ops.task_linear_input_grad, (r(T, N, 5), r(5, 4))),
        ("task_linear_weight_grad", ops.task_linear_weight_grad, (r(T, N, 5), r(T, N, 4), False)),
        ("task_linear_weight_grad-shared", ops.task_linear_weight_grad, (r(T, N, 5), r(T, N, 4), True)),
        ("task_conv2d", ops.task_conv2d, (r(T, N, 2, 5, 5), r(T, 3, 2, 3, 3), r(T, 3), [1, 1], [1, 1])),
        ("task_conv2d-strided", ops.task_conv2d, (r(T, N, 2, 5, 4), r(T, 3, 2, 3, 3), r(T, 3), [2, 2], [1, 1])),
        ("task_conv2d-shared", ops.task_conv2d, (r(T, N, 2, 5, 5), r(3, 2, 3, 3), r(3), [2, 1], [0, 1])),
        ("task_conv2d_input_grad", ops.task_conv2d_input_grad, (r(T, N, 3, 3, 3), r(T, 3, 2, 3, 3), [5, 5], [2, 2], [1, 1])),
        ("task_conv2d_input_grad-shared", ops.task_conv2d_input_grad, (r(T, N, 3, 3, 3), r(3, 2, 3, 3), [6, 6], [2, 2], [1, 1])),
        ("task_conv2d_weight_grad", ops.task_conv2d_weight_grad, (r(T, N, 3, 3, 3), r(T, N, 2, 5, 5), [3, 3], [2, 2], [1, 1], False)),
        ("task_conv2d_weight_grad-shared", ops.task_conv2d_weight_grad, (r(T, N, 3, 3, 3), r(T, N, 2, 5, 5), [3, 3], [2, 2], [1, 1], True)),
        ("task_batch_norm-2d", ops.task_batch_norm, (r(T, 4, 3, 2, 2), r(T, 3), r(T, 3), 1e-5, "relu", 0.0)),
        ("task_batch_norm-1d", ops.task_batch_norm, (r(T, 5, 3), r(T, 3), r(T, 3), 1e-5, "tanh", 0.0)),
        ("task_batch_norm-shared", ops.task_batch_norm, (r(T, 4, 3, 2), r(3), r(3), 1e-3, "sigmoid", 0.0)),
        ("task_batch_norm-noaffine", ops.task_batch_norm, (r(T, 4, 3, 2, 2), None, None, 1e-5, "none", 0.0)),
        ("task_batch_norm_backward", ops.task_batch_norm_backward, (r(T, 4, 3, 2, 2), r(T, 4, 3, 2, 2), r(T, 3), 1e-5, [True, True, True])),
        ("task_batch_norm_backward-partial", ops.task_batch_norm_backward, (r(T, 4, 3), r(T, 4, 3), r(3), 1e-5, [True, False, True])),
        ("task_loss-ce", ops.task_loss, (r(T, 4, 5), torch.randint(0, 5, (T, 4)), "cross_entropy")),
        ("task_loss-mse", ops.task_loss, (r(T, 4, 2), r(T, 4, 2), "mse")),
        ("task_loss_grad-ce", ops.task_loss_grad, (r(T, 4, 5), torch.randint(0, 5, (T, 4)), "cross_entropy")),
        ("task_loss_grad-mse", ops.task_loss_grad, (r(T, 4, 2), r(T, 4, 2), "mse")),
        ("activation_grad-tanh", ops.activation_grad, (r(T, 3, 4), torch.tanh(r(T, 3, 4, grad=False)).requires_grad_(), "tanh", 0.0)),
        ("activation_grad-sigmoid", ops.activation_grad, (r(T, 3, 4), torch.sigmoid(r(T, 3, 4, grad=False)).requires_grad_(), "sigmoid", 0.0)),
        ("inner_step-segments", ops.inner_step, (r(7), r(T, 7), r(3), r(7), r(7), seg)),
        ("inner_step-scalar", ops.inner_step, (r(T, 7), r(T, 7), r(1).squeeze().detach().requires_grad_(), None, None, None)),
        ("inner_step-param", ops.inner_step, (r(T, 7), r(T, 7), r(7), None, r(7), None)),
        ("inner_step_backward", ops.inner_step_backward, (r(T, 7), r(T, 7), r(3), r(7), r(7), seg, True, [True] * 5)),
        ("inner_step_backward-partial", ops.inner_step_backward, (r(T, 7), r(T, 7), r(7), None, r(7), None, False, [False, True, True, False, True])),
    ]
    return cases


CASES = sample_inputs()
IDS = [c[0] for c in CASES]


def differentiable(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def as_function(op, args):
    idx = differentiable(args)

    def f(*xs):
        full = list(args)
        for i, x in zip(idx, xs):
            full[i] = x
        return op(*full)

    return f, [args[i] for i in idx]


@pytest.mark.parametrize("name, op, args", CASES, ids=IDS)
def test_opcheck(name, op, args):
    opcheck(op, args)


@pytest.mark.parametrize("name, op, args", CASES, ids=IDS)
def test_gradcheck_and_gradgradcheck(name, op, args):
    f, inputs = as_function(op, args)
    # Convolutions have the most inputs; fast mode checks random projections of the full
    # Jacobian (still fails on a wrong gradient) at a fraction of the cost.
    fast = name.startswith("task_conv2d")
    assert gradcheck(f, inputs, fast_mode=fast)
    assert gradgradcheck(f, inputs, fast_mode=fast)


def test_ops_are_registered_under_the_fastmeta_namespace():
    for name in ops.__all__:
        if name[0].islower():
            assert hasattr(torch.ops.fastmeta, name), name


def test_references_match_torch_functional():
    x, w, b = r(2, 3, 4, grad=False), r(2, 5, 4, grad=False), r(2, 5, grad=False)
    got = ops.task_linear(x, w, b, "relu", 0.0)
    want = torch.stack([F.relu(F.linear(x[t], w[t], b[t])) for t in range(2)])
    assert torch.allclose(got, want)
    xc, wc = r(2, 3, 2, 6, 6, grad=False), r(2, 4, 2, 3, 3, grad=False)
    got = ops.task_conv2d(xc, wc, None, [2, 2], [1, 1])
    want = torch.stack([F.conv2d(xc[t], wc[t], None, 2, 1) for t in range(2)])
    assert torch.allclose(got, want)
    xb, g, bb = r(2, 4, 3, 2, 2, grad=False), r(2, 3, grad=False), r(2, 3, grad=False)
    got = ops.task_batch_norm(xb, g, bb, 1e-5, "none", 0.0)
    want = torch.stack([F.batch_norm(xb[t], None, None, g[t], bb[t], training=True) for t in range(2)])
    assert torch.allclose(got, want)


def test_task_shared_weights_compute_per_task_weight_gradients():
    # θ.expand(T, ...) has task stride 0: the forward is one GEMM, but the weight gradient
    # must still come back per task.
    x = r(2, 3, 4, grad=False)
    base = r(5, 4)
    w = base.expand(2, 5, 4)
    y = ops.task_linear(x, w, None, "tanh", 0.0)
    (g,) = torch.autograd.grad(y.sum(), w)
    want = torch.stack(
        [torch.autograd.grad(torch.tanh(x[t] @ base.t()).sum(), base)[0] for t in range(2)]
    )
    assert g.shape == (2, 5, 4) and torch.allclose(g, want)


def test_backend_registry_reports_each_backend_with_a_reason():
    rows = {row["name"]: row for row in fm.backends()}
    assert {"torch", "triton", "cpu", "cuda"} <= set(rows)
    assert rows["torch"]["available"]
    for row in rows.values():
        assert row["available"] or row["reason"]
    with fm.use_backend("torch"):
        assert fm.current_backend() == "torch"
