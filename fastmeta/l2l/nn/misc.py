"""Small modules and helpers of ``learn2learn.nn``: Lambda, Flatten, Scale, freeze, unfreeze."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class Lambda(nn.Module):
    """A module that calls ``lmb(*args, **kwargs)`` in its forward:
    ``Lambda(lambda x: x.mean(dim=[2, 3]))``."""

    def __init__(self, lmb: Callable):
        super().__init__()
        if not callable(lmb):
            raise TypeError(f"lmb must be callable, got {type(lmb).__name__}")
        self.lmb = lmb

    def forward(self, *args, **kwargs):
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """``x.view(x.size(0), -1)``: flattens every dim after the batch dim."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


class Scale(nn.Module):
    """``x * alpha`` with a learned ``alpha`` of ``shape`` (an int, a tuple, or None for
    ``(1,)``), initialised to ``alpha``."""

    def __init__(self, shape=None, alpha: float = 1.0):
        super().__init__()
        if shape is None:
            shape = (1,)
        elif isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(s) for s in shape)
        self.alpha = nn.Parameter(torch.full(shape, float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha


def freeze(module: nn.Module) -> nn.Module:
    """Detach every parameter of ``module`` and set ``requires_grad=False``, in place;
    returns ``module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for p in module.parameters():
        p.detach_()
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=True`` on every parameter of ``module``; returns ``module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for p in module.parameters():
        p.requires_grad_(True)
    return module
