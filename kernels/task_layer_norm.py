"""Triton kernels for ``task_layer_norm`` and its backward (fastmeta/ops/task_layer_norm.py).

Per row r of task t (x viewed as [T, R, D], R = the product of the middle dims):

    μ = mean x[r],  σ² = mean (x[r] − μ)²  (biased),  y = γ[t]·(x − μ)/√(σ² + eps) + β[t]

and backward, with g = grad_y·γ[t]:

    dx = rstd·(g − mean g − x̂·mean(g·x̂)),  dγ[t] = Σ_r grad_y·x̂,  dβ[t] = Σ_r grad_y

grid   forward and dx: (R, T), one program per row: a row of D values sits in registers
       (BLOCK = next power of two ≥ D), so the statistics take one read. dγ and dβ: (⌈D/BLOCK_D⌉, T),
       one program per task and block of features walks the task's R rows; no atomics, so
       the sums are deterministic.
bound  memory: one read of x (and of grad_y) per output.

Declines: non-fp32 or mixed devices, x of rank < 2, D above 16384 (a row must fit in
registers), γ/β not shaped [T, D] / [D], empty tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, interpreting, task_stride

MAX_D = 16384


@triton.jit
def _row_stats(x, ok, D, eps):
    mean = tl.sum(x, axis=0) / D
    d = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / D + eps)
    return d, rstd


@triton.jit
def task_layer_norm_kernel(
    x_ptr, gamma_ptr, beta_ptr, out_ptr, R, D, eps, gamma_task_stride, beta_task_stride,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    base = (t * R + r) * D
    j = tl.arange(0, BLOCK)
    ok = j < D
    x = tl.load(x_ptr + base + j, mask=ok, other=0.0)
    d, rstd = _row_stats(x, ok, D, eps)
    z = d * rstd
    if HAS_GAMMA:
        z = z * tl.load(gamma_ptr + t * gamma_task_stride + j, mask=ok, other=0.0)
    if HAS_BETA:
        z = z + tl.load(beta_ptr + t * beta_task_stride + j, mask=ok, other=0.0)
    tl.store(out_ptr + base + j, z, mask=ok)


@triton.jit
def task_layer_norm_input_grad_kernel(
    grad_y_ptr, x_ptr, gamma_ptr, grad_x_ptr, R, D, eps, gamma_task_stride,
    HAS_GAMMA: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    base = (t * R + r) * D
    j = tl.arange(0, BLOCK)
    ok = j < D
    x = tl.load(x_ptr + base + j, mask=ok, other=0.0)
    g = tl.load(grad_y_ptr + base + j, mask=ok, other=0.0)
    if HAS_GAMMA:
        g = g * tl.load(gamma_ptr + t * gamma_task_stride + j, mask=ok, other=0.0)
    d, rstd = _row_stats(x, ok, D, eps)
    xhat = d * rstd
    mean_g = tl.sum(g, axis=0) / D
    mean_gx = tl.sum(g * xhat, axis=0) / D
    tl.store(grad_x_ptr + base + j, rstd * (g - mean_g - xhat * mean_gx), mask=ok)


@triton.jit
def task_layer_norm_param_grad_kernel(
    grad_y_ptr, x_ptr, grad_gamma_ptr, grad_beta_ptr, R, D, eps,
    NEED_GAMMA: tl.constexpr, NEED_BETA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    jb = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    j = tl.arange(0, BLOCK)
    ok = j < D
    cols = jb * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    acc_gamma = tl.zeros([BLOCK_D], tl.float32)
    acc_beta = tl.zeros([BLOCK_D], tl.float32)
    for r in range(0, R):
        base = (t * R + r) * D
        x = tl.load(x_ptr + base + j, mask=ok, other=0.0)
        _, rstd = _row_stats(x, ok, D, eps)
        mean = tl.sum(x, axis=0) / D
        xc = tl.load(x_ptr + base + cols, mask=cols_ok, other=0.0)
        g = tl.load(grad_y_ptr + base + cols, mask=cols_ok, other=0.0)
        acc_gamma += g * (xc - mean) * rstd
        acc_beta += g
    if NEED_GAMMA:
        tl.store(grad_gamma_ptr + t * D + cols, acc_gamma, mask=cols_ok)
    if NEED_BETA:
        tl.store(grad_beta_ptr + t * D + cols, acc_beta, mask=cols_ok)


def _config(D: int) -> dict:
    """A row in registers: BLOCK the next power of two ≥ D, warps growing with it (4 up to
    2048 values, 8 beyond). The interpreter takes one warp."""
    block = max(16, triton.next_power_of_2(D))
    return {"BLOCK": block, "num_warps": 1 if interpreting() else (4 if block <= 2048 else 8)}


def _feature_param(p, T, D):
    """(tensor, task stride) of γ or β shaped [D] or [T, D] with unit feature stride, else None."""
    if p is None:
        return None
    if p.shape == (D,) and p.stride(0) == 1:
        return p, 0
    if p.shape == (T, D) and p.stride(1) == 1:
        return p, task_stride(p, 2)
    return None


def _takes(x, *params) -> bool:
    return x.dim() >= 2 and 0 < x.size(-1) <= MAX_D and all_float32_on_one_device(x, *params)


def task_layer_norm(x, gamma, beta, eps):
    if not _takes(x, gamma, beta):
        return NotImplemented
    T, D = x.size(0), x.size(-1)
    g, b = _feature_param(gamma, T, D), _feature_param(beta, T, D)
    if (gamma is not None and g is None) or (beta is not None and b is None):
        return NotImplemented
    x = x.contiguous()
    R = x.numel() // (T * D)
    out = torch.empty_like(x)
    cfg = _config(D)
    task_layer_norm_kernel[(R, T)](
        x, gamma if gamma is not None else x, beta if beta is not None else x, out, R, D, float(eps),
        g[1] if g else 0, b[1] if b else 0, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return out


def task_layer_norm_backward(grad_y, x, gamma, eps, needs):
    if grad_y.shape != x.shape or not _takes(x, grad_y, gamma):
        return NotImplemented
    T, D = x.size(0), x.size(-1)
    g = _feature_param(gamma, T, D)
    if gamma is not None and g is None:
        return NotImplemented
    need_x, need_gamma, need_beta = (bool(n) for n in needs)
    x, grad_y = x.contiguous(), grad_y.contiguous()
    R = x.numel() // (T * D)
    cfg = _config(D)
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    grad_gamma = x.new_empty((T, D)) if need_gamma else x.new_empty(0)
    grad_beta = x.new_empty((T, D)) if need_beta else x.new_empty(0)
    if need_x:
        task_layer_norm_input_grad_kernel[(R, T)](
            grad_y, x, gamma if gamma is not None else x, grad_x, R, D, float(eps), g[1] if g else 0,
            HAS_GAMMA=gamma is not None, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
        )
    if need_gamma or need_beta:
        block_d = min(cfg["BLOCK"], 256)
        task_layer_norm_param_grad_kernel[(triton.cdiv(D, block_d), T)](
            grad_y, x, grad_gamma, grad_beta, R, D, float(eps), NEED_GAMMA=need_gamma, NEED_BETA=need_beta,
            BLOCK=cfg["BLOCK"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
        )
    return [grad_x, grad_gamma, grad_beta]
