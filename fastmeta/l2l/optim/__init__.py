"""learn2learn's ``learn2learn.optim``: differentiable, learnable update rules, written
from its documentation.

- :class:`ParameterUpdate`: one transform per parameter; maps a loss to transformed
  gradients ("updates");
- :class:`DifferentiableSGD`: ``p ← p − lr·update`` through ``update_module``, so the
  step stays in the graph;
- :class:`LearnableOptimizer`: an optimizer whose gradient transform is learned
  (hypergradient descent);
- :mod:`transforms`: :class:`ModuleTransform`, :class:`ReshapedTransform`,
  :class:`KroneckerTransform`, :class:`MetaCurvatureTransform`.
"""

from . import transforms
from .learnable_optimizer import LearnableOptimizer
from .parameter_update import ParameterUpdate
from .update_rules import DifferentiableSGD

__all__ = ["DifferentiableSGD", "LearnableOptimizer", "ParameterUpdate", "transforms"]
