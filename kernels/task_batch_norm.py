"""Triton kernels for ``task_batch_norm``, its backward and the backward's backward
(fastmeta/ops/task_batch_norm.py).

Per task t and channel c, over the task's N examples and S spatial positions:

    μ = mean x,  σ² = mean (x − μ)²  (biased),  y = act(γ (x − μ)/√(σ² + eps) + β)

and backward (at z, before the activation):

    dβ = Σ g,  dγ = Σ g·x̂,  dx = γ/√(σ² + eps) · (g − dβ/count − x̂·dγ/count)

For a piecewise-linear activation (relu, leaky_relu) the backward kernels take the
forward's output y (HAS_Y) and read g = grad_y·f'(y) themselves, and the double backward
writes its d grad_z times f'(y); for the others the op layer applies activation_grad
first and passes no y.

The double backward is the closed form of reference_task_batch_norm_double_backward: per
(task, channel) sums of g, u (the upstream at dx) and x − μ, then every output element
is an affine combination of g, u and x − μ.

grid   (C, T): one program per (channel, task) owns all count = N·S values of its
       statistics, so the reductions are in registers, deterministic, with no second
       launch and no atomics. x is [T, N, C, S] contiguous; a program walks N rows of S
       contiguous values in BLOCK chunks.
passes forward: mean, variance (two-pass, as the reference: one-pass E[x²] − μ² loses
       digits when |μ| ≫ σ), then write y: 2 reads + 1 write of x. Backward: mean, then
       variance with Σg and Σg·(x − μ) together, then write dx: 3 reads of x, 2 of g.
       Double backward: mean, then variance with the five sums of g and u, then write
       d grad_z and dx: 3 reads of x, 2 of g and of u.
bound  memory. W2's layers have T·C = 2048 programs of ~1k values; W4's first layer only
       T·C = 128 programs of 564k values each, about one per SM, which still keeps each
       SM streaming (BLOCK = 2048 values in flight per program).

Declines: non-fp32 or mixed devices, x of rank < 3, γ/β not shaped [T, C] / [C],
unknown activations, empty tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.activation import activation_code, activation_derivative, apply_activation
from fastmeta.kernels.launch_checks import all_float32_on_one_device, interpreting, task_stride


@triton.jit
def _channel_mean(x_base, N, C, S, count, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < count
        acc += tl.load(x_base + (j // S).to(tl.int64) * (C * S) + j % S, mask=ok, other=0.0)
    return tl.sum(acc, axis=0) / count


@triton.jit
def task_batch_norm_kernel(
    x_ptr, gamma_ptr, beta_ptr, out_ptr,
    N, C, S, eps, negative_slope,
    gamma_task_stride, gamma_channel_stride, beta_task_stride, beta_channel_stride,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
    indices_ptr=None, W=1, HO=1, WO=1, POOL: tl.constexpr = 0,
):
    # POOL > 0 (task_batch_norm_max_pool2d): out is the POOL×POOL max pooling of y (stride
    # POOL, no padding) and indices its positions; y itself is never written.
    c = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    count = N * S
    base = t * N * C * S + c * S  # element (t, 0, c, 0); row n adds n·C·S
    mean = _channel_mean(x_ptr + base, N, C, S, count, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < count
        x = tl.load(x_ptr + base + (j // S).to(tl.int64) * (C * S) + j % S, mask=ok, other=0.0)
        d = tl.where(ok, x - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / count + eps)
    scale = rstd
    shift = 0.0
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + t * gamma_task_stride + c * gamma_channel_stride)
    if HAS_BETA:
        shift = tl.load(beta_ptr + t * beta_task_stride + c * beta_channel_stride)
    if POOL == 0:
        for start in range(0, count, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < count
            offs = base + (j // S).to(tl.int64) * (C * S) + j % S
            x = tl.load(x_ptr + offs, mask=ok, other=0.0)
            z = (x - mean) * scale  # x̂, in the reference's order: (x − μ)·rstd·γ + β
            if HAS_GAMMA:
                z = z * gamma
            if HAS_BETA:
                z = z + shift
            tl.store(out_ptr + offs, apply_activation(z, negative_slope, ACT), mask=ok)
    else:
        # One value per window: y at its POOL² taps, computed as the loop above computes it,
        # and max_pool2d_kernel's choice among them (row-major; a NaN wins, the last NaN).
        pooled = HO * WO
        pooled_base = t * N * C * pooled + c * pooled
        for start in range(0, N * pooled, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < N * pooled
            n = (j // pooled).to(tl.int64)
            p = j % pooled
            h0 = (p // WO) * POOL
            w0 = (p % WO) * POOL
            best = tl.full([BLOCK], float("-inf"), tl.float32)
            index = (h0 * W + w0).to(tl.int64)
            for a in tl.static_range(POOL):
                for b in tl.static_range(POOL):
                    s = (h0 + a) * W + w0 + b
                    x = tl.load(x_ptr + base + n * (C * S) + s, mask=ok, other=0.0)
                    z = (x - mean) * scale
                    if HAS_GAMMA:
                        z = z * gamma
                    if HAS_BETA:
                        z = z + shift
                    v = apply_activation(z, negative_slope, ACT)
                    take = ok & ((v > best) | (v != v))
                    best = tl.where(take, v, best)
                    index = tl.where(take, s.to(tl.int64), index)
            out = pooled_base + n * (C * pooled) + p
            tl.store(out_ptr + out, best, mask=ok)
            tl.store(indices_ptr + out, index, mask=ok)


@triton.jit
def _gradient_at_z(grad_z_ptr, y_ptr, offs, ok, negative_slope, HAS_Y: tl.constexpr, ACT: tl.constexpr):
    """g, or g·f'(y) where the op was given y (a piecewise-linear activation)."""
    g = tl.load(grad_z_ptr + offs, mask=ok, other=0.0)
    if HAS_Y:
        g = g * activation_derivative(tl.load(y_ptr + offs, mask=ok, other=0.0), negative_slope, ACT)
    return g


@triton.jit
def _window_of(t, c, j, N, C, S, W, HO, WO, POOL: tl.constexpr):
    """Where element j of slice (t, c) (example j // S, position s = j % S of its H×W plane)
    lies in the pooled maps [T, N, C, HO, WO]: (offset, s, inside a window). The windows
    (POOL×POOL, stride POOL, no padding) do not overlap; the rows and columns past the last
    whole window are in none."""
    s = j % S
    h = s // W
    w = s % W
    inside = (h // POOL < HO) & (w // POOL < WO)
    offset = ((t * N + (j // S)) * C + c) * (HO * WO) + (h // POOL) * WO + w // POOL
    return offset, s, inside


@triton.jit
def _pooled_gradient_at_z(grad_pooled_ptr, pooled_ptr, indices_ptr, t, c, j, ok, N, C, S, W, HO, WO, negative_slope,
                          HAS_Y: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr):
    """The gradient at z of element j when the forward was pooled: its window's upstream
    where it is the window's maximum (the indices), else 0: max_pool2d_backward's gather
    form; f'(y) there is f' of the window's pooled value, which is y at its maximum.
    Returns (g, offset in the pooled maps, is the window's maximum)."""
    at, s, inside = _window_of(t, c, j, N, C, S, W, HO, WO, POOL)
    picked = ok & inside
    hit = picked & (tl.load(indices_ptr + at, mask=picked, other=-1) == s)
    g = tl.load(grad_pooled_ptr + at, mask=hit, other=0.0)
    if HAS_Y:
        g = g * activation_derivative(tl.load(pooled_ptr + at, mask=hit, other=0.0), negative_slope, ACT)
    return g, at, hit


@triton.jit
def _gradient_of(grad_z_ptr, y_ptr, indices_ptr, offs, t, c, j, ok, N, C, S, W, HO, WO, negative_slope,
                 HAS_Y: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr):
    """g at element j: :func:`_gradient_at_z`, or :func:`_pooled_gradient_at_z` (POOL > 0)."""
    if POOL == 0:
        g = _gradient_at_z(grad_z_ptr, y_ptr, offs, ok, negative_slope, HAS_Y, ACT)
    else:
        g, _, _ = _pooled_gradient_at_z(grad_z_ptr, y_ptr, indices_ptr, t, c, j, ok, N, C, S, W, HO, WO,
                                        negative_slope, HAS_Y, ACT, POOL)
    return g


@triton.jit
def task_batch_norm_backward_kernel(
    grad_z_ptr, x_ptr, gamma_ptr, y_ptr, grad_x_ptr, grad_gamma_ptr, grad_beta_ptr, dx_addend_ptr,
    dgamma_addend_ptr,
    N, C, S, eps, negative_slope, gamma_task_stride, gamma_channel_stride,
    HAS_GAMMA: tl.constexpr, HAS_Y: tl.constexpr, ACT: tl.constexpr, NEED_X: tl.constexpr,
    NEED_GAMMA: tl.constexpr, NEED_BETA: tl.constexpr, BLOCK: tl.constexpr,
    HAS_DX_ADDEND: tl.constexpr = False, HAS_DGAMMA_ADDEND: tl.constexpr = False,
    indices_ptr=None, W=1, HO=1, WO=1, POOL: tl.constexpr = 0,
):
    # POOL > 0 (task_batch_norm_max_pool2d_backward): grad_z and y are the pooled maps'
    # upstream and values, gathered at each element through the indices.
    # The addends (x's layout, contiguous; [T, C]) are added in the stores the kernel makes
    # anyway: grad_x's write pass, grad_gamma's one value per (task, channel).
    c = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    count = N * S
    base = t * N * C * S + c * S
    mean = _channel_mean(x_ptr + base, N, C, S, count, BLOCK)
    sq = tl.zeros([BLOCK], tl.float32)
    sum_g = tl.zeros([BLOCK], tl.float32)
    sum_g_centred = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < count
        offs = base + (j // S).to(tl.int64) * (C * S) + j % S
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        g = _gradient_of(grad_z_ptr, y_ptr, indices_ptr, offs, t, c, j, ok, N, C, S, W, HO, WO, negative_slope,
                         HAS_Y, ACT, POOL)
        d = tl.where(ok, x - mean, 0.0)
        sq += d * d
        sum_g += g
        sum_g_centred += g * d
    rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, axis=0) / count + eps)
    grad_beta = tl.sum(sum_g, axis=0)
    grad_gamma = tl.sum(sum_g_centred, axis=0) * rstd  # Σ g·x̂
    if NEED_GAMMA:  # the addend goes into the store only: grad_x below reads Σ g·x̂ itself
        if HAS_DGAMMA_ADDEND:
            tl.store(grad_gamma_ptr + t * C + c, grad_gamma + tl.load(dgamma_addend_ptr + t * C + c))
        else:
            tl.store(grad_gamma_ptr + t * C + c, grad_gamma)
    if NEED_BETA:
        tl.store(grad_beta_ptr + t * C + c, grad_beta)
    if NEED_X:
        scale = rstd
        if HAS_GAMMA:
            scale = rstd * tl.load(gamma_ptr + t * gamma_task_stride + c * gamma_channel_stride)
        mean_g = grad_beta / count
        mean_g_xhat = grad_gamma / count
        for start in range(0, count, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < count
            offs = base + (j // S).to(tl.int64) * (C * S) + j % S
            x = tl.load(x_ptr + offs, mask=ok, other=0.0)
            g = _gradient_of(grad_z_ptr, y_ptr, indices_ptr, offs, t, c, j, ok, N, C, S, W, HO, WO, negative_slope,
                             HAS_Y, ACT, POOL)
            xhat = (x - mean) * rstd
            grad_x = scale * (g - mean_g - xhat * mean_g_xhat)
            if HAS_DX_ADDEND:
                grad_x += tl.load(dx_addend_ptr + offs, mask=ok, other=0.0)
            tl.store(grad_x_ptr + offs, grad_x, mask=ok)


@triton.jit
def task_batch_norm_double_backward_kernel(
    grad_z_ptr, x_ptr, gamma_ptr, up_x_ptr, up_gamma_ptr, up_beta_ptr, y_ptr, d_grad_z_ptr, d_x_ptr, d_gamma_ptr,
    N, C, S, eps, negative_slope, gamma_task_stride, gamma_channel_stride, up_gamma_task_stride,
    up_gamma_channel_stride, up_beta_task_stride, up_beta_channel_stride,
    HAS_GAMMA: tl.constexpr, HAS_UP_X: tl.constexpr, HAS_UP_GAMMA: tl.constexpr, HAS_UP_BETA: tl.constexpr,
    HAS_Y: tl.constexpr, ACT: tl.constexpr,
    NEED_GRAD_Z: tl.constexpr, NEED_X: tl.constexpr, NEED_GAMMA: tl.constexpr, GRAD_SUMS: tl.constexpr,
    WRITE: tl.constexpr, BLOCK: tl.constexpr,
    indices_ptr=None, W=1, HO=1, WO=1, POOL: tl.constexpr = 0,
):
    # POOL > 0 (task_batch_norm_max_pool2d_double_backward): grad_z and y are the pooled
    # maps' upstream and values, gathered through the indices, and d grad_z is written to
    # the pooled maps, each window's value from its maximum's element (max_pool2d's gather).
    c = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    count = N * S
    base = t * N * C * S + c * S
    mean = _channel_mean(x_ptr + base, N, C, S, count, BLOCK)
    sq = tl.zeros([BLOCK], tl.float32)
    sg = tl.zeros([BLOCK], tl.float32)
    sgd = tl.zeros([BLOCK], tl.float32)
    su = tl.zeros([BLOCK], tl.float32)
    sud = tl.zeros([BLOCK], tl.float32)
    sug = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < count
        offs = base + (j // S).to(tl.int64) * (C * S) + j % S
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        d = tl.where(ok, x - mean, 0.0)
        sq += d * d
        if GRAD_SUMS:  # d x and d γ read the sums of g; d grad_z alone does not
            g = _gradient_of(grad_z_ptr, y_ptr, indices_ptr, offs, t, c, j, ok, N, C, S, W, HO, WO, negative_slope,
                             HAS_Y, ACT, POOL)
            sg += g
            sgd += g * d
        if HAS_UP_X:
            u = tl.load(up_x_ptr + offs, mask=ok, other=0.0)
            su += u
            sud += u * d
            if GRAD_SUMS:
                sug += u * g
    rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, axis=0) / count + eps)
    a = rstd
    if HAS_GAMMA:
        a = rstd * tl.load(gamma_ptr + t * gamma_task_stride + c * gamma_channel_stride)
    u_gamma = 0.0
    if HAS_UP_GAMMA:
        u_gamma = tl.load(up_gamma_ptr + t * up_gamma_task_stride + c * up_gamma_channel_stride)
    u_beta = 0.0
    if HAS_UP_BETA:
        u_beta = tl.load(up_beta_ptr + t * up_beta_task_stride + c * up_beta_channel_stride)
    mg = tl.sum(sg, axis=0) / count  # mean(g)
    gx = tl.sum(sgd, axis=0) * rstd / count  # mean(g·x̂)
    mu = tl.sum(su, axis=0) / count  # mean(u)
    ux = tl.sum(sud, axis=0) * rstd / count  # mean(u·x̂)
    k = tl.sum(sug, axis=0) / count - mu * mg - gx * ux  # K / count
    if NEED_GAMMA:
        tl.store(d_gamma_ptr + t * C + c, rstd * k * count)
    # d grad_z = a·P(u) + U_γ·x̂ + U_β = a·u + zd·(x − μ) + z0
    zd = (u_gamma - a * ux) * rstd
    z0 = u_beta - a * mu
    # d x = α·P(g) − κ·x̂ − β·P(u) = α·g − β·u + xd·(x − μ) + x0
    alpha = rstd * (u_gamma - a * ux)
    beta = rstd * a * gx
    xd = rstd * (beta * ux - alpha * gx - rstd * a * k)
    x0 = beta * mu - alpha * mg
    if WRITE:
        for start in range(0, count, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < count
            offs = base + (j // S).to(tl.int64) * (C * S) + j % S
            d = tl.load(x_ptr + offs, mask=ok, other=0.0) - mean
            if HAS_UP_X:
                u = tl.load(up_x_ptr + offs, mask=ok, other=0.0)
            if NEED_GRAD_Z:
                v = zd * d + z0
                if HAS_UP_X:
                    v += a * u
                if POOL == 0:
                    if HAS_Y:
                        v = v * activation_derivative(tl.load(y_ptr + offs, mask=ok, other=0.0), negative_slope, ACT)
                    tl.store(d_grad_z_ptr + offs, v, mask=ok)
                else:  # each window's maximum writes the window's value: once per window
                    at, s, inside = _window_of(t, c, j, N, C, S, W, HO, WO, POOL)
                    hit = ok & inside & (tl.load(indices_ptr + at, mask=ok & inside, other=-1) == s)
                    if HAS_Y:
                        v = v * activation_derivative(tl.load(y_ptr + at, mask=hit, other=0.0), negative_slope, ACT)
                    tl.store(d_grad_z_ptr + at, v, mask=hit)
            if NEED_X:
                v = xd * d + x0 + alpha * _gradient_of(grad_z_ptr, y_ptr, indices_ptr, offs, t, c, j, ok, N, C, S, W,
                                                       HO, WO, negative_slope, HAS_Y, ACT, POOL)
                if HAS_UP_X:
                    v -= beta * u
                tl.store(d_x_ptr + offs, v, mask=ok)


def batch_norm_config(count: int) -> dict:
    """Values per loop step, keyed on the per-(task, channel) count: 2048 × 8 warps (8 per
    thread) for the large maps of W4, down to the next power of two for W2's small ones
    (4 × 2 × 2 × 10 images = 40 values at its last layer). The interpreter takes all at once."""
    if interpreting():
        return {"BLOCK": max(16, triton.next_power_of_2(count)), "num_warps": 1}
    block = max(128, min(2048, triton.next_power_of_2(count)))
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def _channel_param(p, T, C):
    """(pointer tensor, task stride, channel stride) of γ or β, or None if misshapen."""
    if p is None:
        return None
    if p.shape == (C,):
        return p, 0, p.stride(0)
    if p.shape == (T, C):
        return p, task_stride(p, 2), p.stride(1)
    return None


def _layout(x):
    T, N, C = x.shape[:3]
    S = x[0, 0, 0].numel() if x.dim() > 3 else 1
    return T, N, C, S


def task_batch_norm(x, gamma, beta, eps, act, negative_slope):
    code = activation_code(act, negative_slope)
    if code is None or x.dim() < 3 or not all_float32_on_one_device(x, gamma, beta):
        return NotImplemented
    T, N, C, S = _layout(x)
    g, b = _channel_param(gamma, T, C), _channel_param(beta, T, C)
    if (gamma is not None and g is None) or (beta is not None and b is None):
        return NotImplemented
    x = x.contiguous()
    out = torch.empty_like(x)
    cfg = batch_norm_config(N * S)
    task_batch_norm_kernel[(C, T)](
        x, gamma if gamma is not None else x, beta if beta is not None else x, out,
        N, C, S, float(eps), float(negative_slope),
        g[1] if g else 0, g[2] if g else 0, b[1] if b else 0, b[2] if b else 0,
        HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, ACT=code,
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return out


def _fused_activation(y, x, act, negative_slope):
    """The activation code of the backward kernels' y (0 without y), or None to decline
    (the reference then runs, and refuses what the op does not take, naming it)."""
    if y is None:
        return 0 if act == "none" else None
    if act not in ("relu", "leaky_relu") or y.shape != x.shape:
        return None
    return activation_code(act, negative_slope)


def task_batch_norm_backward(grad_z, x, gamma, eps, needs, y=None, act="none", negative_slope=0.01, dx_addend=None,
                             dgamma_addend=None):
    """fastmeta.ops.task_batch_norm_backward; the addends are added in the kernel's stores
    (no launch of their own)."""
    code = _fused_activation(y, x, act, negative_slope)
    if (code is None or x.dim() < 3 or grad_z.shape != x.shape
            or not all_float32_on_one_device(grad_z, x, gamma, y, dx_addend, dgamma_addend)):
        return NotImplemented
    T, N, C, S = _layout(x)
    g = _channel_param(gamma, T, C)
    if gamma is not None and g is None:
        return NotImplemented
    need_x, need_gamma, need_beta = (bool(n) for n in needs)
    x, grad_z = x.contiguous(), grad_z.contiguous()
    y = x if y is None else y.contiguous()
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    grad_gamma = x.new_empty((T, C)) if need_gamma else x.new_empty(0)
    grad_beta = x.new_empty((T, C)) if need_beta else x.new_empty(0)
    dx_addend = dx_addend.contiguous() if need_x and dx_addend is not None else None
    dgamma_addend = dgamma_addend.contiguous() if need_gamma and dgamma_addend is not None else None
    if (dx_addend is not None and dx_addend.shape != x.shape) or (
            dgamma_addend is not None and tuple(dgamma_addend.shape) != (T, C)):
        return NotImplemented
    cfg = batch_norm_config(N * S)
    task_batch_norm_backward_kernel[(C, T)](
        grad_z, x, gamma if gamma is not None else x, y, grad_x, grad_gamma, grad_beta,
        dx_addend if dx_addend is not None else x, dgamma_addend if dgamma_addend is not None else x,
        N, C, S, float(eps), float(negative_slope), g[1] if g else 0, g[2] if g else 0,
        HAS_GAMMA=gamma is not None, HAS_Y=code != 0, ACT=code, NEED_X=need_x, NEED_GAMMA=need_gamma,
        NEED_BETA=need_beta, HAS_DX_ADDEND=dx_addend is not None, HAS_DGAMMA_ADDEND=dgamma_addend is not None,
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return [grad_x, grad_gamma, grad_beta]


def task_batch_norm_double_backward(grad_z, x, gamma, up_x, up_gamma, up_beta, eps, needs, y=None, act="none",
                                    negative_slope=0.01):
    code = _fused_activation(y, x, act, negative_slope)
    if (code is None or x.dim() < 3 or grad_z.shape != x.shape or (up_x is not None and up_x.shape != x.shape)
            or not all_float32_on_one_device(grad_z, x, gamma, up_x, up_gamma, up_beta, y)):
        return NotImplemented
    T, N, C, S = _layout(x)
    params = [(p, _channel_param(p, T, C)) for p in (gamma, up_gamma, up_beta)]
    if any(p is not None and layout is None for p, layout in params):
        return NotImplemented
    (_, g), (_, ug), (_, ub) = params
    need_grad_z, need_x, need_gamma = (bool(n) for n in needs)
    x, grad_z = x.contiguous(), grad_z.contiguous()
    up_x = None if up_x is None else up_x.contiguous()
    y = x if y is None else y.contiguous()
    d_grad_z = torch.empty_like(x) if need_grad_z else x.new_empty(0)
    d_x = torch.empty_like(x) if need_x else x.new_empty(0)
    d_gamma = x.new_empty((T, C)) if need_gamma else x.new_empty(0)
    cfg = batch_norm_config(N * S)
    task_batch_norm_double_backward_kernel[(C, T)](
        grad_z, x, *(p if p is not None else x for p in (gamma, up_x, up_gamma, up_beta)), y, d_grad_z, d_x, d_gamma,
        N, C, S, float(eps), float(negative_slope),
        *(layout[k] if layout else 0 for layout in (g, ug, ub) for k in (1, 2)),
        HAS_GAMMA=gamma is not None, HAS_UP_X=up_x is not None, HAS_UP_GAMMA=up_gamma is not None,
        HAS_UP_BETA=up_beta is not None, HAS_Y=code != 0, ACT=code, NEED_GRAD_Z=need_grad_z, NEED_X=need_x,
        NEED_GAMMA=need_gamma,
        GRAD_SUMS=need_x or need_gamma, WRITE=need_grad_z or need_x, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return [d_grad_z, d_x, d_gamma]
