"""Triton kernels for ``max_pool2d`` and its two backward ops (fastmeta/ops/max_pool2d.py).

Max pooling treats every plane ``[H, W]`` of ``[B, C, H, W]`` on its own, so each kernel
is one elementwise launch over its output, ``BLOCK`` elements per program.

    max_pool2d                  per output (b, c, oh, ow): the window's taps in row-major
                                order, ``v > best or v != v`` (a NaN wins; the last NaN),
                                padding never read; best starts at -inf and the index at
                                the window's first in-plane position, as aten's kernel.
                                Writes y and the int64 indices (h·W + w).
    max_pool2d_backward         per input (b, c, h, w): the outputs whose window covers it
                                (at most ⌈kh/sh⌉·⌈kw/sw⌉, a constexpr bound), each adding
                                its gradient where its index is this position. Every
                                element of grad_x is written once, so there is no zeroing
                                launch and no atomic (the reference's scatter-add is two
                                launches: a zero fill and the scatter).
    max_pool2d_double_backward  per output: grad_grad_x gathered at its index.

W4 runs these 24 + 44 + 20 times per captured second-order iteration; the backward's
gather form saves its 44 zero fills (``python -m fastmeta.tools.launches W4
--as-verified``).

bound  memory: one read of each input element per covering window, one write.

Declines: non-fp32 or mixed devices, tensors not 4-D, indices not int64, an empty output,
a padding above half the kernel (the op's check refuses it first), pooled maps whose size
is not the window's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, runnable_device
from fastmeta.kernels.tiles import cdiv

BLOCK = 1024


@triton.jit
def max_pool2d_kernel(
    x_ptr, y_ptr, indices_ptr, total, H, W, HO, WO, stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    plane = offs // (HO * WO)
    pixel = offs % (HO * WO)
    h0 = (pixel // WO) * stride_h - pad_h
    w0 = (pixel % WO) * stride_w - pad_w
    x_plane = x_ptr + plane * (H * W)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    # aten's start index: the window's first position inside the plane.
    index = (tl.maximum(h0, 0) * W + tl.maximum(w0, 0)).to(tl.int64)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            h = h0 + i
            w = w0 + j
            inside = ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            v = tl.load(x_plane + h * W + w, mask=inside, other=float("-inf"))
            take = inside & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            index = tl.where(take, (h * W + w).to(tl.int64), index)
    tl.store(y_ptr + offs, best, mask=ok)
    tl.store(indices_ptr + offs, index, mask=ok)


@triton.jit
def max_pool2d_backward_kernel(
    grad_y_ptr, indices_ptr, grad_x_ptr, total, H, W, HO, WO, stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, COVER_H: tl.constexpr, COVER_W: tl.constexpr, BLOCK: tl.constexpr,
):
    # Input row h is covered by the outputs oh with oh·sh − ph ≤ h ≤ oh·sh − ph + kh − 1:
    # oh from ⌈(h + ph − kh + 1) / sh⌉ to ⌊(h + ph) / sh⌋, at most COVER_H = ⌈kh / sh⌉ rows.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    plane = offs // (H * W)
    position = offs % (H * W)
    h = position // W
    w = position % W
    oh_last = (h + pad_h) // stride_h
    ow_last = (w + pad_w) // stride_w
    out_plane = plane * (HO * WO)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for a in tl.static_range(COVER_H):
        for b in tl.static_range(COVER_W):
            oh = oh_last - a
            ow = ow_last - b
            covers = ok & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO) & (
                h < oh * stride_h - pad_h + KH) & (w < ow * stride_w - pad_w + KW)
            at = out_plane + oh * WO + ow
            picked = tl.load(indices_ptr + at, mask=covers, other=-1)
            g = tl.load(grad_y_ptr + at, mask=covers & (picked == position), other=0.0)
            acc += g
    tl.store(grad_x_ptr + offs, acc, mask=ok)


@triton.jit
def max_pool2d_double_backward_kernel(
    grad_grad_x_ptr, indices_ptr, out_ptr, total, H, W, HO, WO, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    plane = offs // (HO * WO)
    index = tl.load(indices_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, tl.load(grad_grad_x_ptr + plane * (H * W) + index, mask=ok, other=0.0), mask=ok)


def _geometry(x_shape, kernel_size, stride, padding):
    """(kh, kw, sh, sw, ph, pw, Ho, Wo), or None for what the kernels do not take."""
    if len(kernel_size) != 2 or len(stride) != 2 or len(padding) != 2:
        return None
    (kh, kw), (sh, sw), (ph, pw) = ((int(a), int(b)) for a, b in (kernel_size, stride, padding))
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or 2 * ph > kh or 2 * pw > kw:
        return None
    H, W = x_shape[-2:]
    HO, WO = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if HO < 1 or WO < 1:
        return None
    return kh, kw, sh, sw, ph, pw, HO, WO


def _int64_indices(indices, like) -> bool:
    return (indices.dtype == torch.int64 and indices.device == like.device and indices.dim() == 4
            and runnable_device(indices))


def max_pool2d(x, kernel_size, stride, padding):
    """[y, indices] of fastmeta.ops.max_pool2d, or NotImplemented."""
    if not all_float32_on_one_device(x) or x.dim() != 4:
        return NotImplemented
    geometry = _geometry(x.shape, kernel_size, stride, padding)
    if geometry is None:
        return NotImplemented
    kh, kw, sh, sw, ph, pw, HO, WO = geometry
    B, C, H, W = x.shape
    x = x.contiguous()
    y = torch.empty((B, C, HO, WO), dtype=torch.float32, device=x.device)
    indices = torch.empty((B, C, HO, WO), dtype=torch.int64, device=x.device)
    total = y.numel()
    max_pool2d_kernel[(cdiv(total, BLOCK),)](
        x, y, indices, total, H, W, HO, WO, sh, sw, ph, pw, KH=kh, KW=kw, BLOCK=BLOCK)
    return [y, indices]


def max_pool2d_backward(grad_y, indices, input_size, kernel_size, stride, padding):
    """grad_x of fastmeta.ops.max_pool2d_backward (the gather form: the module docstring),
    or NotImplemented."""
    if not all_float32_on_one_device(grad_y) or grad_y.dim() != 4 or not _int64_indices(indices, grad_y):
        return NotImplemented
    if indices.shape != grad_y.shape or len(input_size) != 2 or min(input_size) < 1:
        return NotImplemented
    H, W = (int(s) for s in input_size)
    geometry = _geometry((H, W), kernel_size, stride, padding)
    if geometry is None or geometry[-2:] != tuple(grad_y.shape[2:]):
        return NotImplemented
    kh, kw, sh, sw, ph, pw, HO, WO = geometry
    B, C = grad_y.shape[:2]
    grad_x = torch.empty((B, C, H, W), dtype=torch.float32, device=grad_y.device)
    total = grad_x.numel()
    max_pool2d_backward_kernel[(cdiv(total, BLOCK),)](
        grad_y.contiguous(), indices.contiguous(), grad_x, total, H, W, HO, WO, sh, sw, ph, pw,
        KH=kh, KW=kw, COVER_H=cdiv(kh, sh), COVER_W=cdiv(kw, sw), BLOCK=BLOCK)
    return grad_x


def max_pool2d_double_backward(grad_grad_x, indices, kernel_size, stride, padding):
    """fastmeta.ops.max_pool2d_double_backward: grad_grad_x gathered at the indices (the
    window only checked against the shapes), or NotImplemented."""
    if not all_float32_on_one_device(grad_grad_x) or grad_grad_x.dim() != 4 or not _int64_indices(indices, grad_grad_x):
        return NotImplemented
    geometry = _geometry(grad_grad_x.shape[2:], kernel_size, stride, padding)
    if indices.shape[:2] != grad_grad_x.shape[:2] or geometry is None or geometry[-2:] != tuple(indices.shape[2:]):
        return NotImplemented
    B, C, H, W = grad_grad_x.shape
    HO, WO = indices.shape[2:]
    out = torch.empty((B, C, HO, WO), dtype=torch.float32, device=grad_grad_x.device)
    total = out.numel()
    if total == 0:
        return NotImplemented
    max_pool2d_double_backward_kernel[(cdiv(total, BLOCK),)](
        grad_grad_x.contiguous(), indices.contiguous(), out, total, H, W, HO, WO, BLOCK=BLOCK)
    return out
