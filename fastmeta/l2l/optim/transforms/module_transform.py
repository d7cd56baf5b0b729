"""ModuleTransform and ReshapedTransform."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn


class ReshapedTransform(nn.Module):
    """Runs ``transform`` on the gradient viewed as ``shape``, and views the result back
    to the gradient's shape."""

    def __init__(self, transform: nn.Module, shape):
        super().__init__()
        self.transform = transform
        self.in_shape = tuple(shape)

    def forward(self, grad: Tensor) -> Tensor:
        return self.transform(grad.reshape(self.in_shape)).reshape(grad.shape)


class ModuleTransform:
    """``ModuleTransform(module_cls)``; ``transform(param)`` is ``module_cls(n, n)`` (n =
    ``param.numel()``) applied to the gradient flattened to ``(1, n)``."""

    def __init__(self, module_cls: Callable):
        if not callable(module_cls):
            raise TypeError(f"module_cls must be callable, got {type(module_cls).__name__}")
        self.module_cls = module_cls

    def __call__(self, parameter: Tensor) -> ReshapedTransform:
        n = parameter.numel()
        return ReshapedTransform(self.module_cls(n, n), (1, n))
