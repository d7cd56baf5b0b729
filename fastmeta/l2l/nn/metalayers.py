"""``learn2learn.nn.metalayers``: :class:`MetaModule`, which rebuilds a model with some of
its submodules substituted by type (an adapter after every Linear, GELU for ReLU, ...)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .misc import freeze


class MetaModule(nn.Module):
    """``MetaModule(module, substitutions, freeze_module=True)``.

    Walks ``module``'s submodules; each whose type is a key of ``substitutions`` is replaced
    by ``substitutions[type](submodule)`` (which may keep the original inside it), the
    others are searched recursively. freeze_module: first freeze the original module's
    parameters (``requires_grad=False``), so that only what the substitutions add is
    trained. ``forward`` runs the wrapped module; ``unwrap()`` returns it.

    ``forward(*args, **kwargs)`` takes any arguments, which torch.fx cannot trace at the
    root of a model: a learner built on the MetaModule itself runs ``meta_batch`` through
    the per-task loop, after its warning. Build it on ``meta_module.unwrap()`` (the same
    module and parameters, an ordinary tree) and ``fm.trace`` runs it batched.
    """

    def __init__(self, module: nn.Module, substitutions: dict | None = None, freeze_module: bool = True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        substitutions = {} if substitutions is None else dict(substitutions)
        for key, fn in substitutions.items():
            if not isinstance(key, type) or not callable(fn):
                raise TypeError("substitutions must map module types to callables (module -> new module)")
        if freeze_module:
            freeze(module)
        self.substitutions = substitutions
        self.wrapped_module = self._substitute(module)

    def _substitute(self, module: nn.Module) -> nn.Module:
        make: Callable | None = self.substitutions.get(type(module))
        if make is not None:
            new = make(module)
            if not isinstance(new, nn.Module):
                raise TypeError(f"the substitution for {type(module).__name__} returned {type(new).__name__}, not a Module")
            return new
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = self._substitute(child)
        return module

    def forward(self, *args, **kwargs):
        return self.wrapped_module(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """The wrapped module (with the substitutions in place)."""
        return self.wrapped_module
