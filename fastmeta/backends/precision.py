"""The matmul precision of the GEMM-like kernels: ``"ieee"``, ``"tf32x3"`` or ``"tf32"``.

- ``"ieee"`` (the default): true fp32 multiply-adds, as every kernel computed before.
- ``"tf32x3"``: each fp32 operand split into two TF32 terms, ``a = a_hi + a_lo`` with
  ``a_hi = tf32(a)`` and ``a_lo = tf32(a − a_hi)``; the product is
  ``a_hi·b_hi + a_hi·b_lo + a_lo·b_hi`` accumulated in fp32 (CUTLASS's 3xTF32, Triton's
  ``input_precision="tf32x3"``): tensor cores at about fp32 accuracy.
- ``"tf32"``: one product of the operands rounded to TF32 (10 mantissa bits): about 1e-3
  relative, the fastest.

``tf32(x)`` keeps fp32's 8 exponent bits and rounds the 23-bit mantissa to its top 10,
to nearest with ties away from zero, as PTX's ``cvt.rna.tf32.f32`` does
(:func:`round_to_tf32`). Products of two TF32 values are exact in fp32.

Setting it: :func:`set_matmul_precision` for the process, ``with matmul_precision(mode):``
for a block, ``matmul_precision()`` to read it (all three exported as ``fm.*``); the
environment variable ``FASTMETA_MATMUL_PRECISION`` sets the initial value, read at import.

Which kernels it governs: those of :data:`MATMUL_FAMILIES` (the ``tl.dot`` kernels of
task_linear and task_conv2d, and the fused MLP steps, whose C++/CUDA GEMMs are scalar
fp32). A backend implements the modes it declares (``Backend.matmul_precisions``):

- ``triton``: all three (the mode is a ``tl.dot`` constexpr of every launch);
- ``cpu`` and ``cuda``: ``"ieee"`` only. Under another mode they decline those kernels
  (the next backend of ``auto``, or the reference, runs them): computing ieee would be a
  different result from the one asked for, and an option a fast path does not implement is
  refused, never approximated. The fused MLP step then is not taken: the engine runs the
  MLP through task_linear, which honours the mode, and ``learner.capture`` on the CPU (the
  fused whole step) refuses;
- ``torch``, the reference: task_linear and task_conv2d emulate each mode's rounding
  exactly on float32 inputs (:func:`product_at_precision`); float64 is never rounded. The
  fused MLP ops' references compute in fp32 whatever the mode.

On the CPU the Triton interpreter ignores ``input_precision`` (it multiplies in fp32), so
each mode's accuracy is proven there through the reference's emulation.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

MATMUL_PRECISIONS = ("ieee", "tf32x3", "tf32")
DEFAULT_MATMUL_PRECISION = "ieee"
ENVIRONMENT_VARIABLE = "FASTMETA_MATMUL_PRECISION"

# The op families whose kernels multiply matrices: their backends implement the mode or decline.
MATMUL_FAMILIES = frozenset({"task_linear", "task_conv2d", "mlp_meta_step", "mlp_meta_step_update"})


def check_matmul_precision(mode, argument: str = "mode") -> str:
    """``mode`` if it is one of :data:`MATMUL_PRECISIONS`; else ValueError naming ``argument``."""
    if not isinstance(mode, str) or mode not in MATMUL_PRECISIONS:
        allowed = ", ".join(repr(m) for m in MATMUL_PRECISIONS)
        raise ValueError(f"{argument}={mode!r} is not a matmul precision; allowed: {allowed}")
    return mode


def _initial() -> str:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    return check_matmul_precision(value, ENVIRONMENT_VARIABLE) if value else DEFAULT_MATMUL_PRECISION


_current = _initial()


def current_matmul_precision() -> str:
    """The matmul precision in force now."""
    return _current


def set_matmul_precision(mode: str) -> None:
    """Set the matmul precision for the process: ``"ieee"``, ``"tf32x3"`` or ``"tf32"``."""
    global _current
    _current = check_matmul_precision(mode)


class _PrecisionBlock:
    """``with matmul_precision(mode):``: the mode inside the block, the previous one after."""

    def __init__(self, mode: str):
        self.mode = check_matmul_precision(mode)
        self._previous: list[str] = []

    def __enter__(self) -> str:
        global _current
        self._previous.append(_current)
        _current = self.mode
        return self.mode

    def __exit__(self, *exc) -> bool:
        global _current
        _current = self._previous.pop()
        return False


def matmul_precision(mode: str | None = None):
    """``matmul_precision()``: the mode in force. ``with matmul_precision(mode):`` sets it
    for the block and restores the previous one on exit (nothing changes until entered)."""
    if mode is None:
        return _current
    return _PrecisionBlock(mode)


def governs(family: str) -> bool:
    """Whether the kernels of this op family are subject to the matmul precision."""
    return family in MATMUL_FAMILIES


# ---------------------------------------------------------------------------------------
# The emulation: each mode's rounding, for the references
# ---------------------------------------------------------------------------------------

_TF32_DROPPED_BITS = 13  # fp32's 23 mantissa bits, TF32's 10
_TF32_HALF = 1 << (_TF32_DROPPED_BITS - 1)
_TF32_KEPT = ~((1 << _TF32_DROPPED_BITS) - 1)


def round_to_tf32(x: Tensor) -> Tensor:
    """float32 ``x`` with its mantissa rounded to TF32's 10 bits, to nearest, ties away from
    zero (``cvt.rna.tf32.f32``); returned as float32. On the bit pattern (sign and
    magnitude): add half of the dropped part's unit to the magnitude, then clear the dropped
    bits; a carry moves into the exponent, so values rounding past fp32's largest become
    ±inf, as the hardware's do. Infinities and NaNs are kept as they are."""
    if x.dtype != torch.float32:
        raise ValueError(f"round_to_tf32 takes float32, got x of dtype {x.dtype}")
    bits = x.view(torch.int32)
    rounded = ((bits + _TF32_HALF) & _TF32_KEPT).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def emulated_precision(*tensors: Tensor) -> str | None:
    """The mode a reference must emulate for these operands: the current one when it is not
    ``"ieee"`` and every operand is float32; else None (compute as it is)."""
    if _current == "ieee" or any(t.dtype != torch.float32 for t in tensors):
        return None
    return _current


def product_at_precision(product: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``product(a, b)`` of a bilinear ``product`` (a GEMM, a convolution, one of their
    gradients) as the current matmul precision computes it:

    - ``"ieee"``, or operands not float32: ``product(a, b)`` as it is;
    - ``"tf32"``: ``product(tf32(a), tf32(b))`` (each term exact in fp32, summed in fp32);
    - ``"tf32x3"``: ``(product(a_hi, b_lo) + product(a_lo, b_hi)) + product(a_hi, b_hi)``,
      the small terms first (as Triton's decomposition accumulates them)."""
    mode = emulated_precision(a, b)
    if mode is None:
        return product(a, b)
    a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
    if mode == "tf32":
        return product(a_hi, b_hi)
    a_lo, b_lo = round_to_tf32(a - a_hi), round_to_tf32(b - b_hi)
    return (product(a_hi, b_lo) + product(a_lo, b_hi)) + product(a_hi, b_hi)
