"""Triton kernels for ``task_conv2d`` and its backward ops (fastmeta/ops/task_conv2d.py).

Each is an implicit GEMM with the task as the batch dimension of the grid, so all tasks
run in one launch with their own weights (what cuDNN's grouped conv does slowly: 9.1 vs
30.8 TFLOP/s shared-weight rate on the H200 at 32 tasks × 10 images of 64×14×14). The
patches are gathered on the fly from x; nothing is unfolded to memory.

    forward       M = N·H'·W' output pixels,  N = O,          K = C·kh·kw
    input-grad    M = N·H·W input pixels,     N = C,          K = O·kh·kw
    weight-grad   M = O,                      N = C·kh·kw,    K = N·H'·W' (· T if shared)

grid   (⌈M / BLOCK_M⌉ · ⌈N / BLOCK_N⌉, batch, SPLIT_K). batch is T, or 1 when the weight
       (and bias) are shared and the tasks fold into the image dimension. Only the
       weight-grad splits K (its output, O × C·kh·kw per task, has few tiles while K runs
       to N·H'·W' = 564k pixels on W4's first layer); partial tiles are summed by torch.
tiling tl.dot(..., input_precision=INPUT_PRECISION) on BLOCK_M × BLOCK_K patches: the
       launchers' ``input_precision`` ("ieee", true fp32, by default; "tf32x3"; "tf32").
bound  FLOPs (W2–W4 convs are 0.1–2 GFLOP per launch). Known waste: the input-grad of a
       strided conv visits every (o, i, j) and masks the ones whose output position is not
       on the stride grid, so at stride 2 about 3/4 of its multiply-adds are on zeros. A
       sub-pixel (phase) decomposition would remove that; not done yet.

Declines: non-fp32 or mixed devices, x not 5-D, w not 4-D / 5-D with matching channels,
stride < 1, padding < 0, an empty output, a bias not shaped [T, O] / [O].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, task_stride
from fastmeta.kernels.task_linear import matmul_config


@triton.jit
def conv2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    NB, C, H, W, O, HO, WO,
    x_task_stride, w_task_stride, bias_task_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    task = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(O, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel (n, oh, ow)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel o
    M = NB * HO * WO
    K = C * KH * KW
    m_ok = offs_m < M
    n_ok = offs_n < O
    image = offs_m // (HO * WO)
    pixel = offs_m % (HO * WO)
    ih0 = (pixel // WO) * stride_h - pad_h
    iw0 = (pixel % WO) * stride_w - pad_w
    x_rows = x_ptr + task * x_task_stride + image.to(tl.int64) * (C * H * W)
    w_cols = w_ptr + task * w_task_stride + offs_n.to(tl.int64) * K

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (c, i, j)
        k_ok = offs_k < K
        c = offs_k // (KH * KW)
        i = (offs_k % (KH * KW)) // KW
        j = offs_k % KW
        ih = ih0[:, None] + i[None, :]
        iw = iw0[:, None] + j[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_rows[:, None] + (c * (H * W))[None, :] + ih * W + iw,
                    mask=m_ok[:, None] & k_ok[None, :] & inside, other=0.0)
        b = tl.load(w_cols[None, :] + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + task * bias_task_stride + offs_n, mask=n_ok, other=0.0)[None, :]
    out_rows = out_ptr + task * out_task_stride + image.to(tl.int64) * (O * HO * WO) + pixel
    tl.store(out_rows[:, None] + (offs_n * (HO * WO))[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def conv2d_input_grad_kernel(
    grad_out_ptr, w_ptr, out_ptr,
    NB, C, H, W, O, HO, WO,
    grad_out_task_stride, w_task_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    task = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(C, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixel (n, h, w)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel c
    M = NB * H * W
    K = O * KH * KW
    m_ok = offs_m < M
    n_ok = offs_n < C
    image = offs_m // (H * W)
    pixel = offs_m % (H * W)
    h_padded = pixel // W + pad_h
    w_padded = pixel % W + pad_w
    g_rows = grad_out_ptr + task * grad_out_task_stride + image.to(tl.int64) * (O * HO * WO)
    w_cols = w_ptr + task * w_task_stride + offs_n * (KH * KW)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (o, i, j)
        k_ok = offs_k < K
        o = offs_k // (KH * KW)
        tap = offs_k % (KH * KW)
        # Output position that read input (h, w) through tap (i, j): oh·s − p + i = h.
        th = h_padded[:, None] - (tap // KW)[None, :]
        tw = w_padded[:, None] - (tap % KW)[None, :]
        oh = th // stride_h
        ow = tw // stride_w
        on_grid = ((th >= 0) & (tw >= 0) & (th - oh * stride_h == 0) & (tw - ow * stride_w == 0)
                   & (oh < HO) & (ow < WO))
        a = tl.load(g_rows[:, None] + (o * (HO * WO))[None, :] + oh * WO + ow,
                    mask=m_ok[:, None] & k_ok[None, :] & on_grid, other=0.0)
        b = tl.load(w_cols[None, :] + (o * (C * KH * KW) + tap)[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_rows = out_ptr + task * out_task_stride + image.to(tl.int64) * (C * H * W) + pixel
    tl.store(out_rows[:, None] + (offs_n * (H * W))[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def conv2d_weight_grad_kernel(
    grad_out_ptr, x_ptr, out_ptr,
    NB, C, H, W, O, HO, WO, k_per_split,
    grad_out_task_stride, x_task_stride, out_split_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    task = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    CKK = C * KH * KW
    tiles_n = tl.cdiv(CKK, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel o
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight column (c, i, j)
    K = NB * HO * WO
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    m_ok = offs_m < O
    n_ok = offs_n < CKK
    c = offs_n // (KH * KW)
    i = (offs_n % (KH * KW)) // KW
    j = offs_n % KW
    g_base = grad_out_ptr + task * grad_out_task_stride + offs_m.to(tl.int64) * (HO * WO)
    x_base = x_ptr + task * x_task_stride + c.to(tl.int64) * (H * W)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # output pixel (n, oh, ow)
        k_ok = offs_k < k_end
        image = (offs_k // (HO * WO)).to(tl.int64)
        pixel = offs_k % (HO * WO)
        a = tl.load(g_base[:, None] + (image * (O * HO * WO) + pixel)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ih = ((pixel // WO) * stride_h - pad_h)[:, None] + i[None, :]
        iw = ((pixel % WO) * stride_w - pad_w)[:, None] + j[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_base[None, :] + (image * (C * H * W))[:, None] + ih * W + iw,
                    mask=k_ok[:, None] & n_ok[None, :] & inside, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out = out_ptr + split.to(tl.int64) * out_split_stride + task * out_task_stride
    tl.store(out + offs_m[:, None] * CKK + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def conv_config(batch: int, M: int, N: int, K: int) -> dict:
    """The GEMM tile table of task_linear.matmul_config, keyed on the implicit GEMM's
    (batch, M, N, K); one source for the tile sizes and the split-K rule."""
    return matmul_config(batch, M, N, K)


def _geometry(stride, padding):
    if len(stride) != 2 or len(padding) != 2:
        return None
    sh, sw = (int(s) for s in stride)
    ph, pw = (int(p) for p in padding)
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        return None
    return sh, sw, ph, pw


def _weight_task_stride(w) -> int:
    return 0 if w.dim() == 4 or (w.size(0) > 1 and w.stride(0) == 0) else w.stride(0)


def _per_task_contiguous_weight(w):
    """w with each task's [O, C, kh, kw] contiguous; the task stride may be anything (a
    view of the flat [T, P] buffer has stride P; an expanded one 0)."""
    O, C, kh, kw = w.shape[-4:]
    if w.stride()[-4:] == (C * kh * kw, kh * kw, kw, 1) or O * C * kh * kw == 1:
        return w
    return w.contiguous()


def task_conv2d(x, w, b, stride, padding, input_precision="ieee"):
    geometry = _geometry(stride, padding)
    if geometry is None or not all_float32_on_one_device(x, w, b) or x.dim() != 5 or w.dim() not in (4, 5):
        return NotImplemented
    sh, sw, ph, pw = geometry
    T, NB, C, H, W = x.shape
    O, _, KH, KW = w.shape[-4:]
    if w.size(-3) != C or (w.dim() == 5 and w.size(0) != T):
        return NotImplemented
    if b is not None and not (b.shape == (O,) or b.shape == (T, O)):
        return NotImplemented
    HO, WO = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    if HO < 1 or WO < 1:
        return NotImplemented
    x = x.contiguous()
    w = _per_task_contiguous_weight(w)
    w_task_stride = _weight_task_stride(w)
    bias_task_stride = task_stride(b, 2) if b is not None else 0
    b = b.contiguous() if b is not None and b.stride(-1) != 1 else b
    out = torch.empty((T, NB, O, HO, WO), dtype=torch.float32, device=x.device)
    if w_task_stride == 0 and bias_task_stride == 0:
        batch, images = 1, T * NB  # shared weight: the tasks fold into the images
    else:
        batch, images = T, NB
    cfg = conv_config(batch, images * HO * WO, O, C * KH * KW)
    grid = (triton.cdiv(images * HO * WO, cfg["BLOCK_M"]) * triton.cdiv(O, cfg["BLOCK_N"]), batch)
    conv2d_forward_kernel[grid](
        x, w, b if b is not None else x, out,
        images, C, H, W, O, HO, WO,
        NB * C * H * W, w_task_stride, bias_task_stride, NB * O * HO * WO,
        sh, sw, ph, pw,
        KH=KH, KW=KW, HAS_BIAS=b is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def task_conv2d_input_grad(grad_out, w, input_size, stride, padding, input_precision="ieee"):
    geometry = _geometry(stride, padding)
    if geometry is None or not all_float32_on_one_device(grad_out, w) or grad_out.dim() != 5:
        return NotImplemented
    if w.dim() not in (4, 5) or len(input_size) != 2:
        return NotImplemented
    sh, sw, ph, pw = geometry
    T, NB, O, HO, WO = grad_out.shape
    _, C, KH, KW = w.shape[-4:]
    H, W = (int(s) for s in input_size)
    if w.size(-4) != O or (w.dim() == 5 and w.size(0) != T) or H < 1 or W < 1:
        return NotImplemented
    if (H + 2 * ph - KH) // sh + 1 != HO or (W + 2 * pw - KW) // sw + 1 != WO:
        return NotImplemented
    grad_out = grad_out.contiguous()
    w = _per_task_contiguous_weight(w)
    w_task_stride = _weight_task_stride(w)
    out = torch.empty((T, NB, C, H, W), dtype=torch.float32, device=grad_out.device)
    batch, images = (1, T * NB) if w_task_stride == 0 else (T, NB)
    cfg = conv_config(batch, images * H * W, C, O * KH * KW)
    grid = (triton.cdiv(images * H * W, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_N"]), batch)
    conv2d_input_grad_kernel[grid](
        grad_out, w, out,
        images, C, H, W, O, HO, WO,
        NB * O * HO * WO, w_task_stride, NB * C * H * W,
        sh, sw, ph, pw,
        KH=KH, KW=KW,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def task_conv2d_weight_grad(grad_out, x, kernel_size, stride, padding, shared, input_precision="ieee"):
    geometry = _geometry(stride, padding)
    if geometry is None or not all_float32_on_one_device(grad_out, x) or grad_out.dim() != 5 or x.dim() != 5:
        return NotImplemented
    if len(kernel_size) != 2:
        return NotImplemented
    sh, sw, ph, pw = geometry
    T, NB, C, H, W = x.shape
    O, HO, WO = grad_out.shape[2:]
    KH, KW = (int(k) for k in kernel_size)
    if grad_out.shape[:2] != (T, NB) or KH < 1 or KW < 1:
        return NotImplemented
    if (H + 2 * ph - KH) // sh + 1 != HO or (W + 2 * pw - KW) // sw + 1 != WO:
        return NotImplemented
    x, grad_out = x.contiguous(), grad_out.contiguous()
    batch, images = (1, T * NB) if shared else (T, NB)
    CKK = C * KH * KW
    K = images * HO * WO
    cfg = conv_config(batch, O, CKK, K)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg["SPLIT_K"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split_k = triton.cdiv(K, k_per_split)
    out_shape = (O, C, KH, KW) if shared else (T, O, C, KH, KW)
    out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
    target = out if split_k == 1 else torch.empty((split_k, *out_shape), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(O, cfg["BLOCK_M"]) * triton.cdiv(CKK, cfg["BLOCK_N"]), batch, split_k)
    conv2d_weight_grad_kernel[grid](
        grad_out, x, target,
        images, C, H, W, O, HO, WO, k_per_split,
        NB * O * HO * WO, NB * C * H * W, out.numel(), O * CKK,
        sh, sw, ph, pw,
        KH=KH, KW=KW,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_k > 1:
        torch.sum(target, dim=0, out=out)  # deterministic, unlike atomics
    return out
