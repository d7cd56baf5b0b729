"""Synthetic stand-ins for the benchmarks' published files (CI has no datasets): the same
formats, a few tiny classes each. Test modules import the fixtures they use (a conftest.py
here would shadow tests/conftest.py, which other tests import by name)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def class_images(label: int, count: int, size: int, seed: int) -> np.ndarray:
    """uint8 ``[count, size, size, 3]``: a colour per class, noise per image."""
    rng = np.random.default_rng(seed * 1000 + label)
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-20, 21, size=(count, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_mini_imagenet(root: Path, classes=(6, 5, 5), per_class: int = 6, size: int = 84) -> Path:
    """``mini-imagenet-cache-{mode}.pkl``: {"image_data": uint8 [N, size, size, 3], "class_dict": name -> indices}."""
    root.mkdir(parents=True, exist_ok=True)
    for k, (mode, count) in enumerate(zip(("train", "validation", "test"), classes)):
        images, class_dict = [], {}
        for c in range(count):
            class_dict[f"n{k:02d}{c:05d}"] = list(range(c * per_class, (c + 1) * per_class))
            images.append(class_images(c, per_class, size, seed=k))
        with open(root / f"mini-imagenet-cache-{mode}.pkl", "wb") as f:
            pickle.dump({"image_data": np.concatenate(images), "class_dict": class_dict}, f, protocol=4)
    return root


def write_fc100(root: Path, classes=(6, 5, 5), per_class: int = 6) -> Path:
    """``FC100_{train,val,test}.pickle`` as MetaOptNet's: {"data": uint8 [N, 32, 32, 3], "labels": [...]},
    protocol 2 (the arrays' bytes then go through ``_codecs.encode``, as in the published files)."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for k, (split, count) in enumerate(zip(("train", "val", "test"), classes)):
        labels = [start + c for c in range(count) for _ in range(per_class)]
        data = np.concatenate([class_images(c, per_class, 32, seed=10 + k) for c in range(count)])
        with open(root / f"FC100_{split}.pickle", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=2)
        start += count
    return root


def write_cifarfs(root: Path, classes=(6, 5, 5), per_class: int = 6) -> Path:
    """The cifar100 archive's layout: ``cifarfs/cifar100/data/<class>/*.png`` and the split lists."""
    base = root / "cifarfs" / "cifar100"
    (base / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
    for k, (split, count) in enumerate(zip(("train", "val", "test"), classes)):
        names = [f"{split}_class{c}" for c in range(count)]
        (base / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for c, name in enumerate(names):
            folder = base / "data" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(class_images(c, per_class, 32, seed=20 + k)):
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def mini_imagenet_root(tmp_path_factory) -> Path:
    return write_mini_imagenet(tmp_path_factory.mktemp("mini-imagenet"), size=16)


@pytest.fixture(scope="session")
def fc100_root(tmp_path_factory) -> Path:
    return write_fc100(tmp_path_factory.mktemp("fc100"))


@pytest.fixture(scope="session")
def cifarfs_root(tmp_path_factory) -> Path:
    return write_cifarfs(tmp_path_factory.mktemp("cifarfs"))
