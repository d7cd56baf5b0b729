"""Triton kernels for ``task_loss``, ``task_loss_grad`` and ``task_loss_grad_backward``
(fastmeta/ops/task_loss.py).

One kernel per loss kind computes the per-task loss and, in the same pass over pred, its
gradient; constexpr flags say which of the two to write, so the op layer's two ops
(``task_loss`` and ``task_loss_grad``) each launch it once, and ``task_loss_and_grad``
(an inner step's checked losses and their gradient) launches it once with both. ``task_loss_grad``'s optional
``[T]`` scale (task_loss's upstream gradient, handed over by its backward; HAS_SCALE) is
read once per program at ``t * scale_stride`` (0: an expanded scalar) and multiplies the
task's gradient after it is rounded, as the reference's ``grad * scale``.

cross-entropy, ``cross_entropy_kernel``
    grid  (T,): a program owns one task, walks its N rows BLOCK_N at a time with all K
          logits of a row in one BLOCK_K tile, and reduces the loss over rows in registers
          (deterministic, no atomics). loss[t] = mean_n (max + log Σ exp(x − max) − x[y]).
    limit K ≤ 8192 classes (one tile per row); more is declined to the reference.
    Labels outside [0, K) give NaN (the reference raises): never a plausible number.
MSE, ``mse_kernel``
    grid  (T,): a program walks the task's N·D values; loss = mean (p − y)², grad =
          (p − y) · 2/(N·D).
task_loss_grad_backward (the VJP of the gradient w.r.t. pred), one launch:
    cross-entropy ``cross_entropy_grad_backward_kernel``, grid (T,), tiles as
          cross_entropy_kernel: d = p ⊙ (u − Σ_k p_k u_k) / N, p = softmax(pred);
    MSE ``mse_grad_backward_kernel``, grid (T,): d = u · 2/(N·D). The target is not read.
accuracy, ``accuracy_kernel``
    grid  (T,): tiles as cross_entropy_kernel; per row the first largest logit (a NaN the
          largest, as torch.argmax), compared with the label; the hits summed in registers.
    ``task_loss_and_accuracy``: cross_entropy_kernel with WRITE_ACCURACY, the same rule on
          the tile it loaded for the loss: the query's loss and accuracy in one launch.
bound  memory/latency: W1–W4 losses are at most 16 × 20 × 20 values; the point is one
       launch for all tasks instead of a reduction kernel per task or a second pass.

Declines: non-fp32 pred (or MSE target), CE labels not int32/int64 shaped [T, N], an MSE
target whose shape differs from pred (the reference would broadcast it), K > 8192, empty
tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, interpreting

MAX_CLASSES = 8192  # one row in one tile: 8192 fp32 = 32 KB of registers across 8 warps


@triton.jit
def _first_largest(logits, ok, cols, BLOCK_K: tl.constexpr):
    """Each row's first largest logit's column (int64), a NaN counting as the largest (as
    torch.argmax): the accuracy's rule, one place for accuracy_kernel and
    cross_entropy_kernel's WRITE_ACCURACY."""
    is_nan = (logits != logits) & ok
    first_nan = tl.min(tl.where(is_nan, cols[None, :], BLOCK_K), axis=1)
    finite_max = tl.max(tl.where(is_nan, -float("inf"), logits), axis=1)
    first_max = tl.min(tl.where((logits == finite_max[:, None]) & ok, cols[None, :], BLOCK_K), axis=1)
    return tl.where(first_nan < BLOCK_K, first_nan, first_max).to(tl.int64)


@triton.jit
def cross_entropy_kernel(
    pred_ptr, target_ptr, loss_ptr, grad_ptr, scale_ptr, scale_stride, accuracy_ptr, N, K,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_ACCURACY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if HAS_SCALE:
        task_scale = tl.load(scale_ptr + t * scale_stride)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    loss_acc = tl.zeros([BLOCK_N], tl.float32)
    hits = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        offs = (t * N + rows)[:, None] * K + cols[None, :]
        logits = tl.load(pred_ptr + offs, mask=ok, other=-float("inf"))
        label = tl.load(target_ptr + t * N + rows, mask=row_ok, other=0).to(tl.int64)  # no wrap-around
        row_max = tl.max(logits, axis=1)
        row_max = tl.where(row_ok, row_max, 0.0)  # keep masked rows finite
        e = tl.exp(logits - row_max[:, None])
        e = tl.where(ok, e, 0.0)
        total = tl.where(row_ok, tl.sum(e, axis=1), 1.0)  # masked rows: no 0/0
        is_label = cols[None, :] == label[:, None]
        if WRITE_LOSS:
            picked = tl.sum(tl.where(is_label & ok, logits, 0.0), axis=1)
            row_loss = row_max + tl.log(total) - picked
            valid = (label >= 0) & (label < K)
            loss_acc += tl.where(row_ok, tl.where(valid, row_loss, float("nan")), 0.0)
        if WRITE_ACCURACY:  # accuracy_kernel's rule, on the tile loaded for the loss
            hits += tl.where(row_ok & (_first_largest(logits, ok, cols, BLOCK_K) == label), 1.0, 0.0)
        if WRITE_GRAD:
            # A row whose label is outside [0, K) has no one-hot 1: make it NaN instead.
            bad_row = (label < 0) | (label >= K)
            grad = (e / total[:, None] - tl.where(is_label, 1.0, 0.0)) / N
            if HAS_SCALE:
                grad = grad * task_scale
            grad = tl.where(bad_row[:, None], float("nan"), grad)
            tl.store(grad_ptr + offs, grad, mask=ok)
    if WRITE_LOSS:
        tl.store(loss_ptr + t, tl.sum(loss_acc, axis=0) / N)
    if WRITE_ACCURACY:
        tl.store(accuracy_ptr + t, tl.sum(hits, axis=0) / N)


@triton.jit
def mse_kernel(pred_ptr, target_ptr, loss_ptr, grad_ptr, scale_ptr, scale_stride, count, grad_scale,
               WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    if HAS_SCALE:
        task_scale = tl.load(scale_ptr + t * scale_stride)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < count
        offs = t * count + j
        diff = tl.load(pred_ptr + offs, mask=ok, other=0.0) - tl.load(target_ptr + offs, mask=ok, other=0.0)
        if WRITE_LOSS:
            acc += diff * diff
        if WRITE_GRAD:
            if HAS_SCALE:
                tl.store(grad_ptr + offs, (diff * grad_scale) * task_scale, mask=ok)
            else:
                tl.store(grad_ptr + offs, diff * grad_scale, mask=ok)
    if WRITE_LOSS:
        tl.store(loss_ptr + t, tl.sum(acc, axis=0) / count)


@triton.jit
def cross_entropy_grad_backward_kernel(upstream_ptr, pred_ptr, out_ptr, N, K,
                                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        offs = (t * N + rows)[:, None] * K + cols[None, :]
        logits = tl.load(pred_ptr + offs, mask=ok, other=-float("inf"))
        u = tl.load(upstream_ptr + offs, mask=ok, other=0.0)
        row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)  # keep masked rows finite
        e = tl.where(ok, tl.exp(logits - row_max[:, None]), 0.0)
        total = tl.where(row_ok, tl.sum(e, axis=1), 1.0)  # masked rows: no 0/0
        p = e / total[:, None]
        pu = tl.sum(p * u, axis=1)
        tl.store(out_ptr + offs, p * (u - pu[:, None]) / N, mask=ok)


@triton.jit
def mse_grad_backward_kernel(upstream_ptr, out_ptr, count, grad_scale, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < count
        offs = t * count + j
        tl.store(out_ptr + offs, tl.load(upstream_ptr + offs, mask=ok, other=0.0) * grad_scale, mask=ok)


@triton.jit
def accuracy_kernel(pred_ptr, target_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    hits = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        logits = tl.load(pred_ptr + (t * N + rows)[:, None] * K + cols[None, :], mask=ok, other=-float("inf"))
        label = tl.load(target_ptr + t * N + rows, mask=row_ok, other=-1)
        hits += tl.where(row_ok & (_first_largest(logits, ok, cols, BLOCK_K) == label), 1.0, 0.0)
    tl.store(out_ptr + t, tl.sum(hits, axis=0) / N)


def loss_config(rows: int, row_size: int) -> dict:
    """Tile keyed on the per-task shape: all K classes of a row, and enough rows for
    ~2048 values per step (W3: 20 rows × 32 classes → one step per task). The interpreter
    takes the whole task at once."""
    block_k = max(16, triton.next_power_of_2(row_size))
    if interpreting():
        return {"BLOCK_N": max(1, triton.next_power_of_2(rows)), "BLOCK_K": block_k, "num_warps": 1}
    block_n = max(1, min(triton.next_power_of_2(rows), 2048 // block_k))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4 if block_k * block_n <= 2048 else 8}


def mse_config(count: int) -> dict:
    """Values per loop step of one task: up to 4096 × 8 warps; the interpreter takes all."""
    if interpreting():
        return {"BLOCK": max(16, triton.next_power_of_2(count)), "num_warps": 1}
    block = max(128, min(4096, triton.next_power_of_2(count)))
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def _launch(pred, target, kind, write_loss, write_grad, scale=None, write_accuracy=False):
    if not all_float32_on_one_device(pred) or pred.dim() < 2:
        return NotImplemented
    T, N = pred.shape[:2]
    if target.device != pred.device:
        return NotImplemented
    if scale is not None and (scale.dtype != torch.float32 or scale.device != pred.device or scale.dim() != 1
                              or scale.size(0) != T or (T > 1 and scale.stride(0) not in (0, 1))):
        return NotImplemented
    has_scale = scale is not None
    scale_stride = scale.stride(0) if has_scale and T > 1 else 0
    if not has_scale:
        scale = pred  # never read (HAS_SCALE is off): any tensor of the device
    loss = pred.new_empty(T) if write_loss else pred.new_empty(0)
    accuracy = pred.new_empty(T) if write_accuracy else loss  # never written without WRITE_ACCURACY
    grad = torch.empty(pred.shape, dtype=torch.float32, device=pred.device) if write_grad else pred.new_empty(0)
    pred = pred.contiguous()
    if kind == "cross_entropy":
        if pred.dim() != 3 or target.shape != (T, N) or target.dtype not in (torch.int64, torch.int32):
            return NotImplemented
        K = pred.size(2)
        if K > MAX_CLASSES:
            return NotImplemented
        cfg = loss_config(N, K)
        if write_accuracy and (target.dtype != torch.int64 or K == 0):
            return NotImplemented
        cross_entropy_kernel[(T,)](
            pred, target.contiguous(), loss, grad, scale, scale_stride, accuracy, N, K,
            WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, HAS_SCALE=has_scale, WRITE_ACCURACY=write_accuracy,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        )
    elif kind == "mse":
        if target.shape != pred.shape or target.dtype != torch.float32 or write_accuracy:
            return NotImplemented
        count = pred[0].numel()
        cfg = mse_config(count)
        mse_kernel[(T,)](
            pred, target.contiguous(), loss, grad, scale, scale_stride, count, 2.0 / count,
            WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, HAS_SCALE=has_scale, BLOCK=cfg["BLOCK"],
            num_warps=cfg["num_warps"],
        )
    else:
        return NotImplemented
    if write_accuracy:
        return loss, accuracy
    if write_loss and write_grad:
        return loss, grad
    return loss if write_loss else grad


def task_loss(pred, target, kind):
    return _launch(pred, target, kind, write_loss=True, write_grad=False)


def task_loss_grad(pred, target, kind, scale=None):
    return _launch(pred, target, kind, write_loss=False, write_grad=True, scale=scale)


def task_loss_and_grad(pred, target, kind):
    """The losses ``[T]`` and their unscaled gradient in one launch (WRITE_LOSS, WRITE_GRAD)."""
    return _launch(pred, target, kind, write_loss=True, write_grad=True)


def task_loss_and_accuracy(pred, target):
    """The cross-entropy losses and accuracies ``([T], [T])`` in one launch of
    cross_entropy_kernel (WRITE_LOSS, WRITE_ACCURACY)."""
    return _launch(pred, target, "cross_entropy", write_loss=True, write_grad=False, write_accuracy=True)


def task_loss_grad_backward(upstream, pred, target, kind):
    if not all_float32_on_one_device(upstream, pred) or pred.dim() < 2 or upstream.shape != pred.shape:
        return NotImplemented
    if target.device != pred.device or pred.numel() == 0:
        return NotImplemented
    T, N = pred.shape[:2]
    out = torch.empty(pred.shape, dtype=torch.float32, device=pred.device)
    pred, upstream = pred.contiguous(), upstream.contiguous()
    if kind == "cross_entropy":
        if pred.dim() != 3 or target.shape != (T, N) or pred.size(2) > MAX_CLASSES:
            return NotImplemented
        K = pred.size(2)
        cfg = loss_config(N, K)
        cross_entropy_grad_backward_kernel[(T,)](upstream, pred, out, N, K, BLOCK_N=cfg["BLOCK_N"],
                                                 BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    elif kind == "mse":
        if target.shape != pred.shape:
            return NotImplemented
        count = pred[0].numel()
        cfg = mse_config(count)
        mse_grad_backward_kernel[(T,)](upstream, out, count, 2.0 / count, BLOCK=cfg["BLOCK"],
                                       num_warps=cfg["num_warps"])
    else:
        return NotImplemented
    return out


def task_accuracy(pred, target):
    """Per-task accuracy ``[T]`` (accuracy_kernel); declines what cross_entropy_kernel declines."""
    if not all_float32_on_one_device(pred) or pred.dim() != 3 or target.device != pred.device:
        return NotImplemented
    T, N, K = pred.shape
    if target.shape != (T, N) or target.dtype != torch.int64 or K > MAX_CLASSES or K == 0 or T == 0:
        return NotImplemented
    out = pred.new_empty(T)
    cfg = loss_config(N, K)
    accuracy_kernel[(T,)](pred.contiguous(), target.contiguous(), out, N, K, BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return out
