"""The learners: MAML, ModelAwareMAML and MetaSGD, and learn2learn's clone/adapt API.

- :mod:`fastmeta.learners.base`: what they share (``meta_batch``, ``fast_weights``,
  ``predict``, ``capture``, ``clone``);
- :mod:`fastmeta.learners.maml`: MAML, first and second order;
- :mod:`fastmeta.learners.model_aware`: ModelAwareMAML and MetaSGD;
- :mod:`fastmeta.learners.l2l`: the per-task adapter ``clone()`` returns.
"""

from fastmeta.engine import MetaBatchOutput
from fastmeta.learners.base import MetaLearner
from fastmeta.learners.l2l import AdaptedModel
from fastmeta.learners.maml import MAML
from fastmeta.learners.model_aware import LR_MODES, MetaSGD, ModelAwareMAML

__all__ = ["LR_MODES", "MAML", "AdaptedModel", "MetaBatchOutput", "MetaLearner", "MetaSGD", "ModelAwareMAML"]
