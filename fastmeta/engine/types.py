"""The engine's small value types: what a meta-batch returns (imported by both the iteration and the
whole-step wrappers, so neither imports the other's module for it)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class MetaBatchOutput(NamedTuple):
    """What ``meta_batch`` returns.

    loss: the mean query loss, a scalar; ``loss.backward()`` gives the meta-gradient.
    task_loss: ``[T]`` query loss per task.
    accuracy: ``[T]`` query accuracy per task (classification), else None.
    """

    loss: Tensor
    task_loss: Tensor
    accuracy: Tensor | None
