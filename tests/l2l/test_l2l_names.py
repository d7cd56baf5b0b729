"""Every public name of learn2learn's documented modules resolves in fastmeta.l2l, or
raises an ImportError naming the library it needs (qpth, PyTorch Lightning, gym).

The list is learn2learn's API documentation (learn2learn.net/docs) and the ``__init__``
of each documented module, at learn2learn 0.2. Names fastmeta refuses (datasets it has no
reader for, downloads) resolve to something that raises NotImplementedError naming them.
"""

from __future__ import annotations

import importlib

import pytest

DOCUMENTED = {
    "learn2learn": [
        "algorithms", "data", "gym", "nn", "optim", "text", "utils", "vision", "clone_module", "detach_module",
        "update_module", "clone_parameters", "clone_named_parameters", "magic_box", "accuracy",
        "clone_distribution", "detach_distribution", "flatten_config",
    ],
    "learn2learn.utils": [
        "clone_module", "detach_module", "update_module", "clone_parameters", "clone_named_parameters", "magic_box",
        "accuracy", "clone_distribution", "detach_distribution", "flatten_config",
    ],
    "learn2learn.utils.lightning": ["EpisodicBatcher", "TrackTestAccuracyCallback", "NoLeaveProgressBar"],
    "learn2learn.algorithms": [
        "MAML", "maml_update", "MetaSGD", "meta_sgd_update", "GBML", "LightningEpisodicModule", "LightningMAML",
        "LightningANIL", "LightningPrototypicalNetworks", "LightningMetaOptNet",
    ],
    "learn2learn.algorithms.maml": ["MAML", "maml_update"],
    "learn2learn.algorithms.meta_sgd": ["MetaSGD", "meta_sgd_update"],
    "learn2learn.algorithms.gbml": ["GBML"],
    "learn2learn.algorithms.base_learner": ["BaseLearner"],
    "learn2learn.data": [
        "MetaDataset", "UnionMetaDataset", "FilteredMetaDataset", "TaskDataset", "Taskset", "DataDescription",
        "OnDeviceDataset", "partition_task", "InfiniteIterator", "transforms",
    ],
    "learn2learn.data.transforms": [
        "NWays", "KShots", "LoadData", "FilterLabels", "FusedNWaysKShots", "RemapLabels", "ConsecutiveLabels",
    ],
    "learn2learn.nn": [
        "Lambda", "Flatten", "Scale", "freeze", "unfreeze", "KroneckerLinear", "KroneckerRNN", "KroneckerLSTM",
        "MetaModule", "PrototypicalClassifier", "SVClassifier",
    ],
    "learn2learn.nn.metalayers": ["MetaModule"],
    "learn2learn.optim": ["LearnableOptimizer", "ParameterUpdate", "DifferentiableSGD", "transforms"],
    "learn2learn.optim.transforms": [
        "ModuleTransform", "ReshapedTransform", "KroneckerTransform", "MetaCurvatureTransform",
    ],
    "learn2learn.vision": ["benchmarks", "datasets", "models", "transforms"],
    "learn2learn.vision.benchmarks": ["get_tasksets", "list_tasksets", "BenchmarkTasksets"],
    "learn2learn.vision.models": [
        "OmniglotFC", "OmniglotCNN", "CNN4", "CNN4Backbone", "MiniImagenetCNN", "ConvBase", "ConvBlock",
        "LinearBlock", "ResNet12", "ResNet12Backbone", "WRN28", "WRN28Backbone", "get_pretrained_backbone",
        "maml_init_", "fc_init_",
    ],
    "learn2learn.vision.datasets": [
        "FullOmniglot", "MiniImagenet", "TieredImagenet", "FC100", "CIFARFS", "VGGFlower102", "FGVCAircraft",
        "FGVCFungi", "CUBirds200", "Quickdraw", "DescribableTextures",
    ],
    "learn2learn.vision.transforms": ["RandomClassRotation"],
    "learn2learn.gym": ["MetaEnv", "AsyncVectorEnv"],
    "learn2learn.text": ["datasets"],
    "learn2learn.text.datasets": ["NewsClassification"],
}
COUNT = sum(len(names) for names in DOCUMENTED.values())

# Names that need a library fastmeta does not depend on: the library their ImportError names.
NEEDS = {
    "learn2learn.nn.SVClassifier": "qpth",
    "learn2learn.utils.lightning": "PyTorch Lightning",
    "learn2learn.gym": "gym",
    **{f"learn2learn.algorithms.{n}": "PyTorch Lightning" for n in DOCUMENTED["learn2learn.algorithms"]
       if n.startswith("Lightning")},
}
# Names that resolve to a refusal: constructing or calling them raises NotImplementedError naming them.
REFUSED = {
    "learn2learn.vision.datasets." + n for n in (
        "TieredImagenet", "VGGFlower102", "FGVCAircraft", "FGVCFungi", "CUBirds200", "Quickdraw",
        "DescribableTextures")
} | {"learn2learn.vision.models.get_pretrained_backbone", "learn2learn.text.datasets.NewsClassification"}


def ours(module: str) -> str:
    return "fastmeta.l2l" + module[len("learn2learn"):]


def resolve(module: str, name: str):
    return getattr(importlib.import_module(ours(module)), name)


def needed_library(module: str, name: str) -> str | None:
    for key in (f"{module}.{name}", module):
        if key in NEEDS:
            return NEEDS[key]
    return None


def test_the_documented_names_are_counted():
    assert COUNT == 122


@pytest.mark.parametrize("module, name", [(m, n) for m, names in DOCUMENTED.items() for n in names],
                         ids=lambda v: v)
def test_each_documented_name_resolves_or_names_its_library(module, name):
    library = needed_library(module, name)
    if library is not None:
        with pytest.raises(ImportError, match=library):
            resolve(module, name)
        return
    value = resolve(module, name)
    assert value is not None
    if f"{module}.{name}" in REFUSED:
        with pytest.raises(NotImplementedError, match=name):
            value()


def test_the_top_level_and_the_learners_are_fastmetas():
    import fastmeta as fm
    import fastmeta.l2l as l2l

    assert l2l.algorithms.MAML is fm.MAML and l2l.algorithms.MetaSGD is fm.MetaSGD and fm.l2l is l2l
    assert l2l.algorithms.maml.maml_update is l2l.maml_update is l2l.utils.maml_update
    assert l2l.data.Taskset is l2l.data.TaskDataset and l2l.vision.models.MiniImagenetCNN is l2l.vision.models.CNN4
    assert l2l.nn.metalayers.MetaModule is l2l.nn.MetaModule
    # The old leftover: fastmeta.l2l.nn was torch.nn, so torch's names leaked through it.
    with pytest.raises(AttributeError, match="fastmeta.l2l.nn"):
        l2l.nn.Conv2d


def test_every_l2l_package_is_in_pyproject():
    """A non-editable install ships only the packages pyproject.toml lists."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "fastmeta" / "l2l").rglob("__init__.py")}
    assert found and found <= listed, sorted(found - listed)
