"""fastmeta.l2l.data and vision.datasets/benchmarks: the published formats, the restricted
unpickler, the task transforms, and tasks that depend only on the seed."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

import fastmeta.l2l as l2l
from published_fixtures import cifarfs_root, fc100_root, mini_imagenet_root  # noqa: F401 (fixtures)
from fastmeta.l2l.data import DataDescription, MetaDataset, TaskDataset
from fastmeta.l2l.data.transforms import (
    ConsecutiveLabels, FilterLabels, FusedNWaysKShots, KShots, LoadData, NWays, RemapLabels,
)
from fastmeta.l2l.vision.datasets.published_files import UnsafePickleError, load_pickle


class Pairs(torch.utils.data.Dataset):
    """label c has ``per[c]`` examples; x is the index as a float tensor."""

    def __init__(self, per=(3, 4, 5, 3, 4)):
        self.labels = [c for c, n in enumerate(per) for _ in range(n)]

    def __getitem__(self, i):
        return torch.tensor([float(i)]), self.labels[i]

    def __len__(self):
        return len(self.labels)


# -- the restricted unpickler -------------------------------------------------------------


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_a_pickle_that_names_anything_else_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": RunsACommand(), "class_dict": {}}))
    with pytest.raises(UnsafePickleError) as error:
        l2l.vision.datasets.MiniImagenet(tmp_path, mode="train")
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "system" in message
    assert not (tmp_path / "pwned-by-pickle").exists()
    # Another class of the standard library, loaded through copyreg, is refused too.
    path.write_bytes(pickle.dumps({"x": __import__("collections").OrderedDict(a=1)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        load_pickle(path)


def test_arrays_dicts_lists_numbers_and_strings_load(tmp_path):
    value = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, "x", (3, 4)], "c": np.float32(1.5),
             "d": {3, 4}}
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        got = load_pickle(path)
        assert np.array_equal(got["a"], value["a"]) and got["b"] == value["b"] and got["c"] == 1.5
        assert got["d"] == {3, 4}


def test_files_are_checked_before_reading(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        load_pickle(tmp_path)
    big = tmp_path / "big.pkl"
    big.write_bytes(pickle.dumps(list(range(1000))))
    with pytest.raises(ValueError, match="more than the 100 allowed"):
        load_pickle(big, max_bytes=100)
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(pickle.dumps(list(range(1000)))[:50])
    with pytest.raises(ValueError, match="could not be read as a pickle"):
        load_pickle(broken)


# -- the published formats ----------------------------------------------------------------


def test_missing_files_say_what_to_put_where(tmp_path):
    for name in ("mini-imagenet", "fc100", "cifarfs", "omniglot"):
        with pytest.raises(FileNotFoundError) as error:
            l2l.vision.benchmarks.get_tasksets(name, root=tmp_path)
        assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-train.pkl"):
        l2l.vision.datasets.MiniImagenet(tmp_path)
    with pytest.raises(FileNotFoundError, match="FC100_val.pickle"):
        l2l.vision.datasets.FC100(tmp_path, mode="validation")


def test_refused_options_are_named(tmp_path, mini_imagenet_root):
    with pytest.raises(ValueError, match="tiered-imagenet"):
        l2l.vision.benchmarks.get_tasksets("tiered-imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="device"):
        l2l.vision.benchmarks.get_tasksets("mini-imagenet", root=mini_imagenet_root, device="cpu")
    with pytest.raises(ValueError, match="data_augmentation='lee2019'"):
        l2l.vision.benchmarks.get_tasksets("mini-imagenet", root=mini_imagenet_root, data_augmentation="lee2019")
    with pytest.raises(ValueError, match="download"):
        l2l.vision.datasets.MiniImagenet(mini_imagenet_root, download=True)
    with pytest.raises(ValueError, match="mode"):
        l2l.vision.datasets.FC100(mini_imagenet_root, mode="val")


@pytest.mark.parametrize("name", ["mini-imagenet", "fc100", "cifarfs"])
def test_benchmark_tasksets_read_each_format(name, mini_imagenet_root, fc100_root, cifarfs_root):
    root = {"mini-imagenet": mini_imagenet_root, "fc100": fc100_root, "cifarfs": cifarfs_root}[name]
    tasksets = l2l.vision.benchmarks.get_tasksets(name, train_ways=3, train_samples=4, test_ways=2,
                                                  test_samples=3, root=root, seed=7)
    size = 16 if name == "mini-imagenet" else 32
    for taskset, ways, samples in ((tasksets.train, 3, 4), (tasksets.validation, 2, 3), (tasksets.test, 2, 3)):
        x, y = taskset.sample()
        assert x.shape == (ways * samples, 3, size, size) and x.dtype == torch.float32
        # Labels 0 .. ways-1, each class's examples consecutive (the scripts' interleaved split relies on it).
        assert sorted(set(y.tolist())) == list(range(ways))
        assert all(len(set(y[k * samples:(k + 1) * samples].tolist())) == 1 for k in range(ways))
    x, _ = tasksets.train.sample()
    if name == "mini-imagenet":
        assert x.max() > 1.0  # the stored 0-255 values, as learn2learn's
    else:
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_splits_hold_their_published_classes(fc100_root, cifarfs_root, mini_imagenet_root):
    fc = {m: l2l.vision.datasets.FC100(fc100_root, mode=m) for m in ("train", "validation", "test")}
    assert [sorted(set(d.labels_of_items())) for d in fc.values()] == [list(range(6)), list(range(6, 11)),
                                                                      list(range(11, 16))]
    image, label = fc["train"][0]
    assert image.size == (32, 32) and label == 0
    cifar = l2l.vision.datasets.CIFARFS(cifarfs_root, mode="validation")
    assert cifar.classes == [f"val_class{c}" for c in range(5)] and len(cifar) == 30
    mini = l2l.vision.datasets.MiniImagenet(mini_imagenet_root, mode="test")
    assert len(mini) == 30 and mini[0][0].shape == (3, 16, 16) and mini.labels_of_items()[-1] == 4


def test_omniglot_tasksets_read_the_official_archives(synthetic_omniglot):
    tasksets = l2l.vision.benchmarks.get_tasksets("omniglot", train_ways=5, train_samples=2, test_ways=5,
                                                  test_samples=2, root=synthetic_omniglot, seed=3)
    dataset = tasksets.train.dataset
    splits = dataset.dataset.omniglot.splits
    assert [len(splits[s]) for s in ("train", "val", "test")] == [54, 5, 21]
    for taskset, split in ((tasksets.train, "train"), (tasksets.validation, "val"), (tasksets.test, "test")):
        description = taskset.sample_task_description(random.Random(0))
        chars = {dataset.indices_to_labels[dd.index] for dd in description}
        assert chars <= set(splits[split].tolist()) and len(chars) == 5
        x, y = taskset.sample()
        assert x.shape == (10, 1, 28, 28) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# -- tasks depend on the seed only --------------------------------------------------------


def make_tasks(seed, num_tasks=20):
    dataset = MetaDataset(Pairs())
    transforms = [NWays(dataset, 3), KShots(dataset, 2), LoadData(dataset), RemapLabels(dataset),
                  ConsecutiveLabels(dataset)]
    return TaskDataset(dataset, task_transforms=transforms, num_tasks=num_tasks, seed=seed)


def as_lists(task):
    return task[0].view(-1).tolist(), task[1].tolist()


def test_the_same_seed_gives_the_same_tasks_however_often_they_are_drawn():
    a, b = make_tasks(5), make_tasks(5)
    forward = [as_lists(a[i]) for i in range(20)]
    random.seed(123)
    random.random()  # the global state is not what decides
    backward = [as_lists(b[i]) for i in reversed(range(20))][::-1]
    assert forward == backward
    assert [as_lists(a[3]) for _ in range(3)] == [forward[3]] * 3
    assert [as_lists(make_tasks(5).sample()) for _ in range(1)] == [as_lists(make_tasks(5).sample())]
    c, d = make_tasks(5), make_tasks(5)
    assert [as_lists(c.sample()) for _ in range(6)] == [as_lists(d.sample()) for _ in range(6)]
    assert forward != [as_lists(make_tasks(6)[i]) for i in range(20)]
    unlimited = [make_tasks(9, num_tasks=-1) for _ in range(2)]
    assert [as_lists(unlimited[0].sample()) for _ in range(4)] == [as_lists(unlimited[1].sample()) for _ in range(4)]


def test_without_a_seed_the_tasks_follow_pythons_random_state():
    random.seed(11)
    a = [as_lists(make_tasks(None)[i]) for i in range(5)]
    random.seed(11)
    assert a == [as_lists(make_tasks(None)[i]) for i in range(5)]


def test_the_task_transforms():
    dataset = MetaDataset(Pairs())
    rng = random.Random(0)
    labels = lambda d: [dataset.indices_to_labels[dd.index] for dd in d]  # noqa: E731
    from fastmeta.l2l.data.task_dataset import _TASK_RNG

    _TASK_RNG.set(rng)
    three = NWays(dataset, 3)(None)
    assert len(set(labels(three))) == 3 and len(three) == sum(labels(three).count(c) for c in set(labels(three)))
    two = KShots(dataset, 2)(three)
    assert sorted(labels(two)) == sorted(sorted(set(labels(three))) * 2)
    with pytest.raises(ValueError, match="k=6"):
        KShots(dataset, 6)(None)
    repeated = KShots(dataset, 6, replacement=True)(None)
    assert len(repeated) == 30
    assert set(labels(FilterLabels(dataset, [1, 3])(None))) == {1, 3}
    fused = FusedNWaysKShots(dataset, n=2, k=3, filter_labels=[0, 2, 4])(None)
    assert len(fused) == 6 and set(labels(fused)) <= {0, 2, 4}
    ordered = ConsecutiveLabels(dataset)(list(reversed(fused)))
    assert labels(ordered) == sorted(labels(fused))
    remapped = RemapLabels(dataset, shuffle=False)(LoadData(dataset)(ordered))
    data = [dd.transforms[-1](dd.transforms[0](dd.index)) for dd in remapped]
    assert [y for _, y in data] == [0, 0, 0, 1, 1, 1]
    _TASK_RNG.set(None)
    with pytest.raises(ValueError, match="n=9"):
        NWays(dataset, 9)(None)


def test_meta_datasets_and_helpers():
    a, b = MetaDataset(Pairs((2, 3))), MetaDataset(Pairs((1, 1, 2)))
    union = l2l.data.UnionMetaDataset([a, b])
    assert len(union) == 9 and union.labels == [0, 1, 2, 3, 4] and union.labels_to_indices[4] == [7, 8]
    filtered = l2l.data.FilteredMetaDataset(a, [1])
    assert len(filtered) == 3 and filtered[0][0].item() == 2.0
    x = torch.arange(8.0)[:, None]
    y = torch.tensor([0, 0, 1, 1, 0, 1, 2, 2])
    (sx, sy), (qx, qy) = l2l.data.partition_task(x, y, shots=1)
    assert sy.tolist() == [0, 1, 2] and qy.tolist() == [0, 1, 0, 1, 2]
    it = l2l.data.InfiniteIterator([1, 2])
    assert [next(it) for _ in range(5)] == [1, 2, 1, 2, 1]
    on_device = l2l.data.OnDeviceDataset(Pairs((2, 2)))
    assert on_device.data.shape == (4, 1) and MetaDataset(on_device).labels == [0, 1]
    assert isinstance(DataDescription(3).transforms, list)
