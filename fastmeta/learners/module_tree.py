"""Copies of a model whose parameter slots hold other tensors: what ``clone()`` hands out.

A :class:`ModuleTree` records a model's structure once: its modules (each once, shared
submodules included, in ``named_modules()`` order) and where each parameter sits (a tied
weight has several slots). :meth:`ModuleTree.copy` then builds a new tree of the same
classes whose parameter slots hold the tensors given, without running any ``__init__``:
each module is a shallow copy with its own ``_parameters``, ``_buffers``, ``_modules`` and
hook dicts and the same buffer tensors. Every attribute and method of the user's model
works on the copy, and its own ``forward`` runs with the new tensors.

Running the user's module directly is the cheapest way to run one task: a copy costs
a quarter of what ``torch.func.functional_call`` spends swapping the parameters in and
out on every call (docs/benchmarks.md, "Measurements behind code decisions"), and a
clone computes what that loop computes, with the same kernels. bench/bench_l2l.py has the
end-to-end comparison.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# The per-instance containers nn.Module.__init__ creates (parameters, buffers, children,
# hooks): a copy gets its own, so that registering a hook or a buffer on a clone leaves
# the model alone.
_MODULE_CONTAINERS = tuple(k for k, v in nn.Module().__dict__.items() if isinstance(v, (dict, set)))
# The BatchNorm forwards that transductive_batch_norm stands in for: torch's own. A
# subclass with its own forward keeps it.
STANDARD_BATCH_NORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def transductive_batch_norm(module: _BatchNorm, input: Tensor) -> Tensor:
    """A BatchNorm layer's forward with batch statistics, in training and evaluation mode
    alike, that never reads or writes its running statistics (MAML's transductive
    setting): ``F.batch_norm`` without them, PyTorch's kernels and numbers."""
    module._check_input_dim(input)
    return F.batch_norm(input, None, None, module.weight, module.bias, True, 0.0, module.eps)


class ModuleTree:
    """The module structure of ``root`` and the slots of its parameters.

    ``names[k]`` and ``slots[k]`` (a list of ``(module index, key)``) describe the k-th
    parameter of ``root.named_parameters()``; module 0 is ``root``.
    """

    def __init__(self, root: nn.Module):
        if not isinstance(root, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(root).__name__}")
        modules: list[nn.Module] = []
        prefixes: list[str] = []
        index: dict[int, int] = {}

        def visit(m: nn.Module, prefix: str) -> None:
            index[id(m)] = len(modules)
            modules.append(m)
            prefixes.append(prefix)
            for key, child in m._modules.items():
                if child is not None and id(child) not in index:
                    visit(child, f"{prefix}.{key}" if prefix else key)

        visit(root, "")
        self.modules = modules
        self.children = [
            [(key, None if c is None else index[id(c)]) for key, c in m._modules.items()] for m in modules
        ]
        self._recorded = [(dict(m._modules), dict(m._parameters)) for m in modules]
        slots: list[list[tuple[int, str]]] = []
        names: list[str] = []
        tensors: list[Tensor] = []
        where: dict[int, int] = {}
        for i, (m, prefix) in enumerate(zip(modules, prefixes)):
            for key, p in m._parameters.items():
                if p is None:
                    continue
                k = where.get(id(p))
                if k is None:
                    where[id(p)] = k = len(slots)
                    slots.append([])
                    names.append(f"{prefix}.{key}" if prefix else key)
                    tensors.append(p)
                slots[k].append((i, key))
        self.slots = slots
        self.names = names
        self.batch_norms = [
            i for i, m in enumerate(modules)
            if isinstance(m, _BatchNorm) and type(m).forward in STANDARD_BATCH_NORM_FORWARDS
        ]

    def describes(self, root: nn.Module) -> bool:
        """Whether ``root`` still has the recorded structure and parameter tensors
        (a replaced submodule or parameter means a new tree)."""
        if root is not self.modules[0]:
            return False
        for m, (children, params) in zip(self.modules, self._recorded):
            if not (_same_items(m._modules, children) and _same_items(m._parameters, params)):
                return False
        return True

    def read(self, modules: Sequence[nn.Module]) -> list[Tensor]:
        """The tensors in the parameter slots of ``modules`` (this tree's layout)."""
        return [modules[s[0][0]]._parameters[s[0][1]] for s in self.slots]

    def write(self, modules: Sequence[nn.Module], tensors: Sequence[Tensor | None]) -> None:
        """Put ``tensors[k]`` into every slot of parameter k (None: leave it)."""
        for places, t in zip(self.slots, tensors):
            if t is not None:
                for i, key in places:
                    modules[i]._parameters[key] = t

    def copy(self, sources: Sequence[nn.Module], tensors: Sequence[Tensor], transductive: bool) -> list[nn.Module]:
        """A new tree shaped like ``sources`` (the originals or an earlier copy) holding
        ``tensors``. transductive: its BatchNorm layers run :func:`transductive_batch_norm`;
        otherwise their own forward, PyTorch's behaviour, on the running-statistic tensors
        they share with ``sources``."""
        copies = []
        for m in sources:
            state = m.__dict__.copy()
            for key in _MODULE_CONTAINERS:
                value = state.get(key)
                if value is not None:
                    state[key] = value.copy()
            c = object.__new__(type(m))
            object.__setattr__(c, "__dict__", state)
            copies.append(c)
        for c, children in zip(copies, self.children):
            mods = c._modules
            for key, j in children:
                mods[key] = None if j is None else copies[j]
        self.write(copies, tensors)
        for i in self.batch_norms:
            state = copies[i].__dict__
            if transductive:
                state["forward"] = functools.partial(transductive_batch_norm, copies[i])
            else:  # copied from a transductive tree (a learner's mode changed): PyTorch's again
                state.pop("forward", None)
        return copies


def _same_items(current: dict, recorded: dict) -> bool:
    if len(current) != len(recorded):
        return False
    for key, value in recorded.items():
        if current.get(key, _MISSING) is not value:
            return False
    return True


_MISSING = object()
