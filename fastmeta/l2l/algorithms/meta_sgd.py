"""``learn2learn.algorithms.meta_sgd``: ``MetaSGD`` (fastmeta's) and ``meta_sgd_update``."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from fastmeta.l2l.utils import update_module
from fastmeta.learners import MetaSGD

__all__ = ["MetaSGD", "meta_sgd_update"]


def meta_sgd_update(model: nn.Module, lrs: Sequence[Tensor] | None = None,
                    grads: Sequence[Tensor | None] | None = None) -> nn.Module:
    """Meta-SGD's step in place: each parameter ``p`` with a gradient ``g`` becomes
    ``p − lr_p ⊙ g`` (one rate tensor per ``model.parameters()``); returns ``model``.
    Without ``lrs`` and ``grads``, the ``p.update`` attributes already set are applied."""
    if (lrs is None) != (grads is None):
        raise ValueError("meta_sgd_update: pass both lrs and grads, or neither")
    if grads is not None:
        params = list(model.parameters())
        lrs, grads = list(lrs), list(grads)
        if not len(params) == len(lrs) == len(grads):
            raise ValueError(
                f"meta_sgd_update: the model has {len(params)} parameters but lrs holds {len(lrs)} "
                f"and grads {len(grads)}"
            )
        for p, lr, g in zip(params, lrs, grads):
            if g is not None:
                p.update = -lr * g
    return update_module(model)
