import shutil
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import (
    REAL_OMNIGLOT,
    SYNTHETIC_OMNIGLOT_CHARACTERS,
    SYNTHETIC_OMNIGLOT_DRAWINGS,
    write_synthetic_omniglot,
)

import fastmeta.data.omniglot as omniglot_module
from fastmeta.data import DatasetError, Omniglot, TaskBatch, maml_split_sizes
from fastmeta.data.images import MAX_MEMBER_BYTES
from helpers import png_declaring


@pytest.fixture(scope="module")
def omniglot(synthetic_omniglot):
    return Omniglot(synthetic_omniglot)


def test_loads_the_whole_dataset_as_one_tensor(omniglot):
    assert omniglot.images.shape == (SYNTHETIC_OMNIGLOT_CHARACTERS, SYNTHETIC_OMNIGLOT_DRAWINGS, 28, 28)
    assert omniglot.images.dtype == torch.uint8
    # Inverted: the paper (most pixels) is 0 and the strokes are bright.
    assert omniglot.images.float().mean() < 0.3 * 255 and omniglot.images.max() == 255
    # Lanczos on the grey image gives intermediate values; nearest-neighbour would give only 0 and 255.
    assert ((omniglot.images > 0) & (omniglot.images < 255)).any()
    assert omniglot.character_names[0] == "images_background/Alpha/character01"
    assert omniglot.character_names[-1] == "images_evaluation/Epsilon/character16"


def test_maml_split_sizes():
    assert maml_split_sizes(1623) == (1100, 100, 423)
    for n in (3, 20, 80, 200, 1623, 5000):
        train, val, test = maml_split_sizes(n)
        assert train + val + test == n
        assert abs(train - n * 1100 / 1623) <= 0.5 and abs(val - n * 100 / 1623) <= 0.5
    with pytest.raises(ValueError, match="at least 3"):
        maml_split_sizes(2)


def test_split_is_a_fixed_partition(omniglot, synthetic_omniglot):
    sizes = [len(omniglot.splits[s]) for s in ("train", "val", "test")]
    assert sizes == list(maml_split_sizes(SYNTHETIC_OMNIGLOT_CHARACTERS)) == [54, 5, 21]
    everything = torch.cat([omniglot.splits[s] for s in ("train", "val", "test")])
    assert sorted(everything.tolist()) == list(range(SYNTHETIC_OMNIGLOT_CHARACTERS))
    # Shuffled, not the file order, and the same on every load.
    assert omniglot.splits["train"].tolist() != list(range(54))
    again = Omniglot(synthetic_omniglot)
    assert all(torch.equal(omniglot.splits[s], again.splits[s]) for s in omniglot.splits)
    assert not torch.equal(Omniglot(synthetic_omniglot, split_seed=1).splits["train"], omniglot.splits["train"])


def test_task_shapes_and_labels(omniglot):
    tasks = omniglot.tasks("train", ways=5, shots=2, queries=3)
    batch = tasks.sample(0, 6)
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (6, 10, 1, 28, 28) and batch.query_x.shape == (6, 15, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert batch.support_x.min() >= 0 and batch.support_x.max() <= 1
    assert batch.support_y.shape == (6, 10) and batch.query_y.shape == (6, 15)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.query_y.min() == 0 and batch.query_y.max() == 4


def test_tasks_pick_distinct_classes_and_examples(omniglot):
    tasks = omniglot.tasks("train", ways=5, shots=2, queries=3)
    plan = tasks.plan(4, range(64))
    assert plan.classes.shape == (64, 5) and plan.examples.shape == (64, 5, 5)
    for task_classes in plan.classes:
        assert task_classes.unique().numel() == 5
    for class_examples in plan.examples.view(-1, 5):
        assert class_examples.unique().numel() == 5
    assert plan.examples.max() < SYNTHETIC_OMNIGLOT_DRAWINGS and plan.classes.max() < 54
    # The class that gets label 0 varies from task to task: labels are permuted per task.
    assert plan.classes[:, 0].unique().numel() > 20
    assert plan.rotations.unique().tolist() == [0, 1, 2, 3]


def test_images_are_the_planned_drawings_rotated(omniglot):
    tasks = omniglot.tasks("train", ways=5, shots=1, queries=1)
    plan = tasks.plan(9, range(16))
    batch = tasks.gather(plan)
    train_characters = omniglot.splits["train"]
    for task in range(16):
        for way in range(5):
            character = train_characters[plan.classes[task, way]]
            for slot, (images, row) in enumerate(((batch.support_x, way), (batch.query_x, way))):
                drawing = omniglot.images[character, plan.examples[task, way, slot]].float() / 255
                expected = torch.rot90(drawing, int(plan.rotations[task, way]), dims=(0, 1))
                assert torch.equal(images[task, row, 0], expected)
    assert torch.equal(batch.support_x, tasks.sample(9, range(16)).support_x)


def test_sharded_draws_equal_one_draw(omniglot):
    tasks = omniglot.tasks("train", ways=5, shots=1, queries=2, seed=42)
    whole = tasks.sample(123, range(8))
    first, second = tasks.sample(123, range(0, 4)), tasks.sample(123, torch.arange(4, 8))
    for field, a, b, c in zip(TaskBatch._fields, whole, first, second):
        assert torch.equal(a, torch.cat([b, c])), field
    assert not torch.equal(whole.support_x, tasks.sample(124, range(8)).support_x)
    other_seed = omniglot.tasks("train", ways=5, shots=1, queries=2, seed=43)
    assert not torch.equal(whole.support_x, other_seed.sample(123, range(8)).support_x)


def test_rotations_can_be_switched_off(omniglot):
    plan = omniglot.tasks("val", ways=5, shots=1, queries=1, rotate=False).plan(0, 4)
    assert plan.rotations is None


def test_extracted_folders_load_like_the_archives(tmp_path, synthetic_omniglot, omniglot):
    for archive in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(synthetic_omniglot / f"{archive}.zip") as archive_file:
            archive_file.extractall(tmp_path)
    from_folders = Omniglot(tmp_path, cache_dir=False)
    assert torch.equal(from_folders.images, omniglot.images)
    assert from_folders.character_names == omniglot.character_names


def test_second_load_comes_from_the_cache(tmp_path, synthetic_omniglot, monkeypatch):
    first = Omniglot(synthetic_omniglot, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("omniglot-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the PNGs were decoded again although a cache entry exists")

    monkeypatch.setattr(omniglot_module, "_decode", no_decoding)
    assert torch.equal(Omniglot(synthetic_omniglot, cache_dir=tmp_path).images, first.images)
    # A damaged entry is rebuilt, not trusted.
    monkeypatch.undo()
    entry = next(tmp_path.glob("omniglot-*.pt"))
    entry.write_bytes(entry.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="damaged"):
        assert torch.equal(Omniglot(synthetic_omniglot, cache_dir=tmp_path).images, first.images)


def test_a_changed_archive_is_decoded_again(tmp_path, monkeypatch):
    root = write_synthetic_omniglot(tmp_path / "data", drawings=2)
    cache = tmp_path / "cache"
    Omniglot(root, cache_dir=cache)
    write_synthetic_omniglot(root, drawings=3)  # different size and mtime
    assert Omniglot(root, cache_dir=cache).drawings_per_character == 3
    assert len(list(cache.glob("omniglot-*.pt"))) == 2


def test_missing_data_names_the_path(tmp_path, synthetic_omniglot):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Omniglot(tmp_path / "nowhere")
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    with pytest.raises(FileNotFoundError, match="images_evaluation.zip"):
        Omniglot(tmp_path)


def test_corrupt_zip_names_the_archive(tmp_path, synthetic_omniglot):
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    (tmp_path / "images_evaluation.zip").write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match="images_evaluation.zip"):
        Omniglot(tmp_path, cache_dir=False)


def test_corrupt_member_names_the_file(tmp_path, synthetic_omniglot):
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    broken = "images_evaluation/Delta/character03/0051_02.png"
    with zipfile.ZipFile(synthetic_omniglot / "images_evaluation.zip") as source:
        with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as copy:
            for name in source.namelist():
                copy.writestr(name, b"\x89PNG garbage" if name == broken else source.read(name))
    with pytest.raises(DatasetError, match=f"images_evaluation.zip:{broken} is not a readable image"):
        Omniglot(tmp_path, cache_dir=False)


def test_truncated_zip_names_the_archive(tmp_path, synthetic_omniglot):
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    data = (synthetic_omniglot / "images_evaluation.zip").read_bytes()
    (tmp_path / "images_evaluation.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="images_evaluation.zip"):
        Omniglot(tmp_path, cache_dir=False)


def test_uneven_drawings_name_the_character(tmp_path):
    root = write_synthetic_omniglot(tmp_path, drawings=3, as_zip=False)
    next((root / "images_evaluation" / "Delta" / "character02").glob("*.png")).unlink()
    with pytest.raises(DatasetError, match="Delta/character02 .* has 2 drawings"):
        Omniglot(root, cache_dir=False)


def test_too_few_classes_or_drawings(omniglot):
    with pytest.raises(ValueError, match=r"ways=20 .* only 5"):
        omniglot.tasks("val", ways=20, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"shots=4 \+ queries=3 .* only 6"):
        omniglot.tasks("train", ways=5, shots=4, queries=3)
    with pytest.raises(ValueError, match="ways"):
        omniglot.tasks("train", ways=0, shots=1, queries=1)
    with pytest.raises(ValueError, match="split"):
        omniglot.tasks("validation", ways=5, shots=1, queries=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_the_same_tasks(synthetic_omniglot):
    cpu = Omniglot(synthetic_omniglot).tasks("train", ways=5, shots=1, queries=1, seed=3)
    cuda = Omniglot(synthetic_omniglot, device="cuda").tasks("train", ways=5, shots=1, queries=1, seed=3)
    for a, b in zip(cpu.sample(7, range(32)), cuda.sample(7, range(32))):
        assert torch.equal(a, b.cpu())


@pytest.mark.slow
@pytest.mark.skipif(not REAL_OMNIGLOT.is_dir(), reason="set FASTMETA_OMNIGLOT to the folder of the official Omniglot archives")
def test_real_omniglot():
    data = Omniglot(REAL_OMNIGLOT)
    assert data.images.shape == (1623, 20, 28, 28)
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert sum(name.startswith("images_background/") for name in data.character_names) == 964
    batch = data.tasks("train", ways=20, shots=1, queries=1).sample(0, 16)
    assert batch.support_x.shape == (16, 20, 1, 28, 28)
    # About 8% of Omniglot's 28x28 pixels are stroke after inversion.
    assert 0.04 < batch.support_x.mean() < 0.15


def test_a_block_of_iterations_equals_one_sample_per_iteration(omniglot):
    tasks = omniglot.tasks("train", ways=5, shots=2, queries=1, seed=4)
    block = tasks.sample_block(range(7, 10), range(3, 8))
    assert len(block) == 3
    for iteration, batch in zip(range(7, 10), block):
        for field, a, b in zip(TaskBatch._fields, batch, tasks.sample(iteration, range(3, 8))):
            assert torch.equal(a, b), field
        assert batch.support_x.is_contiguous() and batch.query_x.is_contiguous()


# -- hostile files: bounded before they are read ------------------------------------------------


def replace_member(source: Path, destination: Path, member: str, write) -> None:
    """Copy the zip ``source`` to ``destination``, writing ``member`` with ``write(zip, name)``."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as copy:
        for name in original.namelist():
            if name == member:
                write(copy, name)
            else:
                copy.writestr(name, original.read(name))


MEMBER = "images_evaluation/Delta/character03/0051_02.png"


def test_a_member_declaring_a_huge_size_is_refused_before_it_is_read(tmp_path, synthetic_omniglot):
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    size = 64 << 20  # 64 MiB of zeros: 64 KiB deflated

    def huge(archive, name):
        with archive.open(name, "w", force_zip64=True) as handle:
            for _ in range(size >> 20):
                handle.write(bytes(1 << 20))

    replace_member(synthetic_omniglot / "images_evaluation.zip", tmp_path / "images_evaluation.zip", MEMBER, huge)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=rf"images_evaluation.zip:{MEMBER} declares {size} bytes uncompressed, "
                                               rf"more than the {MAX_MEMBER_BYTES} allowed"):
            Omniglot(tmp_path, cache_dir=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes: the member was read"


def test_a_member_whose_header_understates_its_size_is_not_read_past_it(tmp_path, synthetic_omniglot):
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    path = tmp_path / "images_evaluation.zip"
    replace_member(synthetic_omniglot / "images_evaluation.zip", path, MEMBER,
                   lambda archive, name: archive.writestr(name, bytes(2 << 20)))
    data = bytearray(path.read_bytes())
    entry = data.find(b"PK\x01\x02")  # the first central directory entry
    name = MEMBER.encode()
    while data[entry + 46 : entry + 46 + len(name)] != name:  # the central directory entry of MEMBER
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + 24 : entry + 28] = struct.pack("<I", 100)  # "100 bytes uncompressed"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"images_evaluation.zip:{MEMBER} (cannot be read|is not a readable image)"):
        Omniglot(tmp_path, cache_dir=False)


@pytest.mark.parametrize(
    "width, height, message",
    [
        (15000, 15000, "is too large to decode"),  # beyond Pillow's DecompressionBombError limit
        (10000, 10000, "is too large to decode"),  # Pillow's DecompressionBombWarning range
        (9000, 9000, "declares 9000 x 9000 pixels, more than the 67108864 allowed"),  # fastmeta's own cap
    ],
)
def test_a_decompression_bomb_is_a_dataset_error_naming_the_file(tmp_path, synthetic_omniglot, width, height, message):
    shutil.copy(synthetic_omniglot / "images_background.zip", tmp_path)
    replace_member(synthetic_omniglot / "images_evaluation.zip", tmp_path / "images_evaluation.zip", MEMBER,
                   lambda archive, name: archive.writestr(name, png_declaring(width, height)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning does not leak out either
        with pytest.raises(DatasetError, match=rf"Omniglot: .*images_evaluation.zip:{MEMBER} {message}"):
            Omniglot(tmp_path, cache_dir=False)
