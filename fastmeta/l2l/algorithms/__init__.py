"""learn2learn's ``learn2learn.algorithms``: MAML, MetaSGD, GBML, and their module paths.

- ``MAML`` and ``MetaSGD`` are :class:`fastmeta.MAML` and :class:`fastmeta.MetaSGD`
  (learn2learn's positional arguments; ``meta_batch`` too);
- ``maml_update`` (``algorithms.maml``), ``meta_sgd_update`` (``algorithms.meta_sgd``),
  ``BaseLearner`` (``algorithms.base_learner``);
- :class:`GBML` (``algorithms.gbml``): gradient-based meta-learning with a gradient
  transform. With no transform (identity) it is fastmeta's MAML, with per-parameter
  ``Scale`` transforms at ``lr=1`` fastmeta's MetaSGD; other transforms (Meta-Curvature,
  Kronecker, module transforms) run task by task through ``clone()``/``adapt()``.

The ``Lightning*`` modules subclass PyTorch Lightning's, which fastmeta does not depend
on: reading them raises ImportError naming it.
"""

from .base_learner import BaseLearner
from .gbml import GBML
from .maml import MAML, maml_update
from .meta_sgd import MetaSGD, meta_sgd_update

__all__ = ["BaseLearner", "GBML", "MAML", "MetaSGD", "maml_update", "meta_sgd_update"]

NEEDS_LIGHTNING = (
    "LightningEpisodicModule", "LightningMAML", "LightningANIL", "LightningPrototypicalNetworks",
    "LightningMetaOptNet",
)


def __getattr__(name: str):
    if name in NEEDS_LIGHTNING or name == "lightning":
        raise ImportError(
            f"fastmeta.l2l.algorithms.{name} needs PyTorch Lightning (pip install pytorch-lightning), "
            "which fastmeta does not depend on"
        )
    raise AttributeError(f"module 'fastmeta.l2l.algorithms' has no attribute {name!r}")
