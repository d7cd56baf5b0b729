"""``task_layer_norm``: LayerNorm over the last dimension with per-task affine weights.

    y[t, n] = γ[t] · (x[t, n] − μ[t, n]) / √(σ²[t, n] + eps) + β[t]

μ and σ² (biased) are taken per row, over the last dim D, as ``nn.LayerNorm(D)`` does;
only γ and β differ between tasks.

Shapes:

- x: ``[T, N, ..., D]`` (rank ≥ 2: the task dim and D);
- gamma, beta: ``[T, D]`` (per task), ``[D]`` (shared) or None (``elementwise_affine=False``).

Returns the shape of x.

Backward: ``task_layer_norm_backward(grad_y, x, gamma, eps, needs)`` returns the gradients
at x, γ and β (the last two per task, ``[T, D]``); those not flagged in ``needs`` are empty.

Double backward: the backward's own backward is the exact VJP of its reference
(:mod:`fastmeta.ops.reference_vjp`), built from PyTorch ops and itself differentiable,
so second-order MAML differentiates through the inner loop's LayerNorm gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmeta.backends.table import shared_or_contiguous
from fastmeta.ops.reference_vjp import reference_vjp
from fastmeta.ops.registration import ModuleOp, NativeCall, OpFamily, cpu_native_node, define_family, define_op


def _per_feature(p: Tensor, x: Tensor) -> Tensor:
    """``[T, D]`` or ``[D]`` → broadcastable against x ``[T, N, ..., D]``."""
    if p.dim() == 2:
        return p.reshape(p.size(0), *([1] * (x.dim() - 2)), p.size(1))
    return p


def _normalise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x̂, 1/√(σ² + eps)) with per-row statistics over the last dim (keepdim)."""
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    return centred * rstd, rstd


def _task_sum(v: Tensor) -> Tensor:
    """``[T, ..., D]`` → ``[T, D]``: the sum over every row of each task."""
    return v.reshape(v.size(0), -1, v.size(-1)).sum(1)


def reference_task_layer_norm(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float) -> Tensor:
    """Per-task affine LayerNorm over the last dim; see the module docstring."""
    z, _ = _normalise(x, eps)
    if gamma is not None:
        z = z * _per_feature(gamma, x)
    if beta is not None:
        z = z + _per_feature(beta, x)
    return z


def reference_task_layer_norm_backward(
    grad_y: Tensor, x: Tensor, gamma: Tensor | None, eps: float, needs: list[bool]
) -> list[Tensor]:
    """[grad_x, grad_gamma ``[T, D]``, grad_beta ``[T, D]``]; those not needed are empty.

    Per row, with g = grad_y·γ: grad_x = rstd·(g − mean(g) − x̂·mean(g·x̂)).
    """
    need_x, need_gamma, need_beta = needs
    xhat, rstd = _normalise(x, eps)
    grad_x = x.new_empty(0)
    if need_x:
        g = grad_y if gamma is None else grad_y * _per_feature(gamma, x)
        grad_x = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return [
        grad_x,
        _task_sum(grad_y * xhat) if need_gamma else x.new_empty(0),
        _task_sum(grad_y) if need_beta else x.new_empty(0),
    ]


# ---------------------------------------------------------------------------------------
# task_layer_norm
# ---------------------------------------------------------------------------------------


def _native_takes(device_type, x, *rest) -> bool:
    return x.dim() >= 2 and device_type == "cpu"  # the CUDA sources have no LayerNorm: the reference runs


task_layer_norm = define_op(reference_task_layer_norm, NativeCall(
    takes=lambda device_type, x, gamma, beta, eps: _native_takes(device_type, x),
    args=lambda x, gamma, beta, eps: (
        x.contiguous(), shared_or_contiguous(gamma, True), shared_or_contiguous(beta, True), float(eps)),
))


@task_layer_norm.register_fake
def _(x, gamma, beta, eps):
    return torch.empty_like(x)


def _ln_setup(ctx, inputs, output):
    x, gamma, beta, eps = inputs
    ctx.eps = eps
    ctx.gamma_dim = None if gamma is None else gamma.dim()
    ctx.beta_dim = None if beta is None else beta.dim()
    ctx.save_for_backward(x, gamma)


def _ln_backward(ctx, grad_y):
    x, gamma = ctx.saved_tensors
    needs = [
        ctx.needs_input_grad[0],
        ctx.gamma_dim is not None and ctx.needs_input_grad[1],
        ctx.beta_dim is not None and ctx.needs_input_grad[2],
    ]
    if not any(needs):
        return None, None, None, None
    grad_x, grad_gamma, grad_beta = task_layer_norm_backward(grad_y, x, gamma, ctx.eps, needs)
    if needs[1] and ctx.gamma_dim == 1:
        grad_gamma = grad_gamma.sum(0)
    if needs[2] and ctx.beta_dim == 1:
        grad_beta = grad_beta.sum(0)
    return (
        grad_x if needs[0] else None,
        grad_gamma if needs[1] else None,
        grad_beta if needs[2] else None,
        None,
    )


task_layer_norm.register_autograd(_ln_backward, setup_context=_ln_setup)


def _ln_native_node(x, gamma, beta, eps):
    """task_layer_norm's node in C++ (``fastmeta_ext::task_layer_norm_node``,
    csrc/cpu/task_layer_norm.cpp): the same graph as :func:`_ln_backward`'s Python node, with
    autograd's engine calling the backward kernel directly. Taken for CPU x of at least two
    dims with γ and β of its dtype, where the ``cpu`` backend runs both ops; NotImplemented
    (the Python node) otherwise."""
    if x.dim() < 2:
        return NotImplemented
    node = cpu_native_node("task_layer_norm_node", ("task_layer_norm", "task_layer_norm_backward"), x, gamma, beta)
    return NotImplemented if node is None else node(x, gamma, beta, float(eps))[0]


task_layer_norm.register_native_node(_ln_native_node)


# ---------------------------------------------------------------------------------------
# task_layer_norm_backward
# ---------------------------------------------------------------------------------------


task_layer_norm_backward = define_op(reference_task_layer_norm_backward, NativeCall(
    takes=lambda device_type, grad_y, x, gamma, eps, needs: _native_takes(device_type, x),
    args=lambda grad_y, x, gamma, eps, needs: (
        grad_y.contiguous(), x.contiguous(), shared_or_contiguous(gamma, True), float(eps), [bool(n) for n in needs]),
))


@task_layer_norm_backward.register_fake
def _(grad_y, x, gamma, eps, needs):
    T, D = x.size(0), x.size(-1)
    shapes = [tuple(x.shape), (T, D), (T, D)]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


def _ln_backward_setup(ctx, inputs, output):
    grad_y, x, gamma, eps, needs = inputs
    ctx.eps, ctx.needs = eps, needs
    ctx.save_for_backward(grad_y, x, gamma)


def _ln_backward_backward(ctx, upstream):
    """Second order: the exact VJP of the backward's reference (PyTorch ops, differentiable)."""
    upstream = [u if n and u is not None and u.numel() else None for u, n in zip(upstream, ctx.needs)]
    grads = reference_vjp(
        lambda *inputs: reference_task_layer_norm_backward(*inputs, ctx.eps, ctx.needs),
        ctx.saved_tensors,
        ctx.needs_input_grad[:3],
        upstream,
    )
    return (*grads, None, None)


task_layer_norm_backward.register_autograd(_ln_backward_backward, setup_context=_ln_backward_setup)


# ---------------------------------------------------------------------------------------
# The family: its kernels' samples, its layers' shapes, the modules it runs
# ---------------------------------------------------------------------------------------


def _run_layer_norm(m: torch.nn.LayerNorm, x: Tensor, params: dict, act: str, negative_slope: float) -> Tensor | None:
    """nn.LayerNorm over the last dim on ``[T, N, ..., D]``; None (vmap runs it) otherwise."""
    if len(m.normalized_shape) != 1 or x.dim() < 3 or x.size(-1) != m.normalized_shape[0]:
        return None
    return task_layer_norm(x, params["weight"], params["bias"], float(m.eps))


def _samples():
    T, N, D, r = 2, 3, 7, torch.randn
    x = r(T, N, D)
    return {
        "task_layer_norm": lambda: (x, r(T, D), r(D), 1e-5),
        "task_layer_norm_backward": lambda: (r(T, N, D), x, r(T, D), 1e-5, [True] * 3),
    }


FAMILY = define_family(OpFamily(
    name="task_layer_norm",
    sample_args=_samples(),
    layer_shapes=lambda m, x_shape: {"T": x_shape[0], "N": math.prod(x_shape[1:-1]), "D": x_shape[-1]},
    modules={torch.nn.LayerNorm: ModuleOp(params=("weight", "bias"), run=_run_layer_norm)},
    check_seconds=15,  # not yet run on a GPU: an estimate from task_batch_norm's 22 s, with fewer cases
    dry_run_case="test_task_layer_norm and shape0",
))
