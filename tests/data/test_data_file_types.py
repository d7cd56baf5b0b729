"""Issue 26, defects 9 and 10: data loading reads regular files only. A FIFO named .png
used to hang, and a symlink loop raised a raw OSError (ELOOP); each is now one
DatasetError naming the file, for an image folder and an extracted Omniglot."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from fastmeta.data import ImageFolderTasks, Omniglot
from fastmeta.data.errors import DatasetError


def image_folder(tmp_path):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(folder / "good.png")
    return folder


def test_a_fifo_named_png_is_refused_not_read(tmp_path):
    os.mkfifo(image_folder(tmp_path) / "pipe.png")
    with pytest.raises(DatasetError, match=r"pipe.png is not a regular file \(a FIFO\)") as caught:
        ImageFolderTasks(tmp_path, cache_dir=False).load_split("train")
    assert "\n" not in str(caught.value)


def test_a_symlink_loop_is_one_line_naming_the_file(tmp_path):
    loop = image_folder(tmp_path) / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(DatasetError, match="loop.png cannot be read") as caught:
        ImageFolderTasks(tmp_path, cache_dir=False).load_split("train")
    assert "\n" not in str(caught.value)


def test_a_dangling_link_is_named(tmp_path):
    (image_folder(tmp_path) / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(DatasetError, match="gone.png cannot be read"):
        ImageFolderTasks(tmp_path, cache_dir=False).load_split("train")


def test_a_symlink_to_a_regular_image_is_read(tmp_path):
    folder = image_folder(tmp_path)
    (folder / "link.png").symlink_to(folder / "good.png")
    entry = ImageFolderTasks(tmp_path, image_size=4, cache_dir=False).load_split("train")
    assert entry["images"].shape[0] == 2


def omniglot_folder(tmp_path):
    for name in ("images_background", "images_evaluation"):
        drawings = tmp_path / name / "Alpha" / "character01"
        drawings.mkdir(parents=True)
        for i in range(3):
            Image.new("L", (105, 105), 255).save(drawings / f"{i}.png")
    return tmp_path / "images_background" / "Alpha" / "character01"


@pytest.mark.parametrize("kind", ["fifo", "loop"])
def test_an_extracted_omniglot_refuses_non_regular_files(tmp_path, kind):
    target = omniglot_folder(tmp_path) / "bad.png"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(target)
    with pytest.raises(DatasetError, match="bad.png") as caught:
        Omniglot(tmp_path, cache_dir=False).tasks("train", ways=1, shots=1, queries=1)
    assert "\n" not in str(caught.value)
