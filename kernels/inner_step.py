"""Triton kernels for ``inner_step`` and ``inner_step_backward`` (fastmeta/ops/inner_step.py).

    θ'[t, p] = θ[t, p] − lr[p] · mask[p] · precond[p] · g[t, p]

Forward, ``inner_step_kernel``
    grid  (⌈P / BLOCK_P⌉, ⌈T / TASKS_PER_PROGRAM⌉); each program loads its slice of the
          per-parameter coefficient lr·mask·precond once and applies it to TASKS_PER_PROGRAM
          rows of the [T, P] buffer.
    bound memory: it reads θ and g and writes θ' (12 B per element; W2's 32 × 112k buffer
          is 43 MB, ≈ 10 µs at the H200's 4.26 TB/s), so the coefficient is read once per
          program rather than once per element.

Backward, ``inner_step_backward_kernel``
    grid  (⌈P / BLOCK_P⌉,); each program walks all T tasks of its column slice, so the
          reductions over tasks (θ shared, lr, mask, precond) are plain register sums,
          deterministic and with no second launch.
    The per-segment and scalar rates need a reduction over P as well: one atomic add per
    program (scalar, or segments when the block lies in one segment, the usual case) or
    per element (a block that straddles segments) into a zeroed output. Those gradients are
    therefore not bitwise reproducible run to run, exactly like the reference's
    ``index_add_`` on CUDA.
    bound memory: reads grad_out and g, writes dθ and dg (16 B per element).

Declines (returns NotImplemented, the reference runs): any tensor not fp32 or not on
the same Triton-capable device; segments not int32/int64; mask, precond or a per-parameter
rate whose size is not P; empty buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch_checks import all_float32_on_one_device, interpreting

# How lr is indexed; a constexpr, so each mode compiles to its own straight-line kernel.
LR_SCALAR, LR_PER_SEGMENT, LR_PER_PARAMETER = 0, 1, 2


@triton.jit
def _rate(lr_ptr, segments_ptr, offs, in_range, num_segments, LR_MODE: tl.constexpr):
    if LR_MODE == 0:
        return tl.load(lr_ptr).to(tl.float32)
    elif LR_MODE == 1:
        seg = tl.load(segments_ptr + offs, mask=in_range, other=0).to(tl.int64)
        # An index outside [0, S) makes the rate NaN: the reference raises on it, and a
        # NaN cannot pass for a plausible update.
        valid = (seg >= 0) & (seg < num_segments)
        return tl.load(lr_ptr + seg, mask=in_range & valid, other=float("nan"))
    else:
        return tl.load(lr_ptr + offs, mask=in_range, other=0.0)


@triton.jit
def inner_step_kernel(
    theta_ptr, grad_ptr, lr_ptr, mask_ptr, precond_ptr, segments_ptr, out_ptr,
    T, P, num_segments, theta_task_stride, grad_task_stride,
    LR_MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PRECOND: tl.constexpr,
    BLOCK_P: tl.constexpr, TASKS_PER_PROGRAM: tl.constexpr,
):
    # int64 column offsets: t · P passes 2^31 at e.g. 32 tasks × 67M parameters.
    offs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = offs < P
    coef = _rate(lr_ptr, segments_ptr, offs, in_range, num_segments, LR_MODE)
    # The same product order as the reference (rate · mask · precond), for bitwise parity.
    if HAS_MASK:
        coef = coef * tl.load(mask_ptr + offs, mask=in_range, other=0.0)
    if HAS_PRECOND:
        coef = coef * tl.load(precond_ptr + offs, mask=in_range, other=0.0)
    first_task = tl.program_id(1) * TASKS_PER_PROGRAM
    for i in range(TASKS_PER_PROGRAM):
        t = (first_task + i).to(tl.int64)
        ok = in_range & (t < T)
        theta = tl.load(theta_ptr + t * theta_task_stride + offs, mask=ok, other=0.0)
        g = tl.load(grad_ptr + t * grad_task_stride + offs, mask=ok, other=0.0)
        tl.store(out_ptr + t * P + offs, theta - coef * g, mask=ok)


@triton.jit
def inner_step_backward_kernel(
    grad_out_ptr, grad_ptr, lr_ptr, mask_ptr, precond_ptr, segments_ptr,
    d_theta_ptr, d_grad_ptr, d_lr_ptr, d_mask_ptr, d_precond_ptr,
    T, P, num_segments, grad_out_task_stride, grad_task_stride,
    LR_MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PRECOND: tl.constexpr,
    THETA_SHARED: tl.constexpr,
    NEED_THETA: tl.constexpr, NEED_GRAD: tl.constexpr, NEED_LR: tl.constexpr,
    NEED_MASK: tl.constexpr, NEED_PRECOND: tl.constexpr, NEED_OUTER: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = offs < P
    rate = _rate(lr_ptr, segments_ptr, offs, in_range, num_segments, LR_MODE)
    mask = tl.full([BLOCK_P], 1.0, tl.float32)
    precond = tl.full([BLOCK_P], 1.0, tl.float32)
    if HAS_MASK:
        mask = tl.load(mask_ptr + offs, mask=in_range, other=0.0)
    if HAS_PRECOND:
        precond = tl.load(precond_ptr + offs, mask=in_range, other=0.0)
    coef = rate
    if HAS_MASK:
        coef = coef * mask
    if HAS_PRECOND:
        coef = coef * precond

    sum_grad_out = tl.zeros([BLOCK_P], tl.float32)
    sum_grad_out_g = tl.zeros([BLOCK_P], tl.float32)  # Σ_t grad_out[t] · g[t]
    # Row pointers advance by one task per iteration: 64-bit pointer arithmetic, so the
    # offset t · P never passes through a 32-bit integer.
    grad_out_row = grad_out_ptr + offs
    grad_row = grad_ptr + offs
    d_theta_row = d_theta_ptr + offs
    d_grad_row = d_grad_ptr + offs
    for _ in range(T):
        go = tl.load(grad_out_row, mask=in_range, other=0.0)
        if NEED_THETA:
            if THETA_SHARED:
                sum_grad_out += go
            else:
                tl.store(d_theta_row, go, mask=in_range)
        if NEED_GRAD:
            tl.store(d_grad_row, -coef * go, mask=in_range)
        if NEED_OUTER:
            g = tl.load(grad_row, mask=in_range, other=0.0)
            sum_grad_out_g += go * g
        grad_out_row += grad_out_task_stride
        grad_row += grad_task_stride
        d_theta_row += P
        d_grad_row += P
    if NEED_THETA:
        if THETA_SHARED:
            tl.store(d_theta_ptr + offs, sum_grad_out, mask=in_range)
    outer = -sum_grad_out_g
    if NEED_LR:
        d = outer
        if HAS_MASK:
            d = d * mask
        if HAS_PRECOND:
            d = d * precond
        if LR_MODE == 0:
            tl.atomic_add(d_lr_ptr, tl.sum(tl.where(in_range, d, 0.0), axis=0))
        elif LR_MODE == 1:
            seg = tl.load(segments_ptr + offs, mask=in_range, other=0).to(tl.int64)
            first = tl.min(tl.where(in_range, seg, num_segments), axis=0)
            last = tl.max(tl.where(in_range, seg, -1), axis=0)
            if (first == last) & (first >= 0) & (first < num_segments):
                # The usual case: segments are contiguous ranges of the buffer, so a block
                # lies inside one. One atomic instead of BLOCK_P to the same address (W2:
                # 112k same-address atomics would serialise in L2 for tens of µs).
                tl.atomic_add(d_lr_ptr + first, tl.sum(tl.where(in_range, d, 0.0), axis=0))
            else:
                tl.atomic_add(d_lr_ptr + seg, d, mask=in_range & (seg >= 0) & (seg < num_segments))
        else:
            tl.store(d_lr_ptr + offs, d, mask=in_range)
    if NEED_MASK:
        d = outer * rate
        if HAS_PRECOND:
            d = d * precond
        tl.store(d_mask_ptr + offs, d, mask=in_range)
    if NEED_PRECOND:
        d = outer * rate
        if HAS_MASK:
            d = d * mask
        tl.store(d_precond_ptr + offs, d, mask=in_range)


# ---------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------


def inner_step_config(T: int, P: int) -> dict:
    """Block sizes keyed on the buffer size.

    On a GPU: 1024 columns × 4 warps per program (8 fp32 per thread, two 16-byte loads),
    and enough programs to cover the ~132 SMs of an H100/H200 several times over. W1's
    buffer (25 × 1761) then takes 2 × 25 programs; W2's (32 × 112k) 110 × 8.
    Under the interpreter every program costs ~7 ms whatever its size, so one program
    takes everything.
    """
    if interpreting():
        return {"BLOCK_P": max(16, triton.next_power_of_2(P)), "TASKS_PER_PROGRAM": max(T, 1), "num_warps": 1}
    block_p = 1024 if P >= 64 * 1024 else max(128, min(1024, triton.next_power_of_2(P)))
    column_programs = triton.cdiv(P, block_p)
    # Few column blocks: spread tasks across programs; many: give each program 4 rows.
    tasks_per_program = 1 if column_programs < 132 else 4
    return {"BLOCK_P": block_p, "TASKS_PER_PROGRAM": tasks_per_program, "num_warps": 4}


def inner_step_backward_config(T: int, P: int) -> dict:
    """One program per column block walks all tasks; 512 columns keeps W2's 112k-parameter
    buffer at 220 programs (more than one per SM) while each still streams 4 KB rows."""
    if interpreting():
        return {"BLOCK_P": max(16, triton.next_power_of_2(P)), "num_warps": 1}
    block_p = 512 if P >= 32 * 1024 else max(128, min(512, triton.next_power_of_2(P)))
    return {"BLOCK_P": block_p, "num_warps": 4}


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _rate_mode(lr, segments, P):
    """(LR mode, number of segments), or None when the rate's layout is unsupported."""
    if segments is not None:
        if lr.dim() != 1 or segments.dtype not in (torch.int64, torch.int32):
            return None
        if segments.dim() != 1 or segments.numel() != P or segments.device != lr.device:
            return None
        return LR_PER_SEGMENT, lr.numel()
    if lr.dim() == 0:
        return LR_SCALAR, 1
    if lr.dim() == 1 and lr.numel() == P:
        return LR_PER_PARAMETER, 1
    return None


def _per_parameter_ok(t, P) -> bool:
    return t is None or (t.dim() == 1 and t.numel() == P)


def _rows(t):
    """A [T, P] tensor whose columns are contiguous (rows may be strided views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def inner_step(theta, grad, lr, mask, precond, segments):
    if not all_float32_on_one_device(grad, theta, lr, mask, precond) or grad.dim() != 2:
        return NotImplemented
    T, P = grad.shape
    mode = _rate_mode(lr, segments, P)
    if mode is None or not (_per_parameter_ok(mask, P) and _per_parameter_ok(precond, P)):
        return NotImplemented
    if not (theta.shape == (P,) or theta.shape == (T, P)):
        return NotImplemented
    lr_mode, num_segments = mode
    theta, grad = _rows(theta), _rows(grad)
    theta_task_stride = 0 if theta.dim() == 1 else theta.stride(0)
    lr = lr.contiguous()
    mask = mask.contiguous() if mask is not None else None
    precond = precond.contiguous() if precond is not None else None
    segments = segments.contiguous() if segments is not None else None

    out = torch.empty((T, P), dtype=grad.dtype, device=grad.device)
    # Absent mask/precond/segments: lr stands in as a pointer that is never read, because
    # the constexpr flag that would read it is off.
    cfg = inner_step_config(T, P)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(T, cfg["TASKS_PER_PROGRAM"]))
    inner_step_kernel[grid](
        theta, grad, lr,
        mask if mask is not None else lr,
        precond if precond is not None else lr,
        segments if segments is not None else lr,
        out,
        T, P, num_segments, theta_task_stride, grad.stride(0),
        LR_MODE=lr_mode, HAS_MASK=mask is not None, HAS_PRECOND=precond is not None,
        BLOCK_P=cfg["BLOCK_P"], TASKS_PER_PROGRAM=cfg["TASKS_PER_PROGRAM"],
        num_warps=cfg["num_warps"],
    )
    return out


def inner_step_backward(grad_out, grad, lr, mask, precond, segments, theta_shared, needs):
    if not all_float32_on_one_device(grad_out, grad, lr, mask, precond) or grad.dim() != 2:
        return NotImplemented
    if grad_out.shape != grad.shape:
        return NotImplemented
    T, P = grad.shape
    mode = _rate_mode(lr, segments, P)
    if mode is None or not (_per_parameter_ok(mask, P) and _per_parameter_ok(precond, P)):
        return NotImplemented
    lr_mode, num_segments = mode
    need_theta, need_grad, need_lr, need_mask, need_precond = (bool(n) for n in needs)
    need_mask = need_mask and mask is not None
    need_precond = need_precond and precond is not None
    grad_out, grad = _rows(grad_out), _rows(grad)
    lr = lr.contiguous()
    mask = mask.contiguous() if mask is not None else None
    precond = precond.contiguous() if precond is not None else None
    segments = segments.contiguous() if segments is not None else None

    def empty():  # outputs of a custom op may not alias each other: one each
        return grad_out.new_empty(0)

    d_theta = grad_out.new_empty((P,) if theta_shared else (T, P)) if need_theta else empty()
    d_grad = grad_out.new_empty((T, P)) if need_grad else empty()
    # Scalar and per-segment rates are reduced with atomics, so they start at zero.
    d_lr = (torch.empty_like(lr) if lr_mode == LR_PER_PARAMETER else torch.zeros_like(lr)) if need_lr else empty()
    d_mask = grad_out.new_empty(P) if need_mask else empty()
    d_precond = grad_out.new_empty(P) if need_precond else empty()

    cfg = inner_step_backward_config(T, P)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]),)
    inner_step_backward_kernel[grid](
        grad_out, grad, lr,
        mask if mask is not None else lr,
        precond if precond is not None else lr,
        segments if segments is not None else lr,
        d_theta, d_grad, d_lr, d_mask, d_precond,
        T, P, num_segments, grad_out.stride(0), grad.stride(0),
        LR_MODE=lr_mode, HAS_MASK=mask is not None, HAS_PRECOND=precond is not None,
        THETA_SHARED=bool(theta_shared),
        NEED_THETA=need_theta, NEED_GRAD=need_grad, NEED_LR=need_lr,
        NEED_MASK=need_mask, NEED_PRECOND=need_precond,
        NEED_OUTER=need_lr or need_mask or need_precond,  # Σ_t grad_out·g is needed
        BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"],
    )
    return [d_theta, d_grad, d_lr, d_mask, d_precond]
