import numpy as np
import pytest
import torch
from PIL import Image

from fastmeta.data import DatasetError, ImageFolderTasks, TaskBatch

# Classes with different image counts; every image is one flat colour that encodes its
# class and index, so a test can tell which image it got after resizing.
CLASS_SIZES = {"train": [4, 6, 5, 9, 4, 7], "val": [5, 5, 5, 5, 5], "test": [8, 4, 4, 4, 4]}


def colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    return (40 * class_index + 10, 20 * image_index + 5, 200)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for split, sizes in CLASS_SIZES.items():
        for class_index, count in enumerate(sizes):
            folder = root / split / f"n{class_index:04d}"
            folder.mkdir(parents=True)
            for image_index in range(count):
                # Odd sizes and a JPEG among the PNGs: everything is resized to one size.
                size = (30 + image_index, 20 + class_index)
                suffix = ".jpg" if image_index == 1 else ".png"
                Image.new("RGB", size, colour(class_index, image_index)).save(folder / f"{image_index:03d}{suffix}")
    (root / "train" / "n0000" / "notes.txt").write_text("not an image: ignored")
    return root


def test_shapes_and_labels(image_root):
    tasks = ImageFolderTasks(image_root, image_size=12).tasks("train", ways=5, shots=1, queries=3)
    batch = tasks.sample(0, 4)
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (4, 5, 3, 12, 12) and batch.query_x.shape == (4, 15, 3, 12, 12)
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min() and batch.support_x.max() <= 1
    assert batch.support_y[0].tolist() == [0, 1, 2, 3, 4]
    assert batch.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_uneven_classes_only_draw_existing_images(image_root):
    dataset = ImageFolderTasks(image_root, image_size=8)
    tasks = dataset.tasks("train", ways=6, shots=1, queries=3)
    plan = tasks.plan(1, range(200))
    counts = torch.tensor(CLASS_SIZES["train"])
    assert (plan.examples < counts[plan.classes].unsqueeze(-1)).all()
    for class_examples in plan.examples.view(-1, 4):
        assert class_examples.unique().numel() == 4
    # The 9-image class uses all nine positions over many tasks.
    big = plan.examples[plan.classes == 3]
    assert big.unique().tolist() == list(range(9))
    # Each gathered image is the planned one (its colour encodes class and index).
    batch = tasks.gather(plan)
    for task in range(3):
        for way in range(6):
            pixel = batch.support_x[task, way, :, 4, 4] * 255
            expected = torch.tensor(colour(int(plan.classes[task, way]), int(plan.examples[task, way, 0])))
            # JPEG shifts a flat colour by a few levels; neighbouring codes differ by 10 or more.
            assert (pixel - expected).abs().max() <= 3


def test_grey_mode_and_sharding(image_root):
    tasks = ImageFolderTasks(image_root, image_size=10, mode="L").tasks("test", ways=5, shots=2, queries=2, seed=5)
    whole = tasks.sample(3, range(6))
    assert whole.support_x.shape == (6, 10, 1, 10, 10)
    halves = tasks.sample(3, range(3)), tasks.sample(3, range(3, 6))
    for a, b, c in zip(whole, *halves):
        assert torch.equal(a, torch.cat([b, c]))


def test_missing_paths_are_named(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="absent"):
        ImageFolderTasks(tmp_path / "absent")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val"):
        ImageFolderTasks(tmp_path).tasks("val", ways=5, shots=1, queries=1)


def test_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="bad.png"):
        ImageFolderTasks(tmp_path, cache_dir=False).tasks("train", ways=1, shots=1, queries=1)


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty_class"):
        ImageFolderTasks(tmp_path, cache_dir=False).load_split("train")


def test_too_few_classes_or_images(image_root):
    dataset = ImageFolderTasks(image_root, image_size=8)
    with pytest.raises(ValueError, match=r"ways=6 .* only 5"):
        dataset.tasks("val", ways=6, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"shots=1 \+ queries=4 .* train/n0000 .* only 4"):
        dataset.tasks("train", ways=2, shots=1, queries=4)
    with pytest.raises(ValueError, match="mode"):
        ImageFolderTasks(image_root, mode="CMYK")


def test_decoded_split_is_cached(tmp_path, image_root):
    first = ImageFolderTasks(image_root, image_size=8, cache_dir=tmp_path).load_split("val")
    assert len(list(tmp_path.glob("image-folder-*.pt"))) == 1
    second = ImageFolderTasks(image_root, image_size=8, cache_dir=tmp_path).load_split("val")
    assert torch.equal(first["images"], second["images"]) and first["names"] == second["names"]
    ImageFolderTasks(image_root, image_size=9, cache_dir=tmp_path).load_split("val")
    assert len(list(tmp_path.glob("image-folder-*.pt"))) == 2
    assert np.array_equal(first["class_count"].numpy(), CLASS_SIZES["val"])


def test_a_block_of_iterations_equals_one_sample_per_iteration(image_root):
    tasks = ImageFolderTasks(image_root, image_size=8).tasks("train", ways=3, shots=1, queries=2)
    for iteration, batch in zip(range(5, 8), tasks.sample_block(range(5, 8), 4)):
        for a, b in zip(batch, tasks.sample(iteration, 4)):
            assert torch.equal(a, b)


def test_a_decompression_bomb_is_a_dataset_error_naming_the_file(tmp_path):
    from helpers import png_declaring

    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(folder / "good.png")
    (folder / "bomb.png").write_bytes(png_declaring(15000, 15000))
    with pytest.raises(DatasetError, match=rf"image folder: {folder / 'bomb.png'} is too large to decode"):
        ImageFolderTasks(tmp_path, cache_dir=False).load_split("train")
