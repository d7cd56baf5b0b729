"""Fused activations and ``activation_grad``, the backward op they share.

Activations are fused into the linear and BatchNorm ops. Their backward needs
only the op's *output* y, never the pre-activation, so the forward saves one tensor:

=========== ================ ======================= =====================
act         f(z)             f'(z) written in y       d f'/dy
=========== ================ ======================= =====================
none        z                1                       0
relu        max(z, 0)        [y > 0]                 0
leaky_relu  z or s·z         [y > 0] + s·[y <= 0]    0   (needs s >= 0)
tanh        tanh z           1 − y²                  −2y
sigmoid     σ(z)             y(1 − y)                1 − 2y
=========== ================ ======================= =====================

``activation_grad(grad_y, y, act, negative_slope)`` = grad_y · f'(y). It is bilinear
enough that its own backward is written directly, in torch ops, below; where d f'/dy is 0
(none, relu, leaky_relu) the gradient at y is never computed: autograd gets None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.ops.registration import NativeCall, OpFamily, cpu_native_node, define_family, define_op

ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")


def check_activation(act: str, negative_slope: float) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if act == "leaky_relu" and negative_slope < 0:
        # With s < 0 the sign of y no longer tells the sign of z, and the backward reads y.
        raise ValueError(f"leaky_relu needs negative_slope >= 0, got {negative_slope}")


def apply_activation(z: Tensor, act: str, negative_slope: float) -> Tensor:
    """f(z). For "none" this is z itself: callers pass a freshly computed z."""
    if act == "relu":
        return torch.relu(z)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    return z


def activation_derivative(y: Tensor, act: str, negative_slope: float) -> Tensor:
    """f'(z), written as a function of y = f(z)."""
    if act == "relu":
        return (y > 0).to(y.dtype)
    if act == "leaky_relu":
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, negative_slope))
    if act == "tanh":
        return 1 - y * y
    if act == "sigmoid":
        return y * (1 - y)
    return torch.ones_like(y)


def d_activation_derivative_dy(y: Tensor, act: str) -> Tensor | None:
    """d f'(z) / dy as a function of y (the table's last column); None where it is zero.
    Not the second derivative f''(z) = d f'/dz: that is this times f'(z) (the fused
    meta-step's ``_activation_second_derivative``)."""
    if act == "tanh":
        return -2 * y
    if act == "sigmoid":
        return 1 - 2 * y
    return None


# ---------------------------------------------------------------------------------------
# activation_grad: grad_y · f'(y)
# ---------------------------------------------------------------------------------------


def reference_activation_grad(grad_y: Tensor, y: Tensor, act: str, negative_slope: float) -> Tensor:
    """The gradient at the activation's input: grad_y · f'(z), with f'(z) read from y = f(z).

    grad_y, y: the same shape. act: one of ``ACTIVATIONS``.
    """
    return grad_y * activation_derivative(y, act, negative_slope)


def _check_activation_grad(grad_y, y, act, negative_slope) -> None:
    """An activation the table does not hold, or leaky ReLU with a negative slope (whose f'
    y cannot tell): refused by name on every path, not read as "none"."""
    check_activation(act, negative_slope)


activation_grad = define_op(reference_activation_grad, NativeCall(
    takes=lambda device_type, grad_y, y, act, negative_slope: act in ACTIVATIONS and grad_y.shape == y.shape,
    args=lambda grad_y, y, act, negative_slope: (grad_y.contiguous(), y.contiguous(), act, float(negative_slope)),
), check=_check_activation_grad)


@activation_grad.register_fake
def _(grad_y, y, act, negative_slope):
    return torch.empty_like(y)


def _activation_grad_setup(ctx, inputs, output):
    grad_y, y, act, negative_slope = inputs
    ctx.act, ctx.negative_slope = act, negative_slope
    ctx.save_for_backward(grad_y, y)


def _activation_grad_backward(ctx, grad):
    grad_y, y = ctx.saved_tensors
    d_grad_y = d_y = None
    if ctx.needs_input_grad[0]:
        d_grad_y = activation_grad(grad, y, ctx.act, ctx.negative_slope)
    if ctx.needs_input_grad[1]:
        # Piecewise-linear activations (none, relu, leaky_relu): f' is constant where it is
        # defined, so the gradient at y is exactly zero. None says so to autograd, which then
        # computes nothing for it (no zeros tensor, no accumulation into y's gradient).
        second = d_activation_derivative_dy(y, ctx.act)
        d_y = None if second is None else grad * grad_y * second
    return d_grad_y, d_y, None, None


activation_grad.register_autograd(_activation_grad_backward, setup_context=_activation_grad_setup)


def _activation_grad_native_node(grad_y, y, act, negative_slope):
    """activation_grad's node in C++ (``fastmeta_ext::activation_grad_node``,
    csrc/cpu/activation.cpp): the same graph as :func:`_activation_grad_backward`'s Python
    node, with autograd's engine calling the kernel directly. Taken for CPU tensors of one
    shape and dtype where the ``cpu`` backend runs the kernel; NotImplemented (the Python
    node) otherwise."""
    _check_activation_grad(grad_y, y, act, negative_slope)
    if grad_y.shape != y.shape:
        return NotImplemented
    node = cpu_native_node("activation_grad_node", ("activation_grad",), grad_y, y)
    return NotImplemented if node is None else node(grad_y, y, act, float(negative_slope))[0]


activation_grad.register_native_node(_activation_grad_native_node)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


FAMILY = define_family(OpFamily(
    name="activation",
    sample_args={"activation_grad": lambda: (torch.randn(2, 3, 5), torch.randn(2, 3, 5), "tanh", 0.0)},
    check_seconds=10,
    dry_run_case="test_activation_grad and tanh",
))
