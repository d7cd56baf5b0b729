"""Gradient transforms of ``learn2learn.optim.transforms``: each is called on a parameter
and returns the module that maps that parameter's gradient to its update.

- :class:`ModuleTransform` (``module_cls``): a ``module_cls(numel, numel)`` on the
  flattened gradient (``torch.nn.Linear``: a learned full matrix);
- :class:`ReshapedTransform`: reshapes the gradient for a transform and back;
- :class:`KroneckerTransform` (``kronecker_cls``): a Kronecker-factored transform
  (``fastmeta.l2l.nn.KroneckerLinear``), Arnold et al. 2019;
- :class:`MetaCurvatureTransform`: Meta-Curvature (Park & Oliva 2019).
"""

from .kronecker_transform import KroneckerTransform
from .metacurvature_transform import MetaCurvatureTransform
from .module_transform import ModuleTransform, ReshapedTransform

__all__ = ["KroneckerTransform", "MetaCurvatureTransform", "ModuleTransform", "ReshapedTransform"]
