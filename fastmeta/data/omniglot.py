"""Omniglot, as the MAML paper uses it: one tensor of 1623 characters x 20 drawings.

Preprocessing (docs/benchmarks.md, "Omniglot protocol"):
- each 105x105 binary PNG is converted to 8-bit grey and resized to 28x28 with Lanczos
  (Pillow resizes mode "1" images with nearest-neighbour whatever filter is asked for,
  hence the conversion first), then inverted, so strokes are 1.0 and paper 0.0;
- characters are ordered by (archive, alphabet, character), background first, then
  shuffled with a fixed seed into 1100 train / 100 validation / 423 test characters.
  The shuffle uses fastmeta's counter RNG, so the split is the same on every machine and
  every library version. (The MAML code shuffles its own directory listing with Python's
  ``random``; that exact split depends on the file system and cannot be reproduced.)
- each class of a task is rotated by a random multiple of 90 degrees.

Accepted layouts under ``root``: ``images_background.zip`` and ``images_evaluation.zip``
(the official archives), or their extracted folders ``images_background/`` and
``images_evaluation/``, either directly in ``root`` or in ``root/omniglot-py`` (where
torchvision downloads them). Inside, PNGs are ``ALPHABET/characterNN/*.png``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import cached
from .errors import DatasetError, check_regular_file
from .few_shot import FewShotTasks
from .images import decode_resized, read_zip_member
from .random import random_words

__all__ = ["Omniglot", "maml_split_sizes", "OMNIGLOT_ARCHIVES", "MAML_SPLIT"]

OMNIGLOT_ARCHIVES = ("images_background", "images_evaluation")
MAML_SPLIT = (1100, 100, 423)
SPLITS = ("train", "val", "test")
# Bump when preprocessing changes, so cached tensors from the old code are not reused.
_PREPROCESSING = "omniglot-v1: convert L, resize LANCZOS, invert"


def maml_split_sizes(num_classes: int) -> tuple[int, int, int]:
    """(train, val, test) class counts: MAML's 1100 / 100 / 423 for the full 1623 characters.

    Other sizes (a subset, or a synthetic stand-in in tests) get the same proportions:
    train = round(n * 1100 / 1623), val = round(n * 100 / 1623), test = the rest.
    """
    if num_classes < 3:
        raise ValueError(f"Omniglot needs at least 3 characters to split into train/val/test, got {num_classes}")
    total = sum(MAML_SPLIT)
    # Round half up in integers, so no float rounding mode decides a class's split.
    train = (2 * num_classes * MAML_SPLIT[0] + total) // (2 * total)
    val = (2 * num_classes * MAML_SPLIT[1] + total) // (2 * total)
    return train, val, num_classes - train - val


@dataclass(frozen=True)
class _Character:
    name: str  # "images_background/Latin/character01"
    members: tuple[str, ...]  # zip member names or file paths, sorted


class _Archive:
    """One of the two halves of Omniglot, as a zip or as an extracted folder."""

    def __init__(self, root: Path, name: str):
        candidates = [root, root / "omniglot-py"]
        for directory in candidates:
            if (directory / f"{name}.zip").is_file():
                self.path, self.is_zip = directory / f"{name}.zip", True
                break
            if (directory / name).is_dir():
                self.path, self.is_zip = directory / name, False
                break
        else:
            tried = ", ".join(str(d / f"{name}.zip") + " or " + str(d / name) + "/" for d in candidates)
            raise FileNotFoundError(f"Omniglot: {name} not found; looked for {tried}")
        self.name = name
        self._zip = None

    def fingerprint(self) -> list:
        """What the cache key needs to notice a changed archive: names, sizes, mtimes."""
        if self.is_zip:
            stat = self.path.stat()
            return [self.name, "zip", stat.st_size, stat.st_mtime_ns]
        files = sorted(self.path.rglob("*.png"))
        stats = [check_regular_file(f, "Omniglot") for f in files]
        return [
            self.name,
            "folder",
            len(files),
            sum(s.st_size for s in stats),
            max((s.st_mtime_ns for s in stats), default=0),
        ]

    def characters(self) -> list[_Character]:
        if self.is_zip:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as error:
                raise DatasetError(f"Omniglot: {self.path} is not a readable zip archive ({error})") from None
            names = [n for n in self._zip.namelist() if n.lower().endswith(".png")]
            parts = [PurePosixPath(n).parts for n in names]
        else:
            files = sorted(self.path.rglob("*.png"))
            for f in files:
                check_regular_file(f, "Omniglot")
            names = [str(f) for f in files]
            parts = [f.relative_to(self.path).parts for f in files]
        grouped: dict[str, list[str]] = {}
        for member, member_parts in zip(names, parts):
            if len(member_parts) < 3:
                raise DatasetError(
                    f"Omniglot: {self._describe(member)} is not laid out as ALPHABET/characterNN/drawing.png"
                )
            alphabet, character = member_parts[-3], member_parts[-2]
            grouped.setdefault(f"{self.name}/{alphabet}/{character}", []).append(member)
        if not grouped:
            raise DatasetError(f"Omniglot: {self.path} contains no PNG images")
        return [_Character(name, tuple(sorted(members))) for name, members in sorted(grouped.items())]

    def _describe(self, member: str) -> str:
        return f"{self.path}:{member}" if self.is_zip else member

    def read_image(self, member: str, size: int) -> np.ndarray:
        """One drawing, resized and inverted: uint8 [size, size], strokes 255."""
        where = f"Omniglot: {self._describe(member)}"
        source = read_zip_member(self._zip, member, where) if self.is_zip else Path(member)
        grey = decode_resized(source, size, "L", where)
        return 255 - np.asarray(grey, dtype=np.uint8)

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _decode(archives: list[_Archive], image_size: int) -> dict:
    characters = [(archive, character) for archive in archives for character in archive.characters()]
    drawings = len(characters[0][1].members)
    for archive, character in characters:
        if len(character.members) != drawings:
            raise DatasetError(
                f"Omniglot: {character.name} in {archive.path} has {len(character.members)} drawings; "
                f"every character needs the same number ({characters[0][1].name} has {drawings})"
            )
    images = np.empty((len(characters), drawings, image_size, image_size), dtype=np.uint8)
    progress = tqdm(total=len(characters) * drawings, desc="Omniglot: decoding PNGs (cached afterwards)", unit="img", disable=None)
    with progress:
        for index, (archive, character) in enumerate(characters):
            for drawing, member in enumerate(character.members):
                images[index, drawing] = archive.read_image(member, image_size)
            progress.update(drawings)
    return {"images": torch.from_numpy(images), "names": [character.name for _, character in characters]}


class Omniglot:
    """Omniglot as one uint8 tensor ``images [num_characters, drawings, S, S]`` on ``device``.

    Args:
        root: the folder with ``images_background.zip`` and ``images_evaluation.zip`` or
            their extracted folders (see the module docstring).
        device: where the images live and tasks are drawn.
        image_size: S, 28 in the MAML protocol.
        split_seed: the seed of the character shuffle that makes the 1100/100/423 split.
        cache_dir: where the decoded tensor is cached; None for the default
            (``fastmeta.data.cache``), False to always decode.

    Attributes: ``images``, ``character_names``, ``splits`` (split name -> int64 tensor of
    character indices). Draw tasks with ``tasks(split, ways, shots, queries, seed)``.

    Raises FileNotFoundError naming the paths tried when an archive or folder is missing,
    and DatasetError naming the file when an archive or image is corrupt. Everything is
    read and checked before anything is returned or cached.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        image_size: int = 28,
        split_seed: int = 0,
        cache_dir: str | os.PathLike | None | bool = None,
    ):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"Omniglot: data folder {self.root} does not exist")
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Omniglot: {self.root} is not a folder; pass the folder that holds images_background.zip and images_evaluation.zip"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        archives = [_Archive(self.root, name) for name in OMNIGLOT_ARCHIVES]
        key = {"archives": [a.fingerprint() for a in archives], "image_size": image_size, "preprocessing": _PREPROCESSING}
        try:
            entry = cached("omniglot", key, lambda: _decode(archives, image_size), cache_dir)
        finally:
            for archive in archives:
                archive.close()
        self.images: torch.Tensor = entry["images"].to(device)
        self.character_names: list[str] = list(entry["names"])
        self.device = self.images.device
        self.split_seed = split_seed
        self.splits = self._split(split_seed)

    @property
    def num_characters(self) -> int:
        return self.images.shape[0]

    @property
    def drawings_per_character(self) -> int:
        return self.images.shape[1]

    def _split(self, split_seed: int) -> dict[str, torch.Tensor]:
        count = self.num_characters
        sizes = maml_split_sizes(count)
        # A seeded shuffle: sort characters by a counter-RNG key (ties impossible: key*n + index).
        keys = random_words(split_seed, 0, "omniglot/split", [0], count)[0] * count + torch.arange(count)
        order = keys.argsort(descending=True)
        return dict(zip(SPLITS, order.split(sizes)))

    def tasks(
        self, split: str, *, ways: int, shots: int, queries: int, seed: int = 0, rotate: bool = True
    ) -> FewShotTasks:
        """An N-way K-shot sampler over one split's characters (see FewShotTasks.sample)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        characters = self.splits[split]
        drawings, side = self.drawings_per_character, self.images.shape[-1]
        return FewShotTasks(
            self.images.view(-1, 1, side, side),
            class_start=characters * drawings,
            class_count=torch.full_like(characters, drawings),
            ways=ways,
            shots=shots,
            queries=queries,
            rotate=rotate,
            seed=seed,
            stream=f"omniglot/{split}",
            class_names=[self.character_names[i] for i in characters.tolist()],
        )

    def __repr__(self) -> str:
        sizes = "/".join(str(len(self.splits[s])) for s in SPLITS)
        return f"Omniglot({str(self.root)!r}, characters={self.num_characters}, split={sizes}, device={self.device})"
