"""``learn2learn.algorithms.maml``: ``MAML`` (fastmeta's) and ``maml_update``."""

from fastmeta.l2l.utils import maml_update
from fastmeta.learners import MAML

__all__ = ["MAML", "maml_update"]
