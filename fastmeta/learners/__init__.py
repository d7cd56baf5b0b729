"""The learners: MAML, ModelAwareMAML and MetaSGD, and learn2learn's clone/adapt API.

- :mod:`fastmeta.learners.base`: what they share (``meta_batch``, ``fast_weights``,
  ``predict``, ``capture``, ``clone``);
- :mod:`fastmeta.learners.maml`: MAML, first and second order;
- :mod:`fastmeta.learners.model_aware`: ModelAwareMAML and MetaSGD;
- :mod:`fastmeta.learners.adapted`: the per-task copy ``clone()`` returns and ``adapt()``;
- :mod:`fastmeta.learners.module_tree`: how a clone copies the model (``ModuleTree``,
  which ``fastmeta.l2l.clone_module`` uses too).

learn2learn's names live one layer up, in :mod:`fastmeta.l2l`.
"""

from fastmeta.engine import MetaBatchOutput
from fastmeta.learners.base import MetaLearner
from fastmeta.learners.adapted import AdaptedModel
from fastmeta.learners.base import BATCH_NORM_MODES
from fastmeta.learners.maml import MAML
from fastmeta.learners.model_aware import LR_MODES, MetaSGD, ModelAwareMAML
from fastmeta.learners.module_tree import ModuleTree

__all__ = [
    "BATCH_NORM_MODES", "LR_MODES", "MAML", "AdaptedModel", "MetaBatchOutput", "MetaLearner", "MetaSGD",
    "ModelAwareMAML", "ModuleTree",
]
