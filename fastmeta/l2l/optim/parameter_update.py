"""``ParameterUpdate``: a transform per parameter, applied to that parameter's gradient."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn


class ParameterUpdate(nn.Module):
    """``ParameterUpdate(parameters, transform)``: ``transform(p)`` for each parameter makes
    its gradient transform (an ``nn.Module``, or None for the identity).

    ``forward(loss, parameters, create_graph=False, retain_graph=False, allow_unused=False,
    allow_nograd=False)`` returns one update per parameter: the transformed gradient of
    ``loss``, or None where there is no gradient (unused with ``allow_unused``, or frozen
    with ``allow_nograd``). The transforms' parameters are this module's parameters.
    """

    def __init__(self, parameters: Iterable[Tensor], transform: Callable):
        super().__init__()
        if not callable(transform):
            raise TypeError(f"transform must be callable (parameter -> Module or None), got {type(transform).__name__}")
        modules, indices = [], []
        for p in parameters:
            t = transform(p)
            if t is None:
                indices.append(None)
            elif isinstance(t, nn.Module):
                indices.append(len(modules))
                modules.append(t)
            else:
                raise ValueError(f"transform must return a Module or None, got {type(t).__name__}")
        self.transforms_modules = nn.ModuleList(modules)
        self.transforms_indices = indices

    def forward(self, loss: Tensor, parameters: Iterable[Tensor], create_graph: bool = False,
                retain_graph: bool = False, allow_unused: bool = False, allow_nograd: bool = False) -> list:
        parameters = list(parameters)
        if len(parameters) != len(self.transforms_indices):
            raise ValueError(
                f"ParameterUpdate holds {len(self.transforms_indices)} transforms but got {len(parameters)} parameters"
            )
        frozen = [i for i, p in enumerate(parameters) if not p.requires_grad]
        if frozen and not allow_nograd:
            raise ValueError(f"parameters {frozen} have requires_grad=False; pass allow_nograd=True to leave them")
        differentiable = [p for p in parameters if p.requires_grad]
        grads = torch.autograd.grad(loss, differentiable, create_graph=create_graph,
                                    retain_graph=retain_graph or create_graph, allow_unused=True)
        unused = [i for i, g in enumerate(grads) if g is None]
        if unused and not allow_unused:
            raise ValueError(f"the loss does not depend on parameters {unused}; pass allow_unused=True")
        it = iter(grads)
        updates = []
        for p, index in zip(parameters, self.transforms_indices):
            g = next(it) if p.requires_grad else None
            if g is None or index is None:
                updates.append(g)
            else:
                updates.append(self.transforms_modules[index](g))
        return updates
