"""Task transforms of ``learn2learn.data.transforms``: each maps a task description (a
list of :class:`DataDescription`, or None for "every example") to a new one.

Random choices come from :func:`fastmeta.l2l.data.task_dataset.task_rng`: the
TaskDataset's per-task generator, or Python's ``random`` outside one.
"""

from __future__ import annotations

from typing import Iterable

from .meta_dataset import MetaDataset
from .task_dataset import DataDescription, task_rng


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TaskTransform:
    """The base of the task transforms: holds the MetaDataset they read labels from."""

    def __init__(self, dataset: MetaDataset):
        if not isinstance(dataset, MetaDataset):
            raise TypeError(f"dataset must be a fastmeta.l2l.data.MetaDataset, got {type(dataset).__name__}")
        self.dataset = dataset

    def new_task(self) -> list[DataDescription]:
        return [DataDescription(i) for i in range(len(self.dataset))]

    def __call__(self, task_description):
        raise NotImplementedError

    def _by_label(self, task_description) -> dict:
        groups: dict = {}
        for dd in task_description:
            groups.setdefault(self.dataset.indices_to_labels[dd.index], []).append(dd)
        return groups


class NWays(TaskTransform):
    """Keep the examples of n labels chosen at random among those in the task (all the
    dataset's labels for a new task)."""

    def __init__(self, dataset: MetaDataset, n: int = 2):
        super().__init__(dataset)
        self.n = _check_count("n", n)

    def __call__(self, task_description):
        rng = task_rng()
        if task_description is None:
            labels = list(self.dataset.labels)
            if self.n > len(labels):
                raise ValueError(f"NWays: n={self.n} but the dataset has {len(labels)} labels")
            chosen = rng.sample(labels, k=self.n)
            return [DataDescription(i) for label in chosen for i in self.dataset.labels_to_indices[label]]
        groups = self._by_label(task_description)
        if self.n > len(groups):
            raise ValueError(f"NWays: n={self.n} but the task has {len(groups)} labels")
        chosen = set(rng.sample(list(groups), k=self.n))
        return [dd for dd in task_description if self.dataset.indices_to_labels[dd.index] in chosen]


class KShots(TaskTransform):
    """Keep k examples of each label of the task, drawn at random (with replacement if
    ``replacement``)."""

    def __init__(self, dataset: MetaDataset, k: int = 1, replacement: bool = False):
        super().__init__(dataset)
        self.k = _check_count("k", k)
        self.replacement = bool(replacement)

    def __call__(self, task_description):
        rng = task_rng()
        if task_description is None:
            task_description = self.new_task()
        result = []
        for label, group in self._by_label(task_description).items():
            if self.replacement:
                for old in (group[rng.randrange(len(group))] for _ in range(self.k)):
                    copy = DataDescription(old.index)
                    copy.transforms = list(old.transforms)
                    result.append(copy)
            else:
                if self.k > len(group):
                    raise ValueError(f"KShots: k={self.k} but label {label!r} has {len(group)} examples")
                result.extend(rng.sample(group, k=self.k))
        return result


class FilterLabels(TaskTransform):
    """Keep the examples whose label is in ``labels``."""

    def __init__(self, dataset: MetaDataset, labels: Iterable):
        super().__init__(dataset)
        self.filter_labels = set(labels)

    def __call__(self, task_description):
        if task_description is None:
            return [DataDescription(i) for label in self.dataset.labels if label in self.filter_labels
                    for i in self.dataset.labels_to_indices[label]]
        return [dd for dd in task_description if self.dataset.indices_to_labels[dd.index] in self.filter_labels]


class FusedNWaysKShots(TaskTransform):
    """NWays, KShots and FilterLabels in one step: n labels (among ``filter_labels`` if
    given), then k examples of each."""

    def __init__(self, dataset: MetaDataset, n: int = 2, k: int = 1, replacement: bool = False,
                 filter_labels: Iterable | None = None):
        super().__init__(dataset)
        self.n = _check_count("n", n)
        self.k = _check_count("k", k)
        self.replacement = bool(replacement)
        self.filter_labels = None if filter_labels is None else list(filter_labels)
        if self.filter_labels is not None:
            missing = [l for l in self.filter_labels if l not in dataset.labels_to_indices]
            if missing:
                raise ValueError(f"FusedNWaysKShots: filter_labels {missing[:5]} are not labels of the dataset")

    def __call__(self, task_description):
        rng = task_rng()
        if task_description is None:
            labels = self.dataset.labels if self.filter_labels is None else self.filter_labels
            pools = {label: self.dataset.labels_to_indices[label] for label in labels}
        else:
            groups = self._by_label(task_description)
            if self.filter_labels is not None:
                keep = set(self.filter_labels)
                groups = {l: g for l, g in groups.items() if l in keep}
            pools = {label: [dd.index for dd in g] for label, g in groups.items()}
        if self.n > len(pools):
            raise ValueError(f"FusedNWaysKShots: n={self.n} but only {len(pools)} labels are available")
        result = []
        for label in rng.sample(list(pools), k=self.n):
            pool = pools[label]
            if self.replacement:
                picked = [pool[rng.randrange(len(pool))] for _ in range(self.k)]
            else:
                if self.k > len(pool):
                    raise ValueError(f"FusedNWaysKShots: k={self.k} but label {label!r} has {len(pool)} examples")
                picked = rng.sample(pool, k=self.k)
            result.extend(DataDescription(i) for i in picked)
        return result


class LoadData(TaskTransform):
    """Each example's data is ``dataset[index]``: the first of its transforms."""

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        for dd in task_description:
            dd.transforms.append(self.dataset.__getitem__)
        return task_description


class RemapLabels(TaskTransform):
    """Relabel the task's classes 0 .. n−1 (in a random order if ``shuffle``, else in
    sorted order of the original labels); the data's ``(x, y)`` becomes ``(x, new y)``."""

    def __init__(self, dataset: MetaDataset, shuffle: bool = True):
        super().__init__(dataset)
        self.shuffle = bool(shuffle)

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        labels = sorted({self.dataset.indices_to_labels[dd.index] for dd in task_description}, key=_sort_key)
        if self.shuffle:
            task_rng().shuffle(labels)
        mapping = {label: new for new, label in enumerate(labels)}
        for dd in task_description:
            new = mapping[self.dataset.indices_to_labels[dd.index]]
            dd.transforms.append(_Relabel(new))
        return task_description


class _Relabel:
    __slots__ = ("label",)

    def __init__(self, label: int):
        self.label = label

    def __call__(self, item):
        return (item[0], self.label, *item[2:])


class ConsecutiveLabels(TaskTransform):
    """Order the task's examples by label, so each class's examples are consecutive (the
    order within a class is kept)."""

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        return sorted(task_description, key=lambda dd: _sort_key(self.dataset.indices_to_labels[dd.index]))


def _sort_key(label):
    return (0, label, "") if isinstance(label, (int, float)) else (1, 0, str(label))


__all__ = [
    "ConsecutiveLabels", "FilterLabels", "FusedNWaysKShots", "KShots", "LoadData", "NWays", "RemapLabels",
    "TaskTransform",
]
