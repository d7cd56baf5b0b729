"""Triton kernels for ``task_conv2d`` and its backward ops (fastmeta/ops/task_conv2d.py).

Each is an implicit GEMM with the task as the batch dimension of the grid, so all tasks
run in one launch with their own weights (what cuDNN's grouped conv does slowly: 9.1 vs
30.8 TFLOP/s shared-weight rate on the H200 at 32 tasks × 10 images of 64×14×14). The
patches are gathered on the fly from x; nothing is unfolded to memory.

    forward       M = N·H'·W' output pixels,  N = O,          K = C·kh·kw
    input-grad    per output phase (rh, rw), rh < stride_h, rw < stride_w:
                  M = N · the phase's input pixels,  N = C,  K = O · the phase's taps
    weight-grad   M = O,                      N = C·kh·kw,    K = N·H'·W' (· T if shared)

grid   (⌈M / BLOCK_M⌉ · ⌈N / BLOCK_N⌉, batch, Z). batch is T, or 1 when the weight (and
       bias) are shared and the tasks fold into the image dimension. Z is SPLIT_K, the K
       ranges of a split launch; for the input-grad, its stride_h · stride_w phases times
       SPLIT_K (row 0 then sized for the largest phase). Any of the three splits K where a
       launch would have fewer busy programs than two waves of the GPU's SMs (W2's 7 × 7
       and smaller layers, W4's weight gradients with K = N·H'·W' up to 564k pixels): the
       partial tiles go to a buffer [SPLIT_K, *out], summed in split order (deterministic,
       unlike atomics) by the last K range of each tile in its epilogue (ONE_PASS,
       kernels/split_k.py), or by torch in a second launch where one pass is not in force;
       the forward's first K range adds the bias. Tiles,
       split, warps and stages: kernels/tiles.py (the rule from the per-task problem, the
       table of tuned shape classes, the SM count).
tiling tl.dot(..., input_precision=INPUT_PRECISION) on BLOCK_M × BLOCK_K patches: the
       launchers' ``input_precision`` ("ieee", true fp32, by default; "tf32x3"; "tf32").
bound  FLOPs (W2–W4 convs are 0.1–2 GFLOP per launch).

The input gradient by phase (sub-pixel decomposition). Input pixel h is read by tap i from
output row oh where oh·s − p + i = h, so only the taps i ≡ h + p (mod s) reach it. The
pixels of one phase r = (h + p) mod s form a stride-1 problem with the taps r, r + s, …:
for a 3×3 kernel at stride 2 the four phases take 2×2, 2×1, 1×2 and 1×1 taps, 9 in all
instead of 4 × 9, so no multiply-add is by a tap that is off the stride grid (the kernel
before this one masked 3/4 of its taps at stride 2: W2's input gradients issued 6.40 G
MACs for 1.63 G useful). The phases are grid row 2 of one launch.

The backward's launches in one. task_conv2d_backward's input and weight gradients read the
same grad_out and do not depend on each other, nor do the double backward's d grad_out, d x
and d w. Where the protocol GRADS_IN_ONE_LAUNCH is in force (kernels/verified_protocols.py:
on CUDA once the GPU check has verified it) the launches of one call run as one,
conv2d_grads_kernel, whose 1-D grid holds every part's programs, each part with its own
plan (tiles, split, epilogue), so that each output is what its own launch writes, bit for
bit (tests/kernels/test_conv_grads_in_one_launch.py). One launch where there were two or
three (W2 15 fewer per captured iteration, W4 63), and the parts fill the SMs that the
others leave idle.

Every launch's grid, tiles and MACs come from a plan function of its shapes
(:func:`conv_launch_plan`, :class:`ConvLaunch`): the launcher runs what the plan says, and
the accounting (tests/kernels/test_conv_issued_macs.py) counts from the same plan.

Declines: non-fp32 or mixed devices, x not 5-D, w not 4-D / 5-D with matching channels,
stride < 1, padding < 0, an empty output, a bias not shaped [T, O] / [O].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, task_stride
from fastmeta.kernels.verified_protocols import in_force
from fastmeta.kernels.split_k import split_reduction, split_reductions, store_tile
from fastmeta.kernels.tiles import (
    cdiv,
    busy_programs,
    device_sm_count,
    k_steps,
    launch_config,
    normalized_split,
    PlannedLaunch,
    plan_config,
    planned_launch,
)


@triton.jit
def conv2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, final_ptr, counters_ptr, x2_ptr, w2_ptr,
    NB, C, H, W, O, HO, WO, k_per_split,
    x_task_stride, w_task_stride, bias_task_stride, out_split_stride, out_task_stride, w2_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ONE_PASS: tl.constexpr = False, TWO_TERMS: tl.constexpr = False,
):
    # ONE_PASS (a split launch): out_ptr is the partial tiles' buffer, and the last K range
    # of each tile to finish writes their sum to final_ptr (kernels/split_k.py).
    # TWO_TERMS: conv(x, w) + conv(x2, w2) as one GEMM over K = 2·C·kh·kw, the second
    # half of K reading x2 (x's shape and task stride) and w2 (at w2_task_stride): the
    # double backward's d grad_out in one launch.
    forward_program(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(2),
        x_ptr, w_ptr, bias_ptr, out_ptr, final_ptr, counters_ptr, x2_ptr, w2_ptr,
        NB, C, H, W, O, HO, WO, k_per_split,
        x_task_stride, w_task_stride, bias_task_stride, out_split_stride, out_task_stride, w2_task_stride,
        stride_h, stride_w, pad_h, pad_w, KH, KW, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, ONE_PASS,
        TWO_TERMS)


@triton.jit
def forward_program(
    tile, task, split, tiles_per_task, splits,
    x_ptr, w_ptr, bias_ptr, out_ptr, final_ptr, counters_ptr, x2_ptr, w2_ptr,
    NB, C, H, W, O, HO, WO, k_per_split,
    x_task_stride, w_task_stride, bias_task_stride, out_split_stride, out_task_stride, w2_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ONE_PASS: tl.constexpr, TWO_TERMS: tl.constexpr,
):
    # One program of the forward launch: (tile, task, split) its place in the grid
    # (tiles_per_task × tasks × splits), as conv2d_forward_kernel's program ids, or a
    # grouped launch's (conv2d_grads_kernel).
    task = task.to(tl.int64)
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
    x2_rows = x2_ptr + task * x_task_stride + image.to(tl.int64) * (C * H * W)
    w2_cols = w2_ptr + task * w2_task_stride + offs_n.to(tl.int64) * K

    k_begin = split * k_per_split
    k_end = tl.minimum(2 * K if TWO_TERMS else K, k_begin + k_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (term, c, i, j)
        k_ok = offs_k < k_end
        second = offs_k >= K  # all False with one term
        kk = tl.where(second, offs_k - K, offs_k)
        c = kk // (KH * KW)
        i = (kk % (KH * KW)) // KW
        j = kk % KW
        ih = ih0[:, None] + i[None, :]
        iw = iw0[:, None] + j[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        patch = (c * (H * W))[None, :] + ih * W + iw
        a_ok = m_ok[:, None] & k_ok[None, :] & inside
        b_ok = k_ok[:, None] & n_ok[None, :]
        if TWO_TERMS:  # each element from one term: the other's load is masked off
            a = (tl.load(x_rows[:, None] + patch, mask=a_ok & ~second[None, :], other=0.0)
                 + tl.load(x2_rows[:, None] + patch, mask=a_ok & second[None, :], other=0.0))
            b = (tl.load(w_cols[None, :] + kk[:, None], mask=b_ok & ~second[:, None], other=0.0)
                 + tl.load(w2_cols[None, :] + kk[:, None], mask=b_ok & second[:, None], other=0.0))
        else:
            a = tl.load(x_rows[:, None] + patch, mask=a_ok, other=0.0)
            b = tl.load(w_cols[None, :] + kk[:, None], mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:  # once: by the first K range's partial tile
        acc += tl.load(bias_ptr + task * bias_task_stride + offs_n, mask=n_ok & (split == 0), other=0.0)[None, :]
    offsets = ((task * out_task_stride + image.to(tl.int64) * (O * HO * WO) + pixel)[:, None]
               + (offs_n * (HO * WO))[None, :])
    stored = m_ok[:, None] & n_ok[None, :]
    store_tile(acc, out_ptr, offsets, out_split_stride, final_ptr, stored, split, splits,
               counters_ptr + tile + tiles_per_task * task, ONE_PASS)


@triton.jit
def conv2d_input_grad_kernel(
    grad_out_ptr, w_ptr, out_ptr, addend_ptr, final_ptr, counters_ptr,
    NB, C, H, W, O, HO, WO, splits, k_per_split,
    grad_out_task_stride, w_task_stride, out_split_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_ADDEND: tl.constexpr = False, ONE_PASS: tl.constexpr = False,
):
    # HAS_ADDEND: the first K range's tiles also add addend (the output's shape, contiguous,
    # unsplit) before they store: dx + dx_addend in the store it makes anyway.
    # ONE_PASS: as in conv2d_forward_kernel, one counter per (tile, task, phase).
    input_grad_program(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(1),
        grad_out_ptr, w_ptr, out_ptr, addend_ptr, final_ptr, counters_ptr,
        NB, C, H, W, O, HO, WO, splits, k_per_split,
        grad_out_task_stride, w_task_stride, out_split_stride, out_task_stride,
        stride_h, stride_w, pad_h, pad_w, KH, KW, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, HAS_ADDEND, ONE_PASS)


@triton.jit
def input_grad_program(
    tile, task, z, tiles_per_task, tasks,
    grad_out_ptr, w_ptr, out_ptr, addend_ptr, final_ptr, counters_ptr,
    NB, C, H, W, O, HO, WO, splits, k_per_split,
    grad_out_task_stride, w_task_stride, out_split_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_ADDEND: tl.constexpr, ONE_PASS: tl.constexpr,
):
    # One program of the input-gradient launch: (tile, task, z) its place in the grid
    # (tiles_per_task × tasks × phases · splits), as conv2d_input_grad_kernel's program ids,
    # or a grouped launch's (conv2d_grads_kernel).
    task = task.to(tl.int64)
    phase = z // splits  # grid row 2: (phase, K range)
    split = z % splits
    rh = phase // stride_w
    rw = phase % stride_w
    h_first = (rh + stride_h - pad_h % stride_h) % stride_h  # the first h of the phase
    w_first = (rw + stride_w - pad_w % stride_w) % stride_w
    rows = (H - h_first + stride_h - 1) // stride_h  # the phase's input rows, columns, taps
    cols = (W - w_first + stride_w - 1) // stride_w
    taps_h = (KH - rh + stride_h - 1) // stride_h
    taps_w = (KW - rw + stride_w - 1) // stride_w
    taps = taps_h * taps_w
    M = NB * rows * cols
    K = O * taps
    tiles_n = tl.cdiv(C, BLOCK_N)
    # The grid is sized for the largest phase: the programs past this phase's tiles, or
    # past its K ranges, idle (those within its tiles store zeros: the partial tiles of a
    # split launch are all summed).
    k_begin = split * k_per_split
    k_end = tl.where(tile < tl.cdiv(M, BLOCK_M) * tiles_n, tl.minimum(K, k_begin + k_per_split), 0)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # phase pixel (n, qh, qw)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel c
    m_ok = offs_m < M
    n_ok = offs_n < C
    plane = tl.maximum(rows * cols, 1)
    image = offs_m // plane
    pixel = offs_m % plane
    qh = pixel // tl.maximum(cols, 1)
    qw = pixel % tl.maximum(cols, 1)
    h = h_first + qh * stride_h
    w = w_first + qw * stride_w
    oh0 = (h + pad_h) // stride_h
    ow0 = (w + pad_w) // stride_w
    g_rows = grad_out_ptr + task * grad_out_task_stride + image.to(tl.int64) * (O * HO * WO)
    w_cols = w_ptr + task * w_task_stride + offs_n * (KH * KW)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (o, a, b): tap (rh + a·stride_h, rw + b·stride_w)
        k_ok = offs_k < k_end
        o = offs_k // taps
        a = (offs_k % taps) // taps_w
        b = offs_k % taps_w
        oh = oh0[:, None] - a[None, :]
        ow = ow0[:, None] - b[None, :]
        inside = (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        g = tl.load(g_rows[:, None] + (o * (HO * WO))[None, :] + oh * WO + ow,
                    mask=m_ok[:, None] & k_ok[None, :] & inside, other=0.0)
        tap = (rh + a * stride_h) * KW + rw + b * stride_w
        wt = tl.load(w_cols[None, :] + (o * (C * KH * KW) + tap)[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(g, wt, acc, input_precision=INPUT_PRECISION)

    # A phase without taps (kernel 1 at stride 2: the odd pixels) stores its zeros (and its addend).
    offsets = ((task * out_task_stride + image.to(tl.int64) * (C * H * W) + h * W + w)[:, None]
               + (offs_n * (H * W))[None, :])
    stored = m_ok[:, None] & n_ok[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + offsets, mask=stored & (split == 0), other=0.0)
    store_tile(acc, out_ptr, offsets, out_split_stride, final_ptr, stored, split, splits,
               counters_ptr + tile + tiles_per_task * (task + tasks * phase), ONE_PASS)


@triton.jit
def conv2d_weight_grad_kernel(
    grad_out_ptr, x_ptr, out_ptr, addend_ptr, final_ptr, counters_ptr,
    NB, C, H, W, O, HO, WO, k_per_split,
    grad_out_task_stride, x_task_stride, out_split_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_ADDEND: tl.constexpr = False, ONE_PASS: tl.constexpr = False,
):
    # HAS_ADDEND: as in conv2d_input_grad_kernel (dw + dw_addend, by the first K range).
    # ONE_PASS: as in conv2d_forward_kernel.
    weight_grad_program(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(2),
        grad_out_ptr, x_ptr, out_ptr, addend_ptr, final_ptr, counters_ptr,
        NB, C, H, W, O, HO, WO, k_per_split,
        grad_out_task_stride, x_task_stride, out_split_stride, out_task_stride,
        stride_h, stride_w, pad_h, pad_w, KH, KW, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, HAS_ADDEND, ONE_PASS)


@triton.jit
def weight_grad_program(
    tile, task, split, tiles_per_task, splits,
    grad_out_ptr, x_ptr, out_ptr, addend_ptr, final_ptr, counters_ptr,
    NB, C, H, W, O, HO, WO, k_per_split,
    grad_out_task_stride, x_task_stride, out_split_stride, out_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_ADDEND: tl.constexpr, ONE_PASS: tl.constexpr,
):
    # One program of the weight-gradient launch: (tile, task, split) its place in the grid
    # (tiles_per_task × tasks × splits), as in input_grad_program.
    task = task.to(tl.int64)
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

    offsets = task * out_task_stride + offs_m[:, None] * CKK + offs_n[None, :]
    stored = m_ok[:, None] & n_ok[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + offsets, mask=stored & (split == 0), other=0.0)
    store_tile(acc, out_ptr, offsets, out_split_stride, final_ptr, stored, split, splits,
               counters_ptr + tile + tiles_per_task * task, ONE_PASS)


@triton.jit
def conv2d_grads_kernel(
    grad_out_ptr,
    fwd_x_ptr, fwd_w_ptr, fwd_x2_ptr, fwd_w2_ptr, fwd_out_ptr, fwd_final_ptr, fwd_counters_ptr,
    dx_w_ptr, dx_ptr, dx_addend_ptr, dx_final_ptr, dx_counters_ptr,
    dw_x_ptr, dw_ptr, dw_addend_ptr, dw_final_ptr, dw_counters_ptr,
    C, H, W, O, HO, WO,
    fwd_begin, fwd_images, fwd_tiles, fwd_tasks, fwd_splits, fwd_k_per_split,
    dx_begin, dx_images, dx_tiles, dx_tasks, dx_rows, dx_splits, dx_k_per_split,
    dw_begin, dw_images, dw_tiles, dw_tasks, dw_splits, dw_k_per_split,
    x_task_stride, grad_out_task_stride, fwd_w_task_stride, fwd_w2_task_stride, dx_w_task_stride,
    fwd_split_stride, dx_split_stride, dw_split_stride, dw_task_stride,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    FWD_BLOCK_M: tl.constexpr, FWD_BLOCK_N: tl.constexpr, FWD_BLOCK_K: tl.constexpr,
    DX_BLOCK_M: tl.constexpr, DX_BLOCK_N: tl.constexpr, DX_BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr, DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_FORWARD: tl.constexpr, HAS_INPUT_GRAD: tl.constexpr, HAS_WEIGHT_GRAD: tl.constexpr,
    TWO_TERMS: tl.constexpr, DX_ADDEND: tl.constexpr, DW_ADDEND: tl.constexpr,
    FWD_ONE_PASS: tl.constexpr, DX_ONE_PASS: tl.constexpr, DW_ONE_PASS: tl.constexpr,
):
    # The launches of one backward call as one 1-D grid (the protocol
    # "conv2d_grads_in_one_launch", kernels/verified_protocols.py): task_conv2d_backward's
    # input and weight gradients, or the double backward's d grad_out (the forward
    # launch, TWO_TERMS where both upstreams are given), d x and d w. Each part present
    # (HAS_*) owns the programs [its begin, its begin + its programs) and runs them as its
    # own launch would: program (tile, task, z) of its own grid (tiles × tasks × z), its
    # own tiles, split and epilogue, so each output is what its single launch writes, bit
    # for bit. Every x-shaped tensor (x, g_dx) has x_task_stride and every grad_out-shaped
    # one grad_out_task_stride; the parts' outputs are contiguous.
    pid = tl.program_id(0)
    if HAS_FORWARD:
        program = pid - fwd_begin
        if (program >= 0) & (program < fwd_tiles * fwd_tasks * fwd_splits):
            forward_program(
                program % fwd_tiles, (program // fwd_tiles) % fwd_tasks, program // (fwd_tiles * fwd_tasks),
                fwd_tiles, fwd_splits,
                fwd_x_ptr, fwd_w_ptr, fwd_x_ptr, fwd_out_ptr, fwd_final_ptr, fwd_counters_ptr, fwd_x2_ptr, fwd_w2_ptr,
                fwd_images, C, H, W, O, HO, WO, fwd_k_per_split,
                x_task_stride, fwd_w_task_stride, 0, fwd_split_stride, grad_out_task_stride, fwd_w2_task_stride,
                stride_h, stride_w, pad_h, pad_w, KH, KW, False, FWD_BLOCK_M, FWD_BLOCK_N, FWD_BLOCK_K,
                INPUT_PRECISION, FWD_ONE_PASS, TWO_TERMS)
    if HAS_INPUT_GRAD:
        program = pid - dx_begin
        if (program >= 0) & (program < dx_tiles * dx_tasks * dx_rows):
            input_grad_program(
                program % dx_tiles, (program // dx_tiles) % dx_tasks, program // (dx_tiles * dx_tasks),
                dx_tiles, dx_tasks,
                grad_out_ptr, dx_w_ptr, dx_ptr, dx_addend_ptr, dx_final_ptr, dx_counters_ptr,
                dx_images, C, H, W, O, HO, WO, dx_splits, dx_k_per_split,
                grad_out_task_stride, dx_w_task_stride, dx_split_stride, x_task_stride,
                stride_h, stride_w, pad_h, pad_w, KH, KW, DX_BLOCK_M, DX_BLOCK_N, DX_BLOCK_K, INPUT_PRECISION,
                DX_ADDEND, DX_ONE_PASS)
    if HAS_WEIGHT_GRAD:
        program = pid - dw_begin
        if (program >= 0) & (program < dw_tiles * dw_tasks * dw_splits):
            weight_grad_program(
                program % dw_tiles, (program // dw_tiles) % dw_tasks, program // (dw_tiles * dw_tasks),
                dw_tiles, dw_splits,
                grad_out_ptr, dw_x_ptr, dw_ptr, dw_addend_ptr, dw_final_ptr, dw_counters_ptr,
                dw_images, C, H, W, O, HO, WO, dw_k_per_split,
                grad_out_task_stride, x_task_stride, dw_split_stride, dw_task_stride,
                stride_h, stride_w, pad_h, pad_w, KH, KW, DW_BLOCK_M, DW_BLOCK_N, DW_BLOCK_K, INPUT_PRECISION,
                DW_ADDEND, DW_ONE_PASS)


# ---------------------------------------------------------------------------------------
# launch plans: the grid, the tiles and the MACs of each launch, from its shapes alone. The
# launchers run exactly what these return, and conv_launch_plan() gives it without running
# anything, so the accounting (tests/kernels/test_conv_issued_macs.py) is of the real grids.
# The tiles and split-K come from kernels/tiles.py (the rule, the table, the SM count).
# ---------------------------------------------------------------------------------------


def conv_config(batch: int, M: int, N: int, K: int, *, kernel: str = "conv_forward", problems=None,
                sm_count: int | None = None, can_split: bool = True) -> dict:
    """The launchers' tiles for an implicit GEMM of ``batch`` × (M, N, K) (``problems``: one
    (M, K) per input-gradient phase): tiles.launch_config's plan at ``sm_count`` SMs (the
    device's), or the interpreter's tiles where there is none."""
    return launch_config(kernel, batch, problems or ((M, K),), N, sm_count, can_split)


def gpu_conv_config(batch: int, M: int, N: int, K: int, *, kernel: str = "conv_forward", problems=None,
                    sm_count: int | None = None, can_split: bool = True) -> dict:
    """The tiles a GPU launch gets at ``sm_count`` SMs (an H100's 132 by default), also under
    the interpreter: for the accounting on the CPU, and for tests that run a GPU's tiles."""
    return plan_config(kernel, batch, problems or ((M, K),), N, sm_count, can_split)


@dataclass(frozen=True)
class ConvLaunch(PlannedLaunch):
    """One launch of a conv kernel.

    kernel: "forward", "input_grad" or "weight_grad". batch: grid row 1 (T, or 1 when the
    tasks fold into the images of a shared weight); images: examples per batch entry.
    grid, config: what the launcher runs (config: the tiles, SPLIT_K and k_per_split, warps,
    stages; from the plan also its shape_class and source). issued_macs: the multiply-adds
    the grid's programs execute, BLOCK_M × BLOCK_N × BLOCK_K per K-step, tile padding and
    masked taps included (a split adds none). useful_macs: the convolution's own,
    T·N·O·H'·W'·C·kh·kw, the same for all three kernels. busy_programs: the programs with
    at least one K-step; sm_count: the SMs the launch was planned for (None: the
    interpreter's tiles, or tiles forced by the caller).
    """

    kernel: str
    batch: int
    images: int
    grid: tuple[int, int, int]
    config: dict
    issued_macs: int
    useful_macs: int
    busy_programs: int = 0
    sm_count: int | None = None

    def launch_tiles(self) -> dict:
        """The tile constants the launch passes (BLOCK_M, BLOCK_N, BLOCK_K)."""
        return {k: self.config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}


GRADS_IN_ONE_LAUNCH = "conv2d_grads_in_one_launch"  # the grouped launch's protocol (kernels/verified_protocols.py)
_PART_PREFIXES = {"forward": "FWD", "input_grad": "DX", "weight_grad": "DW"}  # conv2d_grads_kernel's constexprs
_PLACEHOLDER_TILE = 16  # an absent part's tile constants (tl.dot's smallest tile; its code is not compiled)


@dataclass(frozen=True)
class ConvLaunchGroup(PlannedLaunch):
    """The launches of one backward call as one launch of conv2d_grads_kernel, where the
    protocol :data:`GRADS_IN_ONE_LAUNCH` is in force: task_conv2d_backward's input and
    weight gradients, or the double backward's d grad_out (a forward launch), d x and d w.
    Each part keeps its own plan (tiles, split, MACs); the launch's 1-D grid is the parts'
    programs one part after another, those whose programs run more MACs each first
    (longest first: the short ones fill the tail). Warps: the most of the parts'; stages:
    the fewest (one part's code runs at a time, and the compiler reuses one part's shared
    memory for the next's: tests/kernels/test_triton_compile.py)."""

    parts: tuple[ConvLaunch, ...]  # in the order of their programs
    kernel: str = "grads"

    @classmethod
    def of(cls, launches) -> "ConvLaunchGroup":
        kinds = [launch.kernel for launch in launches]
        if len(launches) < 2 or len(set(kinds)) != len(kinds) or not set(kinds) <= set(_PART_PREFIXES):
            raise ValueError(f"a conv launch group takes two or three launches of distinct kinds "
                             f"{sorted(_PART_PREFIXES)}, got {kinds}")
        order = list(_PART_PREFIXES)
        return cls(tuple(sorted(launches, key=lambda launch: (
            -launch.issued_macs / max(launch.busy_programs, 1), order.index(launch.kernel)))))

    def part(self, kind: str) -> ConvLaunch | None:
        """The part of kind ``kind`` ("forward", "input_grad", "weight_grad"), or None."""
        return next((part for part in self.parts if part.kernel == kind), None)

    def begin(self, kind: str) -> int:
        """The first program of part ``kind`` in the launch's grid."""
        begin = 0
        for part in self.parts:
            if part.kernel == kind:
                return begin
            begin += part.programs
        raise KeyError(kind)

    @property
    def grid(self) -> tuple[int, int, int]:
        return sum(part.programs for part in self.parts), 1, 1

    @property
    def config(self) -> dict:
        configs = [part.config for part in self.parts]
        return {"num_warps": max(c["num_warps"] for c in configs), "num_stages": min(c["num_stages"] for c in configs),
                "SPLIT_K": max(c["SPLIT_K"] for c in configs)}

    @property
    def issued_macs(self) -> int:
        return sum(part.issued_macs for part in self.parts)

    @property
    def useful_macs(self) -> int:
        return sum(part.useful_macs for part in self.parts)

    @property
    def busy_programs(self) -> int:
        return sum(part.busy_programs for part in self.parts)

    @property
    def sm_count(self) -> int | None:
        return self.parts[0].sm_count

    def launch_tiles(self) -> dict:
        """The tile constants the launch passes (conv2d_grads_kernel's names; an absent
        part's are placeholders)."""
        tiles = {}
        for kind, prefix in _PART_PREFIXES.items():
            part = self.part(kind)
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                tiles[f"{prefix}_{name}"] = part.config[name] if part is not None else _PLACEHOLDER_TILE
        return tiles


def _tile_macs(config: dict) -> int:
    return config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"]


def _config(config_for, kernel, batch, problems, N, sm_count) -> dict:
    """The tile rule's config (``config_for``, default conv_config) with its SPLIT_K made
    whole: K ranges of whole BLOCK_K steps (k_per_split), none empty."""
    problems = tuple(problems)
    M, K = max(m for m, _ in problems), max(k for _, k in problems)
    cfg = dict((config_for or conv_config)(batch, M, N, K, kernel=kernel, problems=problems, sm_count=sm_count))
    split_k, k_per_split = normalized_split(K, cfg["BLOCK_K"], cfg.get("SPLIT_K", 1))
    cfg.update(SPLIT_K=split_k, k_per_split=k_per_split)
    return cfg


def _launch(kernel, batch, images, problems, N, grid_z, cfg, useful) -> ConvLaunch:
    bm, bn, bk, kps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["k_per_split"]
    tiles = [cdiv(m, bm) * cdiv(N, bn) for m, _ in problems]
    steps = sum(t * k_steps(k, bk, kps) for t, (_, k) in zip(tiles, problems))
    return ConvLaunch(kernel, batch, images, (max(tiles), batch, grid_z), cfg,
                      issued_macs=batch * steps * _tile_macs(cfg), useful_macs=useful,
                      busy_programs=busy_programs(batch, problems, N, bm, bn, kps), sm_count=cfg.get("sm_count"))


def forward_launch(batch, images, C, H, W, O, KH, KW, stride, padding, config_for=None,
                   sm_count=None, terms=1) -> ConvLaunch:
    """M = images · H'·W', N = O, K = terms · C·kh·kw (two terms: the sum of two
    convolutions of the same shapes, TWO_TERMS); grid row 2 is the K ranges of a split.
    Two terms take the tiles of one term's plan (its shape class) and twice its K ranges:
    the launch issues no more than the two single launches would (K ranges of whole
    BLOCK_K steps over both terms), where a plan for the doubled K could take larger tiles
    and pad more."""
    (sh, sw), (ph, pw) = stride, padding
    HO, WO = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    problems = ((images * HO * WO, C * KH * KW),)
    cfg = _config(config_for, "conv_forward", batch, problems, O, sm_count)
    if terms > 1:
        problems = ((images * HO * WO, terms * C * KH * KW),)
        split_k, k_per_split = normalized_split(terms * C * KH * KW, cfg["BLOCK_K"], terms * cfg["SPLIT_K"])
        cfg.update(SPLIT_K=split_k, k_per_split=k_per_split)
    return _launch("forward", batch, images, problems, O, cfg["SPLIT_K"], cfg,
                   useful=terms * batch * images * HO * WO * O * C * KH * KW)


def input_grad_phases(size: int, kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
    """Per output phase r < stride of one dimension: (input positions, kernel taps). The
    positions p with (p + padding) % stride == r are reached only by the taps i ≡ r (mod
    stride); a phase may have no positions (size < stride) or no taps (kernel ≤ r)."""
    return [((size - (r - padding) % stride + stride - 1) // stride, (kernel - r + stride - 1) // stride)
            for r in range(stride)]


def input_grad_launch(batch, images, C, H, W, O, KH, KW, stride, padding, config_for=None,
                      sm_count=None) -> ConvLaunch:
    """One launch for the stride_h · stride_w phases, each a stride-1 problem M = images ·
    its pixels, N = C, K = O · its taps; grid row 2 is (phase, K range), SPLIT_K ranges of
    k_per_split per phase. The largest phase sizes the tiles and the grid's row 0; a
    phase's programs past its own tiles or K ranges idle (no K-steps)."""
    (sh, sw), (ph, pw) = stride, padding
    HO, WO = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    problems = tuple((images * rows * cols, O * taps_h * taps_w)
                     for rows, taps_h in input_grad_phases(H, KH, sh, ph)
                     for cols, taps_w in input_grad_phases(W, KW, sw, pw))
    cfg = _config(config_for, "conv_input_grad", batch, problems, C, sm_count)
    return _launch("input_grad", batch, images, problems, C, sh * sw * cfg["SPLIT_K"], cfg,
                   useful=batch * images * HO * WO * O * C * KH * KW)


def weight_grad_launch(batch, images, C, H, W, O, KH, KW, stride, padding, config_for=None,
                       sm_count=None) -> ConvLaunch:
    """M = O, N = C·kh·kw, K = images · H'·W'; grid row 2 is the K ranges of a split."""
    (sh, sw), (ph, pw) = stride, padding
    HO, WO = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    problems = ((O, images * HO * WO),)
    cfg = _config(config_for, "conv_weight_grad", batch, problems, C * KH * KW, sm_count)
    return _launch("weight_grad", batch, images, problems, C * KH * KW, cfg["SPLIT_K"], cfg,
                   useful=batch * O * C * KH * KW * images * HO * WO)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


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


def _forward_call(x, w, b, stride, padding, config_for=None, sm_count=None):
    """(launch, x, w, b, w task stride, bias task stride) for task_conv2d, or None where it
    declines."""
    geometry = _geometry(stride, padding)
    if geometry is None or not all_float32_on_one_device(x, w, b) or x.dim() != 5 or w.dim() not in (4, 5):
        return None
    sh, sw, ph, pw = geometry
    T, NB, C, H, W = x.shape
    O, _, KH, KW = w.shape[-4:]
    if w.size(-3) != C or (w.dim() == 5 and w.size(0) != T):
        return None
    if b is not None and not (b.shape == (O,) or b.shape == (T, O)):
        return None
    if (H + 2 * ph - KH) // sh + 1 < 1 or (W + 2 * pw - KW) // sw + 1 < 1:
        return None
    w = _per_task_contiguous_weight(w)
    w_task_stride = _weight_task_stride(w)
    bias_task_stride = task_stride(b, 2) if b is not None else 0
    # Shared weight and bias: the tasks fold into the images.
    batch, images = (1, T * NB) if w_task_stride == 0 and bias_task_stride == 0 else (T, NB)
    launch = forward_launch(batch, images, C, H, W, O, KH, KW, (sh, sw), (ph, pw), config_for,
                            sm_count or device_sm_count(x.device))
    return launch, w, w_task_stride, bias_task_stride


def _two_terms_call(x, w, x2, w2, stride, padding, config_for=None, sm_count=None):
    """(launch, w, w task stride, w2, w2 task stride) for conv(x, w) + conv(x2, w2) in one
    launch (x2 shaped as x, w2 as w), or None where it declines."""
    single = _forward_call(x, w, None, stride, padding, config_for, sm_count)
    if single is None or not all_float32_on_one_device(x, x2, w2) or x2.shape != x.shape or w2.shape != w.shape:
        return None
    _, w, w_task_stride, _ = single
    w2 = _per_task_contiguous_weight(w2)
    w2_task_stride = _weight_task_stride(w2)
    sh, sw, ph, pw = _geometry(stride, padding)
    T, NB, C, H, W = x.shape
    O, _, KH, KW = w.shape[-4:]
    batch, images = (1, T * NB) if w_task_stride == 0 and w2_task_stride == 0 else (T, NB)
    launch = forward_launch(batch, images, C, H, W, O, KH, KW, (sh, sw), (ph, pw), config_for,
                            sm_count or device_sm_count(x.device), terms=2)
    return launch, w, w_task_stride, w2, w2_task_stride


def _input_grad_call(grad_out, w, input_size, stride, padding, config_for=None, sm_count=None):
    geometry = _geometry(stride, padding)
    if geometry is None or not all_float32_on_one_device(grad_out, w) or grad_out.dim() != 5:
        return None
    if w.dim() not in (4, 5) or len(input_size) != 2:
        return None
    sh, sw, ph, pw = geometry
    T, NB, O, HO, WO = grad_out.shape
    _, C, KH, KW = w.shape[-4:]
    H, W = (int(s) for s in input_size)
    if w.size(-4) != O or (w.dim() == 5 and w.size(0) != T) or H < 1 or W < 1:
        return None
    if (H + 2 * ph - KH) // sh + 1 != HO or (W + 2 * pw - KW) // sw + 1 != WO:
        return None
    w = _per_task_contiguous_weight(w)
    w_task_stride = _weight_task_stride(w)
    batch, images = (1, T * NB) if w_task_stride == 0 else (T, NB)
    launch = input_grad_launch(batch, images, C, H, W, O, KH, KW, (sh, sw), (ph, pw), config_for,
                               sm_count or device_sm_count(grad_out.device))
    return launch, w, w_task_stride


def _weight_grad_call(grad_out, x, kernel_size, stride, padding, shared, config_for=None, sm_count=None):
    geometry = _geometry(stride, padding)
    if geometry is None or not all_float32_on_one_device(grad_out, x) or grad_out.dim() != 5 or x.dim() != 5:
        return None
    if len(kernel_size) != 2:
        return None
    sh, sw, ph, pw = geometry
    T, NB, C, H, W = x.shape
    O, HO, WO = grad_out.shape[2:]
    KH, KW = (int(k) for k in kernel_size)
    if grad_out.shape[:2] != (T, NB) or KH < 1 or KW < 1:
        return None
    if (H + 2 * ph - KH) // sh + 1 != HO or (W + 2 * pw - KW) // sw + 1 != WO:
        return None
    batch, images = (1, T * NB) if shared else (T, NB)
    return (weight_grad_launch(batch, images, C, H, W, O, KH, KW, (sh, sw), (ph, pw), config_for,
                               sm_count or device_sm_count(x.device)),)


_CALLS = {"task_conv2d": _forward_call, "task_conv2d_input_grad": _input_grad_call,
          "task_conv2d_weight_grad": _weight_grad_call, "task_conv2d_two_terms": _two_terms_call}


def conv_launch_plan(kernel: str, *args, config_for=None, sm_count: int | None = None) -> ConvLaunch | None:
    """The launch the launcher ``kernel`` (a name of the table, e.g. "task_conv2d_input_grad")
    makes for ``args``, or None where it declines; runs nothing. config_for: the tile rule
    (default conv_config, what the launcher itself uses; gpu_conv_config for a GPU's).
    sm_count: the SMs to plan for (default: the device's, or with gpu_conv_config an
    H100's)."""
    return planned_launch(_CALLS, kernel, *args, config_for=config_for, sm_count=sm_count)


def task_conv2d(x, w, b, stride, padding, input_precision="ieee"):
    call = _forward_call(x, w, b, stride, padding)
    if call is None:
        return NotImplemented
    return _run_forward(call, x, b, stride, padding, input_precision)


def task_conv2d_two_terms(x, w, x2, w2, stride, padding, input_precision="ieee"):
    """conv(x, w) + conv(x2, w2) in one launch (no bias): the double backward's d grad_out.
    Not an op of the table: task_conv2d_double_backward's launch, and the tile sweep's
    (bench/tune_tiles.py) kept call of it."""
    call = _two_terms_call(x, w, x2, w2, stride, padding)
    if call is None:
        return NotImplemented
    return _run_two_terms(call, x, x2, stride, padding, input_precision)


def _run_two_terms(call, x, x2, stride, padding, input_precision):
    """The TWO_TERMS launch ``call`` (from _two_terms_call) of conv(x, w) + conv(x2, w2)."""
    launch, w, w_task_stride, w2, w2_task_stride = call
    return _run_forward((launch, w, w_task_stride, 0), x, None, stride, padding, input_precision,
                        second=(x2.contiguous(), w2, w2_task_stride))


def _run_forward(call, x, b, stride, padding, input_precision, second=None):
    """The forward launch ``call`` (from _forward_call) and the sum of its partial tiles;
    second: (x2, w2, w2 task stride), the second term of a TWO_TERMS launch."""
    launch, w, w_task_stride, bias_task_stride = call
    sh, sw, ph, pw = _geometry(stride, padding)
    T, NB, C, H, W = x.shape
    O, _, KH, KW = w.shape[-4:]
    HO, WO = (H + 2 * ph - KH) // sh + 1, (W + 2 * pw - KW) // sw + 1
    x = x.contiguous()
    b = b.contiguous() if b is not None and b.stride(-1) != 1 else b
    out = torch.empty((T, NB, O, HO, WO), dtype=torch.float32, device=x.device)
    cfg = launch.config
    split_k = cfg["SPLIT_K"]
    target = out if split_k == 1 else torch.empty((split_k, *out.shape), dtype=torch.float32, device=x.device)
    one_pass, counters = split_reduction(x.device, split_k, launch.grid[0] * launch.grid[1])
    x2, w2, w2_task_stride = second if second is not None else (x, w, w_task_stride)
    conv2d_forward_kernel[launch.grid](
        x, w, b if b is not None else x, target, out, counters if one_pass else target, x2, w2,
        launch.images, C, H, W, O, HO, WO, cfg["k_per_split"],
        NB * C * H * W, w_task_stride, bias_task_stride, out.numel(), NB * O * HO * WO, w2_task_stride,
        sh, sw, ph, pw,
        KH=KH, KW=KW, HAS_BIAS=b is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision, ONE_PASS=one_pass, TWO_TERMS=second is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out if one_pass else _sum_partial_tiles(target, out)


def task_conv2d_input_grad(grad_out, w, input_size, stride, padding, input_precision="ieee"):
    call = _input_grad_call(grad_out, w, input_size, stride, padding)
    if call is None:
        return NotImplemented
    return _run_input_grad(call, grad_out, w, input_size, stride, padding, input_precision)


def _run_input_grad(call, grad_out, w, input_size, stride, padding, input_precision, addend=None):
    """addend (dx's shape, fp32): added by the kernel's first K range (HAS_ADDEND)."""
    launch, w, w_task_stride = call
    sh, sw, ph, pw = _geometry(stride, padding)
    T, NB, O, HO, WO = grad_out.shape
    _, C, KH, KW = w.shape[-4:]
    H, W = (int(s) for s in input_size)
    grad_out = grad_out.contiguous()
    out = torch.empty((T, NB, C, H, W), dtype=torch.float32, device=grad_out.device)
    cfg = launch.config
    split_k = cfg["SPLIT_K"]
    target = out if split_k == 1 else torch.empty((split_k, *out.shape), dtype=torch.float32, device=out.device)
    addend = None if addend is None else addend.contiguous()
    one_pass, counters = split_reduction(grad_out.device, split_k, launch.grid[0] * launch.grid[1] * sh * sw)
    conv2d_input_grad_kernel[launch.grid](
        grad_out, w, target, addend if addend is not None else target, out, counters if one_pass else target,
        launch.images, C, H, W, O, HO, WO, split_k, cfg["k_per_split"],
        NB * O * HO * WO, w_task_stride, out.numel(), NB * C * H * W,
        sh, sw, ph, pw,
        KH=KH, KW=KW,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision, HAS_ADDEND=addend is not None, ONE_PASS=one_pass,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out if one_pass else _sum_partial_tiles(target, out)


def task_conv2d_weight_grad(grad_out, x, kernel_size, stride, padding, shared, input_precision="ieee"):
    call = _weight_grad_call(grad_out, x, kernel_size, stride, padding, shared)
    if call is None:
        return NotImplemented
    return _run_weight_grad(call, grad_out, x, kernel_size, stride, padding, shared, input_precision)


def _run_weight_grad(call, grad_out, x, kernel_size, stride, padding, shared, input_precision, addend=None):
    """addend (dw's shape, fp32): added by the kernel's first K range (HAS_ADDEND)."""
    (launch,) = call
    sh, sw, ph, pw = _geometry(stride, padding)
    T, NB, C, H, W = x.shape
    O, HO, WO = grad_out.shape[2:]
    KH, KW = (int(k) for k in kernel_size)
    x, grad_out = x.contiguous(), grad_out.contiguous()
    CKK = C * KH * KW
    cfg = launch.config
    out_shape = (O, C, KH, KW) if shared else (T, O, C, KH, KW)
    out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
    split_k = cfg["SPLIT_K"]
    target = out if split_k == 1 else torch.empty((split_k, *out_shape), dtype=torch.float32, device=x.device)
    addend = None if addend is None else addend.contiguous()
    one_pass, counters = split_reduction(x.device, split_k, launch.grid[0] * launch.grid[1])
    conv2d_weight_grad_kernel[launch.grid](
        grad_out, x, target, addend if addend is not None else target, out, counters if one_pass else target,
        launch.images, C, H, W, O, HO, WO, cfg["k_per_split"],
        NB * O * HO * WO, NB * C * H * W, out.numel(), O * CKK,
        sh, sw, ph, pw,
        KH=KH, KW=KW,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision, HAS_ADDEND=addend is not None, ONE_PASS=one_pass,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out if one_pass else _sum_partial_tiles(target, out)


_FORWARD_KINDS = ("task_conv2d", "task_conv2d_two_terms")


def _grouped(launches, device: torch.device):
    """The composed launches as they run: where there are two or more and
    :data:`GRADS_IN_ONE_LAUNCH` is in force on ``device``, one grouped launch
    ("grads_group", (its plan, {kind: call}), {kind: args}); else as they were."""
    if len(launches) < 2 or not in_force(GRADS_IN_ONE_LAUNCH, device):
        return launches
    group = ConvLaunchGroup.of([call[0] for _, call, _ in launches])
    return [("grads_group", (group, {kind: call for kind, call, _ in launches}),
             {kind: args for kind, _, args in launches})]


def _run_grads_group(call, args, input_precision, dx_addend=None, dw_addend=None) -> dict:
    """{kind: output}: the launches of ``call`` (from :func:`_grouped`: the group's plan and
    each part's call, by kind) as one conv2d_grads_kernel launch, each output what its own
    launcher writes (the same tiles, split, epilogue and addend)."""
    group, calls = call
    forward_kind = next((kind for kind in calls if kind in _FORWARD_KINDS), None)
    dx_args, dw_args = args.get("task_conv2d_input_grad"), args.get("task_conv2d_weight_grad")
    grad_out, _, _, stride, padding = (dx_args or dw_args)[:5]
    sh, sw, ph, pw = _geometry(stride, padding)
    T, NB, O, HO, WO = grad_out.shape
    if dw_args is not None:
        C, H, W = dw_args[1].shape[2:]
        KH, KW = (int(k) for k in dw_args[2])
    else:
        C, KH, KW = dx_args[1].shape[-3:]
        H, W = (int(s) for s in dx_args[2])
    grad_out = grad_out.contiguous()
    device = grad_out.device
    shapes = {"forward": (T, NB, O, HO, WO), "input_grad": (T, NB, C, H, W),
              "weight_grad": (O, C, KH, KW) if dw_args is not None and dw_args[5] else (T, O, C, KH, KW)}
    tiles_per_counter_row = {"forward": 1, "input_grad": sh * sw, "weight_grad": 1}
    kinds = [kind for kind in _PART_PREFIXES if group.part(kind) is not None]
    outputs, targets = {}, {}
    for kind in kinds:
        split_k = group.part(kind).config["SPLIT_K"]
        outputs[kind] = torch.empty(shapes[kind], dtype=torch.float32, device=device)
        targets[kind] = outputs[kind] if split_k == 1 else torch.empty(
            (split_k, *shapes[kind]), dtype=torch.float32, device=device)
    one_pass, counters = split_reductions(device, [
        (group.part(kind).config["SPLIT_K"], group.part(kind).grid[0] * group.part(kind).grid[1]
         * tiles_per_counter_row[kind]) for kind in kinds])
    one_pass, counters = dict(zip(kinds, one_pass)), dict(zip(kinds, counters))

    def pointers(kind, addend=None):
        """(out, addend, final, counters) of part ``kind``; placeholders where it is absent."""
        if kind not in outputs:
            return grad_out, grad_out, grad_out, grad_out
        target = targets[kind]
        return (target, addend if addend is not None else target, outputs[kind],
                counters[kind] if one_pass[kind] else target)

    def scalars(kind, rows=False):
        """(begin, images, tiles, tasks, [rows,] splits, k_per_split) of part ``kind``; zeros where absent."""
        part = group.part(kind)
        if part is None:
            return (0,) * (7 if rows else 6)
        head = (group.begin(kind), part.images, part.grid[0], part.grid[1])
        return (*head, *((part.grid[2],) if rows else ()), part.config["SPLIT_K"], part.config["k_per_split"])

    fwd_x = fwd_w = fwd_x2 = fwd_w2 = grad_out
    fwd_w_task_stride = fwd_w2_task_stride = 0
    two_terms = forward_kind == "task_conv2d_two_terms"
    if forward_kind is not None:
        fwd_call, fwd_args = calls[forward_kind], args[forward_kind]
        fwd_x = fwd_x2 = fwd_args[0].contiguous()
        _, fwd_w, fwd_w_task_stride = fwd_call[:3]
        fwd_w2, fwd_w2_task_stride = (fwd_call[3], fwd_call[4]) if two_terms else (fwd_w, fwd_w_task_stride)
        if two_terms:
            fwd_x2 = fwd_args[2].contiguous()
    dx_w, dx_w_task_stride = (calls["task_conv2d_input_grad"][1:3] if dx_args is not None else (grad_out, 0))
    dw_x = dw_args[1].contiguous() if dw_args is not None else grad_out
    dx_addend = None if dx_addend is None or dx_args is None else dx_addend.contiguous()
    dw_addend = None if dw_addend is None or dw_args is None else dw_addend.contiguous()

    conv2d_grads_kernel[group.grid](
        grad_out,
        fwd_x, fwd_w, fwd_x2, fwd_w2, *pointers("forward")[:1], *pointers("forward")[2:],
        dx_w, *pointers("input_grad", dx_addend),
        dw_x, *pointers("weight_grad", dw_addend),
        C, H, W, O, HO, WO,
        *scalars("forward"), *scalars("input_grad", rows=True), *scalars("weight_grad"),
        NB * C * H * W, NB * O * HO * WO, fwd_w_task_stride, fwd_w2_task_stride, dx_w_task_stride,
        *(outputs[kind].numel() if kind in outputs else 0 for kind in _PART_PREFIXES),
        O * C * KH * KW,
        sh, sw, ph, pw,
        KH=KH, KW=KW, **group.launch_tiles(),
        INPUT_PRECISION=input_precision,
        HAS_FORWARD="forward" in outputs, HAS_INPUT_GRAD="input_grad" in outputs,
        HAS_WEIGHT_GRAD="weight_grad" in outputs, TWO_TERMS=two_terms,
        DX_ADDEND=dx_addend is not None, DW_ADDEND=dw_addend is not None,
        FWD_ONE_PASS=one_pass.get("forward", False), DX_ONE_PASS=one_pass.get("input_grad", False),
        DW_ONE_PASS=one_pass.get("weight_grad", False),
        num_warps=group.config["num_warps"], num_stages=group.config["num_stages"],
    )
    by_part = {kind: outputs[kind] if one_pass[kind] else _sum_partial_tiles(targets[kind], outputs[kind])
               for kind in kinds}
    return {kind: by_part[launch_kind] for kind, launch_kind in (
        (forward_kind, "forward"), ("task_conv2d_input_grad", "input_grad"),
        ("task_conv2d_weight_grad", "weight_grad")) if launch_kind in by_part}


def _sum_partial_tiles(target, out):
    """The second pass of a split launch that did not sum in one pass (kernels/split_k.py):
    its partial tiles [SPLIT_K, *out] summed in split order into ``out`` (deterministic,
    unlike atomics); nothing where it did not split."""
    if target is not out:
        torch.sum(target, dim=0, out=out)
    return out


# ---------------------------------------------------------------------------------------
# task_conv2d_backward and task_conv2d_double_backward: the launchers above, composed.
# Every launch is planned (and may decline) before any runs, so a decline never leaves half
# the work done. Launches per call: backward one input-grad and one weight-grad launch (each
# where its output is wanted); double backward one forward launch for d grad_out (both
# terms, conv(g_dx, w) + conv(x, g_dw), as one GEMM over twice the K: TWO_TERMS), one
# input-grad, one weight-grad. Where the protocol GRADS_IN_ONE_LAUNCH is in force, the
# launches of one call (two or three) run as one (conv2d_grads_kernel, _grouped). A split
# launch not in one pass also sums its partial tiles (torch.sum), as above.
# ---------------------------------------------------------------------------------------


def _backward_launches(grad_out, x, w, stride, padding, output_mask, dx_addend=None, dw_addend=None,
                       config_for=None, sm_count=None):
    """task_conv2d_backward's launches in order, each (kind, call, its launcher's arguments),
    or None where one declines: the input gradient where dx is wanted, the weight gradient
    (summed over tasks for a 4-D w) where dw is. The addends launch nothing of their own:
    each is added by its launch's first K range (HAS_ADDEND), so they must be fp32 on the
    device, shaped as their output."""
    if len(output_mask) != 2 or not all_float32_on_one_device(grad_out, x, w, dx_addend, dw_addend):
        return None
    if w.dim() not in (4, 5) or (dx_addend is not None and dx_addend.shape != x.shape) or (
            dw_addend is not None and dw_addend.shape != w.shape):
        return None
    if x.dim() != 5 or grad_out.dim() != 5 or w.size(-3) != x.size(2):
        return None
    input_size, kernel_size, shared = list(x.shape[3:]), list(w.shape[-2:]), w.dim() == 4
    launches = []
    if output_mask[0]:
        args = (grad_out, w, input_size, stride, padding)
        launches.append(("task_conv2d_input_grad", _input_grad_call(*args, config_for, sm_count), args))
    if output_mask[1]:
        args = (grad_out, x, kernel_size, stride, padding, shared)
        launches.append(("task_conv2d_weight_grad", _weight_grad_call(*args, config_for, sm_count), args))
    return None if any(call is None for _, call, _ in launches) else launches


def _double_backward_launches(g_dx, g_dw, grad_out, x, w, stride, padding, output_mask, config_for=None,
                              sm_count=None):
    """task_conv2d_double_backward's launches in order (as _backward_launches): d grad_out
    = conv(g_dx, w) + conv(x, g_dw), one TWO_TERMS launch where both upstreams are given
    (else the one forward that has its upstream), the input gradient with g_dw (d x), the
    weight gradient with g_dx (d w); each only where its output is wanted and its upstream
    present. None where one declines."""
    if len(output_mask) != 3 or not all_float32_on_one_device(g_dx, g_dw, grad_out, x, w):
        return None
    if w.dim() not in (4, 5) or x.dim() != 5 or grad_out.dim() != 5:
        return None
    if (g_dx is not None and g_dx.shape != x.shape) or (g_dw is not None and g_dw.shape != w.shape):
        return None
    input_size, kernel_size, shared = list(x.shape[3:]), list(w.shape[-2:]), w.dim() == 4
    launches = []
    if output_mask[0]:
        if g_dx is not None and g_dw is not None:
            args = (g_dx, w, x, g_dw, stride, padding)
            launches.append(("task_conv2d_two_terms", _two_terms_call(*args, config_for, sm_count), args))
        for inp, weight in ((g_dx, w), (x, g_dw)) if not launches else ():
            if inp is not None and weight is not None:
                args = (inp, weight, None, stride, padding)
                launches.append(("task_conv2d", _forward_call(*args, config_for, sm_count), args))
        if not launches and (_geometry(stride, padding) is None or tuple(grad_out.shape[:3]) != (
                x.size(0), x.size(1), w.size(-4))):
            return None
    if output_mask[1] and g_dw is not None:
        args = (grad_out, g_dw, input_size, stride, padding)
        launches.append(("task_conv2d_input_grad", _input_grad_call(*args, config_for, sm_count), args))
    if output_mask[2] and g_dx is not None:
        args = (grad_out, g_dx, kernel_size, stride, padding, shared)
        launches.append(("task_conv2d_weight_grad", _weight_grad_call(*args, config_for, sm_count), args))
    return None if any(call is None for _, call, _ in launches) else launches


_COMPOSED = {"task_conv2d_backward": _backward_launches, "task_conv2d_double_backward": _double_backward_launches}


def conv_launch_plans(kernel: str, *args, config_for=None, sm_count: int | None = None,
                      grouped: bool = True) -> list[ConvLaunch | ConvLaunchGroup] | None:
    """Every launch the launcher ``kernel`` makes for ``args``, in order (one for the three
    conv launchers, those of the composed task_conv2d_backward and
    task_conv2d_double_backward: with ``grouped``, as they run, the launches of a call one
    launch where it is in force; else each GEMM's own), or None where it declines; runs
    nothing. As :func:`conv_launch_plan`."""
    if kernel in _COMPOSED:
        launches = _COMPOSED[kernel](*args, config_for=config_for, sm_count=sm_count)
        if launches is not None and grouped:
            launches = _grouped(launches, args[2].device)  # w, or grad_out: a tensor of the op's device
        return None if launches is None else [call[0] for _, call, _ in launches]
    plan = conv_launch_plan(kernel, *args, config_for=config_for, sm_count=sm_count)
    return None if plan is None else [plan]


def task_conv2d_backward(grad_out, x, w, stride, padding, output_mask, dx_addend=None, dw_addend=None,
                         input_precision="ieee"):
    """(dx, dw) of fastmeta.ops.task_conv2d_backward: dw summed over tasks for a 4-D w, per
    task for a 5-D one; an unwanted output empty, and not launched. The addends are added
    in the launches' epilogues (their first K range: no launch of their own)."""
    launches = _backward_launches(grad_out, x, w, stride, padding, output_mask, dx_addend, dw_addend)
    if launches is None:
        return NotImplemented
    dx = dw = x.new_empty(0)
    for kind, call, args in _grouped(launches, x.device):
        if kind == "grads_group":
            outputs = _run_grads_group(call, args, input_precision, dx_addend, dw_addend)
            dx = outputs.get("task_conv2d_input_grad", dx)
            dw = outputs.get("task_conv2d_weight_grad", dw)
        elif kind == "task_conv2d_input_grad":
            dx = _run_input_grad(call, *args, input_precision, addend=dx_addend)
        else:
            dw = _run_weight_grad(call, *args, input_precision, addend=dw_addend)
    return dx, dw


def task_conv2d_double_backward(g_dx, g_dw, grad_out, x, w, stride, padding, output_mask, input_precision="ieee"):
    """(d_grad_out, d_x, d_w) of fastmeta.ops.task_conv2d_double_backward:
    d_grad_out = conv(g_dx, w) + conv(x, g_dw) (one launch over both terms' K),
    d_x = input_grad(grad_out, g_dw), d_w = weight_grad(grad_out, g_dx); unwanted outputs
    empty, a wanted one without its upstream zeros."""
    launches = _double_backward_launches(g_dx, g_dw, grad_out, x, w, stride, padding, output_mask)
    if launches is None:
        return NotImplemented
    d_grad_out = None
    d_x = d_w = empty = x.new_empty(0)
    for kind, call, args in _grouped(launches, x.device):
        if kind == "grads_group":
            outputs = _run_grads_group(call, args, input_precision)
            d_grad_out = next((outputs[k] for k in _FORWARD_KINDS if k in outputs), d_grad_out)
            d_x = outputs.get("task_conv2d_input_grad", d_x)
            d_w = outputs.get("task_conv2d_weight_grad", d_w)
        elif kind == "task_conv2d_two_terms":
            d_grad_out = _run_two_terms(call, g_dx, x, stride, padding, input_precision)
        elif kind == "task_conv2d":
            inp, _, b, stride_, padding_ = args
            d_grad_out = _run_forward(call, inp, b, stride_, padding_, input_precision)
        elif kind == "task_conv2d_input_grad":
            d_x = _run_input_grad(call, *args, input_precision)
        else:
            d_w = _run_weight_grad(call, *args, input_precision)
    if output_mask[0] and d_grad_out is None:  # both upstreams absent
        d_grad_out = torch.zeros(grad_out.shape, dtype=torch.float32, device=grad_out.device)
    if output_mask[1] and g_dw is None:
        d_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if output_mask[2] and g_dx is None:
        d_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    return (d_grad_out if d_grad_out is not None else empty), d_x, d_w
