"""BatchNorm in a clone's forward: PyTorch's numbers, a cheaper second order.

A clone's BatchNorm layers (``torch.nn`` BatchNorm1d/2d/3d and SyncBatchNorm) run
:func:`clone_batch_norm` instead of their ``forward``. With batch statistics (the
transductive default, and the "running" mode in training) it is one autograd function:

- forward: ``torch.native_batch_norm``, what ``F.batch_norm`` runs on batch statistics
  (updating the running statistics when given, in the "running" mode);
- backward: ``native_batch_norm_backward``, as PyTorch's: ``adapt()``'s gradients, and so
  the adapted weights, are bit for bit those of the functional loop;
- the backward's own backward (the meta-gradient of second-order MAML) in closed form.

PyTorch's double backward of BatchNorm is a composite of some fifty passes over the
activations; it was 20% of the Omniglot conv4 clone/adapt meta-iteration on the CPU (one
thread). The closed form below takes about fifteen, on the statistics the forward
saved. Per channel, with M values, x̂ the normalised input, a = γ·rstd, g the incoming
gradient and P(v) = v − mean(v) − x̂·mean(x̂v), the backward is ∂x = a·P(g),
∂γ = Σ g·x̂, ∂β = Σ g; for upstream (u, U_γ, U_β) on those:

    d g = a·P(u) + U_γ·x̂ + U_β
    d γ = M·rstd·k,      k = mean(u·g) − mean(u)·mean(g) − mean(g·x̂)·mean(u·x̂)
    d x = rstd·(U_γ·P(g) − a·(k·x̂ + mean(u·x̂)·P(g) + mean(g·x̂)·P(u)))

(the derivation of :mod:`fastmeta.ops.task_batch_norm`'s closed form, for one task on
PyTorch's layout ``[N, C, *spatial]``). It is written in differentiable torch ops on
statistics recomputed from x, so higher orders stay exact. The tests compare it with
PyTorch's in float64 (gradcheck and gradgradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# The BatchNorm forwards clone_batch_norm stands in for: torch's own. A subclass with its
# own forward keeps it.
STANDARD_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def clone_batch_norm(module: _BatchNorm, transductive: bool, input: Tensor) -> Tensor:
    """``module``'s forward in a clone. transductive: batch statistics always, running
    statistics untouched; otherwise PyTorch's behaviour (training: batch statistics and a
    running-statistics update; evaluation: the running statistics)."""
    module._check_input_dim(input)
    running_mean = running_var = None
    momentum = 0.0
    if not transductive:
        if not module.training and module.running_mean is not None:
            return F.batch_norm(input, module.running_mean, module.running_var, module.weight, module.bias,
                                False, 0.0, module.eps)
        if module.training and module.track_running_stats:
            running_mean, running_var = module.running_mean, module.running_var
            momentum = 0.0 if module.momentum is None else module.momentum
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.add_(1)
                if module.momentum is None:  # a cumulative moving average
                    momentum = 1.0 / float(module.num_batches_tracked)
    if input.numel() // input.size(1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    return _BatchStatisticsNorm.apply(input, module.weight, module.bias, running_mean, running_var, momentum,
                                      module.eps)


def _channel_view(x: Tensor) -> tuple[tuple[int, ...], list[int]]:
    return (1, x.size(1)) + (1,) * (x.dim() - 2), [0, *range(2, x.dim())]


class _BatchStatisticsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.affine = (weight is not None, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        has_weight, has_bias = ctx.affine
        grad_x, grad_weight, grad_bias = _BatchStatisticsNormBackward.apply(grad_y, x, weight, mean, invstd, ctx.eps)
        return (grad_x, grad_weight if has_weight else None, grad_bias if has_bias else None,
                None, None, None, None)


class _BatchStatisticsNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_y, x, weight, mean, invstd, eps):
        has_weight = weight is not None
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, eps, [True, has_weight, True]
        )
        ctx.save_for_backward(grad_y, x, weight)
        ctx.eps = eps
        if not has_weight:  # an autograd.Function's outputs are tensors
            grad_weight = grad_bias.new_zeros(grad_bias.shape)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, up_x, up_weight, up_bias):
        g, x, weight = ctx.saved_tensors
        shape, dims = _channel_view(x)
        count = x.numel() // x.size(1)
        # The statistics again, from x: differentiable, so that a third order (the
        # gradient of this closed form) is exact too; three passes.
        centred = x - x.mean(dims, keepdim=True)
        rstd = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + ctx.eps)
        xhat = centred * rstd
        a = rstd if weight is None else rstd * weight.view(shape)
        up_x = torch.zeros_like(x) if up_x is None else up_x
        u_w = torch.zeros_like(rstd) if up_weight is None or weight is None else up_weight.view(shape)
        u_b = torch.zeros_like(rstd) if up_bias is None else up_bias.view(shape)
        g_mean = g.mean(dims, keepdim=True)
        g_xhat = (g * xhat).mean(dims, keepdim=True)
        u_mean = up_x.mean(dims, keepdim=True)
        u_xhat = (up_x * xhat).mean(dims, keepdim=True)
        k = (up_x * g).mean(dims, keepdim=True) - u_mean * g_mean - g_xhat * u_xhat
        # Per-channel coefficients first, then a few passes over the activations:
        # d g = a·u + x̂·(U_γ − a·mean(u·x̂)) + (U_β − a·mean(u)).
        d_grad = torch.addcmul(u_b - a * u_mean, xhat, u_w - a * u_xhat) + a * up_x
        # d x = c_g·P(g) + c_k·x̂ + c_u·P(u), expanded the same way.
        c_g = rstd * (u_w - a * u_xhat)
        c_k = -rstd * a * k
        c_u = -rstd * a * g_xhat
        d_x = torch.addcmul(-(c_g * g_mean + c_u * u_mean), xhat, c_k - c_g * g_xhat - c_u * u_xhat)
        d_x = d_x + c_g * g + c_u * up_x
        d_weight = None if weight is None else (rstd * k).reshape(-1) * count
        return d_grad, d_x, d_weight, None, None, None
