"""``task_loss``: one loss per task, with its gradient in the same family.

kind ``"cross_entropy"``: pred ``[T, N, K]`` logits, target int64 ``[T, N]`` class
indices; loss[t] = mean over n of −log softmax(pred[t, n])[target[t, n]].

kind ``"mse"``: pred and target ``[T, N, *D]`` floats; loss[t] = mean over n and D of
(pred − target)².

Returns ``[T]``. The per-task mean matches ``F.cross_entropy`` / ``F.mse_loss`` applied
to each task on its own, so summing task losses gives each task its own gradient.

Backward: ``task_loss_grad(pred, target, kind, scale=None)`` → d loss[t] / d pred[t], shape of
pred (softmax − one-hot over N for cross-entropy; 2(pred − target) / (N·D) for MSE), each
task's times ``scale[t]`` where a ``[T]`` scale is given: ``task_loss``'s backward hands it
the upstream gradient of the task losses, so d pred is one kernel, with no multiply after it
(the scale may be an expanded scalar, task stride 0). The reference recomputes it.

Accuracy: ``task_accuracy(pred, target)`` → ``[T]`` in pred's dtype, the share of each task's
N rows whose largest logit (the first of equals; a NaN counts as the largest, as
``torch.argmax`` has it) is at the target class: the query accuracy ``meta_batch`` reports,
in one kernel where ``argmax``, ``eq`` and ``mean`` were three. Not differentiable.

An inner step's both: ``task_loss_and_grad(pred, target, kind)`` → ``(task_loss,
task_loss_grad)`` from one pass (one kernel where they were two): the support losses for the
NaN/Inf check under validation (not differentiable here) and their gradient at pred (which
differentiates as ``task_loss_grad``'s).

The query's both: ``task_loss_and_accuracy(pred, target)`` → ``(task_loss(pred, target,
"cross_entropy"), task_accuracy(pred, target))`` from one pass over pred (one kernel where
they were two); the losses differentiate as ``task_loss``'s, the accuracies do not. The
engine's query step takes it for a built-in cross-entropy.

Double backward: ``task_loss_grad_backward(upstream, pred, target, kind)`` → the VJP of
task_loss_grad w.r.t. pred, in closed form (one op where recomputing the reference with
autograd cost eight aten dispatches per second-order meta-iteration):
p ⊙ (u − Σ_k p_k u_k) / N with p = softmax(pred) for cross-entropy; u · 2 / (N·D) for MSE,
whose VJP w.r.t. target is its negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.ops.registration import NativeCall, OpFamily, cpu_native_node, define_family, define_op
from fastmeta.ops.reference_vjp import reference_vjp

LOSS_KINDS = ("cross_entropy", "mse")


def _per_task_count(pred: Tensor, kind: str) -> int:
    return pred.size(1) if kind == "cross_entropy" else pred[0].numel()


def reference_task_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-task mean loss ``[T]``; see the module docstring."""
    T = pred.size(0)
    if kind == "cross_entropy":
        per_example = F.cross_entropy(
            pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="none"
        )
        return per_example.view(T, -1).mean(1)
    diff = pred - target
    return (diff * diff).reshape(T, -1).mean(1)


def reference_task_loss_grad(pred: Tensor, target: Tensor, kind: str, scale: Tensor | None = None) -> Tensor:
    """d task_loss[t] / d pred[t], the shape of pred; times ``scale[t]`` per task where given."""
    count = _per_task_count(pred, kind)
    if kind == "cross_entropy":
        grad = torch.softmax(pred, dim=-1)
        one_hot = F.one_hot(target, pred.size(-1)).to(pred.dtype)
        grad = (grad - one_hot) / count
    else:
        grad = (pred - target) * (2.0 / count)
    return grad if scale is None else grad * _per_task(scale, pred)


def _per_task(values: Tensor, like: Tensor) -> Tensor:
    """``[T]`` → ``[T, 1, ...]``, broadcasting over the rest of ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def reference_task_loss_grad_backward(upstream: Tensor, pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Σ <upstream, d task_loss_grad / d pred>, the shape of pred: the softmax Jacobian
    applied to upstream row by row for cross-entropy, upstream · 2 / (N·D) for MSE
    (which does not depend on pred; its VJP w.r.t. target is the negative of this)."""
    count = _per_task_count(pred, kind)
    if kind == "cross_entropy":
        p = torch.softmax(pred, dim=-1)
        return p * (upstream - (p * upstream).sum(-1, keepdim=True)) / count
    return upstream * (2.0 / count)


def reference_task_accuracy(pred: Tensor, target: Tensor) -> Tensor:
    """Per-task accuracy ``[T]``; see the module docstring."""
    return (pred.argmax(-1) == target).mean(1, dtype=pred.dtype)


def _native_loss_takes(device_type, pred, target, kind, scale=None) -> bool:
    if pred.dim() < 2:
        return False
    if scale is not None and (scale.dim() != 1 or scale.size(0) != pred.size(0) or scale.dtype != pred.dtype
                              or scale.device != pred.device):
        return False
    if kind == "cross_entropy":
        return pred.dim() == 3 and target.dtype == torch.int64
    return kind == "mse" and target.shape == pred.shape


_NATIVE_LOSS = NativeCall(takes=_native_loss_takes,
                          args=lambda pred, target, kind: (pred.contiguous(), target.contiguous(), kind))

task_loss = define_op(reference_task_loss, _NATIVE_LOSS)


def _scale_for_kernels(scale: Tensor | None) -> Tensor | None:
    """A ``[T]`` scale as the kernels read it: at a task stride of 0 (an expanded scalar, as
    ``sum``'s backward hands it) or 1, else a contiguous copy."""
    if scale is None or scale.size(0) <= 1 or scale.stride(0) in (0, 1):
        return scale
    return scale.contiguous()


@task_loss.register_fake
def _(pred, target, kind):
    return pred.new_empty((pred.size(0),))


def _loss_setup(ctx, inputs, output):
    pred, target, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(pred, target)


def _loss_backward(ctx, grad_loss):
    pred, target = ctx.saved_tensors
    grad = task_loss_grad(pred, target, ctx.kind, grad_loss)  # the upstream as the kernel's scale
    d_target = None
    if ctx.kind == "mse" and ctx.needs_input_grad[1]:
        d_target = -grad
    return grad if ctx.needs_input_grad[0] else None, d_target, None


task_loss.register_autograd(_loss_backward, setup_context=_loss_setup)

# What the C++ nodes call (csrc/cpu/task_loss.cpp): task_loss's backward runs task_loss_grad,
# whose node's backward runs task_loss_grad_backward.
_LOSS_NODE_KERNELS = ("task_loss", "task_loss_grad", "task_loss_grad_backward", "task_loss_and_accuracy",
                      "task_loss_and_grad")


def _loss_node(name: str, pred: Tensor, target: Tensor, kind: str):
    """``fastmeta_ext.<name>`` (a C++ node: the same graph as the Python node, with autograd's
    engine calling the kernels directly) where the kernels take the arguments, on CPU
    tensors (the target of pred's dtype, or int64 class indices), where the ``cpu`` backend
    runs the three ops; None otherwise (the Python node runs)."""
    if kind not in LOSS_KINDS or not _native_loss_takes("cpu", pred, target, kind) or target.device.type != "cpu":
        return None
    return cpu_native_node(name, _LOSS_NODE_KERNELS, pred, target if kind == "mse" else None)


def _loss_native_node(pred, target, kind):
    """task_loss's node in C++ (``fastmeta_ext::task_loss_node``): see :func:`_loss_node`."""
    node = _loss_node("task_loss_node", pred, target, kind)
    return NotImplemented if node is None else node(pred, target, kind)[0]


task_loss.register_native_node(_loss_native_node)


task_loss_grad = define_op(reference_task_loss_grad, NativeCall(
    takes=_native_loss_takes,
    args=lambda pred, target, kind, scale=None: (pred.contiguous(), target.contiguous(), kind,
                                                 _scale_for_kernels(scale)),
))


@task_loss_grad.register_fake
def _(pred, target, kind, scale=None):
    return torch.empty_like(pred)


def _loss_grad_setup(ctx, inputs, output):
    pred, target, kind, *rest = inputs
    scale = rest[0] if rest else None
    ctx.kind = kind
    ctx.save_for_backward(pred, target, scale)


def _loss_grad_backward(ctx, upstream):
    pred, target, scale = ctx.saved_tensors
    # Only MSE's target is differentiable (a cross-entropy target holds class indices);
    # its VJP is −(the VJP w.r.t. pred), negated here only when the target wants it. With a
    # scale, the VJP w.r.t. pred is the unscaled one of upstream · scale, and the scale's
    # own gradient is Σ upstream · (the unscaled gradient) over each task.
    wants_pred = ctx.needs_input_grad[0]
    wants_target = ctx.kind == "mse" and ctx.needs_input_grad[1]
    wants_scale = scale is not None and ctx.needs_input_grad[3]
    d_pred = d_scale = None
    if wants_pred or wants_target:
        scaled = upstream if scale is None else upstream * _per_task(scale, pred)
        d_pred = task_loss_grad_backward(scaled, pred, target, ctx.kind)
    if wants_scale:
        d_scale = (upstream * task_loss_grad(pred, target, ctx.kind)).reshape(pred.size(0), -1).sum(1)
    return (d_pred if wants_pred else None, -d_pred if wants_target else None, None, d_scale)


task_loss_grad.register_autograd(_loss_grad_backward, setup_context=_loss_grad_setup)


def _loss_grad_native_node(pred, target, kind, scale=None):
    """task_loss_grad's node in C++ (``fastmeta_ext::task_loss_grad_node``): see :func:`_loss_node`;
    not with a scale (the Python node runs: task_loss's own backward passes its scale to the
    kernel directly)."""
    if scale is not None:
        return NotImplemented
    node = _loss_node("task_loss_grad_node", pred, target, kind)
    return NotImplemented if node is None else node(pred, target, kind)[0]


task_loss_grad.register_native_node(_loss_grad_native_node)


# ---------------------------------------------------------------------------------------
# task_loss_grad_backward: the loss gradient's VJP w.r.t. pred
# ---------------------------------------------------------------------------------------


def _native_grad_backward_takes(device_type, upstream, pred, target, kind) -> bool:
    return upstream.shape == pred.shape and upstream.dtype == pred.dtype and _native_loss_takes(
        device_type, pred, target, kind)


task_loss_grad_backward = define_op(reference_task_loss_grad_backward, NativeCall(
    takes=_native_grad_backward_takes,
    args=lambda upstream, pred, target, kind: (upstream.contiguous(), pred.contiguous(), target.contiguous(), kind),
))


@task_loss_grad_backward.register_fake
def _(upstream, pred, target, kind):
    return torch.empty_like(pred)


def _grad_backward_setup(ctx, inputs, output):
    upstream, pred, target, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(upstream, pred, target)


def _grad_backward_backward(ctx, grad_out):
    """Third order and gradgradcheck only: autograd of the reference. The output does
    not depend on target (for either kind)."""
    upstream, pred, target = ctx.saved_tensors
    d_upstream, d_pred = reference_vjp(
        lambda u, p: reference_task_loss_grad_backward(u, p, target, ctx.kind),
        (upstream, pred),
        (ctx.needs_input_grad[0], ctx.needs_input_grad[1]),
        grad_out,
    )
    return d_upstream, d_pred, None, None


task_loss_grad_backward.register_autograd(_grad_backward_backward, setup_context=_grad_backward_setup)


# ---------------------------------------------------------------------------------------
# task_accuracy: argmax, compare and mean over the rows in one pass (not differentiable)
# ---------------------------------------------------------------------------------------


def _check_accuracy(pred, target) -> None:
    """Refused, named: pred not ``[T, N, K]`` with K ≥ 1, a target not integer class indices
    ``[T, N]``."""
    if pred.dim() != 3 or pred.size(2) < 1:
        raise ValueError(f"task_accuracy: pred must be [T, N, K] logits with K >= 1, got {tuple(pred.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or (
            tuple(target.shape) != tuple(pred.shape[:2])):
        raise ValueError(f"task_accuracy: target must be integer class indices [T, N] = {tuple(pred.shape[:2])}, "
                         f"got {target.dtype} {tuple(target.shape)}")


task_accuracy = define_op(reference_task_accuracy, NativeCall(
    takes=lambda device_type, pred, target: target.dtype == torch.int64,  # other integer labels: the reference
    args=lambda pred, target: (pred.contiguous(), target.contiguous()),
), check=_check_accuracy)


@task_accuracy.register_fake
def _(pred, target):
    return pred.new_empty((pred.size(0),))


def _accuracy_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output)  # piecewise constant in pred: no gradient to give


def _accuracy_backward(ctx, grad):
    return None, None


task_accuracy.register_autograd(_accuracy_backward, setup_context=_accuracy_setup)


# ---------------------------------------------------------------------------------------
# task_loss_and_accuracy: the query's cross-entropy losses and accuracies in one pass
# ---------------------------------------------------------------------------------------


def reference_task_loss_and_accuracy(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(task_loss(pred, target, "cross_entropy"), task_accuracy(pred, target))``: the
    query's losses ``[T]`` and accuracies ``[T]`` of one ``[T, N, K]`` prediction, in one pass
    over pred where they were two kernels (each row's log-sum-exp and first largest logit
    together). The losses differentiate as ``task_loss``'s; the accuracies do not."""
    return reference_task_loss(pred, target, "cross_entropy"), reference_task_accuracy(pred, target)


def _check_loss_and_accuracy(pred, target) -> None:
    """Refused, named: pred not ``[T, N, K]`` with K ≥ 1, a target not int64 class indices
    ``[T, N]`` (cross-entropy's labels)."""
    if pred.dim() != 3 or pred.size(2) < 1:
        raise ValueError(f"task_loss_and_accuracy: pred must be [T, N, K] logits with K >= 1, got {tuple(pred.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"task_loss_and_accuracy: target must be int64 class indices [T, N] = "
                         f"{tuple(pred.shape[:2])}, got {target.dtype} {tuple(target.shape)}")


task_loss_and_accuracy = define_op(reference_task_loss_and_accuracy, NativeCall(
    takes=lambda device_type, pred, target: _native_loss_takes(device_type, pred, target, "cross_entropy"),
    args=lambda pred, target: (pred.contiguous(), target.contiguous()),
), check=_check_loss_and_accuracy)


@task_loss_and_accuracy.register_fake
def _(pred, target):
    return pred.new_empty((pred.size(0),)), pred.new_empty((pred.size(0),))


def _loss_and_accuracy_setup(ctx, inputs, output):
    pred, target = inputs
    ctx.kind = "cross_entropy"
    ctx.mark_non_differentiable(output[1])  # the accuracy: piecewise constant in pred
    ctx.set_materialize_grads(False)  # no zeros made for the accuracy's (or an unused loss's) gradient
    ctx.save_for_backward(pred, target)


def _loss_and_accuracy_backward(ctx, grad_loss, grad_accuracy):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None
    pred, target = ctx.saved_tensors
    return task_loss_grad(pred, target, "cross_entropy", grad_loss), None


task_loss_and_accuracy.register_autograd(_loss_and_accuracy_backward, setup_context=_loss_and_accuracy_setup)


def _loss_and_accuracy_native_node(pred, target):
    """task_loss_and_accuracy's node in C++ (``fastmeta_ext::task_loss_and_accuracy_node``):
    see :func:`_loss_node`."""
    node = _loss_node("task_loss_and_accuracy_node", pred, target, "cross_entropy")
    return NotImplemented if node is None else tuple(node(pred, target))


task_loss_and_accuracy.register_native_node(_loss_and_accuracy_native_node)


# ---------------------------------------------------------------------------------------
# task_loss_and_grad: an inner step's support losses (checked) and their gradient, one pass
# ---------------------------------------------------------------------------------------


def reference_task_loss_and_grad(pred: Tensor, target: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """``(task_loss(pred, target, kind), task_loss_grad(pred, target, kind))`` from one pass
    over pred, one kernel where they were two: what an inner step needs under validation
    (the support losses, for the NaN/Inf check, and their gradient at pred, which the step
    differentiates with). The losses are not differentiable here (marked so: the step
    differentiates pred with the gradient, never the losses); the gradient differentiates as
    ``task_loss_grad``'s."""
    return reference_task_loss(pred, target, kind), reference_task_loss_grad(pred, target, kind)


task_loss_and_grad = define_op(reference_task_loss_and_grad, _NATIVE_LOSS)


@task_loss_and_grad.register_fake
def _(pred, target, kind):
    return pred.new_empty((pred.size(0),)), torch.empty_like(pred)


def _loss_and_grad_setup(ctx, inputs, output):
    pred, target, kind = inputs
    ctx.kind = kind
    ctx.mark_non_differentiable(output[0])  # the losses: checked, never differentiated
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(pred, target, None)  # as task_loss_grad's node saves them, without a scale


def _loss_and_grad_backward(ctx, grad_losses, upstream):
    """task_loss_grad's backward for the gradient output."""
    if upstream is None:
        return None, None, None
    return _loss_grad_backward(ctx, upstream)[:3]


task_loss_and_grad.register_autograd(_loss_and_grad_backward, setup_context=_loss_and_grad_setup)


def _loss_and_grad_native_node(pred, target, kind):
    """task_loss_and_grad's node in C++ (``fastmeta_ext::task_loss_and_grad_node``: task_loss_grad's
    node with the losses as a first, non-differentiable output): see :func:`_loss_node`."""
    node = _loss_node("task_loss_and_grad_node", pred, target, kind)
    return NotImplemented if node is None else tuple(node(pred, target, kind))


task_loss_and_grad.register_native_node(_loss_and_grad_native_node)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


FAMILY = define_family(OpFamily(
    name="task_loss",
    sample_args={
        "task_loss": lambda: (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), "cross_entropy"),
        "task_loss_grad": lambda: (torch.randn(2, 3, 5), torch.randn(2, 3, 5), "mse"),
        "task_loss_grad_backward": lambda: (torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)),
                                            "cross_entropy"),
        "task_accuracy": lambda: (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))),
        "task_loss_and_accuracy": lambda: (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))),
        "task_loss_and_grad": lambda: (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), "cross_entropy"),
    },
    check_seconds=17,
    dry_run_case="mse-2-3-1",
))
