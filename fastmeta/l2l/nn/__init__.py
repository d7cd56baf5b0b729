"""learn2learn's ``learn2learn.nn``: modules used in meta-learning, written from its
documentation.

- :class:`Lambda`, :class:`Flatten`, :class:`Scale`, :func:`freeze`, :func:`unfreeze`;
- :class:`KroneckerLinear`, :class:`KroneckerRNN`, :class:`KroneckerLSTM`: layers whose
  matrices are Kronecker products (Arnold et al. 2019);
- :class:`MetaModule` (``fastmeta.l2l.nn.metalayers``): substitutes submodules by type;
- :class:`PrototypicalClassifier`: nearest-prototype logits (Snell et al. 2017).

Every module here is a plain ``nn.Module`` that ``fm.trace`` traces (matrix products and
elementwise ops run batched over tasks; tests/l2l checks that no fallback warning fires).

``SVClassifier`` (MetaOptNet's SVM head) needs qpth, which fastmeta does not depend on:
reading it raises ImportError naming qpth.
"""

from .kroneckers import KroneckerLinear, KroneckerLSTM, KroneckerRNN
from .metalayers import MetaModule
from .misc import Flatten, Lambda, Scale, freeze, unfreeze
from .protonet import PrototypicalClassifier

__all__ = [
    "Flatten", "KroneckerLSTM", "KroneckerLinear", "KroneckerRNN", "Lambda", "MetaModule",
    "PrototypicalClassifier", "Scale", "freeze", "unfreeze",
]

# Names whose learn2learn implementation needs a library fastmeta does not depend on.
NEEDS_LIBRARY = {"SVClassifier": "qpth (pip install qpth), MetaOptNet's QP solver"}


def __getattr__(name: str):
    if name in NEEDS_LIBRARY:
        raise ImportError(f"fastmeta.l2l.nn.{name} needs {NEEDS_LIBRARY[name]}, which fastmeta does not depend on")
    raise AttributeError(f"module 'fastmeta.l2l.nn' has no attribute {name!r}")
