"""``learn2learn.vision.benchmarks``: train/validation/test tasksets of the few-shot benchmarks.

>>> tasksets = get_tasksets("omniglot", train_ways=5, train_samples=2, test_ways=5,
...                         test_samples=2, root="~/data")              # doctest: +SKIP
>>> X, y = tasksets.train.sample()                                      # doctest: +SKIP

Each split is a :class:`fastmeta.l2l.data.TaskDataset` with learn2learn's task transforms:

- ``"omniglot"``: the official archives under ``root`` (:class:`fastmeta.data.Omniglot`);
  one dataset of 1623 characters whose classes are split 1100/100/423, each task
  ``FusedNWaysKShots`` over its split's classes, ``LoadData``, ``RemapLabels``,
  ``ConsecutiveLabels``, ``RandomClassRotation`` by 0/90/180/270°. The split is
  fastmeta's seeded shuffle (the same on every machine); learn2learn's shuffles with
  Python's ``random`` state, so its exact classes cannot be reproduced.
- ``"mini-imagenet"``, ``"fc100"``, ``"cifarfs"``: the published files of each split
  (see :mod:`fastmeta.l2l.vision.datasets`), each task ``NWays``, ``KShots``, ``LoadData``,
  ``RemapLabels``, ``ConsecutiveLabels`` (validation: ``ConsecutiveLabels`` before
  ``RemapLabels``). FC100 and CIFAR-FS images become float tensors ``[3, 32, 32]`` in
  [0, 1]; miniImageNet's stay 0–255 unless ``data_augmentation="normalize"`` (÷255).
- ``"tiered-imagenet"`` is refused.

Nothing is downloaded; a missing file raises FileNotFoundError saying what to put where.
Tasks are a function of the TaskDatasets' seeds (``seed=``, or drawn from Python's
``random``), see :mod:`fastmeta.l2l.data`.
"""

from __future__ import annotations

import os
from collections import namedtuple

import numpy as np
import torch

from fastmeta.l2l.data import MetaDataset, TaskDataset
from fastmeta.l2l.data.transforms import ConsecutiveLabels, FusedNWaysKShots, KShots, LoadData, NWays, RemapLabels
from fastmeta.l2l.vision.datasets import CIFARFS, FC100, FullOmniglot, MiniImagenet
from fastmeta.l2l.vision.transforms import RandomClassRotation

__all__ = ["BenchmarkTasksets", "get_tasksets", "list_tasksets"]

BenchmarkTasksets = namedtuple("BenchmarkTasksets", ("train", "validation", "test"))

NAMES = ("omniglot", "mini-imagenet", "tiered-imagenet", "fc100", "cifarfs")


def list_tasksets():
    """The benchmark names learn2learn knows (``"tiered-imagenet"`` is refused here)."""
    return NAMES


def _to_tensor(image) -> torch.Tensor:
    """A PIL image as a float tensor ``[C, H, W]`` in [0, 1] (torchvision's ToTensor for
    8-bit images)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


def _omniglot(train_ways, train_samples, test_ways, test_samples, root, seeds):
    dataset = MetaDataset(FullOmniglot(root))
    splits = dataset.dataset.omniglot.splits
    tasksets = []
    for name, split, ways, samples in (("train", "train", train_ways, train_samples),
                                       ("validation", "val", test_ways, test_samples),
                                       ("test", "test", test_ways, test_samples)):
        transforms = [
            FusedNWaysKShots(dataset, n=ways, k=samples, filter_labels=splits[split].tolist()),
            LoadData(dataset),
            RemapLabels(dataset),
            ConsecutiveLabels(dataset),
            RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
        ]
        tasksets.append((dataset, transforms))
    return tasksets


def _per_split(reader, transform, train_ways, train_samples, test_ways, test_samples, root):
    tasksets = []
    for mode, ways, samples in (("train", train_ways, train_samples), ("validation", test_ways, test_samples),
                                ("test", test_ways, test_samples)):
        dataset = MetaDataset(reader(root, mode=mode, transform=transform))
        if mode == "validation":
            order = [ConsecutiveLabels(dataset), RemapLabels(dataset)]
        else:
            order = [RemapLabels(dataset), ConsecutiveLabels(dataset)]
        transforms = [NWays(dataset, ways), KShots(dataset, samples), LoadData(dataset), *order]
        tasksets.append((dataset, transforms))
    return tasksets


def get_tasksets(name, train_ways=5, train_samples=10, test_ways=5, test_samples=10, num_tasks=-1,
                 root="~/data", device=None, **kwargs) -> BenchmarkTasksets:
    """``BenchmarkTasksets(train, validation, test)`` of benchmark ``name`` read from ``root``.

    ``*_ways`` classes per task and ``*_samples`` examples per class (support and query
    together); num_tasks: tasks per split (-1: a new task each draw). Keyword options:
    ``data_augmentation`` (None, or "normalize" for mini-imagenet), ``seed`` (the
    TaskDatasets' seeds are seed, seed+1, seed+2). ``device`` is refused (move each batch
    with ``.to(device)``), as are other options, by name.
    """
    if name not in NAMES:
        raise ValueError(f"get_tasksets: name must be one of {NAMES}, got {name!r}")
    if device is not None:
        raise ValueError("get_tasksets: device is not supported; move each sampled batch with .to(device)")
    seed = kwargs.pop("seed", None)
    augmentation = kwargs.pop("data_augmentation", None)
    if kwargs:
        raise ValueError(f"get_tasksets: unsupported options {sorted(kwargs)}")
    if augmentation is not None and not (name == "mini-imagenet" and augmentation == "normalize"):
        raise ValueError(
            f"get_tasksets: data_augmentation={augmentation!r} is not supported for {name!r} "
            "(only None, and 'normalize' for mini-imagenet)"
        )
    root = os.path.expanduser(str(root))
    sizes = (train_ways, train_samples, test_ways, test_samples)
    if name == "omniglot":
        tasksets = _omniglot(*sizes, root, seed)
    elif name == "mini-imagenet":
        transform = (lambda x: x / 255.0) if augmentation == "normalize" else None
        tasksets = _per_split(MiniImagenet, transform, *sizes, root)
    elif name == "fc100":
        tasksets = _per_split(FC100, _to_tensor, *sizes, root)
    elif name == "cifarfs":
        tasksets = _per_split(CIFARFS, _to_tensor, *sizes, root)
    else:
        raise ValueError(
            "get_tasksets: 'tiered-imagenet' is not supported: fastmeta has no reader for its published files"
        )
    return BenchmarkTasksets(*(
        TaskDataset(dataset, task_transforms=transforms, num_tasks=num_tasks,
                    seed=None if seed is None else seed + k)
        for k, (dataset, transforms) in enumerate(tasksets)
    ))
