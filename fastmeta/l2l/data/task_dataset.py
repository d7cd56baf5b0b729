"""TaskDataset: tasks described by their example indices and built on demand."""

from __future__ import annotations

import contextvars
import random
from typing import Callable, Sequence

from torch.utils.data import default_collate

from .meta_dataset import MetaDataset

# The generator of the task being described; None outside a TaskDataset (then: ``random``).
_TASK_RNG: contextvars.ContextVar = contextvars.ContextVar("fastmeta_l2l_task_rng", default=None)


def task_rng():
    """The random generator task transforms draw from: the TaskDataset's generator of the
    task being described, or Python's ``random`` module outside one."""
    rng = _TASK_RNG.get()
    return random if rng is None else rng


class DataDescription:
    """One example of a task: its ``index`` in the dataset and the ``transforms`` (callables)
    that turn the index into data (``LoadData`` adds the first)."""

    __slots__ = ("index", "transforms")

    def __init__(self, index: int):
        self.index = index
        self.transforms: list[Callable] = []

    def __repr__(self) -> str:
        return f"DataDescription(index={self.index}, transforms={len(self.transforms)})"


class TaskDataset:
    """Tasks over a :class:`MetaDataset`.

    ``TaskDataset(dataset, task_transforms=None, num_tasks=-1, task_collate=None, *, seed=None)``.
    A task description is a list of :class:`DataDescription`; each transform of
    ``task_transforms`` maps a description (None for the first) to a new one. The task's
    data is its examples, each ``index`` passed through its ``transforms``, collated by
    ``task_collate`` (default: ``torch.utils.data.default_collate``, so ``(X, y)``).

    - num_tasks > 0: a fixed set of tasks; ``dataset[i]`` is task i, ``sample()`` a random one of them.
    - num_tasks = -1: ``sample()`` and ``dataset[i]`` draw a new task each call.

    seed (fastmeta's addition): task i (and the k-th ``sample()``) is drawn by a generator
    seeded by ``(seed, i)``; default: a number drawn from Python's ``random`` now.
    """

    def __init__(self, dataset, task_transforms: Sequence[Callable] | None = None, num_tasks: int = -1,
                 task_collate: Callable | None = None, *, seed: int | None = None):
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or (num_tasks < 1 and num_tasks != -1):
            raise ValueError(f"num_tasks must be a positive int or -1 (no limit), got {num_tasks!r}")
        task_transforms = list(task_transforms or [])
        for t in task_transforms:
            if not callable(t):
                raise TypeError(f"task_transforms must be callables, got {type(t).__name__}")
        self.dataset = dataset
        self.task_transforms = task_transforms
        self.num_tasks = num_tasks
        self.task_collate = default_collate if task_collate is None else task_collate
        self.seed = random.getrandbits(63) if seed is None else int(seed)
        self.sampled_descriptions: dict[int, list[DataDescription]] = {}
        self._samples_drawn = 0
        self._fresh_drawn = 0

    def _rng(self, stream: str, k: int) -> random.Random:
        return random.Random(f"fastmeta.l2l/{self.seed}/{stream}/{k}")

    def sample_task_description(self, rng: random.Random | None = None) -> list[DataDescription]:
        """A new task description, drawn with ``rng`` (default: Python's ``random``)."""
        token = _TASK_RNG.set(rng)
        try:
            description = None
            for transform in self.task_transforms:
                description = transform(description)
        finally:
            _TASK_RNG.reset(token)
        if description is None:  # no transforms: the whole dataset
            description = [DataDescription(i) for i in range(len(self.dataset))]
        return description

    def get_task(self, task_description: list[DataDescription]):
        """The collated data of a task description."""
        data = []
        for dd in task_description:
            item = dd.index
            for transform in dd.transforms:
                item = transform(item)
            data.append(item)
        return self.task_collate(data)

    def task_description(self, i: int) -> list[DataDescription]:
        """Task i's description (num_tasks > 0), drawn once and kept."""
        if self.num_tasks == -1:
            raise ValueError("task_description(i) needs a fixed set of tasks (num_tasks > 0)")
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task {i} out of range for num_tasks={self.num_tasks}")
        description = self.sampled_descriptions.get(i)
        if description is None:
            description = self.sampled_descriptions[i] = self.sample_task_description(self._rng("task", i))
        return description

    def sample(self):
        """A random task: one of the num_tasks tasks, or a new one (num_tasks = -1)."""
        k = self._samples_drawn
        self._samples_drawn += 1
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description(self._rng("fresh", k)))
        return self[self._rng("pick", k).randrange(self.num_tasks)]

    def __getitem__(self, i: int):
        if self.num_tasks == -1:
            k = self._fresh_drawn
            self._fresh_drawn += 1
            return self.get_task(self.sample_task_description(self._rng("item", k)))
        return self.get_task(self.task_description(i))

    def __len__(self) -> int:
        if self.num_tasks == -1:
            raise TypeError("this TaskDataset draws without limit (num_tasks=-1): it has no length")
        return self.num_tasks

    def __iter__(self):
        if self.num_tasks == -1:
            raise TypeError("this TaskDataset draws without limit (num_tasks=-1): use sample()")
        return (self[i] for i in range(self.num_tasks))


Taskset = TaskDataset  # learn2learn's other name for it
