"""``DifferentiableSGD``: a gradient step that stays in the autograd graph."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from fastmeta.l2l.utils import update_module


class DifferentiableSGD(nn.Module):
    """``DifferentiableSGD(lr)``; calling it with ``(module, gradients=None)`` replaces
    each parameter p by ``p − lr·g`` (gradients: one per ``module.parameters()``, None to
    skip one; without them, each parameter's ``.grad``), through :func:`update_module`."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def forward(self, module: nn.Module, gradients: Sequence[Tensor | None] | None = None) -> nn.Module:
        params = list(module.parameters())
        if gradients is None:
            gradients = [p.grad for p in params]
        gradients = list(gradients)
        if len(gradients) != len(params):
            raise ValueError(f"gradients holds {len(gradients)} tensors but the module has {len(params)} parameters")
        updates = [None if g is None else -self.lr * g for g in gradients]
        return update_module(module, updates=updates)
