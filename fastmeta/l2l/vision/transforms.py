"""``learn2learn.vision.transforms``: :class:`RandomClassRotation`."""

from __future__ import annotations

from typing import Sequence

import torch

from fastmeta.l2l.data.meta_dataset import MetaDataset
from fastmeta.l2l.data.task_dataset import task_rng
from fastmeta.l2l.data.transforms import TaskTransform


class RandomClassRotation(TaskTransform):
    """Rotate all the images of each class of a task by one angle drawn from ``degrees``
    (Omniglot's augmentation: a rotated character is a new class).

    The images must be tensors ``[..., H, W]``; angles must be multiples of 90°, which
    rotate exactly (``torch.rot90``, counter-clockwise). Other angles are refused.
    """

    def __init__(self, dataset: MetaDataset, degrees: Sequence[float]):
        super().__init__(dataset)
        degrees = list(degrees)
        if not degrees or any(float(d) % 90 != 0 for d in degrees):
            raise ValueError(f"RandomClassRotation: degrees must be multiples of 90, got {degrees}")
        self.degrees = degrees

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        rng = task_rng()
        turns = {}
        for dd in task_description:
            label = self.dataset.indices_to_labels[dd.index]
            if label not in turns:
                turns[label] = int(float(rng.choice(self.degrees)) // 90) % 4
            if turns[label]:
                dd.transforms.append(_Rotate(turns[label]))
        return task_description


class _Rotate:
    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = k

    def __call__(self, item):
        image = item[0]
        if not isinstance(image, torch.Tensor):
            raise TypeError("RandomClassRotation needs tensor images; put it after a transform that makes tensors")
        return (torch.rot90(image, self.k, dims=(-2, -1)), *item[1:])


__all__ = ["RandomClassRotation"]
