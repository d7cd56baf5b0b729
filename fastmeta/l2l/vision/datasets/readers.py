"""The dataset classes (see the package docstring)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastmeta.data import Omniglot

from .published_files import check_regular_file, load_pickle

MODES = ("train", "validation", "test")
_SHORT = {"train": "train", "validation": "val", "test": "test"}
MAX_IMAGE_BYTES = 64 << 20


def _check_mode(cls: str, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{cls}: mode must be one of {MODES}, got {mode!r}")
    return mode


def _refuse_download(cls: str, download: bool) -> None:
    if download:
        raise ValueError(f"{cls}: download=True is refused: fastmeta never downloads; put the published files under root")


def _root(root) -> Path:
    return Path(os.path.expanduser(str(root)))


class _LabelledImages(Dataset):
    """``(transform(image), target_transform(label))`` pairs over images in memory."""

    transform = None
    target_transform = None

    def labels_of_items(self) -> list:
        return list(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def _finish(self, image, label):
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


class FullOmniglot(_LabelledImages):
    """All 1623 Omniglot characters (background then evaluation alphabets), 20 drawings each.

    ``FullOmniglot(root, transform=None, target_transform=None, download=False, *, image_size=28)``.
    Items are float tensors ``[1, S, S]`` in [0, 1], already resized with Lanczos and
    inverted (strokes 1.0) as the MAML protocol and learn2learn's Omniglot benchmark
    prepare them (learn2learn's FullOmniglot yields the 105×105 PIL image instead; its
    benchmark then resizes and inverts). ``transform`` applies to that tensor. The label
    is the character's index. ``omniglot`` is the :class:`fastmeta.data.Omniglot` read.
    """

    def __init__(self, root, transform=None, target_transform=None, download=False, *, image_size: int = 28):
        _refuse_download("FullOmniglot", download)
        self.omniglot = Omniglot(_root(root), image_size=image_size)
        images = self.omniglot.images
        self._characters, self._drawings = images.shape[:2]
        self._images = images.reshape(-1, 1, *images.shape[2:])
        self._labels = [c for c in range(self._characters) for _ in range(self._drawings)]
        self.transform, self.target_transform = transform, target_transform

    def __getitem__(self, i):
        return self._finish(self._images[i].float() / 255.0, self._labels[i])


class MiniImagenet(_LabelledImages):
    """miniImageNet (Ravi & Larochelle 2017): 64/16/20 classes of 600 images, 84×84.

    ``MiniImagenet(root, mode="train", transform=None, target_transform=None, download=False)``
    reads ``root/mini-imagenet-cache-{mode}.pkl`` (a dict: ``image_data`` uint8
    ``[N, 84, 84, 3]``, ``class_dict`` class name -> indices). Items are float tensors
    ``[3, 84, 84]`` with the stored values (0–255), as learn2learn's; labels number the
    classes in the file's order.
    """

    def __init__(self, root, mode="train", transform=None, target_transform=None, download=False):
        _check_mode("MiniImagenet", mode)
        _refuse_download("MiniImagenet", download)
        path = _root(root) / f"mini-imagenet-cache-{mode}.pkl"
        if not path.exists():
            raise FileNotFoundError(
                f"MiniImagenet: put the published mini-imagenet-cache-{mode}.pkl (learn2learn's miniImageNet files) at {path}"
            )
        data = load_pickle(path, what="MiniImagenet")
        if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
            raise ValueError(f"MiniImagenet: {path} is not a miniImageNet cache (a dict with image_data and class_dict)")
        images = np.asarray(data["image_data"])
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"MiniImagenet: {path}: image_data must be [N, H, W, 3], got {list(images.shape)}")
        labels = [-1] * len(images)
        for k, (_, indices) in enumerate(data["class_dict"].items()):
            for i in indices:
                labels[int(i)] = k
        if -1 in labels:
            raise ValueError(f"MiniImagenet: {path}: image {labels.index(-1)} belongs to no class of class_dict")
        self.x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self._labels = labels
        self.mode = mode
        self.transform, self.target_transform = transform, target_transform

    def __getitem__(self, i):
        return self._finish(self.x[i].float(), self._labels[i])


class FC100(_LabelledImages):
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60/20/20 classes, 32×32.

    ``FC100(root, mode="train", transform=None, target_transform=None, download=False)``
    reads ``root/FC100_{train,val,test}.pickle`` (MetaOptNet's files: a dict, ``data``
    uint8 ``[N, 32, 32, 3]`` and ``labels``; Python 2 strings decode as latin-1). Items are
    PIL images, as learn2learn's (pass a transform such as ToTensor), and the stored labels.
    """

    def __init__(self, root, mode="train", transform=None, target_transform=None, download=False):
        _check_mode("FC100", mode)
        _refuse_download("FC100", download)
        path = _root(root) / f"FC100_{_SHORT[mode]}.pickle"
        if not path.exists():
            raise FileNotFoundError(f"FC100: put the published FC100_{_SHORT[mode]}.pickle (MetaOptNet's FC100 files) at {path}")
        data = load_pickle(path, encoding="latin1", what="FC100")
        if not isinstance(data, dict) or "data" not in data or "labels" not in data:
            raise ValueError(f"FC100: {path} is not an FC100 file (a dict with data and labels)")
        self.images = np.asarray(data["data"])
        self._labels = [int(l) for l in data["labels"]]
        if self.images.ndim != 4 or len(self.images) != len(self._labels):
            raise ValueError(f"FC100: {path}: data {list(self.images.shape)} needs one label per image ({len(self._labels)})")
        self.mode = mode
        self.transform, self.target_transform = transform, target_transform

    def __getitem__(self, i):
        return self._finish(Image.fromarray(self.images[i]), self._labels[i])


class CIFARFS(_LabelledImages):
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 split 64/16/20 classes, 32×32.

    ``CIFARFS(root, mode="train", transform=None, target_transform=None, download=False)``
    reads the published ``cifar100`` archive's contents extracted at ``root/cifarfs``:
    ``cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt`` (one class per line) and
    ``cifarfs/cifar100/data/<class>/*.png``; or learn2learn's processed copy
    ``cifarfs/processed/{train,val,test}/<class>/*.png``. Labels number the split's classes
    in sorted order (as an ImageFolder does); items are PIL images (RGB).
    """

    def __init__(self, root, mode="train", transform=None, target_transform=None, download=False):
        _check_mode("CIFARFS", mode)
        _refuse_download("CIFARFS", download)
        base = _root(root) / "cifarfs"
        split = _SHORT[mode]
        processed = base / "processed" / split
        split_file = base / "cifar100" / "splits" / "bertinetto" / f"{split}.txt"
        if processed.is_dir():
            folders = sorted(p for p in processed.iterdir() if p.is_dir())
        elif split_file.is_file():
            check_regular_file(split_file, 1 << 20, "CIFARFS")
            names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            folders = sorted(base / "cifar100" / "data" / n for n in names)
            missing = [str(f) for f in folders if not f.is_dir()]
            if missing:
                raise FileNotFoundError(f"CIFARFS: class folder {missing[0]} (listed in {split_file}) is missing")
        else:
            raise FileNotFoundError(
                f"CIFARFS: put the published cifar100 files at {base / 'cifar100'} (data/<class>/*.png and "
                f"splits/bertinetto/{split}.txt), or learn2learn's processed split at {processed}"
            )
        self.files, self._labels = [], []
        for label, folder in enumerate(folders):
            for f in sorted(folder.glob("*.png")):
                self.files.append(f)
                self._labels.append(label)
        if not self.files:
            raise FileNotFoundError(f"CIFARFS: no .png images under the {split} class folders of {base}")
        self.classes = [f.name for f in folders]
        self.mode = mode
        self.transform, self.target_transform = transform, target_transform

    def __getitem__(self, i):
        path = self.files[i]
        check_regular_file(path, MAX_IMAGE_BYTES, "CIFARFS")
        with Image.open(path) as image:
            image = image.convert("RGB")
        return self._finish(image, self._labels[i])


def _refused(name: str, why: str):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"fastmeta.l2l.vision.datasets.{name} is not provided: {why}")

    return type(name, (), {"__init__": __init__, "__doc__": f"Refused: {why}"})


TieredImagenet = _refused(
    "TieredImagenet", "fastmeta has no reader for tiered-ImageNet's published files (use get_tasksets on "
    "'mini-imagenet', 'fc100', 'cifarfs' or 'omniglot')")
_NO_READER = "fastmeta has no reader for its published files (learn2learn downloads them)"
VGGFlower102 = _refused("VGGFlower102", _NO_READER)
FGVCAircraft = _refused("FGVCAircraft", _NO_READER)
FGVCFungi = _refused("FGVCFungi", _NO_READER)
CUBirds200 = _refused("CUBirds200", _NO_READER)
Quickdraw = _refused("Quickdraw", _NO_READER)
DescribableTextures = _refused("DescribableTextures", _NO_READER)
