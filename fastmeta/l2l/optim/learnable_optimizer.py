"""``LearnableOptimizer``: an optimizer whose gradient transform is meta-learned."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .parameter_update import ParameterUpdate


class LearnableOptimizer(nn.Module):
    """``LearnableOptimizer(model, transform, lr=1.0)``: steps ``model`` with
    ``p ← p − lr·T_p(p.grad)``, where ``T_p = transform(p)`` has learnable parameters
    (``metaopt.parameters()``).

    ``step()`` replaces each parameter by ``p.detach() − lr·T_p(grad)``: a tensor of the
    graph of the transforms (one step deep), which keeps its ``.grad``. The next loss's
    ``backward()`` then gives the transforms their hypergradient and the model its
    gradient; train the transforms with an ordinary optimizer over ``metaopt.parameters()``.

    >>> metaopt = LearnableOptimizer(model, ModuleTransform(torch.nn.Linear), lr=0.1)  # doctest: +SKIP
    >>> opt = torch.optim.SGD(metaopt.parameters(), lr=1e-3)                           # doctest: +SKIP
    >>> metaopt.zero_grad(); opt.zero_grad()                                           # doctest: +SKIP
    >>> loss(model(X), y).backward(); opt.step(); metaopt.step()                       # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, transform: Callable, lr: float = 1.0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.__dict__["model"] = model  # not a submodule: parameters() are the transforms'
        self.lr = float(lr)
        self.info = ParameterUpdate(model.parameters(), transform)

    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        updates = []
        for p, index in zip(self.model.parameters(), self.info.transforms_indices):
            if p.grad is None:
                updates.append(None)
                continue
            grad = p.grad.detach()
            direction = grad if index is None else self.info.transforms_modules[index](grad)
            updates.append(direction)
        index_of = {id(p): k for k, p in enumerate(self.model.parameters())}
        memo = {}
        for m in self.model.modules():
            for key, p in list(m._parameters.items()):
                if p is None:
                    continue
                new = memo.get(id(p))
                if new is None:
                    u = updates[index_of[id(p)]]
                    if u is None:
                        continue
                    new = p.detach() - self.lr * u
                    new.retain_grad()
                    memo[id(p)] = new
                m._parameters[key] = new
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the transforms and of the model's parameters."""
        super().zero_grad(set_to_none)
        for p in self.model.parameters():
            p.grad = None
