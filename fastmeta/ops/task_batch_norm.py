"""``task_batch_norm``: batch normalisation with per-task batch statistics.

    y[t] = act(γ[t] · (x[t] − μ[t]) / √(σ²[t] + eps) + β[t])

μ[t] and σ²[t] (biased) are taken per task and channel, over the task's N examples and
the spatial dims: MAML's transductive setting. Running statistics are never read or
written.

Shapes:

- x: ``[T, N, C, *spatial]`` (no spatial dims for BatchNorm1d on features);
- gamma, beta: ``[T, C]`` (per task), ``[C]`` (shared) or None (``affine=False``);
- act: see :mod:`fastmeta.ops.activation`.

Returns the shape of x.

Backward: ``task_batch_norm_backward(grad_z, x, gamma, eps, needs, y, act,
negative_slope)`` returns the gradients at x, γ and β (the last two per task, ``[T, C]``)
from the gradient at the normalised, scaled, shifted value z (before the activation).
This is where torch.func's vmap gets second-order MAML wrong.

Double backward: ``task_batch_norm_double_backward(grad_z, x, gamma, up_x, up_gamma,
up_beta, eps, needs, y, act, negative_slope)`` is the backward of that backward in closed
form, one kernel (second-order MAML spends its outer backward here): from the upstream
gradients at grad_x (x's shape), grad_γ and grad_β (``[T, C]`` or ``[C]``; any may be
None) it returns the gradients at grad_z, x and γ (per task, ``[T, C]``). Its own backward
(third order, and gradgradcheck) is the exact VJP of its reference
(:mod:`fastmeta.ops.reference_vjp`).

**The activation gradient, fused.** For a piecewise-linear activation (relu, leaky_relu)
both take the forward's output y and the activation: their first argument is then the
gradient at y, and the kernels apply f'(z) = f'(y) (a mask) to it as they read it, so
``activation_grad`` is no op of its own: ``grad_z = grad_y·f'(y)``. The double backward
returns the gradient at grad_y, f'(y)·(the one at grad_z); f' is constant where defined,
so nothing depends on y and no gradient at y is computed. A smooth activation (tanh,
sigmoid) has a gradient at y (d f'/dy ≠ 0): the op layer runs ``activation_grad`` first and
calls these with y None (act "none"); passing y with one is refused, naming ``act``.

**Why addends.** Second-order MAML's inner step runs task_batch_norm_backward on x and γ
as task_batch_norm's node saved them. In the outer backward x and γ then receive a
gradient from task_batch_norm's node and one from task_batch_norm_backward's, and
autograd's engine summed the two with an ``aten::add_`` per tensor. task_batch_norm's
eager node therefore returns x and γ (those that need a gradient; β is not read by the
backward) as alias outputs and saves the aliases (``register_autograd(...,
aliased_inputs=(0, 1))``): task_batch_norm_backward's gradients of them arrive at
task_batch_norm's own node, whose backward passes them to task_batch_norm_backward as
``dx_addend`` / ``dgamma_addend``, added in the kernel's write pass. A shared γ ``[C]``'s
gradient is the per-task one summed over tasks by an aten op: its addend joins that sum
(an add, where the engine's was one). task_batch_norm_backward's own backward passes the
upstream of grad_x / grad_γ through to the addends unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.backends.table import shared_or_contiguous
from fastmeta.ops.registration import ModuleOp, NativeCall, OpFamily, cpu_native_node, define_family, define_op
from fastmeta.ops.activation import activation_derivative, activation_grad, apply_activation, check_activation
from fastmeta.ops.reference_vjp import reference_vjp


def statistics_dims(x: Tensor) -> tuple[int, ...]:
    """The dims a task's statistics run over: its examples (1) and the spatial dims."""
    return (1, *range(3, x.dim()))


def per_channel(p: Tensor, x: Tensor) -> Tensor:
    """``[T, C]`` or ``[C]`` → broadcastable against x ``[T, N, C, *spatial]``."""
    trailing = (None,) * (x.dim() - 3)
    if p.dim() == 2:
        return p[(slice(None), None, slice(None), *trailing)]
    return p[(slice(None), *trailing)]


def normalise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x̂, 1/√(σ² + eps)) with per-task, per-channel statistics (keepdim)."""
    dims = statistics_dims(x)
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return centred * rstd, rstd


def reference_task_batch_norm(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, act: str, negative_slope: float
) -> Tensor:
    """Per-task batch norm with an optional fused activation; see the module docstring."""
    z, _ = normalise(x, eps)
    if gamma is not None:
        z = z * per_channel(gamma, x)
    if beta is not None:
        z = z + per_channel(beta, x)
    return apply_activation(z, act, negative_slope)


# The activations whose gradient the backward kernels apply themselves (see the module docstring).
MASK_ACTIVATIONS = ("relu", "leaky_relu")


def check_fused_activation(y: Tensor | None, act: str, negative_slope: float) -> None:
    """y and act as the backward ops take them: y None with act "none", or the forward's
    output with a piecewise-linear act (``MASK_ACTIVATIONS``)."""
    check_activation(act, negative_slope)
    if y is None and act != "none":
        raise ValueError(f"act is {act!r} but y is None: the backward needs the forward's output y to apply f'")
    if y is not None and act not in MASK_ACTIVATIONS:
        raise ValueError(
            f"act must be one of {MASK_ACTIVATIONS} when y is given, got {act!r}: a smooth activation has a "
            "gradient at y, so its activation_grad runs first and y is None")


def gradient_at_z(grad_out: Tensor, y: Tensor | None, act: str, negative_slope: float) -> Tensor:
    """grad_z from the backward ops' first argument: itself, or grad_y·f'(y)."""
    check_fused_activation(y, act, negative_slope)
    return grad_out if y is None else grad_out * activation_derivative(y, act, negative_slope)


def reference_task_batch_norm_backward(
    grad_z: Tensor, x: Tensor, gamma: Tensor | None, eps: float, needs: list[bool], y: Tensor | None = None,
    act: str = "none", negative_slope: float = 0.01,  # nn.LeakyReLU's default; read only with leaky_relu
    dx_addend: Tensor | None = None, dgamma_addend: Tensor | None = None,
) -> list[Tensor]:
    """[grad_x, grad_gamma ``[T, C]``, grad_beta ``[T, C]``]; those not needed are empty.

    grad_z: the gradient at z; with y (the forward's output, act relu or leaky_relu), the
    gradient at y, and grad_z = grad_z·f'(y) (see the module docstring). dx_addend (x's
    shape) and dgamma_addend (``[T, C]``), only for a needed output, are added to grad_x and
    grad_gamma: the gradients task_batch_norm's eager node received at its alias outputs
    (see "Why addends" in the module docstring)."""
    grad_z = gradient_at_z(grad_z, y, act, negative_slope)
    need_x, need_gamma, need_beta = needs
    dims = statistics_dims(x)
    count = x.numel() // (x.size(0) * x.size(2))
    xhat, rstd = normalise(x, eps)
    sum_grad = grad_z.sum(dims)  # [T, C]
    sum_grad_xhat = (grad_z * xhat).sum(dims)  # [T, C]
    grad_x = x.new_empty(0)
    if need_x:
        scale = rstd if gamma is None else rstd * per_channel(gamma, x)
        grad_x = scale * (
            grad_z
            - per_channel(sum_grad, x) / count
            - xhat * per_channel(sum_grad_xhat, x) / count
        )
    grad_gamma = sum_grad_xhat if need_gamma else x.new_empty(0)
    if need_x and dx_addend is not None:
        grad_x = grad_x + dx_addend
    if need_gamma and dgamma_addend is not None:
        grad_gamma = grad_gamma + dgamma_addend
    return [
        grad_x,
        grad_gamma,
        sum_grad if need_beta else x.new_empty(0),
    ]


def reference_task_batch_norm_double_backward(
    grad_z: Tensor,
    x: Tensor,
    gamma: Tensor | None,
    up_x: Tensor | None,
    up_gamma: Tensor | None,
    up_beta: Tensor | None,
    eps: float,
    needs: list[bool],
    y: Tensor | None = None,
    act: str = "none",
    negative_slope: float = 0.01,
) -> list[Tensor]:
    """[d_grad_z, d_x, d_gamma ``[T, C]``]: the VJP of task_batch_norm_backward for the
    upstream gradients (up_x, up_gamma, up_beta) at its outputs (grad_x, grad_γ, grad_β);
    ``needs`` flags the three outputs, those not needed are empty. With y (act relu or
    leaky_relu), grad_z is the gradient at y as task_batch_norm_backward takes it, and
    d_grad_z is f'(y) times the gradient at the masked grad_z.

    Per task and channel, with M examples·pixels, a = γ·rstd and the projection
    P(v) = v − mean(v) − x̂·mean(x̂v) (symmetric), the backward is grad_x = a·P(g),
    grad_γ = Σ g·x̂, grad_β = Σ g. For upstream (u, U_γ, U_β) on those three outputs:

        d g = a·P(u) + U_γ·x̂ + U_β
        d γ = rstd·K,        K = <u, g> − M·mean(u)·mean(g) − <g, x̂><u, x̂>/M
        d x = rstd·(U_γ·P(g) − (a/M)·(K·x̂ + <u, x̂>·P(g) + <g, x̂>·P(u)))

    (δx̂ = rstd·P(δx) and δrstd = −rstd²·mean(x̂·δx) give the last line.) d γ does not
    depend on γ: it is the sensitivity of grad_x to the scale.
    """
    grad_z = gradient_at_z(grad_z, y, act, negative_slope)
    need_grad_z, need_x, need_gamma = needs
    T, C = x.size(0), x.size(2)
    dims = statistics_dims(x)
    count = x.numel() // (T * C) if T * C else 0
    xhat, rstd = normalise(x, eps)
    scale = rstd if gamma is None else rstd * per_channel(gamma, x)

    def mean(v):
        return v.mean(dims, keepdim=True)

    def project(v):
        return v - mean(v) - xhat * mean(xhat * v)

    d_grad_z = d_x = d_gamma = x.new_empty(0)
    if need_grad_z:
        d_grad_z = torch.zeros_like(grad_z)
        if up_x is not None:
            d_grad_z = d_grad_z + scale * project(up_x)
        if up_gamma is not None:
            d_grad_z = d_grad_z + per_channel(up_gamma, x) * xhat
        if up_beta is not None:
            d_grad_z = d_grad_z + per_channel(up_beta, x)
        if y is not None:
            d_grad_z = activation_derivative(y, act, negative_slope) * d_grad_z
    if need_x or need_gamma:
        g_xhat = mean(grad_z * xhat)  # <g, x̂>/M
        k = None
        if up_x is not None:
            u_xhat = mean(up_x * xhat)  # <u, x̂>/M
            k = mean(up_x * grad_z) - mean(up_x) * mean(grad_z) - g_xhat * u_xhat  # K/M
        if need_x:
            d_x = torch.zeros_like(x)
            if up_gamma is not None:
                d_x = d_x + rstd * per_channel(up_gamma, x) * project(grad_z)
            if up_x is not None:
                d_x = d_x - rstd * scale * (k * xhat + u_xhat * project(grad_z) + g_xhat * project(up_x))
        if need_gamma:
            d_gamma = x.new_zeros(T, C) if k is None else (rstd * k).reshape(T, C) * count
    return [d_grad_z, d_x, d_gamma]


# ---------------------------------------------------------------------------------------
# task_batch_norm
# ---------------------------------------------------------------------------------------


task_batch_norm = define_op(reference_task_batch_norm, NativeCall(
    takes=lambda device_type, x, gamma, beta, eps, act, negative_slope: x.dim() >= 3,
    args=lambda x, gamma, beta, eps, act, negative_slope: (
        x.contiguous(), gamma, beta, float(eps), act, float(negative_slope)),
))


@task_batch_norm.register_fake
def _(x, gamma, beta, eps, act, negative_slope):
    return torch.empty_like(x)


def _bn_setup(ctx, inputs, output):
    x, gamma, beta, eps, act, negative_slope = inputs
    ctx.eps, ctx.act, ctx.negative_slope = eps, act, negative_slope
    ctx.gamma_dim = None if gamma is None else gamma.dim()
    ctx.beta_dim = None if beta is None else beta.dim()
    ctx.save_for_backward(x, gamma, output if act != "none" else None)
    # No gradient reached y (the backward ops' y has none): nothing to do, not zeros to push through.
    ctx.set_materialize_grads(False)


def _bn_backward(ctx, grad_y):
    """The alias outputs' gradients (``ctx.alias_grads``, eager path only) are added to x's
    and γ's: in the kernel (γ per task), or to the task sum (γ shared)."""
    addends = getattr(ctx, "alias_grads", {})
    add_x, add_gamma = addends.get(0), addends.get(1)
    if grad_y is None:  # only the aliases were read
        return add_x, add_gamma, None, None, None, None
    x, gamma, y = ctx.saved_tensors
    act, slope = ctx.act, ctx.negative_slope
    if act in MASK_ACTIVATIONS:  # the backward kernel applies f'(y) itself: no activation_grad op
        grad_z = grad_y
    else:
        grad_z = grad_y if act == "none" else activation_grad(grad_y, y, act, slope)
        y, act, slope = None, "none", 0.0
    needs = [
        ctx.needs_input_grad[0],
        ctx.gamma_dim is not None and ctx.needs_input_grad[1],
        ctx.beta_dim is not None and ctx.needs_input_grad[2],
    ]
    if not any(needs):
        return None, None, None, None, None, None
    kernel_gamma_addend = add_gamma if ctx.gamma_dim == 2 else None
    grad_x, grad_gamma, grad_beta = task_batch_norm_backward(grad_z, x, gamma, ctx.eps, needs, y, act, slope,
                                                             add_x, kernel_gamma_addend)
    if needs[1] and ctx.gamma_dim == 1:
        grad_gamma = grad_gamma.sum(0)
        if add_gamma is not None:
            grad_gamma = grad_gamma + add_gamma
    if needs[2] and ctx.beta_dim == 1:
        grad_beta = grad_beta.sum(0)
    return (
        grad_x if needs[0] else None,
        grad_gamma if needs[1] else None,
        grad_beta if needs[2] else None,
        None,
        None,
        None,
    )


task_batch_norm.register_autograd(_bn_backward, setup_context=_bn_setup, aliased_inputs=(0, 1))


# The ops whose CPU kernels the C++ nodes call themselves (csrc/cpu/task_batch_norm.cpp).
_NODE_KERNELS = ("task_batch_norm", "task_batch_norm_backward", "task_batch_norm_double_backward")


def _bn_native_node(x, gamma, beta, eps, act, negative_slope):
    """task_batch_norm's node in C++ (``fastmeta_ext::task_batch_norm_node``): the same graph
    as :func:`_bn_backward`'s Python node (alias outputs, addends, the task sums of shared
    γ and β), with autograd's engine calling the C++ kernels directly. Taken for contiguous
    CPU x with γ and β of its dtype, an activation the backward kernel applies itself
    ("none" or a mask activation), where the ``cpu`` backend runs the three ops;
    NotImplemented (the Python node) otherwise."""
    if act != "none" and act not in MASK_ACTIVATIONS:
        return NotImplemented
    node = cpu_native_node("task_batch_norm_node", _NODE_KERNELS, x, gamma, beta)
    if node is None or x.dim() < 3 or not x.is_contiguous():
        return NotImplemented
    return node(x, gamma, beta, float(eps), act, float(negative_slope), x.requires_grad,
                gamma is not None and gamma.requires_grad)[0]


task_batch_norm.register_native_node(_bn_native_node)


# ---------------------------------------------------------------------------------------
# task_batch_norm_backward
# ---------------------------------------------------------------------------------------


def _check_backward(grad_z, x, gamma, eps, needs, y=None, act="none", negative_slope=0.01, dx_addend=None,
                    dgamma_addend=None):
    check_fused_activation(y, act, negative_slope)
    if y is not None and y.shape != x.shape:
        raise ValueError(f"y must have x's shape {list(x.shape)}, got {list(y.shape)}")
    if dx_addend is not None and (not needs[0] or dx_addend.shape != x.shape):
        raise ValueError(f"dx_addend must have x's shape {list(x.shape)} and grad_x be needed, got "
                         f"{list(dx_addend.shape)} with needs {list(needs)}")
    if dgamma_addend is not None and (not needs[1] or tuple(dgamma_addend.shape) != (x.size(0), x.size(2))):
        raise ValueError(f"dgamma_addend must be [T, C] = {[x.size(0), x.size(2)]} and grad_gamma be needed, got "
                         f"{list(dgamma_addend.shape)} with needs {list(needs)}")


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


task_batch_norm_backward = define_op(reference_task_batch_norm_backward, NativeCall(
    takes=lambda device_type, grad_z, x, gamma, eps, needs, y=None, act="none", negative_slope=0.01, dx_addend=None,
    dgamma_addend=None: x.dim() >= 3,
    args=lambda grad_z, x, gamma, eps, needs, y=None, act="none", negative_slope=0.01, dx_addend=None,
    dgamma_addend=None: (
        grad_z.contiguous(), x.contiguous(), gamma, float(eps), [bool(n) for n in needs],
        _contiguous(y), act, float(negative_slope), _contiguous(dx_addend), _contiguous(dgamma_addend)),
), check=_check_backward)


@task_batch_norm_backward.register_fake
def _(grad_z, x, gamma, eps, needs, y=None, act="none", negative_slope=0.01, dx_addend=None, dgamma_addend=None):
    T, C = x.size(0), x.size(2)
    shapes = [tuple(x.shape), (T, C), (T, C)]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


def _bn_backward_setup(ctx, inputs, output):
    grad_z, x, gamma, eps, needs, y, act, negative_slope = inputs[:8]  # the addends: nothing to save
    ctx.eps, ctx.needs, ctx.act, ctx.negative_slope = eps, needs, act, negative_slope
    ctx.save_for_backward(grad_z, x, gamma, y)


def _bn_backward_backward(ctx, upstream):
    """No gradient at y: f'(y) is piecewise constant (the module docstring). The addends'
    gradients are the upstream of grad_x / grad_γ, unchanged."""
    grad_z, x, gamma, y = ctx.saved_tensors

    def live(i):  # the upstream at output i, or None where it is absent or was not produced
        u = upstream[i]
        return u if ctx.needs[i] and u is not None and u.numel() else None

    wanted = ctx.needs_input_grad  # (the dispatcher's autograd may leave the defaulted addends out)
    d_addends = (live(0) if len(wanted) > 8 and wanted[8] else None,
                 live(1) if len(wanted) > 9 and wanted[9] else None)
    needs = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        gamma is not None and ctx.needs_input_grad[2],
    ]
    if not any(needs):
        return (None, None, None, None, None, None, None, None, *d_addends)[:len(wanted)]
    d_grad_z, d_x, d_gamma = task_batch_norm_double_backward(
        grad_z, x, gamma, live(0), live(1), live(2), ctx.eps, needs, y, ctx.act, ctx.negative_slope
    )
    if needs[2] and gamma.dim() == 1:
        d_gamma = d_gamma.sum(0)
    return (
        d_grad_z if needs[0] else None,
        d_x if needs[1] else None,
        d_gamma if needs[2] else None,
        None,
        None,
        None,
        None,
        None,
        *d_addends,
    )[:len(wanted)]


task_batch_norm_backward.register_autograd(_bn_backward_backward, setup_context=_bn_backward_setup)


def _bn_backward_native_node(grad_z, x, gamma, eps, needs, y=None, act="none", negative_slope=0.01, dx_addend=None,
                             dgamma_addend=None):
    """task_batch_norm_backward's node in C++ (``fastmeta_ext::task_batch_norm_backward_node``):
    the node task_batch_norm's C++ node builds under create_graph, the same graph as
    :func:`_bn_backward_backward`'s Python node. Taken where :func:`_bn_native_node` would
    be ("none" or a mask activation, x contiguous); NotImplemented otherwise."""
    _check_backward(grad_z, x, gamma, eps, needs, y, act, negative_slope, dx_addend, dgamma_addend)
    if (act != "none" and act not in MASK_ACTIVATIONS) or x.dim() < 3 or not x.is_contiguous():
        return NotImplemented
    node = cpu_native_node("task_batch_norm_backward_node", _NODE_KERNELS[1:], x, grad_z, gamma, y, dx_addend,
                           dgamma_addend)
    if node is None:
        return NotImplemented
    return tuple(node(grad_z, x, gamma, float(eps), [bool(n) for n in needs], y, act, float(negative_slope),
                      dx_addend, dgamma_addend))


task_batch_norm_backward.register_native_node(_bn_backward_native_node)


# ---------------------------------------------------------------------------------------
# task_batch_norm_double_backward
# ---------------------------------------------------------------------------------------


def _check_double_backward(grad_z, x, gamma, up_x, up_gamma, up_beta, eps, needs, y=None, act="none",
                           negative_slope=0.01):
    _check_backward(grad_z, x, gamma, eps, needs, y, act, negative_slope)


task_batch_norm_double_backward = define_op(reference_task_batch_norm_double_backward, NativeCall(
    takes=lambda device_type, grad_z, x, gamma, up_x, up_gamma, up_beta, eps, needs, y=None, act="none",
    negative_slope=0.01: x.dim() >= 3,
    args=lambda grad_z, x, gamma, up_x, up_gamma, up_beta, eps, needs, y=None, act="none", negative_slope=0.01: (
        grad_z.contiguous(), x.contiguous(), gamma, shared_or_contiguous(up_x, False), up_gamma, up_beta, float(eps),
        [bool(n) for n in needs], _contiguous(y), act, float(negative_slope)),
), check=_check_double_backward)


@task_batch_norm_double_backward.register_fake
def _(grad_z, x, gamma, up_x, up_gamma, up_beta, eps, needs, y=None, act="none", negative_slope=0.01):
    T, C = x.size(0), x.size(2)
    shapes = [tuple(grad_z.shape), tuple(x.shape), (T, C)]
    return [x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs)]


def _bn_double_backward_setup(ctx, inputs, output):
    grad_z, x, gamma, up_x, up_gamma, up_beta, eps, needs, y, act, negative_slope = inputs
    ctx.eps, ctx.needs, ctx.act, ctx.negative_slope = eps, needs, act, negative_slope
    ctx.save_for_backward(grad_z, x, gamma, up_x, up_gamma, up_beta, y)


def _bn_double_backward_backward(ctx, upstream):
    """Third order (and gradgradcheck of the backward): the exact VJP of the reference. y
    enters as a constant: f'(y) is piecewise constant."""
    *inputs, y = ctx.saved_tensors
    grads = reference_vjp(
        lambda *inputs: reference_task_batch_norm_double_backward(*inputs, ctx.eps, ctx.needs, y, ctx.act,
                                                                  ctx.negative_slope),
        inputs,
        ctx.needs_input_grad[:6],
        upstream,
    )
    return (*grads, None, None, None, None, None)


task_batch_norm_double_backward.register_autograd(
    _bn_double_backward_backward, setup_context=_bn_double_backward_setup
)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def _run_batch_norm(m, x: Tensor, params: dict, act: str, negative_slope: float) -> Tensor | None:
    """BatchNorm1d/2d with per-task batch statistics on ``[T, N, C, ...]``; None below rank 3."""
    if x.dim() < 3:
        return None
    return task_batch_norm(x, params["weight"], params["bias"], float(m.eps), act, negative_slope)


def _samples():
    T, N, C, r = 2, 3, 3, torch.randn
    x5 = r(T, N, C, 5, 5)
    return {
        "task_batch_norm": lambda: (x5, r(T, C), r(T, C), 1e-5, "relu", 0.0),
        "task_batch_norm_backward": lambda: (x5, x5 + 1, r(T, C), 1e-5, [True] * 3),
        "task_batch_norm_double_backward": lambda: (x5, x5 + 1, r(T, C), x5 * 2, r(T, C), r(C), 1e-5, [True] * 3),
    }


# Per-task batch statistics, always: a declined input must never run under vmap, whose
# second order through BatchNorm is wrong.
_BATCH_NORM_OP = ModuleOp(params=("weight", "bias"), run=_run_batch_norm, fuses_activation=True, subclasses=True,
                          required="[T, N, C, ...]")

FAMILY = define_family(OpFamily(
    name="task_batch_norm",
    sample_args=_samples(),
    layer_shapes=lambda m, x_shape: {"T": x_shape[0], "N": x_shape[1], "C": x_shape[2],
                                     **dict(zip("HW", x_shape[3:]))},
    modules={torch.nn.BatchNorm1d: _BATCH_NORM_OP, torch.nn.BatchNorm2d: _BATCH_NORM_OP},
    check_seconds=22,
    dry_run_case="shape1-shared-shared-none",
))
