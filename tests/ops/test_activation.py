"""``activation_grad`` (fastmeta/ops/activation.py), the backward the fused activations share."""

from __future__ import annotations

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.activation import reference_activation_grad
from harness import backend_params, check_kernel, check_op, to

ACTS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu"))
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_activation_grad(backend, device, act):
    with fm.use_backend("torch"):  # y must be a real f(z)
        y = ops.task_linear(*to([torch.randn(2, 3, 5), torch.randn(2, 7, 5)], device), None, act, 0.2).detach()
    check_op(backend, ops.activation_grad, [torch.randn(2, 3, 7, device=device), y, act, 0.2], [0, 1],
             ["activation_grad"])


def kernel_cases():
    cases = []
    for act in ACTS:
        y = torch.randn(3, 7, 6)
        y = {"tanh": torch.tanh(y), "sigmoid": torch.sigmoid(y), "relu": torch.relu(y)}.get(act, y)
        cases.append((act, (torch.randn(3, 7, 6), y, act, 0.3)))
    return cases


CASES = kernel_cases()


@pytest.mark.parametrize("name,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference(name, args):
    check_kernel("cpu", "activation_grad", reference_activation_grad, to(args, "cpu"), rtol=2e-5)
    # The reference's leaky_relu derivative is torch.where(y > 0, 1.0, slope): Python
    # scalars, so float32 whatever y's dtype; its slope is off by ~1e-8 relative in float64.
    rtol = 1e-7 if name == "leaky_relu" else 1e-10
    check_kernel("cpu", "activation_grad", reference_activation_grad, to(args, "cpu", torch.float64), rtol=rtol,
                 atol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, act):
    y = torch.randn(2, 3, 4, dtype=torch.float64)
    y = (torch.tanh(y) if act == "tanh" else torch.sigmoid(y)).requires_grad_()
    gradchecks(ops.activation_grad, (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True), y, act, 0.0),
               backend=backend)


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu"))
def test_an_unknown_activation_is_declined(backend, device):
    from fastmeta.backends import get_backend
    from harness import require

    require(backend)
    pred = torch.randn(2, 3, 5, device=device)
    assert get_backend(backend).kernel("activation_grad")(pred, pred, "gelu", 0.0) is NotImplemented


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_public_ops_refuse_an_activation_they_cannot_read_back_by_name(backend, needs_grad):
    """On every path (the reference, the kernels, the C++ nodes where autograd records): an
    activation outside the table, and leaky ReLU with a negative slope, whose sign y no
    longer tells. (The reference read an unknown name as "none".)"""
    x = torch.randn(2, 3, 4, requires_grad=needs_grad)
    w = torch.randn(5, 4, requires_grad=needs_grad)
    with fm.use_backend(backend):
        for act, slope, message in (("gelu", 0.0, "act must be one of"), ("leaky_relu", -0.1, "negative_slope >= 0")):
            with pytest.raises(ValueError, match=message):
                ops.activation_grad(x, x.detach(), act, slope)
            with pytest.raises(ValueError, match=message):
                ops.task_linear(x, w, None, act, slope)


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
def test_piecewise_linear_second_derivative_is_never_computed(act):
    """d f'/dy is 0 for these: the backward hands autograd None at y, not a zeros tensor."""
    grad_y = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    out = ops.activation_grad(grad_y, y, act, 0.2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        d_grad_y, d_y = torch.autograd.grad(out, (grad_y, y), torch.ones_like(out), allow_unused=True)
    assert d_y is None
    assert not any(e.name in ("aten::zeros_like", "aten::zeros") for e in prof.events())
    assert torch.equal(d_grad_y, reference_activation_grad(torch.ones_like(out), y, act, 0.2))
