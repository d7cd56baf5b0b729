"""``task_batch_norm_max_pool2d``: a per-task BatchNorm (with its fused activation) whose
output only a max pooling reads, as one op: the pooling rides in the BatchNorm's launches.

    pooled, indices = max_pool2d(task_batch_norm(x, γ, β, eps, act), k, stride k, padding 0)

The traced program runs a ``BatchNorm2d → [ReLU / LeakyReLU] → MaxPool2d(k)`` block
through it where a backend has its kernels for the tensors' device: the C++ kernels on the
CPU (csrc/cpu/task_batch_norm.cpp) and the Triton kernels on a GPU once verified
(kernels/task_batch_norm_max_pool2d.py); elsewhere the block runs as the two ops
(``task_batch_norm``, ``max_pool2d``). The savings are launches and memory passes: the
full-size activations are never written, nor the full-size gradient of the pooling's
backward (W4: 88 max-pooling launches per captured second-order iteration ride in the
BatchNorm's).

Shapes:

- ``task_batch_norm_max_pool2d(x, gamma, beta, eps, act, negative_slope, kernel_size)``
  → ``[pooled, indices]``: x ``[T, N, C, H, W]``; γ, β ``[T, C]``, ``[C]`` or None; act
  ``"none"``, ``"relu"`` or ``"leaky_relu"``; kernel_size k ≥ 1 (windows k×k, stride k, no
  padding, floor: ``HO = H // k``). pooled ``[T, N, C, HO, WO]`` and indices (int64, the
  same shape) are exactly ``max_pool2d``'s of ``task_batch_norm``'s output, the tasks
  folded into the batch: the flat position ``h·W + w`` of each maximum in its plane.
- ``task_batch_norm_max_pool2d_backward(grad_pooled, x, gamma, pooled, indices, eps,
  needs, act, negative_slope, kernel_size, dx_addend, dgamma_addend)`` → ``[grad_x,
  grad_gamma, grad_beta]``: ``task_batch_norm_backward`` of ``max_pool2d_backward(grad_pooled)``
  with y (for f') read from the pooled values, which are y at each window's maximum, the
  only element of a window whose gradient is not zero. The addends as task_batch_norm's.
- ``task_batch_norm_max_pool2d_double_backward(grad_pooled, x, gamma, pooled, indices,
  up_x, up_gamma, up_beta, eps, needs, act, negative_slope, kernel_size)`` → ``[d_grad_pooled,
  d_x, d_gamma]``: ``task_batch_norm_double_backward`` of the same, its d grad_z gathered
  at the indices (``max_pool2d_double_backward``).

The indices must come from this op's forward on the same x (as ``max_pool2d_backward``'s
from ``max_pool2d``): the kernels trust each to lie in its window. Only piecewise-linear
activations are taken: f' is then a function of the pooled value alone, and constant where
defined, so no gradient flows through y or the indices (as in task_batch_norm's backward).
A smooth activation's block runs as the two ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.ops.activation import check_activation
from fastmeta.ops.max_pool2d import (
    reference_max_pool2d,
    reference_max_pool2d_backward,
    reference_max_pool2d_double_backward,
)
from fastmeta.ops.reference_vjp import reference_vjp
from fastmeta.ops.registration import NativeCall, OpFamily, cpu_native_node, define_family, define_op
from fastmeta.ops.task_batch_norm import (
    MASK_ACTIVATIONS,
    reference_task_batch_norm,
    reference_task_batch_norm_backward,
    reference_task_batch_norm_double_backward,
)

# The activations the fused ops take: none, and those whose f' the kernels read from y.
POOLED_ACTIVATIONS = ("none", *MASK_ACTIVATIONS)


def _window(k: int) -> tuple[list[int], list[int], list[int]]:
    return [k, k], [k, k], [0, 0]


def _folded(t: Tensor) -> Tensor:
    return t.flatten(0, 1)


def _full_size(pooled_values: Tensor, indices: Tensor, x: Tensor, kernel_size: int) -> Tensor:
    """Values of the pooled maps placed at their maxima in zeros of x's shape (max_pool2d's
    backward: the windows do not overlap, so nothing is summed)."""
    T, N = x.shape[:2]
    out = reference_max_pool2d_backward(_folded(pooled_values), _folded(indices), list(x.shape[3:]),
                                        *_window(kernel_size))
    return out.unflatten(0, (T, N))


def _y_for_mask(pooled: Tensor, indices: Tensor, x: Tensor, act: str, kernel_size: int) -> Tensor | None:
    """y as the BatchNorm backward reads it for f' (None for act "none"): the pooled values
    at the maxima; elsewhere 0, where the gradient is 0 anyway."""
    return None if act == "none" else _full_size(pooled, indices, x, kernel_size)


def reference_task_batch_norm_max_pool2d(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, act: str,
                                         negative_slope: float, kernel_size: int) -> list[Tensor]:
    """[pooled, indices]: max_pool2d of task_batch_norm (module docstring)."""
    T, N = x.shape[:2]
    y = reference_task_batch_norm(x, gamma, beta, eps, act, negative_slope)
    pooled, indices = reference_max_pool2d(_folded(y), *_window(kernel_size))
    return [pooled.unflatten(0, (T, N)), indices.unflatten(0, (T, N))]


def reference_task_batch_norm_max_pool2d_backward(
    grad_pooled: Tensor, x: Tensor, gamma: Tensor | None, pooled: Tensor, indices: Tensor, eps: float,
    needs: list[bool], act: str, negative_slope: float, kernel_size: int, dx_addend: Tensor | None = None,
    dgamma_addend: Tensor | None = None,
) -> list[Tensor]:
    """[grad_x, grad_gamma ``[T, C]``, grad_beta ``[T, C]``] (module docstring); those not
    needed are empty."""
    grad_y = _full_size(grad_pooled, indices, x, kernel_size)
    return reference_task_batch_norm_backward(grad_y, x, gamma, eps, needs, _y_for_mask(pooled, indices, x, act, kernel_size),
                                              act, negative_slope, dx_addend, dgamma_addend)


def reference_task_batch_norm_max_pool2d_double_backward(
    grad_pooled: Tensor, x: Tensor, gamma: Tensor | None, pooled: Tensor, indices: Tensor, up_x: Tensor | None,
    up_gamma: Tensor | None, up_beta: Tensor | None, eps: float, needs: list[bool], act: str, negative_slope: float,
    kernel_size: int,
) -> list[Tensor]:
    """[d_grad_pooled (pooled's shape), d_x, d_gamma ``[T, C]``]: the VJP of the backward for
    the upstream (up_x, up_gamma, up_beta) at its outputs (module docstring)."""
    grad_y = _full_size(grad_pooled, indices, x, kernel_size)
    d_grad_y, d_x, d_gamma = reference_task_batch_norm_double_backward(
        grad_y, x, gamma, up_x, up_gamma, up_beta, eps, needs, _y_for_mask(pooled, indices, x, act, kernel_size), act,
        negative_slope)
    d_grad_pooled = x.new_empty(0)
    if needs[0]:
        d_grad_pooled = reference_max_pool2d_double_backward(_folded(d_grad_y), _folded(indices),
                                                             *_window(kernel_size)).view(indices.shape)
    return [d_grad_pooled, d_x, d_gamma]


# ---------------------------------------------------------------------------------------
# The checks: every argument named
# ---------------------------------------------------------------------------------------


def _check_block(what: str, x: Tensor, act: str, negative_slope: float, kernel_size: int) -> None:
    check_activation(act, negative_slope)
    if act not in POOLED_ACTIVATIONS:
        raise ValueError(f"{what}: act must be one of {POOLED_ACTIVATIONS}, got {act!r}: a smooth activation's "
                         "gradient depends on y at every element, which the pooled maps do not hold (run "
                         "task_batch_norm and max_pool2d)")
    if x.dim() != 5:
        raise ValueError(f"{what}: x must be [T, N, C, H, W], got {list(x.shape)}")
    if int(kernel_size) < 1 or min(x.shape[3:]) < int(kernel_size):
        raise ValueError(f"{what}: kernel_size must be at least 1 and at most the map's height and width "
                         f"{list(x.shape[3:])}, got {kernel_size}")


def _pooled_shape(x: Tensor, kernel_size: int) -> list[int]:
    return [*x.shape[:3], x.size(3) // int(kernel_size), x.size(4) // int(kernel_size)]


def _check_pooled(what: str, x: Tensor, pooled: Tensor, indices: Tensor, kernel_size: int,
                  **others: Tensor) -> None:
    want = _pooled_shape(x, kernel_size)
    for name, t in {"pooled": pooled, "indices": indices, **others}.items():
        if list(t.shape) != want:
            raise ValueError(f"{what}: {name} must be the pooled maps' shape {want} (x {list(x.shape)}, "
                             f"kernel_size {kernel_size}), got {list(t.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{what}: indices must be int64, got {indices.dtype}")


def _check_forward(x, gamma, beta, eps, act, negative_slope, kernel_size) -> None:
    _check_block("task_batch_norm_max_pool2d", x, act, negative_slope, kernel_size)


def _check_backward(grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope, kernel_size,
                    dx_addend=None, dgamma_addend=None) -> None:
    what = "task_batch_norm_max_pool2d_backward"
    _check_block(what, x, act, negative_slope, kernel_size)
    _check_pooled(what, x, pooled, indices, kernel_size, grad_pooled=grad_pooled)
    if dx_addend is not None and (not needs[0] or dx_addend.shape != x.shape):
        raise ValueError(f"{what}: dx_addend must have x's shape {list(x.shape)} and grad_x be needed, got "
                         f"{list(dx_addend.shape)} with needs {list(needs)}")
    if dgamma_addend is not None and (not needs[1] or tuple(dgamma_addend.shape) != (x.size(0), x.size(2))):
        raise ValueError(f"{what}: dgamma_addend must be [T, C] = {[x.size(0), x.size(2)]} and grad_gamma be "
                         f"needed, got {list(dgamma_addend.shape)} with needs {list(needs)}")


def _check_double_backward(grad_pooled, x, gamma, pooled, indices, up_x, up_gamma, up_beta, eps, needs, act,
                           negative_slope, kernel_size) -> None:
    what = "task_batch_norm_max_pool2d_double_backward"
    _check_block(what, x, act, negative_slope, kernel_size)
    _check_pooled(what, x, pooled, indices, kernel_size, grad_pooled=grad_pooled)
    if up_x is not None and up_x.shape != x.shape:
        raise ValueError(f"{what}: up_x must have x's shape {list(x.shape)}, got {list(up_x.shape)}")


# ---------------------------------------------------------------------------------------
# task_batch_norm_max_pool2d
# ---------------------------------------------------------------------------------------


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


task_batch_norm_max_pool2d = define_op(reference_task_batch_norm_max_pool2d, NativeCall(
    takes=lambda device_type, x, gamma, beta, eps, act, negative_slope, kernel_size: x.dim() == 5,
    args=lambda x, gamma, beta, eps, act, negative_slope, kernel_size: (
        x.contiguous(), gamma, beta, float(eps), act, float(negative_slope), int(kernel_size)),
), check=_check_forward)


@task_batch_norm_max_pool2d.register_fake
def _(x, gamma, beta, eps, act, negative_slope, kernel_size):
    shape = _pooled_shape(x, kernel_size)
    return [x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)]


def _setup(ctx, inputs, output):
    x, gamma, beta, eps, act, negative_slope, kernel_size = inputs
    pooled, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.eps, ctx.act, ctx.negative_slope, ctx.kernel_size = eps, act, negative_slope, int(kernel_size)
    ctx.gamma_dim = None if gamma is None else gamma.dim()
    ctx.beta_dim = None if beta is None else beta.dim()
    ctx.save_for_backward(x, gamma, pooled, indices)
    ctx.set_materialize_grads(False)


def _backward(ctx, grads):
    """task_batch_norm's backward (the alias outputs' gradients as the addends: "Why
    addends" in fastmeta/ops/task_batch_norm.py) through the pooled maps."""
    addends = getattr(ctx, "alias_grads", {})
    add_x, add_gamma = addends.get(0), addends.get(1)
    grad_pooled = grads[0]
    if grad_pooled is None:  # only the aliases were read
        return add_x, add_gamma, None, None, None, None, None
    x, gamma, pooled, indices = ctx.saved_tensors
    needs = [
        ctx.needs_input_grad[0],
        ctx.gamma_dim is not None and ctx.needs_input_grad[1],
        ctx.beta_dim is not None and ctx.needs_input_grad[2],
    ]
    if not any(needs):
        return None, None, None, None, None, None, None
    kernel_gamma_addend = add_gamma if ctx.gamma_dim == 2 else None
    grad_x, grad_gamma, grad_beta = task_batch_norm_max_pool2d_backward(
        grad_pooled, x, gamma, pooled, indices, ctx.eps, needs, ctx.act, ctx.negative_slope, ctx.kernel_size,
        add_x, kernel_gamma_addend)
    if needs[1] and ctx.gamma_dim == 1:
        grad_gamma = grad_gamma.sum(0)
        if add_gamma is not None:
            grad_gamma = grad_gamma + add_gamma
    if needs[2] and ctx.beta_dim == 1:
        grad_beta = grad_beta.sum(0)
    return (grad_x if needs[0] else None, grad_gamma if needs[1] else None, grad_beta if needs[2] else None,
            None, None, None, None)


task_batch_norm_max_pool2d.register_autograd(_backward, setup_context=_setup, aliased_inputs=(0, 1))


# The ops whose CPU kernels the C++ nodes call themselves (csrc/cpu/task_batch_norm.cpp,
# "task_batch_norm_max_pool2d and its backward op").
_NODE_KERNELS = ("task_batch_norm_max_pool2d", "task_batch_norm_max_pool2d_backward",
                 "task_batch_norm_max_pool2d_double_backward")


def _block_native_node(x, gamma, beta, eps, act, negative_slope, kernel_size):
    """The block's node in C++ (``fastmeta_ext::task_batch_norm_max_pool2d_node``): the same
    graph as :func:`_backward`'s Python node (alias outputs, addends, the task sums of shared
    γ and β), with autograd's engine calling the C++ kernels directly. Taken for contiguous
    CPU x with γ and β of its dtype where the ``cpu`` backend runs the three ops;
    NotImplemented (the Python node) otherwise."""
    _check_forward(x, gamma, beta, eps, act, negative_slope, kernel_size)
    if x.dim() != 5 or not x.is_contiguous():
        return NotImplemented
    node = cpu_native_node("task_batch_norm_max_pool2d_node", _NODE_KERNELS, x, gamma, beta)
    if node is None:
        return NotImplemented
    out = node(x, gamma, beta, float(eps), act, float(negative_slope), int(kernel_size), x.requires_grad,
               gamma is not None and gamma.requires_grad)
    return out[:2]


task_batch_norm_max_pool2d.register_native_node(_block_native_node)


# ---------------------------------------------------------------------------------------
# task_batch_norm_max_pool2d_backward
# ---------------------------------------------------------------------------------------


task_batch_norm_max_pool2d_backward = define_op(reference_task_batch_norm_max_pool2d_backward, NativeCall(
    takes=lambda device_type, grad_pooled, x, *rest: x.dim() == 5,
    args=lambda grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope, kernel_size, dx_addend=None,
    dgamma_addend=None: (
        grad_pooled.contiguous(), x.contiguous(), gamma, pooled.contiguous(), indices.contiguous(), float(eps),
        [bool(n) for n in needs], act, float(negative_slope), int(kernel_size), _contiguous(dx_addend),
        _contiguous(dgamma_addend)),
), check=_check_backward)


@task_batch_norm_max_pool2d_backward.register_fake
def _(grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope, kernel_size, dx_addend=None,
      dgamma_addend=None):
    T, C = x.size(0), x.size(2)
    return [x.new_empty(s if n else (0,)) for s, n in zip([tuple(x.shape), (T, C), (T, C)], needs)]


def _backward_setup(ctx, inputs, output):
    grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope, kernel_size = inputs[:10]
    ctx.eps, ctx.needs, ctx.act, ctx.negative_slope, ctx.kernel_size = eps, needs, act, negative_slope, kernel_size
    ctx.save_for_backward(grad_pooled, x, gamma, pooled, indices)


def _backward_backward(ctx, upstream):
    """No gradient at the pooled values or the indices: f' is piecewise constant and the
    choice of maxima too (the module docstring). The addends' gradients are the upstream
    of grad_x / grad_γ, unchanged."""
    grad_pooled, x, gamma, pooled, indices = ctx.saved_tensors

    def live(i):
        u = upstream[i]
        return u if ctx.needs[i] and u is not None and u.numel() else None

    wanted = ctx.needs_input_grad  # (the dispatcher's autograd may leave the defaulted addends out)
    d_addends = (live(0) if len(wanted) > 10 and wanted[10] else None,
                 live(1) if len(wanted) > 11 and wanted[11] else None)
    needs = [wanted[0], wanted[1], gamma is not None and wanted[2]]
    nothing = (None,) * 7  # pooled, indices, eps, needs, act, negative_slope, kernel_size
    if not any(needs):
        return (None, None, None, *nothing, *d_addends)[:len(wanted)]
    d_grad_pooled, d_x, d_gamma = task_batch_norm_max_pool2d_double_backward(
        grad_pooled, x, gamma, pooled, indices, live(0), live(1), live(2), ctx.eps, needs, ctx.act,
        ctx.negative_slope, ctx.kernel_size)
    if needs[2] and gamma.dim() == 1:
        d_gamma = d_gamma.sum(0)
    return (d_grad_pooled if needs[0] else None, d_x if needs[1] else None, d_gamma if needs[2] else None,
            *nothing, *d_addends)[:len(wanted)]


task_batch_norm_max_pool2d_backward.register_autograd(_backward_backward, setup_context=_backward_setup)


def _block_backward_native_node(grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope, kernel_size,
                                dx_addend=None, dgamma_addend=None):
    """The backward op's node in C++ (``fastmeta_ext::task_batch_norm_max_pool2d_backward_node``):
    the node the block's C++ node builds under create_graph, the same graph as
    :func:`_backward_backward`'s Python node. Taken where :func:`_block_native_node` would
    be; NotImplemented otherwise."""
    _check_backward(grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope, kernel_size, dx_addend,
                    dgamma_addend)
    if x.dim() != 5 or not x.is_contiguous() or indices.device.type != "cpu":
        return NotImplemented
    node = cpu_native_node("task_batch_norm_max_pool2d_backward_node", _NODE_KERNELS, x, grad_pooled, gamma, pooled,
                           dx_addend, dgamma_addend)
    if node is None:
        return NotImplemented
    return node(grad_pooled, x, gamma, pooled, indices, float(eps), [bool(n) for n in needs], act,
                float(negative_slope), int(kernel_size), dx_addend, dgamma_addend)


task_batch_norm_max_pool2d_backward.register_native_node(_block_backward_native_node)


# ---------------------------------------------------------------------------------------
# task_batch_norm_max_pool2d_double_backward
# ---------------------------------------------------------------------------------------


task_batch_norm_max_pool2d_double_backward = define_op(reference_task_batch_norm_max_pool2d_double_backward, NativeCall(
    takes=lambda device_type, grad_pooled, x, *rest: x.dim() == 5,
    args=lambda grad_pooled, x, gamma, pooled, indices, up_x, up_gamma, up_beta, eps, needs, act, negative_slope,
    kernel_size: (
        grad_pooled.contiguous(), x.contiguous(), gamma, pooled.contiguous(), indices.contiguous(), _contiguous(up_x),
        up_gamma, up_beta, float(eps), [bool(n) for n in needs], act, float(negative_slope), int(kernel_size)),
), check=_check_double_backward)


@task_batch_norm_max_pool2d_double_backward.register_fake
def _(grad_pooled, x, gamma, pooled, indices, up_x, up_gamma, up_beta, eps, needs, act, negative_slope, kernel_size):
    T, C = x.size(0), x.size(2)
    shapes = [tuple(pooled.shape), tuple(x.shape), (T, C)]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


def _double_backward_setup(ctx, inputs, output):
    (grad_pooled, x, gamma, pooled, indices, up_x, up_gamma, up_beta, eps, needs, act, negative_slope,
     kernel_size) = inputs
    ctx.eps, ctx.needs, ctx.act, ctx.negative_slope, ctx.kernel_size = eps, needs, act, negative_slope, kernel_size
    ctx.save_for_backward(grad_pooled, x, gamma, up_x, up_gamma, up_beta, pooled, indices)


def _double_backward_backward(ctx, upstream):
    """Third order (and gradgradcheck of the backward): the exact VJP of the reference, the
    pooled values and the indices held constant."""
    grad_pooled, x, gamma, up_x, up_gamma, up_beta, pooled, indices = ctx.saved_tensors

    def reference(grad_pooled, x, gamma, up_x, up_gamma, up_beta):
        return reference_task_batch_norm_max_pool2d_double_backward(
            grad_pooled, x, gamma, pooled, indices, up_x, up_gamma, up_beta, ctx.eps, ctx.needs, ctx.act,
            ctx.negative_slope, ctx.kernel_size)

    wanted = ctx.needs_input_grad
    d = reference_vjp(reference, (grad_pooled, x, gamma, up_x, up_gamma, up_beta),
                      (wanted[0], wanted[1], wanted[2], wanted[5], wanted[6], wanted[7]), upstream)
    return (d[0], d[1], d[2], None, None, d[3], d[4], d[5], None, None, None, None, None)


task_batch_norm_max_pool2d_double_backward.register_autograd(_double_backward_backward,
                                                             setup_context=_double_backward_setup)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def _samples():
    T, N, C, r = 2, 3, 3, torch.randn
    x = r(T, N, C, 5, 4)  # 5 rows: the last is in no 2×2 window
    gamma, beta = r(T, C), r(C)
    pooled, indices = reference_task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, "relu", 0.0, 2)
    return {
        "task_batch_norm_max_pool2d": lambda: (x, gamma, beta, 1e-5, "relu", 0.0, 2),
        "task_batch_norm_max_pool2d_backward": lambda: (r(*pooled.shape), x, gamma, pooled, indices, 1e-5,
                                                        [True] * 3, "relu", 0.0, 2),
        "task_batch_norm_max_pool2d_double_backward": lambda: (r(*pooled.shape), x, gamma, pooled, indices, r(*x.shape),
                                                               r(T, C), r(C), 1e-5, [True] * 3, "relu", 0.0, 2),
    }


FAMILY = define_family(OpFamily(
    name="task_batch_norm_max_pool2d",
    sample_args=_samples(),
    # The program maps no module to it alone: it fuses a BatchNorm and the MaxPool2d after
    # it (fastmeta/engine/program.py); the workloads' shapes are those of W4's blocks.
    layer_shapes=None,
    check_seconds=30,  # not yet run on a GPU: an estimate (the BatchNorm family's 22 s and its cases' pooling)
    dry_run_case="small and relu",
))
