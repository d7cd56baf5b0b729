"""learn2learn's API on fastmeta: existing learn2learn code switches by changing its import.

>>> import fastmeta.l2l as l2l                            # was: import learn2learn as l2l
>>> maml = l2l.algorithms.MAML(model, lr=0.4)            # doctest: +SKIP
>>> clone = maml.clone()                                 # doctest: +SKIP
>>> clone.adapt(loss_fn(clone(sx), sy))                  # doctest: +SKIP
>>> tasksets = l2l.vision.benchmarks.get_tasksets("omniglot", root="~/data")   # doctest: +SKIP

The package has learn2learn's module paths and names, written from learn2learn's
documentation (learn2learn is not a dependency, and none of its code is here):

- :mod:`fastmeta.l2l.algorithms`: MAML, MetaSGD (fastmeta's own learners), GBML,
  ``maml.maml_update``, ``meta_sgd.meta_sgd_update``, ``base_learner.BaseLearner``;
- :mod:`fastmeta.l2l.data`: MetaDataset, TaskDataset and the task transforms;
- :mod:`fastmeta.l2l.nn`, :mod:`fastmeta.l2l.optim`, :mod:`fastmeta.l2l.utils`;
- :mod:`fastmeta.l2l.vision`: ``benchmarks.get_tasksets``, ``models``, ``datasets``,
  ``transforms``; nothing is downloaded;
- ``fastmeta.l2l.gym`` needs gym and raises ImportError naming it.

This layer sits between the tools and the learners: it uses only fastmeta's public API
(learners, ``fm.trace``, ``fastmeta.data``, ``fastmeta.models``).
"""

from fastmeta.l2l import algorithms, data, nn, optim, text, utils, vision
from fastmeta.l2l.algorithms import GBML, MAML, MetaSGD
from fastmeta.l2l.utils import (
    accuracy,
    clone_distribution,
    clone_module,
    clone_named_parameters,
    clone_parameters,
    detach_distribution,
    detach_module,
    flatten_config,
    magic_box,
    maml_update,
    update_module,
)

__all__ = [
    "GBML", "MAML", "MetaSGD", "accuracy", "algorithms", "clone_distribution", "clone_module",
    "clone_named_parameters", "clone_parameters", "data", "detach_distribution", "detach_module",
    "flatten_config", "magic_box", "maml_update", "nn", "optim", "text", "update_module", "utils", "vision",
]


def __getattr__(name: str):
    if name == "gym":  # ``l2l.gym`` without importing it: its import needs gym
        import importlib

        return importlib.import_module("fastmeta.l2l.gym")
    raise AttributeError(f"module 'fastmeta.l2l' has no attribute {name!r}")
