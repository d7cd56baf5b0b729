"""Triton launchers of ``task_batch_norm_max_pool2d`` and its two backward ops
(fastmeta/ops/task_batch_norm_max_pool2d.py): a BatchNorm (with its fused activation)
whose output only a max pooling reads, run as the BatchNorm kernels of
kernels/task_batch_norm.py with their ``POOL`` epilogue and prologue, so that the pooling
has no launch of its own on any pass:

    forward          one program per (channel, task), as task_batch_norm_kernel: the
                     statistics, then per window of its maps the activated values at the
                     window's taps and their maximum (max_pool2d_kernel's choice): writes
                     the pooled maps and their indices, never the full-size output
                     (its write and the pool's read of it are gone).
    backward         task_batch_norm_backward_kernel reading each element's gradient from
                     its window: the window's upstream where the element is its maximum,
                     else 0 (max_pool2d_backward's gather form), times f' of the window's
                     value: the full-size gradient max_pool2d_backward wrote is never
                     written.
    double backward  task_batch_norm_double_backward_kernel with the same gathered
                     gradient, writing d grad_pooled at each window's maximum (once per
                     window: max_pool2d_double_backward's gather).

W4 runs 24 + 44 + 20 max-pooling launches per captured second-order iteration, each
after the BatchNorm launch it now rides in (``python -m fastmeta.tools.launches W4
--as-verified``).

Takes: fp32 on one device, x ``[T, N, C, H, W]``, square windows of stride equal to their
size with no padding (the windows do not overlap: each element is in at most one, which
is what lets every pass run per element), and ``act`` "none" or piecewise linear (relu,
leaky_relu: f' of the pooled value is f' at the window's maximum). Declines everything
else (the op layer then runs the reference).
"""

from __future__ import annotations

import torch

from fastmeta.kernels.activation import activation_code
from fastmeta.kernels.launch_checks import all_float32_on_one_device
from fastmeta.kernels.task_batch_norm import (
    _channel_param,
    batch_norm_config,
    task_batch_norm_backward_kernel,
    task_batch_norm_double_backward_kernel,
    task_batch_norm_kernel,
)

PIECEWISE_LINEAR = ("none", "relu", "leaky_relu")


def _geometry(x, kernel_size):
    """(T, N, C, H, W, HO, WO), or None for what the kernels do not take."""
    if x.dim() != 5 or int(kernel_size) < 1:
        return None
    T, N, C, H, W = x.shape
    k = int(kernel_size)
    if H < k or W < k:
        return None
    return T, N, C, H, W, H // k, W // k


def _pooled_ok(geometry, pooled, indices) -> bool:
    T, N, C, H, W, HO, WO = geometry
    shape = (T, N, C, HO, WO)
    return (tuple(pooled.shape) == shape and tuple(indices.shape) == shape and indices.dtype == torch.int64
            and indices.device == pooled.device)


def task_batch_norm_max_pool2d(x, gamma, beta, eps, act, negative_slope, kernel_size):
    """[pooled, indices] of fastmeta.ops.task_batch_norm_max_pool2d, or NotImplemented."""
    geometry = _geometry(x, kernel_size)
    if act not in PIECEWISE_LINEAR or geometry is None or not all_float32_on_one_device(x, gamma, beta):
        return NotImplemented
    T, N, C, H, W, HO, WO = geometry
    g, b = _channel_param(gamma, T, C), _channel_param(beta, T, C)
    if (gamma is not None and g is None) or (beta is not None and b is None):
        return NotImplemented
    x = x.contiguous()
    pooled = x.new_empty((T, N, C, HO, WO))
    indices = torch.empty((T, N, C, HO, WO), dtype=torch.int64, device=x.device)
    cfg = batch_norm_config(N * H * W)
    task_batch_norm_kernel[(C, T)](
        x, gamma if gamma is not None else x, beta if beta is not None else x, pooled,
        N, C, H * W, float(eps), float(negative_slope),
        g[1] if g else 0, g[2] if g else 0, b[1] if b else 0, b[2] if b else 0,
        HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, ACT=activation_code(act, negative_slope),
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        indices_ptr=indices, W=W, HO=HO, WO=WO, POOL=int(kernel_size),
    )
    return [pooled, indices]


def task_batch_norm_max_pool2d_backward(grad_pooled, x, gamma, pooled, indices, eps, needs, act, negative_slope,
                                        kernel_size, dx_addend=None, dgamma_addend=None):
    """[grad_x, grad_gamma, grad_beta] of fastmeta.ops.task_batch_norm_max_pool2d_backward,
    or NotImplemented; the addends are added in the kernel's stores."""
    geometry = _geometry(x, kernel_size)
    if (act not in PIECEWISE_LINEAR or geometry is None or grad_pooled.shape != pooled.shape
            or not all_float32_on_one_device(grad_pooled, x, gamma, pooled, dx_addend, dgamma_addend)
            or not _pooled_ok(geometry, pooled, indices)):
        return NotImplemented
    T, N, C, H, W, HO, WO = geometry
    g = _channel_param(gamma, T, C)
    if gamma is not None and g is None:
        return NotImplemented
    need_x, need_gamma, need_beta = (bool(n) for n in needs)
    if (dx_addend is not None and (not need_x or dx_addend.shape != x.shape)) or (
            dgamma_addend is not None and (not need_gamma or tuple(dgamma_addend.shape) != (T, C))):
        return NotImplemented
    x, grad_pooled, pooled, indices = x.contiguous(), grad_pooled.contiguous(), pooled.contiguous(), indices.contiguous()
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    grad_gamma = x.new_empty((T, C)) if need_gamma else x.new_empty(0)
    grad_beta = x.new_empty((T, C)) if need_beta else x.new_empty(0)
    dx_addend = dx_addend.contiguous() if dx_addend is not None else None
    dgamma_addend = dgamma_addend.contiguous() if dgamma_addend is not None else None
    code = activation_code(act, negative_slope)
    cfg = batch_norm_config(N * H * W)
    task_batch_norm_backward_kernel[(C, T)](
        grad_pooled, x, gamma if gamma is not None else x, pooled, grad_x, grad_gamma, grad_beta,
        dx_addend if dx_addend is not None else x, dgamma_addend if dgamma_addend is not None else x,
        N, C, H * W, float(eps), float(negative_slope), g[1] if g else 0, g[2] if g else 0,
        HAS_GAMMA=gamma is not None, HAS_Y=code != 0, ACT=code, NEED_X=need_x, NEED_GAMMA=need_gamma,
        NEED_BETA=need_beta, HAS_DX_ADDEND=dx_addend is not None, HAS_DGAMMA_ADDEND=dgamma_addend is not None,
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        indices_ptr=indices, W=W, HO=HO, WO=WO, POOL=int(kernel_size),
    )
    return [grad_x, grad_gamma, grad_beta]


def task_batch_norm_max_pool2d_double_backward(grad_pooled, x, gamma, pooled, indices, up_x, up_gamma, up_beta, eps,
                                               needs, act, negative_slope, kernel_size):
    """[d_grad_pooled, d_x, d_gamma] of fastmeta.ops.task_batch_norm_max_pool2d_double_backward,
    or NotImplemented."""
    geometry = _geometry(x, kernel_size)
    if (act not in PIECEWISE_LINEAR or geometry is None or grad_pooled.shape != pooled.shape
            or (up_x is not None and up_x.shape != x.shape)
            or not all_float32_on_one_device(grad_pooled, x, gamma, pooled, up_x, up_gamma, up_beta)
            or not _pooled_ok(geometry, pooled, indices)):
        return NotImplemented
    T, N, C, H, W, HO, WO = geometry
    params = [(p, _channel_param(p, T, C)) for p in (gamma, up_gamma, up_beta)]
    if any(p is not None and layout is None for p, layout in params):
        return NotImplemented
    (_, g), (_, ug), (_, ub) = params
    need_grad_pooled, need_x, need_gamma = (bool(n) for n in needs)
    x, grad_pooled, pooled, indices = x.contiguous(), grad_pooled.contiguous(), pooled.contiguous(), indices.contiguous()
    up_x = None if up_x is None else up_x.contiguous()
    # Every window's value is written (from its maximum, which lies in the window): no fill.
    d_grad_pooled = torch.empty_like(pooled) if need_grad_pooled else x.new_empty(0)
    d_x = torch.empty_like(x) if need_x else x.new_empty(0)
    d_gamma = x.new_empty((T, C)) if need_gamma else x.new_empty(0)
    code = activation_code(act, negative_slope)
    cfg = batch_norm_config(N * H * W)
    task_batch_norm_double_backward_kernel[(C, T)](
        grad_pooled, x, *(p if p is not None else x for p in (gamma, up_x, up_gamma, up_beta)), pooled, d_grad_pooled,
        d_x, d_gamma, N, C, H * W, float(eps), float(negative_slope),
        *(layout[k] if layout else 0 for layout in (g, ug, ub) for k in (1, 2)),
        HAS_GAMMA=gamma is not None, HAS_UP_X=up_x is not None, HAS_UP_GAMMA=up_gamma is not None,
        HAS_UP_BETA=up_beta is not None, HAS_Y=code != 0, ACT=code, NEED_GRAD_Z=need_grad_pooled, NEED_X=need_x,
        NEED_GAMMA=need_gamma, GRAD_SUMS=need_x or need_gamma, WRITE=need_grad_pooled or need_x,
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        indices_ptr=indices, W=W, HO=HO, WO=WO, POOL=int(kernel_size),
    )
    return [d_grad_pooled, d_x, d_gamma]
