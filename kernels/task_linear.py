"""Triton kernels for ``task_linear`` and its backward ops (fastmeta/ops/task_linear.py).

All three ops are one batched GEMM, ``task_matmul_kernel``, with a different choice of
strides:

    forward       y[t]  = act(x[t] @ w[t]ᵀ + b[t])   A = x[t] [N, I],     B = w[t]ᵀ [I, O]
    input-grad    gx[t] = g[t] @ w[t]                A = g[t] [N, O],     B = w[t]  [O, I]
    weight-grad   gw[t] = g[t]ᵀ @ x[t]               A = g[t]ᵀ [O, N],    B = x[t]  [N, I]
    weight-grad, shared: Σ_t g[t]ᵀ @ x[t] = g.reshape(T·N, O)ᵀ @ x.reshape(T·N, I)

task_matmul_kernel
    grid  (⌈M / BLOCK_M⌉ · ⌈N / BLOCK_N⌉, batch, SPLIT_K); batch is T (one launch for all
          tasks) or 1 when the weight is shared and the tasks fold into M. A shared weight
          (``[O, I]`` or task stride 0) is read through a batch stride of 0.
    tiling BLOCK_M × BLOCK_N output tile, BLOCK_K steps of ``tl.dot(..., input_precision=
          INPUT_PRECISION)``: the launchers' ``input_precision`` (fastmeta.backends.precision:
          "ieee", true fp32 FMA, by default; "tf32x3"; "tf32"). Bias and activation are fused in the epilogue.
          SPLIT_K > 1 writes fp32 partial tiles [SPLIT_K, batch, M, N], summed afterwards
          by torch (deterministic, unlike atomics); used when the output has too few tiles
          to fill the GPU, e.g. a shared weight-grad with K = T·N.
    bound  FLOPs at large sizes (51 TFLOP/s fp32 on the H200); the meta-learning layers
          are small (W1: 40 × 40 per task, W2 head: 256 × 5), so in practice launch and
          latency bound: the point is one launch for all tasks.

Declines: non-fp32 or mixed devices, unknown activations, leaky_relu with a negative
slope, ranks other than the documented ones, a bias whose shape is not [T, O] / [O],
empty tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.activation import activation_code, apply_activation
from fastmeta.kernels.launch_checks import all_float32_on_one_device, interpreting, task_stride

SM_COUNT_GUESS = 132  # H100 SXM / H200; only used to size split-K, never queried at import


@triton.jit
def task_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, k_per_split,
    a_batch_stride, a_m_stride, a_k_stride,
    b_batch_stride, b_k_stride, b_n_stride,
    bias_batch_stride, bias_n_stride,
    c_split_stride, c_batch_stride, c_m_stride, c_n_stride,
    negative_slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
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
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * a_k_stride
        b_ptrs += BLOCK_K * b_k_stride

    if HAS_BIAS:
        bias = tl.load(bias_ptr + batch * bias_batch_stride + offs_n * bias_n_stride, mask=offs_n < N, other=0.0)
        acc += bias[None, :]
    acc = apply_activation(acc, negative_slope, ACT)
    c_ptrs = (c_ptr + split.to(tl.int64) * c_split_stride + batch * c_batch_stride
              + offs_m.to(tl.int64)[:, None] * c_m_stride + offs_n[None, :] * c_n_stride)
    tl.store(c_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul_config(batch: int, M: int, N: int, K: int) -> dict:
    """Tile sizes and split-K for one batched GEMM, keyed on its sizes.

    Tiles are at least 16 on each side (tl.dot's minimum) and at most 64: the per-task
    GEMMs here are small (W1: 10 × 40 × 40; W2's head 5 × 5 × 256), and a 64 × 64 fp32
    accumulator is 32 registers per thread at 4 warps. Split-K kicks in when the output
    has fewer tiles than a third of the SMs and K is long enough to give each split at
    least 4 K-steps (e.g. the shared weight-grad of W2's head: 1 tile, K = 32 · 10).
    Under the interpreter each program costs ~7 ms, so one tile covers each dimension.
    """
    if interpreting():
        return {
            "BLOCK_M": max(16, triton.next_power_of_2(M)),
            "BLOCK_N": max(16, triton.next_power_of_2(N)),
            "BLOCK_K": max(16, min(64, triton.next_power_of_2(K))),
            "SPLIT_K": 1, "num_warps": 1, "num_stages": 1,
        }
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 16 if N <= 16 else 32 if N <= 32 else 64
    block_k = 16 if K <= 16 else 32
    tiles = batch * triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = 1
    if tiles < SM_COUNT_GUESS // 3:
        split_k = max(1, min(triton.cdiv(SM_COUNT_GUESS, tiles), K // (4 * block_k)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": 4, "num_stages": 3}


def launch_task_matmul(a, a_strides, b, b_strides, batch, M, N, K, out, out_strides,
                       bias=None, bias_strides=(0, 0), act_code=0, negative_slope=0.0, config=None,
                       input_precision="ieee"):
    """C[batch] = act(A[batch] @ B[batch] + bias) into ``out`` (its strides given).

    Strides are (batch, m, k) for A, (batch, k, n) for B, (batch, m, n) for C. With
    split-K (no bias or activation allowed) partial tiles go to a scratch buffer and are
    summed into ``out``.
    """
    cfg = config or matmul_config(batch, M, N, K)
    split_k = cfg["SPLIT_K"] if bias is None and act_code == 0 else 1
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split_k = triton.cdiv(K, k_per_split)
    target, target_strides, split_stride = out, out_strides, 0
    if split_k > 1:
        target = torch.empty((split_k, batch, M, N), dtype=torch.float32, device=out.device)
        split_stride = batch * M * N
        target_strides = (M * N, N, 1)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), batch, split_k)
    task_matmul_kernel[grid](
        a, b, bias if bias is not None else a, target,
        M, N, K, k_per_split,
        *a_strides, *b_strides, *bias_strides,
        split_stride, *target_strides,
        float(negative_slope),
        HAS_BIAS=bias is not None, ACT=act_code,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        INPUT_PRECISION=input_precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_k > 1:
        torch.sum(target, dim=0, out=out.as_strided((batch, M, N), (out_strides[0], out_strides[1], out_strides[2])))
    return out


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _weight_is_shared(w) -> bool:
    return w.dim() == 2 or (w.size(0) > 1 and w.stride(0) == 0)


def task_linear(x, w, b, act, negative_slope, input_precision="ieee"):
    code = activation_code(act, negative_slope)
    if code is None or not all_float32_on_one_device(x, w, b) or x.dim() != 3 or w.dim() not in (2, 3):
        return NotImplemented
    T, N, I = x.shape
    O = w.size(-2)
    if w.size(-1) != I or (w.dim() == 3 and w.size(0) != T):
        return NotImplemented
    if b is not None and not (b.shape == (O,) or b.shape == (T, O)):
        return NotImplemented
    out = torch.empty((T, N, O), dtype=torch.float32, device=x.device)
    w_task_stride = 0 if _weight_is_shared(w) else w.stride(0)
    b_strides = (task_stride(b, 2), b.stride(-1)) if b is not None else (0, 0)
    weight_strides = (w_task_stride, w.stride(-1), w.stride(-2))  # B = wᵀ: (batch, k=i, n=o)
    if w_task_stride == 0 and b_strides[0] == 0 and x.stride(0) == N * x.stride(1):
        # Shared weight and bias: fold the tasks into M, one GEMM of T·N rows.
        launch_task_matmul(x, (0, x.stride(1), x.stride(2)), w, weight_strides, 1, T * N, O, I,
                           out, (0, O, 1), b, b_strides, code, negative_slope, input_precision=input_precision)
    else:
        launch_task_matmul(x, x.stride(), w, weight_strides, T, N, O, I,
                           out, out.stride(), b, b_strides, code, negative_slope, input_precision=input_precision)
    return out


def task_linear_input_grad(grad_out, w, input_precision="ieee"):
    if not all_float32_on_one_device(grad_out, w) or grad_out.dim() != 3 or w.dim() not in (2, 3):
        return NotImplemented
    T, N, O = grad_out.shape
    I = w.size(-1)
    if w.size(-2) != O or (w.dim() == 3 and w.size(0) != T):
        return NotImplemented
    out = torch.empty((T, N, I), dtype=torch.float32, device=grad_out.device)
    w_task_stride = 0 if _weight_is_shared(w) else w.stride(0)
    weight_strides = (w_task_stride, w.stride(-2), w.stride(-1))  # B = w: (batch, k=o, n=i)
    if w_task_stride == 0 and grad_out.stride(0) == N * grad_out.stride(1):
        launch_task_matmul(grad_out, (0, grad_out.stride(1), grad_out.stride(2)), w, weight_strides,
                           1, T * N, I, O, out, (0, I, 1), input_precision=input_precision)
    else:
        launch_task_matmul(grad_out, grad_out.stride(), w, weight_strides, T, N, I, O, out, out.stride(),
                           input_precision=input_precision)
    return out


def task_linear_weight_grad(grad_out, x, shared, input_precision="ieee"):
    if not all_float32_on_one_device(grad_out, x) or grad_out.dim() != 3 or x.dim() != 3:
        return NotImplemented
    T, N, O = grad_out.shape
    I = x.size(-1)
    if x.shape[:2] != (T, N):
        return NotImplemented
    if shared:
        # Σ_t g[t]ᵀ x[t]: the tasks join the reduction, K = T·N (reshape copies only when
        # the tasks cannot be folded in place).
        g2, x2 = grad_out.reshape(T * N, O), x.reshape(T * N, I)
        out = torch.empty((O, I), dtype=torch.float32, device=x.device)
        launch_task_matmul(g2, (0, g2.stride(1), g2.stride(0)), x2, (0, x2.stride(0), x2.stride(1)),
                           1, O, I, T * N, out, (0, I, 1), input_precision=input_precision)
        return out
    out = torch.empty((T, O, I), dtype=torch.float32, device=x.device)
    launch_task_matmul(grad_out, (grad_out.stride(0), grad_out.stride(2), grad_out.stride(1)),
                       x, x.stride(), T, O, I, N, out, out.stride(), input_precision=input_precision)
    return out
