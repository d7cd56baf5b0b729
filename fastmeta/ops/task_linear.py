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
  summed over tasks to ``[O, I]`` when ``shared``;
- ``task_linear_backward(grad_out, x, w, output_mask, ..., bias_shared)`` → (dx, dw, db): the
  two above and the bias's gradient (grad_out summed over the examples, and over the tasks
  for a shared bias) as one op (what task_linear's backward calls: one autograd node, so
  autograd's engine has no two gradients of grad_out to sum, and one launch on CUDA with no
  bias ``sum`` of its own); an output the mask leaves out is empty (numel 0);
- ``task_linear_double_backward(g_dx, g_dw, grad_out, x, w, output_mask, g_db)`` →
  (d_grad_out, d_x, d_w), its backward: d_grad_out = g_dx @ w + x @ g_dwᵀ + g_db (the second
  product accumulated into the first's output by the kernels, g_db broadcast over the
  examples as a bias: at second order no ``add`` of the bias sum's gradient), d_x =
  grad_out @ g_dw, d_w = grad_outᵀ @ g_dx.

**Why addends.** task_linear_backward also takes ``dx_addend`` and ``dw_addend``, added to
dx and dw (the CPU kernels' GEMMs accumulate into them). Second-order MAML's inner step runs
task_linear_backward on x and w as task_linear's node saved them, so in the outer backward
each got a gradient from both nodes, which autograd's engine summed with an ``aten::add_``.
task_linear's eager node returns x and w (those that need a gradient) as alias outputs and
saves the aliases (``register_autograd(..., aliased_inputs=(0, 1))``); the backward op's
gradients of them arrive at task_linear's own node, which passes them as the addends.
task_linear_backward's own backward passes the upstream of dx / dw through to them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmeta.backends.precision import product_at_precision
from fastmeta.backends.table import shared_or_contiguous
from fastmeta.ops.registration import ModuleOp, NativeCall, OpFamily, cpu_native_node, define_family, define_op
from fastmeta.ops.activation import activation_grad, apply_activation, check_activation
from fastmeta.ops.reference_vjp import reference_vjp


def is_task_shared(t: Tensor) -> bool:
    """A per-task tensor whose task stride is 0: every task reads the same values."""
    return t.dim() >= 1 and t.size(0) > 1 and t.stride(0) == 0


def each_task_contiguous(t: Tensor) -> bool:
    """Whether ``t[k]`` is contiguous for every task k (``t[0].is_contiguous()`` without the
    ``select`` dispatch: from the sizes and strides, dims of size 1 ignored, as torch does)."""
    if 0 in t.shape:
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


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


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def reference_task_linear_bias_grad(grad_out: Tensor, shared: bool) -> Tensor:
    """The bias's gradient: grad_out summed over the examples, ``[T, O]``, and over the
    tasks too where the bias is ``shared`` (``[O]``)."""
    return grad_out.sum((0, 1)) if shared else grad_out.sum(1)


def reference_task_linear_backward(grad_out: Tensor, x: Tensor, w: Tensor, output_mask: list[bool],
                                   dx_addend: Tensor | None = None, dw_addend: Tensor | None = None,
                                   bias_shared: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_out @ w, grad_outᵀ @ x, the bias's gradient) of task_linear with its
    activation's gradient applied: ``[T, N, I]``, w's gradient (``[O, I]`` for a 2-D shared
    w, else ``[T, O, I]``) and b's (``[O]`` where ``bias_shared``, else ``[T, O]``); an output
    whose ``output_mask`` entry is False (or absent: the mask may leave out the third) is
    empty and not computed. dx_addend / dw_addend (only for a wanted output) are added to
    dx / dw ("Why addends" above)."""
    d_x = reference_task_linear_input_grad(grad_out, w) if output_mask[0] else _empty(grad_out)
    d_w = reference_task_linear_weight_grad(grad_out, x, w.dim() == 2) if output_mask[1] else _empty(grad_out)
    wants_b = len(output_mask) > 2 and output_mask[2]
    d_b = reference_task_linear_bias_grad(grad_out, bias_shared) if wants_b else _empty(grad_out)
    if output_mask[0] and dx_addend is not None:
        d_x = d_x + dx_addend
    if output_mask[1] and dw_addend is not None:
        d_w = d_w + dw_addend
    return d_x, d_w, d_b


def _broadcast_bias_gradient(g_db: Tensor, like: Tensor) -> Tensor:
    """g_db (``[O]`` or ``[T, O]``) as d grad_out's term ``[T, N, O]``: the VJP of the bias sum."""
    return (g_db if g_db.dim() == 1 else g_db.unsqueeze(1)).expand(like.shape)


def reference_task_linear_double_backward(g_dx: Tensor | None, g_dw: Tensor | None, grad_out: Tensor, x: Tensor,
                                          w: Tensor, output_mask: list[bool],
                                          g_db: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The VJP of task_linear_backward for upstreams g_dx (of dx), g_dw (of dw) and g_db (of
    the bias's gradient), any None when no gradient reached it: (d_grad_out, d_x, d_w) with
    d_grad_out = g_dx @ w + x @ g_dwᵀ + g_db (broadcast over the examples, and the tasks for
    a 1-D g_db), d_x = grad_out @ g_dw, d_w = grad_outᵀ @ g_dx (reduced over tasks for a 2-D
    w); a term whose upstream is None is zero, an output the mask leaves out is empty."""
    d_grad_out = d_x = d_w = _empty(grad_out)
    if output_mask[0]:
        terms = []
        if g_dx is not None:
            terms.append(reference_task_linear(g_dx, w, None, "none", 0.0))
        if g_dw is not None:
            terms.append(reference_task_linear(x, g_dw, None, "none", 0.0))
        if g_db is not None:
            terms.append(_broadcast_bias_gradient(g_db, grad_out))
        d_grad_out = sum(terms[1:], terms[0]) if terms else torch.zeros_like(grad_out)
        if len(terms) == 1 and g_db is not None:
            d_grad_out = d_grad_out.contiguous()
    if output_mask[1]:
        d_x = reference_task_linear_input_grad(grad_out, g_dw) if g_dw is not None else torch.zeros_like(x)
    if output_mask[2]:
        d_w = (reference_task_linear_weight_grad(grad_out, g_dx, w.dim() == 2) if g_dx is not None
               else torch.zeros_like(w))
    return d_grad_out, d_x, d_w


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


def _check_linear(x, w, b, act, negative_slope) -> None:
    """The fused activation: one the table holds (leaky ReLU with a slope ≥ 0), on every path."""
    check_activation(act, negative_slope)


task_linear = define_op(reference_task_linear, NativeCall(
    takes=lambda device_type, x, w, b, act, negative_slope: x.dim() == 3 and w.dim() in (2, 3),
    args=lambda x, w, b, act, negative_slope: (
        x.contiguous(), _native_per_task(w, w.dim() == 3), _native_per_task(b, b is not None and b.dim() == 2),
        act, float(negative_slope)),
), check=_check_linear)


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
    """The alias outputs' gradients (``ctx.alias_grads``, eager path only) go to
    task_linear_backward as the addends of dx and dw."""
    addends = getattr(ctx, "alias_grads", {})
    add_x, add_w = addends.get(0), addends.get(1)
    if grad_y is None:  # only the aliases were read
        return add_x, add_w, None, None, None
    x, w, y = ctx.saved_tensors
    grad_z = grad_y if ctx.act == "none" else activation_grad(grad_y, y, ctx.act, ctx.negative_slope)
    d_x = d_w = d_b = None
    wants = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if any(wants):  # the bias's gradient inside the pair op: no sum of its own (nor, at second order, an add)
        d_x, d_w, d_b = task_linear_backward(grad_z, x, w, wants, add_x if wants[0] else None,
                                             add_w if wants[1] else None, ctx.bias_shared)
        d_x, d_w, d_b = (d if wanted else None for d, wanted in zip((d_x, d_w, d_b), wants))
    return d_x, d_w, d_b, None, None


task_linear.register_autograd(_task_linear_backward, setup_context=_task_linear_setup, aliased_inputs=(0, 1))


# The ops whose CPU kernels the C++ nodes call themselves (csrc/cpu/task_linear.cpp), and,
# with a fused activation, activation_grad's (csrc/cpu/activation.cpp).
_NODE_KERNELS = ("task_linear", "task_linear_backward", "task_linear_double_backward")
_NODE_KERNELS_WITH_ACTIVATION = (*_NODE_KERNELS, "activation_grad")


def _linear_native_node(x, w, b, act, negative_slope):
    """task_linear's node in C++ (``fastmeta_ext::task_linear_node``): the same graph as
    :func:`_task_linear_backward`'s Python node (alias outputs, addends, the pair op, the
    bias sum, a fused activation's gradient through activation_grad's C++ node), with
    autograd's engine calling the C++ kernels directly. Taken for contiguous CPU x with w
    and b of its dtype, where the ``cpu`` backend runs the ops; NotImplemented (the Python
    node) otherwise. The node lays w and b out as the launchers do
    (csrc/cpu/task_linear.cpp, ``native_per_task``)."""
    _check_linear(x, w, b, act, negative_slope)
    if x.dim() != 3 or w.dim() not in (2, 3) or not x.is_contiguous():
        return NotImplemented
    node = cpu_native_node("task_linear_node", _NODE_KERNELS if act == "none" else _NODE_KERNELS_WITH_ACTIVATION,
                           x, w, b)
    if node is None:
        return NotImplemented
    return node(x, w, b, act, float(negative_slope), x.requires_grad, w.requires_grad)[0]


task_linear.register_native_node(_linear_native_node)


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


# The pair's nodes in C++ (csrc/cpu/task_linear.cpp): the same graphs as the two Python
# nodes above, each one's backward the layer and the other, with autograd's engine calling
# the kernels directly (third order through the public ops). Taken for CPU tensors of one
# dtype where the ``cpu`` backend runs the three ops; NotImplemented otherwise.
_PAIR_KERNELS = ("task_linear", "task_linear_input_grad", "task_linear_weight_grad")


def _input_grad_native_node(grad_out, w):
    if grad_out.dim() != 3 or w.dim() not in (2, 3):
        return NotImplemented
    node = cpu_native_node("task_linear_input_grad_node", _PAIR_KERNELS, grad_out, w)
    return NotImplemented if node is None else node(grad_out, w)[0]


def _weight_grad_native_node(grad_out, x, shared):
    if grad_out.dim() != 3 or x.dim() != 3:
        return NotImplemented
    node = cpu_native_node("task_linear_weight_grad_node", _PAIR_KERNELS, grad_out, x)
    return NotImplemented if node is None else node(grad_out, x, bool(shared))[0]


task_linear_input_grad.register_native_node(_input_grad_native_node)
task_linear_weight_grad.register_native_node(_weight_grad_native_node)


# ---------------------------------------------------------------------------------------
# task_linear_backward: (grad_out @ w, grad_outᵀ @ x) as one op
# ---------------------------------------------------------------------------------------


def _native_weight_of_rank(w: Tensor | None) -> Tensor | None:
    """A weight for the backward pair's native kernels, keeping its rank (a 2-D w is shared:
    its gradient is summed over tasks; a per-task w read by every task, ``θ.expand``, is not):
    a task stride of 0 goes as it is (the kernels read w at its task stride), anything else
    as :func:`_native_per_task` makes it."""
    if w is not None and w.dim() == 3 and is_task_shared(w) and each_task_contiguous(w):
        return w
    return _native_per_task(w, w is not None and w.dim() == 3)


def _backward_native_args(grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False):
    return (grad_out.contiguous(), x.contiguous(), _native_weight_of_rank(w), list(output_mask),
            None if dx_addend is None else dx_addend.contiguous(),
            None if dw_addend is None else dw_addend.contiguous(), bool(bias_shared))


def _check_backward(grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False) -> None:
    """An output mask of other than two or three entries, an addend of an output the mask
    leaves out, or of the wrong shape: refused, named."""
    if len(output_mask) not in (2, 3):
        raise ValueError(f"task_linear_backward: output_mask must have 2 or 3 entries (dx, dw[, db]), "
                         f"got {list(output_mask)}")
    for name, addend, shape, wanted in (("dx_addend", dx_addend, (*grad_out.shape[:2], w.shape[-1]), output_mask[0]),
                                        ("dw_addend", dw_addend, tuple(w.shape), output_mask[1])):
        if addend is not None and (not wanted or tuple(addend.shape) != tuple(shape)):
            raise ValueError(f"task_linear_backward: {name} must have shape {tuple(shape)} and its output be "
                             f"wanted (output_mask {list(output_mask)}), got {tuple(addend.shape)}")


task_linear_backward = define_op(reference_task_linear_backward, NativeCall(
    takes=lambda device_type, grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False: (
        grad_out.dim() == 3 and x.dim() == 3 and w.dim() in (2, 3)),
    args=_backward_native_args,
), check=_check_backward)


@task_linear_backward.register_fake
def _(grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False):
    T, N, O = grad_out.shape
    I = x.size(-1)
    d_x = grad_out.new_empty((T, N, I) if output_mask[0] else (0,))
    d_w = grad_out.new_empty(((O, I) if w.dim() == 2 else (T, O, I)) if output_mask[1] else (0,))
    d_b = grad_out.new_empty(((O,) if bias_shared else (T, O)) if len(output_mask) > 2 and output_mask[2] else (0,))
    return d_x, d_w, d_b


def _linear_backward_setup(ctx, inputs, output):
    grad_out, x, w, output_mask = inputs[:4]  # the addends: nothing to save
    ctx.output_mask = [*output_mask, False][:3]
    ctx.save_for_backward(grad_out, x, w)
    ctx.set_materialize_grads(False)  # an output nothing reached: no zeros pushed through


def _linear_backward_backward(ctx, g_dx, g_dw, g_db):
    grad_out, x, w = ctx.saved_tensors
    # A gradient of an output the mask left out (empty) carries nothing.
    g_dx, g_dw, g_db = (g if g is not None and wanted else None for g, wanted in zip((g_dx, g_dw, g_db),
                                                                                     ctx.output_mask))
    # d_x comes only from g_dw and d_w only from g_dx: without its upstream a gradient is
    # zero, returned as None (autograd's zero) rather than computed as a filled tensor.
    wants = [ctx.needs_input_grad[0] and (g_dx is not None or g_dw is not None or g_db is not None),
             ctx.needs_input_grad[1] and g_dw is not None, ctx.needs_input_grad[2] and g_dx is not None]
    # The addends' gradients: the upstream of dx / dw, unchanged. (The dispatcher's autograd
    # may leave the defaulted addends out of needs_input_grad.)
    needs = ctx.needs_input_grad
    d_addends = (g_dx if len(needs) > 4 and needs[4] else None, g_dw if len(needs) > 5 and needs[5] else None)
    tail = (None, *d_addends, None)
    if not any(wants):
        return (None, None, None, *tail)[:len(needs)]
    d_grad_out, d_x, d_w = task_linear_double_backward(g_dx, g_dw, grad_out, x, w, wants,
                                                       g_db if wants[0] else None)
    return (d_grad_out if wants[0] else None, d_x if wants[1] else None, d_w if wants[2] else None,
            *tail)[:len(needs)]


task_linear_backward.register_autograd(_linear_backward_backward, setup_context=_linear_backward_setup)


def _linear_backward_native_node(grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False):
    """task_linear_backward's node in C++ (``fastmeta_ext::task_linear_backward_node``): the
    node task_linear's C++ node builds under create_graph, the same graph as
    :func:`_linear_backward_backward`'s Python node. Taken for CPU tensors of one dtype the
    ``cpu`` backend runs both ops for; NotImplemented otherwise."""
    _check_backward(grad_out, x, w, output_mask, dx_addend, dw_addend, bias_shared)
    if grad_out.dim() != 3 or x.dim() != 3 or w.dim() not in (2, 3):
        return NotImplemented
    node = cpu_native_node("task_linear_backward_node", _NODE_KERNELS[1:], grad_out, x, w, dx_addend, dw_addend)
    if node is None:
        return NotImplemented
    return tuple(node(grad_out, x, w, [bool(m) for m in output_mask], dx_addend, dw_addend, bool(bias_shared)))


task_linear_backward.register_native_node(_linear_backward_native_node)


# ---------------------------------------------------------------------------------------
# task_linear_double_backward: task_linear_backward's VJP as one op
# ---------------------------------------------------------------------------------------


def _double_backward_native_args(g_dx, g_dw, grad_out, x, w, output_mask, g_db=None):
    return (None if g_dx is None else g_dx.contiguous(), _native_weight_of_rank(g_dw), grad_out.contiguous(),
            x.contiguous(), _native_weight_of_rank(w), list(output_mask),
            g_db if g_db is None or g_db.stride(-1) == 1 else g_db.contiguous())  # read at its task stride


def _double_backward_takes(device_type, g_dx, g_dw, grad_out, x, w, output_mask, g_db=None):
    return (grad_out.dim() == 3 and x.dim() == 3 and w.dim() in (2, 3) and (g_dx is None or g_dx.dim() == 3)
            and (g_dw is None or g_dw.dim() == w.dim()) and (g_db is None or g_db.dim() in (1, 2)))


def _check_double_backward(g_dx, g_dw, grad_out, x, w, output_mask, g_db=None) -> None:
    """A bias gradient's upstream not shaped ``[O]`` or ``[T, O]``: refused, named."""
    if g_db is not None and tuple(g_db.shape) not in ((grad_out.size(2),), tuple(grad_out.shape[::2])):
        raise ValueError(f"task_linear_double_backward: g_db must be [O] or [T, O] = {tuple(grad_out.shape[::2])}, "
                         f"got {tuple(g_db.shape)}")


task_linear_double_backward = define_op(reference_task_linear_double_backward, NativeCall(
    takes=_double_backward_takes, args=_double_backward_native_args,
), check=_check_double_backward)


@task_linear_double_backward.register_fake
def _(g_dx, g_dw, grad_out, x, w, output_mask, g_db=None):
    return tuple(t.new_empty(t.shape if wanted else (0,)) for t, wanted in zip((grad_out, x, w), output_mask))


def _double_backward_setup(ctx, inputs, output):
    g_dx, g_dw, grad_out, x, w, output_mask = inputs[:6]
    g_db = inputs[6] if len(inputs) > 6 else None
    ctx.output_mask = list(output_mask)
    ctx.save_for_backward(g_dx, g_dw, grad_out, x, w, g_db)


def _double_backward_backward(ctx, *upstream):
    """Third order and gradgradcheck only: autograd of the reference."""
    g_dx, g_dw, grad_out, x, w, g_db = ctx.saved_tensors
    mask = ctx.output_mask
    upstream = [u if u is not None and wanted else None for u, wanted in zip(upstream, mask)]
    needs = ctx.needs_input_grad
    grads = reference_vjp(
        lambda a, b, go, xx, ww, gb: reference_task_linear_double_backward(a, b, go, xx, ww, mask, gb),
        (g_dx, g_dw, grad_out, x, w, g_db), (*needs[:5], len(needs) > 6 and needs[6]), upstream)
    return (*grads[:5], None, grads[5])[:len(needs)]


task_linear_double_backward.register_autograd(_double_backward_backward, setup_context=_double_backward_setup)


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
        "task_linear_backward": lambda: (r(T, N, O), r(T, N, 5), r(T, O, 5), [True, True, True]),
        "task_linear_double_backward": lambda: (r(T, N, 5), r(T, O, 5), r(T, N, O), r(T, N, 5), r(T, O, 5),
                                                [True, True, True], r(T, O)),
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
