"""``inner_step``: one inner-loop gradient step for every task, over the flat buffer.

    θ'[t, p] = θ[t, p] − lr[p] · mask[p] · precond[p] · g[t, p]

Shapes (P = parameters in the flat buffer, T = tasks, S = segments):

- theta: ``[P]`` (shared by all tasks: the first step) or ``[T, P]``;
- grad: ``[T, P]``;
- lr: ``[]`` (one rate), ``[S]`` (one per segment; needs ``segments``) or ``[P]``;
- mask, precond: ``[P]`` or None;
- segments: int64 ``[P]``, the segment index of each parameter; only with ``[S]`` rates.

Returns ``[T, P]``. One launch covers the whole buffer, whatever the number of layers.

Backward: ``inner_step_backward`` returns the five input gradients in one pass, reducing
over tasks for the inputs that are shared (θ ``[P]``, lr, mask, precond) and over
segments for ``[S]`` rates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.backends.table import shared_or_contiguous
from fastmeta.ops.registration import NativeCall, OpFamily, cpu_native_node, define_family, define_op


def _rate_per_parameter(lr: Tensor, segments: Tensor | None) -> Tensor:
    """lr as ``[]`` or ``[P]``: per-segment rates are gathered through ``segments``."""
    return lr[segments] if segments is not None else lr


def step_coefficient(lr: Tensor, mask: Tensor | None, precond: Tensor | None, segments: Tensor | None) -> Tensor:
    """lr · mask · precond, broadcastable against ``[T, P]``."""
    coef = _rate_per_parameter(lr, segments)
    if mask is not None:
        coef = coef * mask
    if precond is not None:
        coef = coef * precond
    return coef


def reference_inner_step(
    theta: Tensor, grad: Tensor, lr: Tensor, mask: Tensor | None, precond: Tensor | None, segments: Tensor | None
) -> Tensor:
    """θ' = θ − lr ⊙ mask ⊙ precond ⊙ g for every task at once. See the module docstring."""
    return theta - step_coefficient(lr, mask, precond, segments) * grad


def reference_inner_step_backward(
    grad_out: Tensor, grad: Tensor, lr: Tensor, mask: Tensor | None, precond: Tensor | None,
    segments: Tensor | None, theta_shared: bool, needs: list[bool],
) -> list[Tensor]:
    """Gradients of inner_step w.r.t. (theta, grad, lr, mask, precond), in one pass.

    ``needs`` (five flags) says which to compute; the others come back empty. The shared
    inputs are reduced over tasks (θ when ``theta_shared``, lr, mask, precond).
    """
    need_theta, need_grad, need_lr, need_mask, need_precond = needs
    def empty():  # outputs of a custom op may not alias each other: one each
        return grad_out.new_empty(0)

    d_theta = (grad_out.sum(0) if theta_shared else grad_out.clone()) if need_theta else empty()
    d_grad = -step_coefficient(lr, mask, precond, segments) * grad_out if need_grad else empty()
    # Each of lr, mask, precond gets −Σ_t grad_out · g · (the product of the other two).
    rate = _rate_per_parameter(lr, segments)
    outer = (grad_out * grad).sum(0).neg()  # [P]: −Σ_t grad_out[t] g[t]
    d_lr, d_mask, d_precond = empty(), empty(), empty()
    if need_lr:
        d = outer
        if mask is not None:
            d = d * mask
        if precond is not None:
            d = d * precond
        if lr.dim() == 0:
            d_lr = d.sum()
        elif segments is not None:
            d_lr = torch.zeros_like(lr).index_add_(0, segments, d)
        else:
            d_lr = d
    if need_mask:
        d = outer * rate
        d_mask = d * precond if precond is not None else d
    if need_precond:
        d = outer * rate
        d_precond = d * mask if mask is not None else d
    return [d_theta, d_grad, d_lr, d_mask, d_precond]


def _native_takes(device_type, grad, lr, segments) -> bool:
    return grad.dim() == 2 and (segments is None or (segments.dtype == torch.int64 and lr.dim() == 1))


def _native_inner_step_args(theta, grad, lr, mask, precond, segments):
    if theta.dim() == 2 and theta.size(0) > 1 and theta.stride(0) == 0:
        theta = theta[0]  # θ.expand(T, P): every task starts from the same θ
    return (theta.contiguous(), grad.contiguous(), lr.contiguous(), shared_or_contiguous(mask, False),
            shared_or_contiguous(precond, False), shared_or_contiguous(segments, False))


inner_step = define_op(reference_inner_step, NativeCall(
    takes=lambda device_type, theta, grad, lr, mask, precond, segments: _native_takes(device_type, grad, lr, segments),
    args=_native_inner_step_args,
))


@inner_step.register_fake
def _(theta, grad, lr, mask, precond, segments):
    return torch.empty_like(grad)


inner_step_backward = define_op(reference_inner_step_backward, NativeCall(
    takes=lambda device_type, grad_out, grad, lr, mask, precond, segments, theta_shared, needs: _native_takes(
        device_type, grad, lr, segments),
    args=lambda grad_out, grad, lr, mask, precond, segments, theta_shared, needs: (
        grad_out.contiguous(), grad.contiguous(), lr.contiguous(), shared_or_contiguous(mask, False),
        shared_or_contiguous(precond, False), shared_or_contiguous(segments, False), bool(theta_shared),
        [bool(n) for n in needs]),
))


@inner_step_backward.register_fake
def _(grad_out, grad, lr, mask, precond, segments, theta_shared, needs):
    T, P = grad_out.shape
    shapes = [
        (P,) if theta_shared else (T, P),
        (T, P),
        tuple(lr.shape),
        (P,),
        (P,),
    ]
    return [grad_out.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _inner_step_setup(ctx, inputs, output):
    theta, grad, lr, mask, precond, segments = inputs
    ctx.theta_shared = theta.dim() == 1
    ctx.save_for_backward(grad, lr, mask, precond, segments)


def _inner_step_backward(ctx, grad_out):
    grad, lr, mask, precond, segments = ctx.saved_tensors
    needs = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.needs_input_grad[2],
        mask is not None and ctx.needs_input_grad[3],
        precond is not None and ctx.needs_input_grad[4],
    ]
    if not any(needs):
        return None, None, None, None, None, None
    outs = inner_step_backward(
        grad_out.contiguous(), grad, lr, mask, precond, segments, ctx.theta_shared, needs
    )
    return (*[o if n else None for o, n in zip(outs, needs)], None)


inner_step.register_autograd(_inner_step_backward, setup_context=_inner_step_setup)

NODE_KERNELS = ("inner_step", "inner_step_backward")  # also what the engine's segment_inner_step stands in for


def _inner_step_native_node(theta, grad, lr, mask, precond, segments):
    """inner_step's node in C++ (``fastmeta_ext::inner_step_node``, csrc/cpu/inner_step.cpp):
    the same graph as :func:`_inner_step_backward`'s Python node, with autograd's engine
    calling the kernels directly. Taken where the kernels take the arguments, on CPU tensors
    of one float dtype (the segment indices int64 on the CPU), where the ``cpu`` backend runs
    both ops; NotImplemented (the Python node) otherwise."""
    if not _native_takes("cpu", grad, lr, segments) or (segments is not None and segments.device.type != "cpu"):
        return NotImplemented
    node = cpu_native_node("inner_step_node", NODE_KERNELS, grad, theta, lr, mask, precond)
    return NotImplemented if node is None else node(theta, grad, lr, mask, precond, segments)[0]


inner_step.register_native_node(_inner_step_native_node)


# inner_step_backward is linear in grad_out and multilinear in (grad, lr, mask, precond);
# its own backward (third-order terms of the meta-loss, and gradgradcheck) is the
# reference's VJP, recorded by autograd.
def _inner_step_backward_setup(ctx, inputs, output):
    grad_out, grad, lr, mask, precond, segments, theta_shared, needs = inputs
    ctx.theta_shared, ctx.needs = theta_shared, needs
    ctx.save_for_backward(grad_out, grad, lr, mask, precond, segments)


def _inner_step_backward_backward(ctx, upstream):
    grad_out, grad, lr, mask, precond, segments = ctx.saved_tensors
    from fastmeta.ops.reference_vjp import reference_vjp

    grads = reference_vjp(
        lambda go, g, r, m, p: reference_inner_step_backward(
            go, g, r, m, p, segments, ctx.theta_shared, ctx.needs
        ),
        (grad_out, grad, lr, mask, precond),
        ctx.needs_input_grad[:5],
        upstream,
    )
    return (*grads, None, None, None)


inner_step_backward.register_autograd(
    _inner_step_backward_backward, setup_context=_inner_step_backward_setup
)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def _samples():
    T, P, r = 2, 37, torch.randn
    return {
        "inner_step": lambda: (r(P), r(T, P), torch.tensor(0.1), None, None, None),
        "inner_step_backward": lambda: (r(T, P), r(T, P), torch.tensor(0.1), None, None, None, True, [True] * 5),
    }


FAMILY = define_family(OpFamily(name="inner_step", sample_args=_samples(), check_seconds=22,
                                dry_run_case="scalar-False-False-shared"))
