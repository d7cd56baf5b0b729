"""``max_pool2d``: 2-D max pooling that returns where each maximum came from, and the two
ops that close it under differentiation.

Max pooling treats every example on its own, so the task dim is folded into the batch
before the call (the traced program passes ``[T·N, C, H, W]``).

Shapes:

- ``max_pool2d(x, kernel_size, stride, padding)`` → ``[y, indices]``: x ``[B, C, H, W]``;
  y ``[B, C, Ho, Wo]`` with ``Ho = (H + 2·pad − k)/stride + 1`` (floor, no dilation, no
  ceil mode); indices (int64, the same shape) the flat position ``h·W + w`` of each
  maximum within its ``H×W`` plane, as ``F.max_pool2d(..., return_indices=True)`` gives it
  (padding never wins; among equal values the first in row-major order; a NaN always
  wins, and the last NaN of a window).
- ``max_pool2d_backward(grad_y, indices, input_size, kernel_size, stride, padding)`` →
  grad_x ``[B, C, H, W]``: each ``grad_y`` value added at its maximum's position (a
  scatter-add: windows that overlap may pick the same input); ``input_size`` is ``[H, W]``.
- ``max_pool2d_double_backward(grad_grad_x, indices, kernel_size, stride, padding)`` →
  ``[B, C, Ho, Wo]``: the backward is linear in ``grad_y``, so its own backward is the
  gather of the upstream gradient at the indices.

Both backward ops take the forward's window (kernel_size, stride, padding), and check that
the pooled maps have the size it gives. The references and the C++ kernels do not need it
(they scatter and gather by the indices); the Triton backward computes each input's
gradient from the outputs whose windows cover it (a gather: every element written once, no
zero fill, no atomics), which needs the window. Like aten's own max-pooling backward, it
relies on each index lying inside its output's window: the indices must come from
``max_pool2d`` with the same window. The indices are piecewise constant in x: no gradient flows to x through
  them (the derivative is zero wherever it exists; max pooling is kinked where two window
  values tie).

So every order of derivative runs through these three ops: the backward's backward is
the gather, the gather's backward the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.ops.registration import ModuleOp, NativeCall, OpFamily, cpu_native_node, define_family, define_op


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def reference_max_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> list[Tensor]:
    """[y, indices]; see the module docstring."""
    y, indices = F.max_pool2d(x, kernel_size, stride, padding, return_indices=True)
    return [y, indices]


def reference_max_pool2d_backward(grad_y: Tensor, indices: Tensor, input_size: list[int], kernel_size: list[int],
                                  stride: list[int], padding: list[int]) -> Tensor:
    """grad_y scattered (summed) at the indices into zeros ``[B, C, H, W]`` (the window is
    only checked: module docstring)."""
    B, C = grad_y.shape[:2]
    H, W = input_size
    out = grad_y.new_zeros(B, C, H * W)
    return out.scatter_add_(2, indices.reshape(B, C, -1), grad_y.reshape(B, C, -1)).view(B, C, H, W)


def reference_max_pool2d_double_backward(grad_grad_x: Tensor, indices: Tensor, kernel_size: list[int],
                                         stride: list[int], padding: list[int]) -> Tensor:
    """grad_grad_x ``[B, C, H, W]`` gathered at the indices → ``[B, C, Ho, Wo]``."""
    B, C = grad_grad_x.shape[:2]
    return grad_grad_x.reshape(B, C, -1).gather(2, indices.reshape(B, C, -1)).view(indices.shape)


def _check_window(what: str, kernel_size: list[int], stride: list[int], padding: list[int]) -> None:
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
        if len(v) != 2:
            raise ValueError(f"{what}: {name} must have two values (height, width), got {list(v)}")
    if min(kernel_size) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{what}: kernel_size and stride must be positive and padding non-negative, got "
                         f"kernel_size={list(kernel_size)}, stride={list(stride)}, padding={list(padding)}")
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"{what}: padding must be at most half the kernel size, got padding={list(padding)} "
                         f"for kernel_size={list(kernel_size)}")


def _pooled_shape(plane, kernel_size, stride, padding) -> list[int]:
    return [pooled_size(s, k, st, p) for s, k, st, p in zip(plane, kernel_size, stride, padding)]


def _check_pool(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> None:
    if x.dim() != 4:
        raise ValueError(f"max_pool2d: x must be [B, C, H, W], got {list(x.shape)}")
    _check_window("max_pool2d", kernel_size, stride, padding)
    if min(_pooled_shape(x.shape[2:], kernel_size, stride, padding)) < 1:
        raise ValueError(f"max_pool2d: the output would be empty: input {list(x.shape[2:])}, "
                         f"kernel_size={list(kernel_size)}, stride={list(stride)}, padding={list(padding)}")


def _check_pooled(what: str, pooled: Tensor, plane, kernel_size, stride, padding) -> None:
    """The pooled maps (grad_y, or the indices) have the size the window gives the plane."""
    _check_window(what, kernel_size, stride, padding)
    want = _pooled_shape(plane, kernel_size, stride, padding)
    if list(pooled.shape[2:]) != want:
        raise ValueError(f"{what}: the pooled maps must be {want[0]}x{want[1]} for a {plane[0]}x{plane[1]} plane and "
                         f"kernel_size={list(kernel_size)}, stride={list(stride)}, padding={list(padding)}, got "
                         f"{list(pooled.shape)}")


def _check_indices(grad: Tensor, indices: Tensor, what: str) -> None:
    if indices.dtype != torch.int64:
        raise TypeError(f"{what}: indices must be int64, got {indices.dtype}")
    if grad.dim() != 4 or indices.dim() != 4 or grad.shape[:2] != indices.shape[:2]:
        raise ValueError(f"{what}: the gradient and the indices must be [B, C, ...] of the same B and C, got "
                         f"{list(grad.shape)} and {list(indices.shape)}")


def _check_backward(grad_y: Tensor, indices: Tensor, input_size: list[int], kernel_size: list[int],
                    stride: list[int], padding: list[int]) -> None:
    _check_indices(grad_y, indices, "max_pool2d_backward")
    if grad_y.shape != indices.shape:
        raise ValueError(f"max_pool2d_backward: grad_y and indices must have one shape, got "
                         f"{list(grad_y.shape)} and {list(indices.shape)}")
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"max_pool2d_backward: input_size must be [H, W], got {list(input_size)}")
    _check_pooled("max_pool2d_backward", grad_y, input_size, kernel_size, stride, padding)


def _check_double_backward(grad_grad_x: Tensor, indices: Tensor, kernel_size: list[int], stride: list[int],
                           padding: list[int]) -> None:
    _check_indices(grad_grad_x, indices, "max_pool2d_double_backward")
    _check_pooled("max_pool2d_double_backward", indices, grad_grad_x.shape[2:], kernel_size, stride, padding)


def _on_cpu(device_type, *rest) -> bool:
    # The CUDA extension has no max pooling: on a GPU the Triton kernels (kernels/max_pool2d.py)
    # run once the GPU check has verified them, the reference until then.
    return device_type == "cpu"


# ---------------------------------------------------------------------------------------
# max_pool2d
# ---------------------------------------------------------------------------------------


max_pool2d = define_op(reference_max_pool2d, NativeCall(
    takes=_on_cpu,
    args=lambda x, kernel_size, stride, padding: (x.contiguous(), list(kernel_size), list(stride), list(padding)),
), check=_check_pool)


@max_pool2d.register_fake
def _(x, kernel_size, stride, padding):
    shape = (x.size(0), x.size(1), *(pooled_size(s, k, st, p) for s, k, st, p in
                                      zip(x.shape[2:], kernel_size, stride, padding)))
    return [x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)]


def _pool_setup(ctx, inputs, output):
    x, kernel_size, stride, padding = inputs
    ctx.input_size = [x.size(2), x.size(3)]
    ctx.window = (list(kernel_size), list(stride), list(padding))
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)


def _pool_backward(ctx, grads):
    grad_y = grads[0]
    if grad_y is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    (indices,) = ctx.saved_tensors
    return max_pool2d_backward(grad_y, indices, ctx.input_size, *ctx.window), None, None, None


max_pool2d.register_autograd(_pool_backward, setup_context=_pool_setup)


# ---------------------------------------------------------------------------------------
# max_pool2d_backward: the scatter-add
# ---------------------------------------------------------------------------------------


max_pool2d_backward = define_op(reference_max_pool2d_backward, NativeCall(
    takes=_on_cpu,
    args=lambda grad_y, indices, input_size, kernel_size, stride, padding: (
        grad_y.contiguous(), indices.contiguous(), list(input_size), list(kernel_size), list(stride), list(padding)),
), check=_check_backward)


@max_pool2d_backward.register_fake
def _(grad_y, indices, input_size, kernel_size, stride, padding):
    return grad_y.new_empty((grad_y.size(0), grad_y.size(1), *input_size))


def _backward_setup(ctx, inputs, output):
    grad_y, indices, input_size, kernel_size, stride, padding = inputs
    ctx.window = (list(kernel_size), list(stride), list(padding))
    ctx.save_for_backward(indices)
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, upstream):
    if upstream is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    (indices,) = ctx.saved_tensors
    return max_pool2d_double_backward(upstream, indices, *ctx.window), None, None, None, None, None


max_pool2d_backward.register_autograd(_backward_backward, setup_context=_backward_setup)


# ---------------------------------------------------------------------------------------
# max_pool2d_double_backward: the gather
# ---------------------------------------------------------------------------------------


max_pool2d_double_backward = define_op(reference_max_pool2d_double_backward, NativeCall(
    takes=_on_cpu,
    args=lambda grad_grad_x, indices, kernel_size, stride, padding: (
        grad_grad_x.contiguous(), indices.contiguous(), list(kernel_size), list(stride), list(padding)),
), check=_check_double_backward)


@max_pool2d_double_backward.register_fake
def _(grad_grad_x, indices, kernel_size, stride, padding):
    return grad_grad_x.new_empty(indices.shape)


def _gather_setup(ctx, inputs, output):
    grad_grad_x, indices, kernel_size, stride, padding = inputs
    ctx.input_size = [grad_grad_x.size(2), grad_grad_x.size(3)]
    ctx.window = (list(kernel_size), list(stride), list(padding))
    ctx.save_for_backward(indices)
    ctx.set_materialize_grads(False)


def _gather_backward(ctx, upstream):
    if upstream is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    (indices,) = ctx.saved_tensors
    return max_pool2d_backward(upstream, indices, ctx.input_size, *ctx.window), None, None, None, None


max_pool2d_double_backward.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---------------------------------------------------------------------------------------
# The nodes in C++ (csrc/cpu/max_pool2d.cpp): the same graphs as the Python nodes above,
# with autograd's engine calling the kernels directly. Taken for CPU tensors of a dtype the
# kernels are compiled for, where the ``cpu`` backend runs the three ops; NotImplemented
# (the Python node) otherwise. The arguments are checked first, as the Python path checks
# them.
# ---------------------------------------------------------------------------------------

_NODE_KERNELS = ("max_pool2d", "max_pool2d_backward", "max_pool2d_double_backward")


def _pool_native_node(x, kernel_size, stride, padding):
    _check_pool(x, kernel_size, stride, padding)
    node = cpu_native_node("max_pool2d_node", _NODE_KERNELS, x)
    return NotImplemented if node is None else node(x, list(kernel_size), list(stride), list(padding))


def _scatter_native_node(grad_y, indices, input_size, kernel_size, stride, padding):
    _check_backward(grad_y, indices, input_size, kernel_size, stride, padding)
    node = cpu_native_node("max_pool2d_backward_node", _NODE_KERNELS, grad_y)
    if node is None or indices.device.type != "cpu":
        return NotImplemented
    return node(grad_y, indices, list(input_size), list(kernel_size), list(stride), list(padding))[0]


def _gather_native_node(grad_grad_x, indices, kernel_size, stride, padding):
    _check_double_backward(grad_grad_x, indices, kernel_size, stride, padding)
    node = cpu_native_node("max_pool2d_double_backward_node", _NODE_KERNELS, grad_grad_x)
    if node is None or indices.device.type != "cpu":
        return NotImplemented
    return node(grad_grad_x, indices, list(kernel_size), list(stride), list(padding))[0]


max_pool2d.register_native_node(_pool_native_node)
max_pool2d_backward.register_native_node(_scatter_native_node)
max_pool2d_double_backward.register_native_node(_gather_native_node)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def window_pair(v) -> list[int]:
    """A module's int-or-pair window argument as ``[height, width]``."""
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _accepts(m: nn.MaxPool2d) -> bool:
    """The configurations the op implements; any other (dilation, ceil mode, returned
    indices) runs nn.MaxPool2d itself, with the tasks folded into the batch."""
    return window_pair(m.dilation) == [1, 1] and not m.ceil_mode and not m.return_indices


def _run_max_pool(m: nn.MaxPool2d, x: Tensor, params: dict, act: str, negative_slope: float) -> Tensor | None:
    """nn.MaxPool2d on ``[T, N, C, H, W]`` (tasks and examples folded into the batch); None
    for any other rank (the module then runs under vmap)."""
    if x.dim() != 5:
        return None
    kernel = window_pair(m.kernel_size)
    stride = window_pair(m.stride if m.stride is not None else m.kernel_size)
    y, _ = max_pool2d(x.flatten(0, 1), kernel, stride, window_pair(m.padding))
    return y.unflatten(0, x.shape[:2])


def _samples():
    r = torch.randn
    x = r(2, 3, 6, 5)
    y, indices = reference_max_pool2d(x, [2, 2], [2, 2], [0, 0])
    return {
        "max_pool2d": lambda: (x, [2, 2], [2, 2], [0, 0]),
        "max_pool2d_backward": lambda: (r(*y.shape), indices, [6, 5], [2, 2], [2, 2], [0, 0]),
        "max_pool2d_double_backward": lambda: (r(*x.shape), indices, [2, 2], [2, 2], [0, 0]),
    }


FAMILY = define_family(OpFamily(
    name="max_pool2d",
    sample_args=_samples(),
    layer_shapes=lambda m, x_shape: {"B": x_shape[0] * x_shape[1], "C": x_shape[2], "H": x_shape[3],
                                     "W": x_shape[4], "kernel_size": window_pair(m.kernel_size)},
    modules={nn.MaxPool2d: ModuleOp(params=(), run=_run_max_pool, accepts=_accepts)},
    check_seconds=20,  # not yet run on a GPU: an estimate (three elementwise kernels, the W4 pools and the small cases)
    dry_run_case="triton_kernel and 2x2",
))
