"""Fused activations (device functions) and the ``activation_grad`` kernel.

``apply_activation`` is inlined into the epilogues of the linear and BatchNorm kernels;
``activation_grad_kernel`` is the backward op they share (fastmeta/ops/activation.py):
grad_y · f'(y), with f' written in the output y.

activation_grad_kernel
    grid  (⌈numel / BLOCK⌉,), one flat elementwise pass.
    bound memory: reads grad_y and y, writes one tensor (12 B per element).

Declines: non-fp32 or mismatched tensors, an unknown activation, leaky_relu with a
negative slope (the op layer rejects it too), empty tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, interpreting

# Activation codes, constexpr in every kernel that fuses one.
ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}


def activation_code(act: str, negative_slope: float) -> int | None:
    """The constexpr code for ``act``, or None when the kernels do not support it."""
    if act == "leaky_relu" and negative_slope < 0:
        return None
    return ACTIVATION_CODES.get(act)


@triton.jit
def _tanh(z):
    # Triton 3.6–3.8 have no portable tanh that also runs under the interpreter
    # (libdevice is CUDA-only), so it is built from exp. (1 − e)/(1 + e) with
    # e = exp(−2|z|) loses relative accuracy as |z| → 0 (1 − e cancels: at |z| = 1e-4 the
    # relative error is ~3e-4), so below |z| = 0.1 an odd Taylor polynomial to z⁹ is used;
    # its truncation error there is < 1e-12 relative. Above 0.1 the error is ≲ 1e-6 relative.
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    z2 = z * z
    small = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0)))))
    return tl.where(a < 0.1, small, tl.where(z < 0, -large, large))


@triton.jit
def apply_activation(z, negative_slope, ACT: tl.constexpr):
    """f(z) for the activation code ACT (see ACTIVATION_CODES)."""
    if ACT == 1:
        return tl.where(z < 0, 0.0, z)  # NaN stays NaN, as in torch.relu
    elif ACT == 2:
        return tl.where(z > 0, z, z * negative_slope)
    elif ACT == 3:
        return _tanh(z)
    elif ACT == 4:
        return 1.0 / (1.0 + tl.exp(-z))
    else:
        return z


@triton.jit
def activation_derivative(y, negative_slope, ACT: tl.constexpr):
    """f'(z) written in y = f(z), with the reference's formulas (so NaN/inf propagate alike)."""
    if ACT == 1:
        return tl.where(y > 0, 1.0, 0.0)
    elif ACT == 2:
        return tl.where(y > 0, 1.0, negative_slope)
    elif ACT == 3:
        return 1.0 - y * y
    elif ACT == 4:
        return y * (1.0 - y)
    else:
        return tl.full(y.shape, 1.0, tl.float32)


@triton.jit
def activation_grad_kernel(grad_y_ptr, y_ptr, out_ptr, numel, negative_slope, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    grad_y = tl.load(grad_y_ptr + offs, mask=in_range, other=0.0)
    y = tl.load(y_ptr + offs, mask=in_range, other=0.0)
    tl.store(out_ptr + offs, grad_y * activation_derivative(y, negative_slope, ACT), mask=in_range)


def elementwise_config(numel: int) -> dict:
    """4096 elements × 8 warps per program (16 per thread) on a GPU: W4's largest
    activation (4 × 80 × 32 × 84 × 84 = 72M) is then 17.6k programs. One program
    under the interpreter."""
    if interpreting():
        return {"BLOCK": max(16, triton.next_power_of_2(numel)), "num_warps": 1}
    return {"BLOCK": 4096 if numel >= 4096 else max(128, triton.next_power_of_2(numel)), "num_warps": 8}


def activation_grad(grad_y, y, act, negative_slope):
    code = activation_code(act, negative_slope)
    if code is None or not all_float32_on_one_device(grad_y, y) or grad_y.shape != y.shape:
        return NotImplemented
    grad_y, y = grad_y.contiguous(), y.contiguous()
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    cfg = elementwise_config(y.numel())
    grid = (triton.cdiv(y.numel(), cfg["BLOCK"]),)
    activation_grad_kernel[grid](
        grad_y, y, out, y.numel(), float(negative_slope),
        ACT=code, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return out
