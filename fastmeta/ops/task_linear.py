"""``task_linear``: a linear layer with per-task weights, bias and activation fused.

    y[t] = act(x[t] @ w[t]ᵀ + b[t])

Shapes:

- x: ``[T, N, I]``;
- w: ``[T, O, I]`` (per task) or ``[O, I]`` (shared by all tasks). A per-task weight whose
  task stride is 0 (``θ.expand``) is computed as shared: one GEMM;
- b: ``[T, O]``, ``[O]`` or None;
- act: see :mod:`fastmeta.ops.activation`.

Returns ``[T, N, O]``.

The backward ops close the family under differentiation, so every order of derivative
runs through these three ops:

- ``task_linear_input_grad(grad_out, w)`` = grad_out @ w → ``[T, N, I]``;
- ``task_linear_weight_grad(grad_out, x, shared)`` = grad_outᵀ @ x → ``[T, O, I]``, or
  summed over tasks to ``[O, I]`` when ``shared``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmeta.backends.precision import product_at_precision
from fastmeta.backends.table import shared_or_contiguous
from fastmeta.ops.registration import ModuleOp, NativeCall, OpFamily, define_family, define_op
from fastmeta.ops.activation import activation_grad, apply_activation


def is_task_shared(t: Tensor) -> bool:
    """A per-task tensor whose task stride is 0: every task reads the same values."""
    return t.dim() >= 1 and t.size(0) > 1 and t.stride(0) == 0


def reference_task_linear(x: Tensor, w: Tensor, b: Tensor | None, act: str, negative_slope: float) -> Tensor:
    """act(x @ wᵀ + b) for every task; see the module docstring for shapes."""
    if w.dim() == 3 and is_task_shared(w):
        w = w[0]
    if w.dim() == 2:
        y = product_at_precision(torch.matmul, x, w.t())
    else:
        y = product_at_precision(torch.bmm, x, w.transpose(1, 2))
    if b is not None:
        y = y + (b.unsqueeze(1) if b.dim() == 2 else b)
    return apply_activation(y, act, negative_slope)


def reference_task_linear_input_grad(grad_out: Tensor, w: Tensor) -> Tensor:
    """grad_out ``[T, N, O]`` @ w (``[T, O, I]`` or ``[O, I]``) → ``[T, N, I]``."""
    if w.dim() == 3 and is_task_shared(w):
        w = w[0]
    if w.dim() == 2:
        return product_at_precision(torch.matmul, grad_out, w)
    return product_at_precision(torch.bmm, grad_out, w)


def reference_task_linear_weight_grad(grad_out: Tensor, x: Tensor, shared: bool) -> Tensor:
    """grad_out ``[T, N, O]``ᵀ @ x ``[T, N, I]`` → ``[T, O, I]``, or ``[O, I]`` if shared."""
    if shared:
        g2, x2 = grad_out.reshape(-1, grad_out.size(-1)), x.reshape(-1, x.size(-1))
        return product_at_precision(torch.matmul, g2.t(), x2)
    return product_at_precision(torch.bmm, grad_out.transpose(1, 2), x)


def _native_per_task(t: Tensor | None, task_dim: bool) -> Tensor | None:
    """A weight or bias for the native kernels. The CPU kernels read a per-task ``[T, O, I]``
    or ``[T, O]`` tensor at its task stride when each task's block is contiguous (a view of
    the flat fast-weight buffer: no layout copy, csrc/cpu/task_linear.cpp); anything else,
    and everything for the CUDA kernels, as :func:`shared_or_contiguous` makes it. A few
    stride reads: this runs on every call."""
    if t is None or t.is_contiguous():
        return t
    if task_dim and t.is_cpu:
        strides = t.stride()  # one call: Tensor.stride(dim) parses its argument each time
        if strides[0] != 0 and strides[-1] == 1 and (len(strides) == 2 or strides[-2] == t.shape[-1]):
            return t
    return shared_or_contiguous(t, task_dim)


# ---------------------------------------------------------------------------------------
# task_linear
# ---------------------------------------------------------------------------------------


task_linear = define_op(reference_task_linear, NativeCall(
    takes=lambda device_type, x, w, b, act, negative_slope: x.dim() == 3 and w.dim() in (2, 3),
    args=lambda x, w, b, act, negative_slope: (
        x.contiguous(), _native_per_task(w, w.dim() == 3), _native_per_task(b, b is not None and b.dim() == 2),
        act, float(negative_slope)),
))


@task_linear.register_fake
def _(x, w, b, act, negative_slope):
    return x.new_empty((x.size(0), x.size(1), w.size(-2)))


def _task_linear_setup(ctx, inputs, output):
    x, w, b, act, negative_slope = inputs
    ctx.act, ctx.negative_slope = act, negative_slope
    ctx.has_bias = b is not None
    ctx.bias_shared = b is not None and b.dim() == 1
    ctx.save_for_backward(x, w, output if act != "none" else None)
    # No gradient reached y (activation_grad has none at y for relu): nothing to do, not zeros to push through.
    ctx.set_materialize_grads(False)


def _task_linear_backward(ctx, grad_y):
    if grad_y is None:
        return None, None, None, None, None
    x, w, y = ctx.saved_tensors
    grad_z = grad_y if ctx.act == "none" else activation_grad(grad_y, y, ctx.act, ctx.negative_slope)
    d_x = d_w = d_b = None
    if ctx.needs_input_grad[0]:
        d_x = task_linear_input_grad(grad_z, w)
    if ctx.needs_input_grad[1]:
        d_w = task_linear_weight_grad(grad_z, x, w.dim() == 2)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_b = grad_z.sum((0, 1)) if ctx.bias_shared else grad_z.sum(1)
    return d_x, d_w, d_b, None, None


task_linear.register_autograd(_task_linear_backward, setup_context=_task_linear_setup)


# ---------------------------------------------------------------------------------------
# task_linear_input_grad: grad_out @ w
# ---------------------------------------------------------------------------------------


task_linear_input_grad = define_op(reference_task_linear_input_grad, NativeCall(
    takes=lambda device_type, grad_out, w: grad_out.dim() == 3 and w.dim() in (2, 3),
    args=lambda grad_out, w: (grad_out.contiguous(), _native_per_task(w, w.dim() == 3)),
))


@task_linear_input_grad.register_fake
def _(grad_out, w):
    return grad_out.new_empty((grad_out.size(0), grad_out.size(1), w.size(-1)))


def _input_grad_setup(ctx, inputs, output):
    grad_out, w = inputs
    ctx.save_for_backward(grad_out, w)


def _input_grad_backward(ctx, upstream):
    grad_out, w = ctx.saved_tensors
    d_grad_out = d_w = None
    if ctx.needs_input_grad[0]:
        d_grad_out = task_linear(upstream, w, None, "none", 0.0)
    if ctx.needs_input_grad[1]:
        d_w = task_linear_weight_grad(grad_out, upstream, w.dim() == 2)
    return d_grad_out, d_w


task_linear_input_grad.register_autograd(_input_grad_backward, setup_context=_input_grad_setup)


# ---------------------------------------------------------------------------------------
# task_linear_weight_grad: grad_outᵀ @ x
# ---------------------------------------------------------------------------------------


task_linear_weight_grad = define_op(reference_task_linear_weight_grad, NativeCall(
    takes=lambda device_type, grad_out, x, shared: grad_out.dim() == 3 and x.dim() == 3,
    args=lambda grad_out, x, shared: (grad_out.contiguous(), x.contiguous(), bool(shared)),
))


@task_linear_weight_grad.register_fake
def _(grad_out, x, shared):
    O, I = grad_out.size(-1), x.size(-1)
    return grad_out.new_empty((O, I) if shared else (grad_out.size(0), O, I))


def _weight_grad_setup(ctx, inputs, output):
    grad_out, x, shared = inputs
    ctx.save_for_backward(grad_out, x)


def _weight_grad_backward(ctx, upstream):
    grad_out, x = ctx.saved_tensors
    d_grad_out = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad_out = task_linear(x, upstream, None, "none", 0.0)
    if ctx.needs_input_grad[1]:
        d_x = task_linear_input_grad(grad_out, upstream)
    return d_grad_out, d_x, None


task_linear_weight_grad.register_autograd(_weight_grad_backward, setup_context=_weight_grad_setup)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def _run_linear(m, x: Tensor, params: dict, act: str, negative_slope: float) -> Tensor | None:
    """nn.Linear on ``[T, N, ..., I]`` (the middle dims folded into N); None below rank 3."""
    if x.dim() < 3:
        return None
    y = task_linear(x.reshape(x.size(0), -1, x.size(-1)), params["weight"], params["bias"], act, negative_slope)
    return y.view(*x.shape[:-1], y.size(-1))


def _samples():
    T, N, O, r = 2, 3, 4, torch.randn
    return {
        "task_linear": lambda: (r(T, N, 5), r(T, O, 5), r(T, O), "relu", 0.0),
        "task_linear_input_grad": lambda: (r(T, N, O), r(T, O, 5)),
        "task_linear_weight_grad": lambda: (r(T, N, O), r(T, N, 5), False),
    }


FAMILY = define_family(OpFamily(
    name="task_linear",
    sample_args=_samples(),
    layer_shapes=lambda m, x_shape: {"T": x_shape[0], "N": math.prod(x_shape[1:-1]), "I": m.in_features,
                                     "O": m.out_features},
    modules={torch.nn.Linear: ModuleOp(params=("weight", "bias"), run=_run_linear, fuses_activation=True)},
    check_seconds=33,
    dry_run_case="test_task_linear_activations and tanh",
))
