"""Few-shot tasks from a folder of images, one class per sub-folder (miniImageNet-style).

Layout: ``root/{train,val,test}/<class>/<image files>``. Classes may hold different
numbers of images. Each split is decoded once (resized with Lanczos to S x S, RGB by
default), cached (``fastmeta.data.cache``), and kept on the device as one uint8 tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import cached
from .errors import DatasetError, check_regular_file
from .few_shot import FewShotTasks
from .images import decode_resized

__all__ = ["ImageFolderTasks", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
_PREPROCESSING = "image-folder-v1: convert mode, resize LANCZOS"
_CHANNELS = {"RGB": 3, "L": 1}


def _list_split(split_dir: Path) -> list[tuple[str, list[Path]]]:
    classes = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        for file in files:
            check_regular_file(file, "image folder")
        if not files:
            raise DatasetError(f"image folder: class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        classes.append((class_dir.name, files))
    if not classes:
        raise DatasetError(f"image folder: {split_dir} has no class sub-folders")
    return classes


def _decode_split(classes: list[tuple[str, list[Path]]], image_size: int, mode: str, split: str) -> dict:
    total = sum(len(files) for _, files in classes)
    images = np.empty((total, image_size, image_size, _CHANNELS[mode]), dtype=np.uint8)
    counts = []
    index = 0
    with tqdm(total=total, desc=f"image folder {split}: decoding (cached afterwards)", unit="img", disable=None) as progress:
        for _, files in classes:
            for file in files:
                converted = decode_resized(file, image_size, mode, f"image folder: {file}")
                images[index] = np.asarray(converted, dtype=np.uint8).reshape(image_size, image_size, -1)
                index += 1
            counts.append(len(files))
            progress.update(len(files))
    return {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # [n, C, S, S]
        "class_count": torch.tensor(counts, dtype=torch.int64),
        "names": [name for name, _ in classes],
    }


class ImageFolderTasks:
    """N-way K-shot tasks from ``root/{train,val,test}/<class>/<images>``.

    Args:
        root: the folder holding the split folders.
        image_size: S; images are resized to S x S with Lanczos (84 for miniImageNet).
        mode: "RGB" (3 channels) or "L" (grey, 1 channel).
        device: where the images live and tasks are drawn.
        cache_dir: see ``fastmeta.data.cache``; False to always decode.

    ``tasks(split, ways=, shots=, queries=, seed=)`` loads the split on first use and
    returns a FewShotTasks sampler; images come out as float32 [T, N*K, C, S, S] in [0, 1].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int = 84,
        mode: str = "RGB",
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None | bool = None,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder: {self.root} does not exist or is not a folder")
        if mode not in _CHANNELS:
            raise ValueError(f"mode must be one of {sorted(_CHANNELS)}, got {mode!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size, self.mode, self.device, self.cache_dir = image_size, mode, torch.device(device), cache_dir
        self._splits: dict[str, dict] = {}

    def load_split(self, split: str) -> dict:
        """The split's ``images`` uint8 [n, C, S, S], ``class_count`` [classes] and class ``names``."""
        if split not in self._splits:
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise FileNotFoundError(f"image folder: split folder {split_dir} does not exist")
            classes = _list_split(split_dir)
            stats = [f.stat() for _, files in classes for f in files]
            key = {
                "split": str(split_dir.resolve()),
                "files": len(stats),
                "bytes": sum(s.st_size for s in stats),
                "mtime": max(s.st_mtime_ns for s in stats),
                "image_size": self.image_size,
                "mode": self.mode,
                "preprocessing": _PREPROCESSING,
            }
            entry = cached("image-folder", key, lambda: _decode_split(classes, self.image_size, self.mode, split), self.cache_dir)
            entry["images"] = entry["images"].to(self.device)
            self._splits[split] = entry
        return self._splits[split]

    def tasks(
        self, split: str, *, ways: int, shots: int, queries: int, seed: int = 0, rotate: bool = False
    ) -> FewShotTasks:
        entry = self.load_split(split)
        counts = entry["class_count"]
        return FewShotTasks(
            entry["images"],
            class_start=counts.cumsum(0) - counts,
            class_count=counts,
            ways=ways,
            shots=shots,
            queries=queries,
            rotate=rotate,
            seed=seed,
            stream=f"image-folder/{split}",
            class_names=[f"{split}/{name}" for name in entry["names"]],
        )

    def __repr__(self) -> str:
        return f"ImageFolderTasks({str(self.root)!r}, image_size={self.image_size}, mode={self.mode!r}, device={self.device})"
