"""fastmeta: a meta-learning engine for PyTorch whose hot path runs in fused kernels.

>>> import fastmeta as fm
>>> learner = fm.MAML(fm.models.mlp(), lr=0.01)
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)
>>> out.loss.backward()
"""

from fastmeta import models, ops
from fastmeta.backends import backends, current_backend, use_backend
from fastmeta.engine import Layout, TaskWeights, capture
from fastmeta.learners import MAML, MetaBatchOutput, MetaSGD, ModelAwareMAML

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "Layout",
    "MetaBatchOutput",
    "MetaSGD",
    "ModelAwareMAML",
    "TaskWeights",
    "backends",
    "capture",
    "current_backend",
    "models",
    "ops",
    "use_backend",
]
