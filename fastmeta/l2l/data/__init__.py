"""learn2learn's ``learn2learn.data``: datasets indexed by label, and tasks drawn from them.

>>> dataset = l2l.data.MetaDataset(torch_dataset)                 # doctest: +SKIP
>>> tasks = l2l.data.TaskDataset(dataset, task_transforms=[
...     NWays(dataset, n=5), KShots(dataset, k=2), LoadData(dataset), RemapLabels(dataset)],
...     num_tasks=1000)                                            # doctest: +SKIP
>>> X, y = tasks.sample()                                          # doctest: +SKIP

Written from learn2learn's documentation. One difference, on purpose: learn2learn draws
tasks from Python's global ``random`` state, so the tasks depend on everything else that
used it. Here a :class:`TaskDataset` draws task i from its own generator seeded by
``(seed, i)`` (``seed`` defaults to a number drawn from ``random`` when it is built, so
``random.seed(s)`` beforehand fixes it): the same seed gives the same tasks, however often
and in whatever order they are asked for. Task transforms called outside a TaskDataset
use ``random``, as learn2learn's do.
"""

from . import transforms
from .meta_dataset import FilteredMetaDataset, MetaDataset, UnionMetaDataset
from .task_dataset import DataDescription, TaskDataset, Taskset
from .utils import InfiniteIterator, OnDeviceDataset, partition_task

__all__ = [
    "DataDescription", "FilteredMetaDataset", "InfiniteIterator", "MetaDataset", "OnDeviceDataset",
    "TaskDataset", "Taskset", "UnionMetaDataset", "partition_task", "transforms",
]
