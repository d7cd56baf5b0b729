"""Triton kernels for ``task_linear`` and its backward ops (fastmeta/ops/task_linear.py).

All three ops are one batched GEMM, ``task_matmul_kernel``, with a different choice of
strides:

    forward       y[t]  = act(x[t] @ w[t]ᵀ + b[t])   A = x[t] [N, I],     B = w[t]ᵀ [I, O]
    input-grad    gx[t] = g[t] @ w[t]                A = g[t] [N, O],     B = w[t]  [O, I]
    weight-grad   gw[t] = g[t]ᵀ @ x[t]               A = g[t]ᵀ [O, N],    B = x[t]  [N, I]
    weight-grad, shared: Σ_t g[t]ᵀ @ x[t] = g.reshape(T·N, O)ᵀ @ x.reshape(T·N, I)
    bias-grad     gb[t] = 1ᵀ @ g[t]                  A = ones  [1, N],    B = g[t]  [N, O]
                  (A_ONES: A is not read; shared: the tasks join the reduction, K = T·N)

task_matmul_kernel
    grid  (⌈M / BLOCK_M⌉ · ⌈N / BLOCK_N⌉, batch, SPLIT_K); batch is T (one launch for all
          tasks) or 1 when the weight is shared and the tasks fold into M. A shared weight
          (``[O, I]`` or task stride 0) is read through a batch stride of 0.
    tiling BLOCK_M × BLOCK_N output tile, BLOCK_K steps of ``tl.dot(..., input_precision=
          INPUT_PRECISION)``: the launchers' ``input_precision`` (fastmeta.backends.precision:
          "ieee", true fp32 FMA, by default; "tf32x3"; "tf32"). Bias and activation are fused in the epilogue.
          SPLIT_K > 1 writes fp32 partial tiles [SPLIT_K, batch, M, N] (the first K range
          adds the bias), summed in split order (deterministic, unlike atomics) by the
          last K range of each tile (ONE_PASS, kernels/split_k.py), or by torch afterwards
          where one pass is not in force; used when the launch has fewer busy programs than two waves of the
          GPU's SMs, never with an activation. The tiles, the split, the warps and stages
          come from kernels/tiles.py (:func:`matmul_launch`, :func:`linear_launch_plan`).
    bound  FLOPs at large sizes (51 TFLOP/s fp32 on the H200); the meta-learning layers
          are small (W1: 40 × 40 per task, W2 head: 256 × 5), so in practice launch and
          latency bound: the point is one launch for all tasks.

Declines: non-fp32 or mixed devices, unknown activations, leaky_relu with a negative
slope, ranks other than the documented ones, a bias whose shape is not [T, O] / [O],
empty tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastmeta.kernels.activation import activation_code, apply_activation
from fastmeta.kernels.launch_checks import all_float32_on_one_device, task_stride
from fastmeta.kernels.split_k import split_reduction, store_reduced_tile
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
def task_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, final_ptr, counters_ptr, addend_ptr,
    M, N, K, k_per_split,
    a_batch_stride, a_m_stride, a_k_stride,
    b_batch_stride, b_k_stride, b_n_stride,
    bias_batch_stride, bias_n_stride,
    c_split_stride, c_batch_stride, c_m_stride, c_n_stride,
    final_batch_stride, final_m_stride, final_n_stride,
    negative_slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ONE_PASS: tl.constexpr = False, HAS_ADDEND: tl.constexpr = False,
    A_ONES: tl.constexpr = False,
):
    # ONE_PASS (a split launch): c_ptr is the partial tiles' buffer [SPLIT_K, batch, M, N],
    # and the last K range of each tile to finish writes their sum to final_ptr, at the
    # final_* strides (kernels/split_k.py). HAS_ADDEND: the first K range also adds
    # addend[batch, m, n], laid out as the output (final_* strides): the backward's
    # gradient addends, in the store it makes anyway (no bias, activation or ACCUMULATE).
    # A_ONES: A is a matrix of ones, not read (the bias's gradient, 1ᵀ·grad_out).
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    offs_k = k_begin + tl.arange(0, BLOCK_K)

    # 64-bit base offsets (batch · stride, m · stride); the K loop then advances pointers,
    # so no 32-bit product of an index and a stride can overflow.
    a_ptrs = (a_ptr + batch * a_batch_stride
              + offs_m.to(tl.int64)[:, None] * a_m_stride + offs_k.to(tl.int64)[None, :] * a_k_stride)
    b_ptrs = (b_ptr + batch * b_batch_stride
              + offs_k.to(tl.int64)[:, None] * b_k_stride + offs_n.to(tl.int64)[None, :] * b_n_stride)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = (k0 + tl.arange(0, BLOCK_K)) < k_end
        if A_ONES:
            a = tl.where((offs_m[:, None] < M) & k_ok[None, :], 1.0, 0.0)
        else:
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * a_k_stride
        b_ptrs += BLOCK_K * b_k_stride

    if HAS_BIAS:  # once: by the first K range's partial tile
        bias = tl.load(bias_ptr + batch * bias_batch_stride + offs_n * bias_n_stride, mask=(offs_n < N) & (split == 0),
                       other=0.0)
        acc += bias[None, :]
    if HAS_ADDEND:  # once, likewise
        acc += tl.load(addend_ptr + batch * final_batch_stride + offs_m.to(tl.int64)[:, None] * final_m_stride
                       + offs_n[None, :] * final_n_stride,
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N) & (split == 0), other=0.0)
    acc = apply_activation(acc, negative_slope, ACT)
    c_ptrs = (c_ptr + split.to(tl.int64) * c_split_stride + batch * c_batch_stride
              + offs_m.to(tl.int64)[:, None] * c_m_stride + offs_n[None, :] * c_n_stride)
    c_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:  # C += A·B (no split, bias or activation: the launcher sees to it)
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0)
    if ONE_PASS:
        partial_offsets = (batch * c_batch_stride + offs_m.to(tl.int64)[:, None] * c_m_stride
                           + offs_n[None, :] * c_n_stride)
        final_offsets = (batch * final_batch_stride + offs_m.to(tl.int64)[:, None] * final_m_stride
                         + offs_n[None, :] * final_n_stride)
        store_reduced_tile(acc, c_ptr, partial_offsets, c_split_stride, final_ptr, final_offsets, c_ok, split,
                           tl.num_programs(2), counters_ptr + tile + tl.num_programs(0) * batch)
    else:
        tl.store(c_ptrs, acc, mask=c_ok)


def matmul_config(batch: int, M: int, N: int, K: int, *, kernel: str = "linear_forward", sm_count: int | None = None,
                  can_split: bool = True) -> dict:
    """The launchers' tiles and split-K for one batched GEMM of ``batch`` × (M, N, K):
    kernels/tiles.py's plan at ``sm_count`` SMs (the device's), or the interpreter's tiles
    (one tile covers each dimension, no split) where there is none."""
    return launch_config(kernel, batch, ((M, K),), N, sm_count, can_split)


def gpu_matmul_config(batch: int, M: int, N: int, K: int, *, kernel: str = "linear_forward",
                      sm_count: int | None = None, can_split: bool = True) -> dict:
    """The tiles a GPU launch gets at ``sm_count`` SMs (an H100's 132 by default), also under
    the interpreter: for the accounting on the CPU, and for tests that run a GPU's tiles."""
    return plan_config(kernel, batch, ((M, K),), N, sm_count, can_split)


@dataclass(frozen=True)
class LinearLaunch(PlannedLaunch):
    """One launch of task_matmul_kernel, shaped as task_conv2d's ConvLaunch.

    kernel: "forward", "input_grad" or "weight_grad". batch: grid row 1 (T, or 1 when the
    tasks fold into the rows or the reduction); M, N, K: each batch entry's GEMM. grid,
    config: what the launcher runs (the tiles, SPLIT_K and k_per_split, warps, stages).
    issued_macs: BLOCK_M × BLOCK_N × BLOCK_K per K-step of every program, tile padding
    included (a split adds none); useful_macs: batch · M · N · K. busy_programs: programs
    with at least one K-step; sm_count: the SMs the launch was planned for (None: the
    interpreter's tiles, or tiles forced by the caller).
    """

    kernel: str
    batch: int
    M: int
    N: int
    K: int
    grid: tuple[int, int, int]
    config: dict
    issued_macs: int
    useful_macs: int
    busy_programs: int = 0
    sm_count: int | None = None


def matmul_launch(kernel: str, batch: int, M: int, N: int, K: int, can_split: bool = True, config_for=None,
                  sm_count: int | None = None) -> LinearLaunch:
    """The plan of one task_matmul_kernel launch. can_split: False where an activation
    follows the bias (it cannot apply to partial tiles). config_for: the tile rule (default
    matmul_config, the launchers'; gpu_matmul_config for a GPU's)."""
    cfg = dict((config_for or matmul_config)(batch, M, N, K, kernel=f"linear_{kernel}", sm_count=sm_count,
                                             can_split=can_split))
    split_k, k_per_split = normalized_split(K, cfg["BLOCK_K"], cfg.get("SPLIT_K", 1) if can_split else 1)
    cfg.update(SPLIT_K=split_k, k_per_split=k_per_split)
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    return LinearLaunch(kernel, batch, M, N, K, (tiles, batch, split_k), cfg,
                        issued_macs=batch * tiles * k_steps(K, cfg["BLOCK_K"], k_per_split)
                        * cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["BLOCK_K"],
                        useful_macs=batch * M * N * K,
                        busy_programs=busy_programs(batch, ((M, K),), N, cfg["BLOCK_M"], cfg["BLOCK_N"], k_per_split),
                        sm_count=cfg.get("sm_count"))


def launch_task_matmul(a, a_strides, b, b_strides, batch, M, N, K, out, out_strides,
                       bias=None, bias_strides=(0, 0), act_code=0, negative_slope=0.0, config=None,
                       input_precision="ieee", kernel="forward", accumulate=False, addend=None, a_ones=False):
    """C[batch] = act(A[batch] @ B[batch] + bias) into ``out`` (its strides given), or
    C[batch] += A[batch] @ B[batch] where ``accumulate`` (no bias, no activation; one K
    range: partial tiles would each add the old C), or C[batch] = A[batch] @ B[batch] +
    addend[batch] (``addend`` laid out as ``out``, its strides; no bias, activation or
    accumulate), the addend added by the first K range. a_ones: A is a matrix of ones and
    ``a`` is not read (any tensor on the device).

    Strides are (batch, m, k) for A, (batch, k, n) for B, (batch, m, n) for C. config: a
    plan's (:func:`matmul_launch`; planned here for ``kernel`` when not given). With
    split-K (no activation allowed; the first K range adds the bias) partial tiles go to a
    scratch buffer and are summed into ``out`` in split order: by the launch itself in one
    pass (kernels/split_k.py), else by ``torch.sum``.
    """
    cfg = config or matmul_launch(kernel, batch, M, N, K, act_code == 0,
                                  sm_count=device_sm_count(out.device)).config
    if accumulate and (bias is not None or act_code != 0):
        raise ValueError("an accumulating GEMM takes no bias and no activation")
    if addend is not None and (bias is not None or act_code != 0 or accumulate or addend.stride() != out.stride()
                               or addend.shape != out.shape):
        raise ValueError("an addend is laid out as the output, in a GEMM without bias, activation or accumulation")
    split_k, k_per_split = normalized_split(K, cfg["BLOCK_K"], cfg["SPLIT_K"] if act_code == 0 and not accumulate
                                            else 1)
    target, target_strides, split_stride = out, out_strides, 0
    if split_k > 1:
        target = torch.empty((split_k, batch, M, N), dtype=torch.float32, device=out.device)
        split_stride = batch * M * N
        target_strides = (M * N, N, 1)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), batch, split_k)
    one_pass, counters = split_reduction(out.device, split_k, grid[0] * grid[1])
    task_matmul_kernel[grid](
        a, b, bias if bias is not None else a, target, out, counters if one_pass else target,
        addend if addend is not None else out,
        M, N, K, k_per_split,
        *a_strides, *b_strides, *bias_strides,
        split_stride, *target_strides, *out_strides,
        float(negative_slope),
        HAS_BIAS=bias is not None, ACT=act_code, ACCUMULATE=accumulate,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision, ONE_PASS=one_pass, HAS_ADDEND=addend is not None, A_ONES=a_ones,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_k > 1 and not one_pass:  # the second pass: deterministic, unlike atomics
        torch.sum(target, dim=0, out=out.as_strided((batch, M, N), (out_strides[0], out_strides[1], out_strides[2])))
    return out


# ---------------------------------------------------------------------------------------
# launchers: each _call plans its launch from the shapes (and runs nothing); the launcher
# then allocates and runs it. linear_launch_plan() gives the plans alone.
# ---------------------------------------------------------------------------------------


def _weight_is_shared(w) -> bool:
    return w.dim() == 2 or (w.size(0) > 1 and w.stride(0) == 0)


def _linear_call(x, w, b, act, negative_slope, config_for=None, sm_count=None):
    """(launch, gemm arguments, output shape) for task_linear, or None where it declines."""
    code = activation_code(act, negative_slope)
    if code is None or not all_float32_on_one_device(x, w, b) or x.dim() != 3 or w.dim() not in (2, 3):
        return None
    T, N, I = x.shape
    O = w.size(-2)
    if w.size(-1) != I or (w.dim() == 3 and w.size(0) != T):
        return None
    if b is not None and not (b.shape == (O,) or b.shape == (T, O)):
        return None
    w_task_stride = 0 if _weight_is_shared(w) else w.stride(0)
    b_strides = (task_stride(b, 2), b.stride(-1)) if b is not None else (0, 0)
    weight_strides = (w_task_stride, w.stride(-1), w.stride(-2))  # B = wᵀ: (batch, k=i, n=o)
    sm_count = sm_count or device_sm_count(x.device)
    if w_task_stride == 0 and b_strides[0] == 0 and x.stride(0) == N * x.stride(1):
        # Shared weight and bias: fold the tasks into M, one GEMM of T·N rows.
        launch = matmul_launch("forward", 1, T * N, O, I, code == 0, config_for, sm_count)
        gemm = (x, (0, x.stride(1), x.stride(2)), w, weight_strides, 1, T * N, O, I, (0, O, 1))
    else:
        launch = matmul_launch("forward", T, N, O, I, code == 0, config_for, sm_count)
        gemm = (x, x.stride(), w, weight_strides, T, N, O, I, (N * O, O, 1))
    return launch, gemm, (T, N, O), (b, b_strides, code)


def _linear_input_grad_call(grad_out, w, config_for=None, sm_count=None):
    if not all_float32_on_one_device(grad_out, w) or grad_out.dim() != 3 or w.dim() not in (2, 3):
        return None
    T, N, O = grad_out.shape
    I = w.size(-1)
    if w.size(-2) != O or (w.dim() == 3 and w.size(0) != T):
        return None
    w_task_stride = 0 if _weight_is_shared(w) else w.stride(0)
    weight_strides = (w_task_stride, w.stride(-2), w.stride(-1))  # B = w: (batch, k=o, n=i)
    sm_count = sm_count or device_sm_count(grad_out.device)
    if w_task_stride == 0 and grad_out.stride(0) == N * grad_out.stride(1):
        launch = matmul_launch("input_grad", 1, T * N, I, O, True, config_for, sm_count)
        gemm = (grad_out, (0, grad_out.stride(1), grad_out.stride(2)), w, weight_strides, 1, T * N, I, O, (0, I, 1))
    else:
        launch = matmul_launch("input_grad", T, N, I, O, True, config_for, sm_count)
        gemm = (grad_out, grad_out.stride(), w, weight_strides, T, N, I, O, (N * I, I, 1))
    return launch, gemm, (T, N, I)


def _linear_weight_grad_call(grad_out, x, shared, config_for=None, sm_count=None):
    if not all_float32_on_one_device(grad_out, x) or grad_out.dim() != 3 or x.dim() != 3:
        return None
    T, N, O = grad_out.shape
    I = x.size(-1)
    if x.shape[:2] != (T, N):
        return None
    sm_count = sm_count or device_sm_count(x.device)
    if shared:
        # Σ_t g[t]ᵀ x[t]: the tasks join the reduction, K = T·N (reshape copies only when
        # the tasks cannot be folded in place).
        def gemm():
            g2, x2 = grad_out.reshape(T * N, O), x.reshape(T * N, I)
            return (g2, (0, g2.stride(1), g2.stride(0)), x2, (0, x2.stride(0), x2.stride(1)), 1, O, I, T * N,
                    (0, I, 1))

        return matmul_launch("weight_grad", 1, O, I, T * N, True, config_for, sm_count), gemm, (O, I)

    def gemm():
        return (grad_out, (grad_out.stride(0), grad_out.stride(2), grad_out.stride(1)), x, x.stride(), T, O, I, N,
                (O * I, I, 1))

    return matmul_launch("weight_grad", T, O, I, N, True, config_for, sm_count), gemm, (T, O, I)


def _linear_bias_grad_call(grad_out, shared, config_for=None, sm_count=None):
    """The bias's gradient 1ᵀ @ grad_out[t] (A_ONES): ``[T, O]``, or ``[O]`` with the tasks in
    the reduction where ``shared``; planned as a weight gradient (a reduction over the examples)."""
    if not all_float32_on_one_device(grad_out) or grad_out.dim() != 3:
        return None
    T, N, O = grad_out.shape
    sm_count = sm_count or device_sm_count(grad_out.device)
    if shared:
        def gemm():
            g2 = grad_out.reshape(T * N, O)
            return (g2, (0, 0, 0), g2, (0, g2.stride(0), g2.stride(1)), 1, 1, O, T * N, (0, O, 1))

        return matmul_launch("weight_grad", 1, 1, O, T * N, True, config_for, sm_count), gemm, (O,)

    def gemm():
        return (grad_out, (0, 0, 0), grad_out, grad_out.stride(), T, 1, O, N, (O, O, 1))

    return matmul_launch("weight_grad", T, 1, O, N, True, config_for, sm_count), gemm, (T, O)


_LINEAR_CALLS = {"task_linear": _linear_call, "task_linear_input_grad": _linear_input_grad_call,
                 "task_linear_weight_grad": _linear_weight_grad_call}


def linear_launch_plan(kernel: str, *args, config_for=None, sm_count: int | None = None) -> LinearLaunch | None:
    """The launch the launcher ``kernel`` (a name of the table, e.g. "task_linear_weight_grad")
    makes for ``args``, or None where it declines; runs nothing. config_for: the tile rule
    (default matmul_config, what the launcher itself uses; gpu_matmul_config for a GPU's).
    sm_count: the SMs to plan for (default: the device's, or with gpu_matmul_config an
    H100's)."""
    return planned_launch(_LINEAR_CALLS, kernel, *args, config_for=config_for, sm_count=sm_count)


def _run(launch, gemm, out_shape, device, bias=None, bias_strides=(0, 0), act_code=0, negative_slope=0.0,
         input_precision="ieee", out=None, addend=None, a_ones=False):
    """The planned launch into a new output, or accumulated into ``out`` where given;
    ``addend`` (the output's shape, contiguous) added in the launch's epilogue."""
    accumulate = out is not None
    if out is None:
        out = torch.empty(out_shape, dtype=torch.float32, device=device)
    a, a_strides, b, b_strides, batch, M, N, K, out_strides = gemm
    return launch_task_matmul(a, a_strides, b, b_strides, batch, M, N, K, out, out_strides, bias, bias_strides,
                              act_code, negative_slope, config=launch.config, input_precision=input_precision,
                              accumulate=accumulate, addend=addend, a_ones=a_ones)


def task_linear(x, w, b, act, negative_slope, input_precision="ieee"):
    call = _linear_call(x, w, b, act, negative_slope)
    if call is None:
        return NotImplemented
    launch, gemm, out_shape, (b, b_strides, code) = call
    return _run(launch, gemm, out_shape, x.device, b, b_strides, code, negative_slope, input_precision)


def task_linear_input_grad(grad_out, w, input_precision="ieee"):
    call = _linear_input_grad_call(grad_out, w)
    if call is None:
        return NotImplemented
    launch, gemm, out_shape = call
    return _run(launch, gemm, out_shape, grad_out.device, input_precision=input_precision)


def task_linear_weight_grad(grad_out, x, shared, input_precision="ieee"):
    call = _linear_weight_grad_call(grad_out, x, shared)
    if call is None:
        return NotImplemented
    launch, gemm, out_shape = call
    return _run(launch, gemm(), out_shape, x.device, input_precision=input_precision)


# ---------------------------------------------------------------------------------------
# task_linear_backward and task_linear_double_backward: the launchers above, one op each
# ---------------------------------------------------------------------------------------


def _empty(like):
    return like.new_empty((0,))


def task_linear_backward(grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False,
                         input_precision="ieee"):
    """(grad_out @ w + dx_addend, grad_outᵀ @ x + dw_addend, 1ᵀ @ grad_out): the input-,
    weight- and bias-gradient launches, each addend added in its launch's epilogue (its
    first K range: no add launch); an output the mask leaves out is empty. The weight's rank
    says whether dw is summed over tasks, ``bias_shared`` whether db is. Declines addends
    not fp32 on the device, or not shaped as their gradient."""
    wants_b = len(output_mask) > 2 and output_mask[2]
    input_call = _linear_input_grad_call(grad_out, w) if output_mask[0] else None
    weight_call = _linear_weight_grad_call(grad_out, x, w.dim() == 2) if output_mask[1] else None
    bias_call = _linear_bias_grad_call(grad_out, bias_shared) if wants_b else None
    if (output_mask[0] and input_call is None) or (output_mask[1] and weight_call is None) or (
            wants_b and bias_call is None):
        return NotImplemented
    addends = []
    for call, addend in ((input_call, dx_addend), (weight_call, dw_addend)):
        if call is not None and addend is not None:
            if not all_float32_on_one_device(grad_out, addend) or tuple(addend.shape) != tuple(call[2]):
                return NotImplemented
            addend = addend.contiguous()
        addends.append(addend if call is not None else None)
    d_x = _empty(grad_out)
    if input_call is not None:
        launch, gemm, out_shape = input_call
        d_x = _run(launch, gemm, out_shape, grad_out.device, input_precision=input_precision, addend=addends[0])
    d_w = _empty(grad_out)
    if weight_call is not None:
        launch, gemm, out_shape = weight_call
        d_w = _run(launch, gemm(), out_shape, grad_out.device, input_precision=input_precision, addend=addends[1])
    d_b = _empty(grad_out)
    if bias_call is not None:
        launch, gemm, out_shape = bias_call
        d_b = _run(launch, gemm(), out_shape, grad_out.device, input_precision=input_precision, a_ones=True)
    return d_x, d_w, d_b


def task_linear_double_backward(g_dx, g_dw, grad_out, x, w, output_mask, g_db=None, input_precision="ieee"):
    """d_grad_out = g_dx @ w + x @ g_dwᵀ + g_db (the second launch accumulates into the
    first's output; g_db, broadcast over the examples, is the first launch's bias), d_x =
    grad_out @ g_dw, d_w = grad_outᵀ @ g_dx; a term without its upstream is zero (a fill),
    an output the mask leaves out is empty."""
    if not all_float32_on_one_device(g_dx, g_dw, grad_out, x, w, g_db):
        return NotImplemented
    if g_db is not None and tuple(g_db.shape) not in ((grad_out.size(2),), (grad_out.size(0), grad_out.size(2))):
        return NotImplemented
    products = []
    bias = g_db  # read at its strides (the first launch's bias)
    if output_mask[0]:
        pairs = [(a, b) for a, b in ((g_dx, w), (x, g_dw)) if a is not None and b is not None]
        # The first launch adds g_db as its bias (the launch plans around it: a per-task bias
        # keeps the tasks apart); the second accumulates.
        products = [_linear_call(a, b, bias if i == 0 else None, "none", 0.0) for i, (a, b) in enumerate(pairs)]
        if any(p is None for p in products):
            return NotImplemented
    input_call = _linear_input_grad_call(grad_out, g_dw) if output_mask[1] and g_dw is not None else None
    weight_call = (_linear_weight_grad_call(grad_out, g_dx, w.dim() == 2) if output_mask[2] and g_dx is not None
                   else None)
    if ((output_mask[1] and g_dw is not None and input_call is None)
            or (output_mask[2] and g_dx is not None and weight_call is None)):
        return NotImplemented
    d_grad_out = d_x = d_w = _empty(grad_out)
    if output_mask[0]:
        d_grad_out = None
        for launch, gemm, out_shape, (b, b_strides, _) in products:
            d_grad_out = _run(launch, gemm, out_shape, grad_out.device, b, b_strides, input_precision=input_precision,
                              out=d_grad_out)
        if d_grad_out is None:
            d_grad_out = (torch.zeros_like(grad_out) if bias is None
                          else (bias if bias.dim() == 1 else bias.unsqueeze(1)).expand(grad_out.shape).contiguous())
    if output_mask[1]:
        if input_call is not None:
            launch, gemm, out_shape = input_call
            d_x = _run(launch, gemm, out_shape, grad_out.device, input_precision=input_precision)
        else:
            d_x = torch.zeros_like(x)
    if output_mask[2]:
        if weight_call is not None:
            launch, gemm, out_shape = weight_call
            d_w = _run(launch, gemm(), out_shape, grad_out.device, input_precision=input_precision)
        else:
            d_w = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
    return d_grad_out, d_x, d_w
