"""fastmeta: a meta-learning engine for PyTorch whose hot path runs in fused kernels.

>>> import fastmeta as fm
>>> learner = fm.MAML(fm.models.mlp(), lr=0.01)
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)   # doctest: +SKIP
>>> out.loss.backward()                                                 # doctest: +SKIP

Layers, top to bottom (each imports only those below it; tests/test_layers.py checks):
``fastmeta.tools`` (CLI, training, bench) → ``fastmeta.l2l`` (learn2learn's API) → ``fastmeta.learners`` → ``fastmeta.engine`` →
``fastmeta.ops`` → ``fastmeta.backends`` → ``fastmeta.kernels`` and the C++/CUDA sources.
"""

from fastmeta import models, ops
from fastmeta.backends import backends, current_backend, use_backend
from fastmeta.backends.precision import matmul_precision, set_matmul_precision
from fastmeta.engine import Layout, TaskWeights, trace
from fastmeta.learners import MAML, MetaBatchOutput, MetaSGD, ModelAwareMAML
from fastmeta import l2l  # learn2learn's API (``import fastmeta.l2l as l2l``), above the learners

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "Layout",
    "MetaBatchOutput",
    "MetaSGD",
    "ModelAwareMAML",
    "TaskWeights",
    "backends",
    "current_backend",
    "l2l",
    "matmul_precision",
    "models",
    "ops",
    "set_matmul_precision",
    "trace",
    "use_backend",
]


def __getattr__(name: str):
    if name == "capture":  # its old name: "capture" now means only learner.capture (CUDA graphs)
        import warnings

        warnings.warn("fm.capture is now fm.trace (fm.capture will be removed)", DeprecationWarning, stacklevel=2)
        return trace
    raise AttributeError(f"module 'fastmeta' has no attribute {name!r}")
