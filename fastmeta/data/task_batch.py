"""The container every task sampler returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TaskBatch(NamedTuple):
    """A meta-batch of T tasks, each tensor with a leading task dimension.

    Classification (Omniglot, image folders), N ways, K shots, Q queries per class:
      support_x float32 [T, N*K, C, H, W], support_y int64 [T, N*K] in 0..N-1,
      query_x   float32 [T, N*Q, C, H, W], query_y   int64 [T, N*Q].
    Regression (sinusoid), K shots, Q queries:
      support_x, support_y float32 [T, K, 1]; query_x, query_y float32 [T, Q, 1].
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, *args, **kwargs) -> "TaskBatch":
        """Like ``Tensor.to`` on every tensor, except that integer labels keep their dtype:
        ``batch.to("cuda")``, ``batch.to(torch.float64)``, ``batch.to("cuda", torch.float64)``."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if not isinstance(a, torch.dtype)), None))
            return t if device is None else t.to(device)

        return TaskBatch(*(move(t) for t in self))

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def split_tasks(self, tasks_per_batch: int) -> list["TaskBatch"]:
        """Consecutive runs of ``tasks_per_batch`` tasks, as views (no copies)."""
        if tasks_per_batch < 1 or self.num_tasks % tasks_per_batch:
            raise ValueError(f"tasks_per_batch={tasks_per_batch} must divide the batch's {self.num_tasks} tasks")
        return [TaskBatch(*parts) for parts in zip(*(t.split(tasks_per_batch) for t in self))]
