"""MetaDataset and its union and filtered variants: a dataset that knows its labels."""

from __future__ import annotations

from typing import Iterable, Sequence

from torch.utils.data import Dataset


def _label_of(item) -> int:
    label = item[1]
    return int(label.item()) if hasattr(label, "item") else label


class MetaDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` pairs and records which indices hold which label.

    ``MetaDataset(dataset, labels_to_indices=None, indices_to_labels=None)``. Attributes:
    ``labels_to_indices`` (label -> list of indices), ``indices_to_labels`` (index ->
    label), ``labels`` (the labels, in order of first appearance). Without the maps, each
    example's label is read once: through ``dataset.labels_of_items()`` when the dataset
    has it (fastmeta's vision datasets: no image is decoded), else ``dataset[i][1]``.
    """

    def __init__(self, dataset, labels_to_indices: dict | None = None, indices_to_labels: dict | None = None):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be indexable and have a length, got {type(dataset).__name__}")
        self.dataset = dataset
        if labels_to_indices is None and indices_to_labels is None:
            if hasattr(dataset, "labels_of_items"):
                labels = list(dataset.labels_of_items())
            else:
                labels = [_label_of(dataset[i]) for i in range(len(dataset))]
            indices_to_labels = dict(enumerate(labels))
        if labels_to_indices is None:
            labels_to_indices = {}
            for index, label in indices_to_labels.items():
                labels_to_indices.setdefault(label, []).append(index)
        if indices_to_labels is None:
            indices_to_labels = {i: label for label, indices in labels_to_indices.items() for i in indices}
        self.labels_to_indices = {label: list(indices) for label, indices in labels_to_indices.items()}
        self.indices_to_labels = dict(indices_to_labels)
        self.labels = list(self.labels_to_indices.keys())

    def __getitem__(self, item):
        return self.dataset[item]

    def __len__(self) -> int:
        return len(self.dataset)


class UnionMetaDataset(MetaDataset):
    """The concatenation of several MetaDatasets, with their labels kept apart: the labels
    of dataset j are shifted by the number of labels of the datasets before it (the
    examples keep their own labels; use the maps, or RemapLabels, for the shifted ones)."""

    def __init__(self, datasets: Sequence[MetaDataset]):
        datasets = [d if isinstance(d, MetaDataset) else MetaDataset(d) for d in datasets]
        if not datasets:
            raise ValueError("UnionMetaDataset needs at least one dataset")
        self.datasets = datasets
        self._starts = []
        indices_to_labels, start, label_offset = {}, 0, 0
        for d in datasets:
            order = {label: k for k, label in enumerate(d.labels)}
            for i, label in d.indices_to_labels.items():
                indices_to_labels[start + i] = label_offset + order[label]
            self._starts.append(start)
            start += len(d)
            label_offset += len(d.labels)
        self._length = start
        super().__init__(self, indices_to_labels=indices_to_labels)

    def __getitem__(self, item):
        if not 0 <= item < self._length:
            raise IndexError(f"index {item} out of range for {self._length} examples")
        j = max(k for k, s in enumerate(self._starts) if s <= item)
        return self.datasets[j][item - self._starts[j]]

    def __len__(self) -> int:
        return self._length


class FilteredMetaDataset(MetaDataset):
    """Only the examples of ``labels``: index i is the i-th kept example of ``dataset``."""

    def __init__(self, dataset: MetaDataset, labels: Iterable):
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        keep = list(labels)
        missing = [l for l in keep if l not in dataset.labels_to_indices]
        if missing:
            raise ValueError(f"FilteredMetaDataset: labels {missing} are not in the dataset")
        self._indices = sorted(i for l in keep for i in dataset.labels_to_indices[l])
        self._source = dataset
        indices_to_labels = {k: dataset.indices_to_labels[i] for k, i in enumerate(self._indices)}
        self.dataset = dataset
        labels_to_indices = {}
        for k, label in indices_to_labels.items():
            labels_to_indices.setdefault(label, []).append(k)
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = indices_to_labels
        self.labels = list(labels_to_indices)

    def __getitem__(self, item):
        return self._source[self._indices[item]]

    def __len__(self) -> int:
        return len(self._indices)
