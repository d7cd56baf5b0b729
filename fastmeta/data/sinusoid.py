"""Sinusoid regression tasks, the MAML paper's protocol (docs/benchmarks.md, "Sinusoid protocol").

A task is y = A sin(x - φ) with A ~ U[0.1, 5], φ ~ U[0, π], inputs x ~ U[-5, 5]; K support
and Q query points. All of a meta-batch comes from one counter-RNG call on the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .random import as_task_indices, random_words, random_words_block, uniform
from .task_batch import TaskBatch

__all__ = ["SinusoidTasks", "SinusoidEvaluation"]


class SinusoidEvaluation(NamedTuple):
    """A fixed evaluation set: the tasks, and each task's amplitude and phase [T]."""

    batch: TaskBatch
    amplitude: torch.Tensor
    phase: torch.Tensor


class SinusoidTasks:
    """Samples sinusoid tasks as a TaskBatch with x and y shaped [T, K, 1] and [T, Q, 1].

    Args:
        shots: K support points per task (10 in the MAML protocol).
        queries: Q query points per task.
        amplitude, phase, x_range: the (low, high) of each uniform distribution.
        seed: the run seed; tasks are a pure function of (seed, iteration, task index).
        device: where the tasks are drawn.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        for name, value in (("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.seed = seed
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"SinusoidTasks(shots={self.shots}, queries={self.queries}, seed={self.seed}, device={self.device})"

    @staticmethod
    def curve(amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The true y = A sin(x - φ); amplitude and phase [T] broadcast over x [T, N, 1]."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    @staticmethod
    def _scale(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + u * (bounds[1] - bounds[0])

    def _split_words(self, words: torch.Tensor):
        """Amplitude [T], phase [T] and inputs [T, points, 1] from words [T, 2 + points]."""
        u = uniform(words)
        amplitude = self._scale(u[:, 0], self.amplitude)
        phase = self._scale(u[:, 1], self.phase)
        x = self._scale(u[:, 2:], self.x_range).unsqueeze(-1)
        return amplitude, phase, x

    def _tasks(self, amplitude, phase, x) -> SinusoidEvaluation:
        y = self.curve(amplitude, phase, x)
        batch = TaskBatch(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])
        return SinusoidEvaluation(batch, amplitude, phase)

    def sample(self, iteration: int, task_indices) -> TaskBatch:
        """The tasks ``task_indices`` (global indices: an int n, a range, a sequence or a tensor) of ``iteration``."""
        return self.sample_with_parameters(iteration, task_indices).batch

    def sample_with_parameters(self, iteration: int, task_indices) -> SinusoidEvaluation:
        """``sample``, plus each task's amplitude and phase."""
        tasks = as_task_indices(task_indices, self.device)
        words = random_words(self.seed, iteration, "sinusoid/train", tasks, 2 + self.shots + self.queries)
        return self._tasks(*self._split_words(words))

    def sample_block(self, iterations, task_indices) -> list[TaskBatch]:
        """``[sample(i, task_indices) for i in iterations]``, drawn in one RNG call."""
        tasks = as_task_indices(task_indices, self.device)
        words = random_words_block(self.seed, iterations, "sinusoid/train", tasks, 2 + self.shots + self.queries)
        return self._tasks(*self._split_words(words)).batch.split_tasks(tasks.numel())

    def evaluation_tasks(self, tasks=600, seed: int = 0, query_points: int = 100) -> SinusoidEvaluation:
        """A fixed evaluation set: K random support points and ``query_points`` evenly spaced
        query points over the whole x range, as in the MAML paper's evaluation.

        ``tasks``: how many (an int n: tasks 0..n-1), or which (a range, a sequence or a
        tensor of indices, so that a process can draw its shard of the set). Independent of
        the training seed and of training tasks (its own RNG stream), so every run is scored
        on the same tasks.
        """
        if query_points < 1:
            raise ValueError(f"query_points must be positive, got {query_points}")
        task_indices = as_task_indices(tasks, self.device)
        num_tasks = task_indices.numel()
        words = random_words(seed, 0, "sinusoid/evaluation", task_indices, 2 + self.shots)
        amplitude, phase, support_x = self._split_words(words)
        grid = torch.linspace(*self.x_range, query_points, device=self.device)
        query_x = grid.view(1, -1, 1).expand(num_tasks, -1, -1).contiguous()
        batch = TaskBatch(
            support_x, self.curve(amplitude, phase, support_x), query_x, self.curve(amplitude, phase, query_x)
        )
        return SinusoidEvaluation(batch, amplitude, phase)
