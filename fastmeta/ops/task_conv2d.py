"""``task_conv2d``: a 2-D convolution with per-task weights, all tasks in one call.

    y[t] = conv2d(x[t], w[t], b[t], stride, padding)

Shapes:

- x: ``[T, N, C, H, W]``;
- w: ``[T, O, C, kh, kw]`` (per task) or ``[O, C, kh, kw]`` (shared). A per-task weight
  with task stride 0 is computed as shared;
- b: ``[T, O]``, ``[O]`` or None;
- stride, padding: two ints each (zero padding, dilation 1, one group).

Returns ``[T, N, O, H', W']``.

The reference runs per-task weights as one grouped convolution (``groups=T``), which is
what torch.func.vmap lowers to. The backward ops close the family under differentiation:

- ``task_conv2d_backward(grad_out, x, w, stride, padding, output_mask)`` → ``(dx, dw)``:
  both gradients of task_conv2d in one op (``output_mask`` says which are wanted; an
  unwanted one is empty and not computed). dw follows w's rank: ``[O, C, kh, kw]`` summed
  over tasks for a 4-D w, ``[T, O, C, kh, kw]`` for a 5-D one (task stride 0 included: an
  expanded weight's gradient is per task, and its expand sums it);
- ``task_conv2d_double_backward(g_dx, g_dw, grad_out, x, w, stride, padding, output_mask)``
  → ``(d_grad_out, d_x, d_w)``: the backward of task_conv2d_backward (below);
- ``task_conv2d_input_grad(grad_out, w, input_size, stride, padding)`` → ``[T, N, C, H, W]``
  and ``task_conv2d_weight_grad(grad_out, x, kernel_size, stride, padding, shared)`` →
  ``[T, O, C, kh, kw]``, or ``[O, C, kh, kw]`` summed over tasks when ``shared``: each
  gradient on its own (the benchmarks and the Triton kernels' tests call them).

**Why one backward op and one double backward op.** task_conv2d's backward as two ops
(input_grad, weight_grad) made two autograd nodes, and the outer backward of second-order
MAML then reached grad_out through both: the engine summed their two gradients of grad_out
with an ``aten::add_`` (one dispatch per conv layer), and each node's own double backward
was two more ops. One node whose double backward is one op computes
d grad_out = conv(g_dx, w) + conv(x, g_dw) with the sum inside the kernel (the second
GEMM accumulates into the first's output): W2's second-order iteration went from 141 to
120 dispatches (tests/engine/test_dispatch_budgets.py has the counts).

**Why addends.** Second-order MAML's inner step runs task_conv2d_backward on x and w as
task_conv2d's node saved them. In the outer backward x and w then receive a gradient from
task_conv2d's node and one from task_conv2d_backward's, and autograd's engine summed the
two with an ``aten::add_`` per tensor. task_conv2d's eager node therefore returns x and w
(those that need a gradient) as alias outputs and saves the aliases
(``register_autograd(..., aliased_inputs=(0, 1))``): task_conv2d_backward's gradients of
them arrive at task_conv2d's own node, whose backward passes them to task_conv2d_backward
as ``dx_addend`` / ``dw_addend``, summed in the kernels (col2im starts from dx_addend, the
weight GEMMs accumulate into dw_addend). task_conv2d_backward's own backward passes the
upstream of dx / dw through to the addends unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.backends import REFERENCE, kernel_choice
from fastmeta.backends.precision import emulated_precision, product_at_precision
from fastmeta.ops.reference_vjp import reference_vjp
from fastmeta.ops.registration import ModuleOp, NativeCall, OpFamily, cpu_native_node, define_family, define_op
from fastmeta.ops.task_linear import each_task_contiguous, is_task_shared


def _fold_tasks_into_channels(t: Tensor) -> Tensor:
    """``[T, N, C, H, W]`` → ``[N, T·C, H, W]``: the layout of a grouped convolution."""
    T, N, C = t.shape[:3]
    return t.transpose(0, 1).reshape(N, T * C, *t.shape[3:])


def _unfold_tasks_from_channels(t: Tensor, T: int) -> Tensor:
    N, TC = t.shape[:2]
    return t.view(N, T, TC // T, *t.shape[2:]).transpose(0, 1).contiguous()


def reference_task_conv2d(x: Tensor, w: Tensor, b: Tensor | None, stride: list[int], padding: list[int]) -> Tensor:
    """conv2d(x[t], w[t], b[t]) for every task; see the module docstring for shapes."""
    T, N = x.shape[:2]
    if w.dim() == 5 and is_task_shared(w):
        w = w[0]
    if b is not None and emulated_precision(x, w) is not None:
        # The emulated modes sum several products: the bias joins once, after them.
        y = reference_task_conv2d(x, w, None, stride, padding)
        return y + (b[:, None, :, None, None] if b.dim() == 2 else b[:, None, None])
    if w.dim() == 4:
        shared_bias = b if b is not None and b.dim() == 1 else None
        y = product_at_precision(lambda x, w: F.conv2d(x, w, shared_bias, stride, padding),
                                 x.reshape(T * N, *x.shape[2:]), w)
        y = y.view(T, N, *y.shape[1:])
        if b is not None and b.dim() == 2:
            y = y + b[:, None, :, None, None]
        return y
    O = w.shape[1]
    bias = None
    if b is not None:
        bias = (b if b.dim() == 2 else b.expand(T, O)).reshape(T * O)
    y = product_at_precision(
        lambda x, w: F.conv2d(_fold_tasks_into_channels(x), w.reshape(T * O, *w.shape[2:]), bias, stride, padding,
                              groups=T), x, w)
    return _unfold_tasks_from_channels(y, T)


def reference_task_conv2d_input_grad(
    grad_out: Tensor, w: Tensor, input_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    """The gradient of task_conv2d at its input x, ``[T, N, C, *input_size]``."""
    T, N = grad_out.shape[:2]
    if w.dim() == 5 and is_task_shared(w):
        w = w[0]
    if w.dim() == 4:
        C = w.shape[1]
        gx = product_at_precision(
            lambda w, g: torch.nn.grad.conv2d_input((T * N, C, *input_size), w, g, stride, padding),
            w, grad_out.reshape(T * N, *grad_out.shape[2:]))
        return gx.view(T, N, *gx.shape[1:])
    O, C = w.shape[1:3]
    gx = product_at_precision(lambda w, g: torch.nn.grad.conv2d_input(
        (N, T * C, *input_size),
        w.reshape(T * O, *w.shape[2:]),
        _fold_tasks_into_channels(g),
        stride,
        padding,
        groups=T,
    ), w, grad_out)
    return _unfold_tasks_from_channels(gx, T)


def reference_task_conv2d_weight_grad(
    grad_out: Tensor,
    x: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    shared: bool,
) -> Tensor:
    """The gradient of task_conv2d at its weight: per task, or summed when ``shared``."""
    T, N, C = x.shape[:3]
    O = grad_out.shape[2]
    if shared:
        return product_at_precision(lambda x, g: torch.nn.grad.conv2d_weight(
            x.reshape(T * N, *x.shape[2:]),
            (O, C, *kernel_size),
            g.reshape(T * N, *g.shape[2:]),
            stride,
            padding,
        ), x, grad_out)
    gw = product_at_precision(lambda x, g: torch.nn.grad.conv2d_weight(
        _fold_tasks_into_channels(x),
        (T * O, C, *kernel_size),
        _fold_tasks_into_channels(g),
        stride,
        padding,
        groups=T,
    ), x, grad_out)
    return gw.view(T, O, C, *kernel_size)


def reference_task_conv2d_backward(
    grad_out: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int], output_mask: list[bool],
    dx_addend: Tensor | None = None, dw_addend: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dx, dw): the gradients of task_conv2d(x, w) at x and w for grad_out, those
    ``output_mask`` leaves out empty. dw is summed over tasks for a 4-D w, per task for a
    5-D one. dx_addend / dw_addend (x's / w's shape, only for a wanted output) are added to
    dx / dw: the gradients task_conv2d's eager node received at its alias outputs (see
    "Why addends" in the module docstring)."""
    dx = dw = grad_out.new_empty(0)
    if output_mask[0]:
        dx = reference_task_conv2d_input_grad(grad_out, w, list(x.shape[3:]), stride, padding)
        if dx_addend is not None:
            dx = dx + dx_addend
    if output_mask[1]:
        dw = reference_task_conv2d_weight_grad(grad_out, x, list(w.shape[-2:]), stride, padding, w.dim() == 4)
        if dw_addend is not None:
            dw = dw + dw_addend
    return dx, dw


def reference_task_conv2d_double_backward(
    g_dx: Tensor | None,
    g_dw: Tensor | None,
    grad_out: Tensor,
    x: Tensor,
    w: Tensor,
    stride: list[int],
    padding: list[int],
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_grad_out, d_x, d_w): the VJP of task_conv2d_backward for the upstream gradients
    g_dx (x's shape) and g_dw (w's shape) at its outputs; None where autograd has none.
    task_conv2d_backward is bilinear in (grad_out, x) and in (grad_out, w), so

        d_grad_out = conv(g_dx, w) + conv(x, g_dw),
        d_x = input_grad(grad_out, g_dw),    d_w = weight_grad(grad_out, g_dx)

    (d_w summed over tasks for a 4-D w). Only the outputs ``output_mask`` flags are
    computed, the others empty; a wanted one whose terms are all absent is zeros."""
    empty = grad_out.new_empty(0)
    d_grad_out = d_x = d_w = empty
    if output_mask[0]:
        d_grad_out = torch.zeros_like(grad_out)
        if g_dx is not None:
            d_grad_out = d_grad_out + reference_task_conv2d(g_dx, w, None, stride, padding)
        if g_dw is not None:
            d_grad_out = d_grad_out + reference_task_conv2d(x, g_dw, None, stride, padding)
    if output_mask[1]:
        d_x = (reference_task_conv2d_input_grad(grad_out, g_dw, list(x.shape[3:]), stride, padding)
               if g_dw is not None else torch.zeros_like(x))
    if output_mask[2]:
        d_w = (reference_task_conv2d_weight_grad(grad_out, g_dx, list(w.shape[-2:]), stride, padding, w.dim() == 4)
               if g_dx is not None else torch.zeros(w.shape, dtype=w.dtype, device=w.device))
    return d_grad_out, d_x, d_w


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------
# How the C++ kernels (csrc/cpu/task_conv2d.cpp) are called
# ---------------------------------------------------------------------------------------


def _native_geometry(kernel, stride, padding, in_size, out_size=None) -> bool:
    """Two values each, stride and kernel ≥ 1, padding ≥ 0, a non-empty output (equal to
    ``out_size`` when given): what the C++ kernels compute; anything else runs the
    reference (which raises where it must). Asked on every call of every conv op: the
    answer is cached per geometry."""
    return _native_geometry_of(tuple(kernel), tuple(stride), tuple(padding), tuple(in_size),
                               None if out_size is None else tuple(out_size))


@functools.lru_cache(maxsize=1024)
def _native_geometry_of(kernel, stride, padding, in_size, out_size) -> bool:
    if not (len(kernel) == len(stride) == len(padding) == len(in_size) == 2):
        return False
    if min(stride) < 1 or min(kernel) < 1 or min(padding) < 0:
        return False
    size = [conv_output_size(n, k, s, p) for n, k, s, p in zip(in_size, kernel, stride, padding)]
    return min(size) >= 1 and (out_size is None or list(out_size) == size)


def _native_weight_takes(w: Tensor, T: int, O: int | None, C: int | None) -> bool:
    return (w.dim() in (4, 5) and (w.dim() == 4 or w.size(0) == T) and (O is None or w.size(-4) == O)
            and (C is None or w.size(-3) == C))


def _task_blocks(t: Tensor | None, per_task_dim: int) -> Tensor | None:
    """For the C++ kernels: a task stride of 0 → the shared tensor; a per-task tensor whose
    tasks are each contiguous (a view of the flat [T, P] buffer) kept as it is, with its
    task stride: no copy of W2's 1.2M-value weights per call; anything else contiguous."""
    if t is None:
        return None
    if t.dim() == per_task_dim and is_task_shared(t):
        return t[0].contiguous()
    if t.dim() == per_task_dim and t.size(0) > 0 and t.stride(0) >= 0 and each_task_contiguous(t):
        return t
    return t.contiguous()


def _native_conv_takes(device_type, x, w, b, stride, padding) -> bool:
    if x.dim() != 5 or not _native_weight_takes(w, x.size(0), None, x.size(2)):
        return False
    if b is not None and tuple(b.shape) not in ((w.size(-4),), (x.size(0), w.size(-4))):
        return False
    return _native_geometry(w.shape[-2:], stride, padding, x.shape[3:])


def _native_input_grad_takes(device_type, grad_out, w, input_size, stride, padding) -> bool:
    if grad_out.dim() != 5 or not _native_weight_takes(w, grad_out.size(0), grad_out.size(2), None):
        return False
    return _native_geometry(w.shape[-2:], stride, padding, input_size, grad_out.shape[3:])


def _native_weight_grad_takes(device_type, grad_out, x, kernel_size, stride, padding, shared) -> bool:
    if grad_out.dim() != 5 or x.dim() != 5 or grad_out.shape[:2] != x.shape[:2]:
        return False
    return _native_geometry(kernel_size, stride, padding, x.shape[3:], grad_out.shape[3:])


def _native_backward_takes(device_type, grad_out, x, w, stride, padding, output_mask, dx_addend=None,
                           dw_addend=None) -> bool:
    if grad_out.dim() != 5 or x.dim() != 5 or grad_out.shape[:2] != x.shape[:2] or len(output_mask) != 2:
        return False
    if not _native_weight_takes(w, x.size(0), grad_out.size(2), x.size(2)):
        return False
    return _native_geometry(w.shape[-2:], stride, padding, x.shape[3:], grad_out.shape[3:])


def _native_double_backward_takes(device_type, g_dx, g_dw, grad_out, x, w, stride, padding, output_mask) -> bool:
    if len(output_mask) != 3 or not _native_backward_takes(device_type, grad_out, x, w, stride, padding, [0, 0]):
        return False
    return (g_dx is None or g_dx.shape == x.shape) and (g_dw is None or g_dw.shape == w.shape)


def _weight_blocks(t: Tensor | None) -> Tensor | None:
    """For the C++ backward ops, whose dw follows w's rank: like :func:`_task_blocks`, but a
    5-D weight stays 5-D (a task stride of 0 included: the kernels read it as shared, and
    its gradient is still per task)."""
    if t is None:
        return None
    if t.dim() == 5 and t.size(0) > 0 and t.stride(0) >= 0 and each_task_contiguous(t):
        return t
    return t.contiguous()


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _ints(values) -> list[int]:
    return [int(v) for v in values]


# ---------------------------------------------------------------------------------------
# task_conv2d
# ---------------------------------------------------------------------------------------


task_conv2d = define_op(reference_task_conv2d, NativeCall(
    takes=_native_conv_takes,
    args=lambda x, w, b, stride, padding: (
        x.contiguous(), _task_blocks(w, 5), _task_blocks(b, 2), _ints(stride), _ints(padding)),
))


@task_conv2d.register_fake
def _(x, w, b, stride, padding):
    kh, kw = w.shape[-2:]
    return x.new_empty(
        (
            x.size(0),
            x.size(1),
            w.size(-4),
            conv_output_size(x.size(3), kh, stride[0], padding[0]),
            conv_output_size(x.size(4), kw, stride[1], padding[1]),
        )
    )


def _task_conv2d_setup(ctx, inputs, output):
    x, w, b, stride, padding = inputs
    ctx.stride, ctx.padding = stride, padding
    ctx.has_bias = b is not None
    ctx.bias_shared = b is not None and b.dim() == 1
    ctx.save_for_backward(x, w)


def _pair_has_kernels_where_fused_has_none(t: Tensor) -> bool:
    """Whether the backend in use runs the reference for task_conv2d_backward on ``t``'s
    device type and dtype but kernels for input_grad and weight_grad: the Triton kernels on
    CUDA until the GPU check records the fused ops as verified there (``auto`` takes only
    verified kernels). There the pair runs, as before the fused ops: the reference would be
    the grouped cuDNN convolution the Triton kernels replace (kernels/task_conv2d.py)."""
    device_type = t.device.type
    return (kernel_choice("task_conv2d_backward", device_type, t.dtype)[0] == REFERENCE
            and kernel_choice("task_conv2d_input_grad", device_type, t.dtype)[0] != REFERENCE
            and kernel_choice("task_conv2d_weight_grad", device_type, t.dtype)[0] != REFERENCE)


def _task_conv2d_backward(ctx, grad_y):
    """grad_y is None on the eager path when only the alias outputs were read; their
    gradients (``ctx.alias_grads``, eager path only) are added to x's and w's in the kernel."""
    x, w = ctx.saved_tensors
    addends = getattr(ctx, "alias_grads", {})
    add_x, add_w = addends.get(0), addends.get(1)
    d_x = d_w = d_b = None
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    if grad_y is None:  # nothing to compute: the inputs' gradients are the aliases'
        return add_x, add_w, None, None, None
    if any(mask) and _pair_has_kernels_where_fused_has_none(x):
        if mask[0]:
            d_x = task_conv2d_input_grad(grad_y, w, list(x.shape[3:]), ctx.stride, ctx.padding)
            d_x = d_x if add_x is None else d_x + add_x
        if mask[1]:
            d_w = task_conv2d_weight_grad(grad_y, x, list(w.shape[-2:]), ctx.stride, ctx.padding, w.dim() == 4)
            d_w = d_w if add_w is None else d_w + add_w
    elif any(mask):  # one op, one node: see the module docstring
        d_x, d_w = task_conv2d_backward(grad_y, x, w, ctx.stride, ctx.padding, mask, add_x, add_w)
        d_x, d_w = (d_x if mask[0] else None), (d_w if mask[1] else None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_b = grad_y.sum((0, 1, 3, 4)) if ctx.bias_shared else grad_y.sum((1, 3, 4))
    return d_x, d_w, d_b, None, None


task_conv2d.register_autograd(_task_conv2d_backward, setup_context=_task_conv2d_setup, aliased_inputs=(0, 1))


# The ops whose CPU kernels the C++ nodes call themselves (csrc/cpu/task_conv2d.cpp,
# "The eager path's autograd nodes in C++").
_NODE_KERNELS = ("task_conv2d", "task_conv2d_backward", "task_conv2d_double_backward")


def _blocks_as_they_are(t: Tensor, per_task_dim: int) -> bool:
    """Whether the C++ kernels take ``t`` as it is: shared and contiguous, or per task with
    each task's block contiguous, at any task stride (0 included: the kernels read it as
    shared, and its gradient stays per task)."""
    if t.dim() == per_task_dim - 1:
        return t.is_contiguous()
    return t.dim() == per_task_dim and t.size(0) > 0 and t.stride(0) >= 0 and each_task_contiguous(t)


def _conv_native_node(x, w, b, stride, padding):
    """task_conv2d's node in C++ (``fastmeta_ext::task_conv2d_node``): the same graph as
    :func:`_task_conv2d_backward`'s Python node (alias outputs, addends, the pair op, the
    bias sum), with autograd's engine calling the C++ kernels directly. Taken for CPU
    tensors of one dtype whose three conv ops the ``cpu`` backend runs, inputs the kernels
    take as they are (x contiguous, :func:`_blocks_as_they_are`); NotImplemented (the
    Python node) otherwise."""
    node = cpu_native_node("task_conv2d_node", _NODE_KERNELS, x, w, b)
    if node is None or not x.is_contiguous() or not _native_conv_takes("cpu", x, w, b, stride, padding) or not _blocks_as_they_are(w, 5) or (
            b is not None and not _blocks_as_they_are(b, 2)):
        return NotImplemented
    return node(x, w, b, _ints(stride), _ints(padding), x.requires_grad, w.requires_grad)[0]


task_conv2d.register_native_node(_conv_native_node)


def _conv_backward_native_node(grad_out, x, w, stride, padding, output_mask, dx_addend=None, dw_addend=None):
    """task_conv2d_backward's node in C++ (``fastmeta_ext::task_conv2d_backward_node``): the
    node task_conv2d's C++ node builds under create_graph, the same graph as
    :func:`_conv_backward_backward`'s Python node. Taken where :func:`_conv_native_node`
    would be (x contiguous, w's blocks as they are); NotImplemented otherwise."""
    _check_backward(grad_out, x, w, stride, padding, output_mask, dx_addend, dw_addend)
    node = cpu_native_node("task_conv2d_backward_node", _NODE_KERNELS[1:], grad_out, x, w, dx_addend, dw_addend)
    if node is None or not x.is_contiguous() or not _blocks_as_they_are(w, 5) or not _native_backward_takes(
            "cpu", grad_out, x, w, stride, padding, output_mask):
        return NotImplemented
    return tuple(node(grad_out, x, w, _ints(stride), _ints(padding), [bool(m) for m in output_mask], dx_addend,
                      dw_addend))


# ---------------------------------------------------------------------------------------
# task_conv2d_backward and its backward, task_conv2d_double_backward
# ---------------------------------------------------------------------------------------


def _check_backward(grad_out, x, w, stride, padding, output_mask, dx_addend=None, dw_addend=None) -> None:
    """Shapes the reference would not refuse (it would return gradients of the wrong
    shape): refused here, naming the argument, before any backend sees them."""
    if x.dim() != 5 or grad_out.dim() != 5 or w.dim() not in (4, 5):
        raise ValueError(f"task_conv2d_backward: x and grad_out must be 5-D and w 4-D or 5-D, got x "
                         f"{tuple(x.shape)}, grad_out {tuple(grad_out.shape)}, w {tuple(w.shape)}")
    if w.size(-3) != x.size(2) or (w.dim() == 5 and w.size(0) != x.size(0)):
        raise ValueError(f"task_conv2d_backward: w {tuple(w.shape)} does not match x {tuple(x.shape)} "
                         "(tasks and input channels)")
    if tuple(grad_out.shape[:3]) != (x.size(0), x.size(1), w.size(-4)):
        raise ValueError(f"task_conv2d_backward: grad_out {tuple(grad_out.shape)} must be [T, N, O] = "
                         f"{(x.size(0), x.size(1), w.size(-4))} and the output maps")
    if len(output_mask) != 2:
        raise ValueError(f"task_conv2d_backward: output_mask holds two flags (dx, dw), got {output_mask}")
    for name, addend, like, wanted in (("dx_addend", dx_addend, x, output_mask[0]),
                                       ("dw_addend", dw_addend, w, output_mask[1])):
        if addend is not None and (not wanted or addend.shape != like.shape):
            raise ValueError(f"task_conv2d_backward: {name} must have shape {tuple(like.shape)} and its output "
                             f"be wanted (output_mask {list(output_mask)}), got {tuple(addend.shape)}")


def _check_double_backward(g_dx, g_dw, grad_out, x, w, stride, padding, output_mask) -> None:
    _check_backward(grad_out, x, w, stride, padding, [True, True])
    if g_dx is not None and g_dx.shape != x.shape:
        raise ValueError(f"task_conv2d_double_backward: g_dx must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(g_dx.shape)}")
    if g_dw is not None and g_dw.shape != w.shape:
        raise ValueError(f"task_conv2d_double_backward: g_dw must have w's shape {tuple(w.shape)}, "
                         f"got {tuple(g_dw.shape)}")
    if len(output_mask) != 3:
        raise ValueError("task_conv2d_double_backward: output_mask holds three flags (d_grad_out, d_x, d_w), "
                         f"got {output_mask}")


task_conv2d_backward = define_op(reference_task_conv2d_backward, check=_check_backward, native=NativeCall(
    takes=_native_backward_takes,
    args=lambda grad_out, x, w, stride, padding, output_mask, dx_addend=None, dw_addend=None: (
        grad_out.contiguous(), x.contiguous(), _weight_blocks(w), _ints(stride), _ints(padding),
        [bool(m) for m in output_mask], _contiguous(dx_addend), _contiguous(dw_addend)),
))


@task_conv2d_backward.register_fake
def _(grad_out, x, w, stride, padding, output_mask, dx_addend=None, dw_addend=None):
    return (x.new_empty(x.shape if output_mask[0] else (0,)), x.new_empty(w.shape if output_mask[1] else (0,)))


def _conv_backward_setup(ctx, inputs, output):
    grad_out, x, w, stride, padding, output_mask = inputs[:6]  # the addends: nothing to save
    ctx.stride, ctx.padding, ctx.output_mask = stride, padding, list(output_mask)
    # An output nothing reads (the empty dx of a first layer, whose input needs no
    # gradient) reaches the backward as None, not as zeros made by an aten op.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_out, x, w)


def _upstream(g: Tensor | None, computed: bool) -> Tensor | None:
    """An upstream gradient that carries something: not None, and of an output that was
    computed (an empty output's gradient, materialised by autograd, is empty too)."""
    return g if computed and g is not None and g.numel() > 0 else None


def _conv_backward_backward(ctx, g_dx, g_dw):
    """One node for both gradients of task_conv2d: its backward is one op, whose
    d grad_out sums the two terms in the kernel (with two nodes, autograd's engine summed
    their gradients of grad_out with an aten add, one more dispatch). The addends are added
    to dx / dw: their gradients are the upstream of dx / dw, unchanged."""
    grad_out, x, w = ctx.saved_tensors
    g_dx, g_dw = _upstream(g_dx, ctx.output_mask[0]), _upstream(g_dw, ctx.output_mask[1])
    needs = ctx.needs_input_grad
    # (The dispatcher's autograd may leave the defaulted addends out of needs_input_grad.)
    d_dx_addend = g_dx if len(needs) > 6 and needs[6] else None
    d_dw_addend = g_dw if len(needs) > 7 and needs[7] else None
    mask = [bool(needs[0]) and (g_dx is not None or g_dw is not None),
            bool(needs[1]) and g_dw is not None,
            bool(needs[2]) and g_dx is not None]
    if not any(mask):
        return (None, None, None, None, None, None, d_dx_addend, d_dw_addend)[:len(needs)]
    d_grad_out, d_x, d_w = task_conv2d_double_backward(g_dx, g_dw, grad_out, x, w, ctx.stride, ctx.padding, mask)
    return (d_grad_out if mask[0] else None, d_x if mask[1] else None, d_w if mask[2] else None,
            None, None, None, d_dx_addend, d_dw_addend)[:len(needs)]


task_conv2d_backward.register_autograd(_conv_backward_backward, setup_context=_conv_backward_setup)
task_conv2d_backward.register_native_node(_conv_backward_native_node)


task_conv2d_double_backward = define_op(reference_task_conv2d_double_backward, check=_check_double_backward,
                                        native=NativeCall(
    takes=_native_double_backward_takes,
    args=lambda g_dx, g_dw, grad_out, x, w, stride, padding, output_mask: (
        _contiguous(g_dx), _weight_blocks(g_dw), grad_out.contiguous(), x.contiguous(), _weight_blocks(w),
        _ints(stride), _ints(padding), [bool(m) for m in output_mask]),
))


@task_conv2d_double_backward.register_fake
def _(g_dx, g_dw, grad_out, x, w, stride, padding, output_mask):
    shapes = (grad_out.shape, x.shape, w.shape)
    return tuple(x.new_empty(shape if wanted else (0,)) for shape, wanted in zip(shapes, output_mask))


def _conv_double_backward_setup(ctx, inputs, output):
    g_dx, g_dw, grad_out, x, w, stride, padding, output_mask = inputs
    ctx.stride, ctx.padding, ctx.output_mask = stride, padding, list(output_mask)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_dx, g_dw, grad_out, x, w)


def _conv_double_backward_backward(ctx, *upstream):
    """Third order (and gradgradcheck of task_conv2d_backward): the exact VJP of the
    reference (fastmeta/ops/reference_vjp.py)."""
    g_dx, g_dw, grad_out, x, w = ctx.saved_tensors
    grads = reference_vjp(
        lambda *inputs: reference_task_conv2d_double_backward(*inputs, ctx.stride, ctx.padding, ctx.output_mask),
        (g_dx, g_dw, grad_out, x, w),
        ctx.needs_input_grad[:5],
        [u if wanted else None for u, wanted in zip(upstream, ctx.output_mask)],
    )
    return (*grads, None, None, None)


task_conv2d_double_backward.register_autograd(
    _conv_double_backward_backward, setup_context=_conv_double_backward_setup
)


# ---------------------------------------------------------------------------------------
# task_conv2d_input_grad
# ---------------------------------------------------------------------------------------


task_conv2d_input_grad = define_op(reference_task_conv2d_input_grad, NativeCall(
    takes=_native_input_grad_takes,
    args=lambda grad_out, w, input_size, stride, padding: (
        grad_out.contiguous(), _task_blocks(w, 5), _ints(input_size), _ints(stride), _ints(padding)),
))


@task_conv2d_input_grad.register_fake
def _(grad_out, w, input_size, stride, padding):
    return grad_out.new_empty((grad_out.size(0), grad_out.size(1), w.size(-3), *input_size))


def _conv_input_grad_setup(ctx, inputs, output):
    grad_out, w, input_size, stride, padding = inputs
    ctx.stride, ctx.padding = stride, padding
    ctx.save_for_backward(grad_out, w)


def _conv_input_grad_backward(ctx, upstream):
    grad_out, w = ctx.saved_tensors
    d_grad_out = d_w = None
    if ctx.needs_input_grad[0]:
        d_grad_out = task_conv2d(upstream, w, None, ctx.stride, ctx.padding)
    if ctx.needs_input_grad[1]:
        d_w = task_conv2d_weight_grad(
            grad_out, upstream, list(w.shape[-2:]), ctx.stride, ctx.padding, w.dim() == 4
        )
    return d_grad_out, d_w, None, None, None


task_conv2d_input_grad.register_autograd(
    _conv_input_grad_backward, setup_context=_conv_input_grad_setup
)


# ---------------------------------------------------------------------------------------
# task_conv2d_weight_grad
# ---------------------------------------------------------------------------------------


task_conv2d_weight_grad = define_op(reference_task_conv2d_weight_grad, NativeCall(
    takes=_native_weight_grad_takes,
    args=lambda grad_out, x, kernel_size, stride, padding, shared: (
        grad_out.contiguous(), x.contiguous(), _ints(kernel_size), _ints(stride), _ints(padding), bool(shared)),
))


@task_conv2d_weight_grad.register_fake
def _(grad_out, x, kernel_size, stride, padding, shared):
    shape = (grad_out.size(2), x.size(2), *kernel_size)
    return grad_out.new_empty(shape if shared else (x.size(0), *shape))


def _conv_weight_grad_setup(ctx, inputs, output):
    grad_out, x, kernel_size, stride, padding, shared = inputs
    ctx.stride, ctx.padding = stride, padding
    ctx.save_for_backward(grad_out, x)


def _conv_weight_grad_backward(ctx, upstream):
    grad_out, x = ctx.saved_tensors
    d_grad_out = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad_out = task_conv2d(x, upstream, None, ctx.stride, ctx.padding)
    if ctx.needs_input_grad[1]:
        d_x = task_conv2d_input_grad(grad_out, upstream, list(x.shape[3:]), ctx.stride, ctx.padding)
    return d_grad_out, d_x, None, None, None, None


task_conv2d_weight_grad.register_autograd(
    _conv_weight_grad_backward, setup_context=_conv_weight_grad_setup
)


# The pair's nodes in C++ (csrc/cpu/task_conv2d.cpp): the same graphs as the two Python
# nodes above, each one's backward the convolution and the other, with autograd's engine
# calling the kernels directly (third order through the public ops). Taken where the
# ``cpu`` backend runs the three ops and the op's kernel takes the arguments (then the
# backward's two kernels take theirs: the same geometry, shapes that follow from it);
# NotImplemented (the Python node) otherwise.
_PAIR_KERNELS = ("task_conv2d", "task_conv2d_input_grad", "task_conv2d_weight_grad")


def _conv_input_grad_native_node(grad_out, w, input_size, stride, padding):
    if not _native_input_grad_takes("cpu", grad_out, w, input_size, stride, padding):
        return NotImplemented
    node = cpu_native_node("task_conv2d_input_grad_node", _PAIR_KERNELS, grad_out, w)
    return NotImplemented if node is None else node(grad_out, w, _ints(input_size), _ints(stride), _ints(padding))[0]


def _conv_weight_grad_native_node(grad_out, x, kernel_size, stride, padding, shared):
    if not _native_weight_grad_takes("cpu", grad_out, x, kernel_size, stride, padding, shared):
        return NotImplemented
    node = cpu_native_node("task_conv2d_weight_grad_node", _PAIR_KERNELS, grad_out, x)
    if node is None:
        return NotImplemented
    return node(grad_out, x, _ints(kernel_size), _ints(stride), _ints(padding), bool(shared))[0]


task_conv2d_input_grad.register_native_node(_conv_input_grad_native_node)
task_conv2d_weight_grad.register_native_node(_conv_weight_grad_native_node)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def _conv_is_supported(m) -> bool:
    return (
        m.groups == 1
        and tuple(m.dilation) == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _run_conv2d(m, x: Tensor, params: dict, act: str, negative_slope: float) -> Tensor | None:
    """nn.Conv2d (groups 1, no dilation, zero padding) on ``[T, N, C, H, W]``; None otherwise."""
    if x.dim() != 5:
        return None
    return task_conv2d(x, params["weight"], params["bias"], list(m.stride), list(m.padding))


def _samples():
    T, N, C, O, r = 2, 3, 3, 4, torch.randn
    x5, w5, g5 = r(T, N, C, 5, 5), r(T, O, C, 3, 3), r(T, N, O, 5, 5)
    return {
        "task_conv2d": lambda: (x5, w5, None, [1, 1], [1, 1]),
        "task_conv2d_input_grad": lambda: (g5, w5, [5, 5], [1, 1], [1, 1]),
        "task_conv2d_weight_grad": lambda: (g5, x5, [3, 3], [1, 1], [1, 1], False),
        "task_conv2d_backward": lambda: (g5, x5, w5, [1, 1], [1, 1], [True, True]),
        "task_conv2d_double_backward": lambda: (x5, r(T, O, C, 3, 3), g5, x5, w5, [1, 1], [1, 1],
                                                [True, True, True]),
    }


FAMILY = define_family(OpFamily(
    name="task_conv2d",
    sample_args=_samples(),
    layer_shapes=lambda m, x_shape: {"T": x_shape[0], "N": x_shape[1], "C": x_shape[2], "H": x_shape[3],
                                     "W": x_shape[4], "O": m.out_channels, "stride": m.stride[0],
                                     "padding": m.padding[0]},
    modules={torch.nn.Conv2d: ModuleOp(params=("weight", "bias"), run=_run_conv2d, accepts=_conv_is_supported)},
    check_seconds=48,
    dry_run_case="per_task-none",
))
