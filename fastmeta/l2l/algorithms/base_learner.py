"""``learn2learn.algorithms.base_learner.BaseLearner``: the base of a custom learner."""

from __future__ import annotations

from torch import nn


class BaseLearner(nn.Module):
    """Wraps ``module``: calling the learner runs it, and attributes the learner lacks are
    the module's. Subclasses define ``adapt(loss)`` and ``clone()``."""

    def __init__(self, module: nn.Module | None = None):
        super().__init__()
        self.module = module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:
                raise
            return getattr(module, name)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def adapt(self, loss, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define adapt(loss)")

    def clone(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define clone()")
