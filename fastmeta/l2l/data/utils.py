"""Helpers of ``learn2learn.data``: partition_task, InfiniteIterator, OnDeviceDataset."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


def partition_task(data: Tensor, labels: Tensor, shots: int = 1):
    """Split a task into support and query: the first ``shots`` examples of each label are
    the support. Returns ``((support_data, support_labels), (query_data, query_labels))``."""
    if labels.dim() != 1 or data.size(0) != labels.numel():
        raise ValueError(f"partition_task: data {list(data.shape)} needs one label per row; labels {list(labels.shape)}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be a non-negative int, got {shots!r}")
    support = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    for label in torch.unique(labels):
        where = (labels == label).nonzero().view(-1)
        if where.numel() < shots:
            raise ValueError(f"partition_task: label {label.item()} has {where.numel()} examples, fewer than shots={shots}")
        support[where[:shots]] = True
    return (data[support], labels[support]), (data[~support], labels[~support])


class InfiniteIterator:
    """Iterates over ``dataloader`` forever, starting it again when it ends."""

    def __init__(self, dataloader):
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
            return next(self.iterator)


class OnDeviceDataset(Dataset):
    """Every example of ``dataset`` loaded once, stacked on ``device``: ``(x, y)`` pairs
    read from two tensors. transform: applied to each x when it is read."""

    def __init__(self, dataset, device=None, transform=None):
        xs, ys = zip(*(dataset[i][:2] for i in range(len(dataset))))
        self.data = torch.stack([x if isinstance(x, Tensor) else torch.as_tensor(x) for x in xs]).to(device)
        self.labels = torch.as_tensor(ys).to(device)
        self.transform = transform

    def labels_of_items(self):
        return self.labels.tolist()

    def __getitem__(self, i):
        x = self.data[i]
        return (x if self.transform is None else self.transform(x)), self.labels[i]

    def __len__(self) -> int:
        return self.data.size(0)
