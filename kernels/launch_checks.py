"""Input checks shared by the launchers: what every kernel here declines.

Every launcher returns ``NotImplemented`` (the op layer then runs the reference) rather
than compute a result it cannot stand behind. These predicates say what that means:

- fp32 only. float64 is for gradient checks and must stay float64; bf16/fp16 are not
  supported yet (no mixed precision yet: docs/benchmarks.md), so a kernel never narrows a dtype.
- every tensor on one device, and that device one Triton can run on (CUDA, or the CPU
  under ``TRITON_INTERPRET=1``).
- no empty tensors: a zero-size grid is an error in Triton, and the reference handles
  the degenerate case for free.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


# Set while the launch recorder (fastmeta.tools.launches) runs a step on the CPU through
# the launchers as a GPU would: they take CPU tensors and size every launch as on a GPU
# (not the interpreter's), and the recorder logs each launch instead of running it.
_recording_on_cpu = False


class recording_on_cpu:
    """``with recording_on_cpu():`` the launchers take CPU tensors as a GPU's (see above).
    Whoever enters it intercepts the launches: nothing may run a kernel inside it."""

    def __enter__(self):
        global _recording_on_cpu
        self._previous, _recording_on_cpu = _recording_on_cpu, True
        return self

    def __exit__(self, *exc):
        global _recording_on_cpu
        _recording_on_cpu = self._previous
        return False


def recording() -> bool:
    """True while the launch recorder runs a step on the CPU as a GPU would (see above)."""
    return _recording_on_cpu


def interpreting() -> bool:
    """True under the Triton interpreter, where each program instance costs ~7 ms (never
    while launches are recorded on the CPU: those are sized as on a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and not _recording_on_cpu


def runnable_device(t: Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "cpu" and (interpreting() or _recording_on_cpu))


def all_float32_on_one_device(*tensors: Tensor | None) -> bool:
    """Every non-None tensor is fp32, non-empty, on one device that Triton can run on."""
    present = [t for t in tensors if t is not None]
    if not present or not runnable_device(present[0]):
        return False
    device = present[0].device
    return all(t.dtype == torch.float32 and t.device == device and t.numel() > 0 for t in present)


def task_stride(t: Tensor, batched_dims: int) -> int:
    """The stride between tasks of a possibly shared tensor.

    ``batched_dims`` is the rank the tensor has when it is per task ([T, O, I] → 3). A
    tensor of lower rank is shared by all tasks (stride 0), as is ``θ.expand(T, ...)``.
    """
    return t.stride(0) if t.dim() == batched_dims else 0
