"""learn2learn's names, for code that switches by changing its import (``fastmeta.l2l``).

>>> import fastmeta.l2l as l2l                            # was: import learn2learn as l2l
>>> maml = l2l.algorithms.MAML(model, lr=0.4)            # doctest: +SKIP
>>> clone = maml.clone()                                 # doctest: +SKIP
>>> clone.adapt(loss_fn(clone(sx), sy))                  # doctest: +SKIP
>>> fast = l2l.clone_module(model)                       # doctest: +SKIP
>>> l2l.update_module(fast, updates=[-0.1 * g for g in grads])   # doctest: +SKIP

- ``algorithms.MAML`` and ``algorithms.MetaSGD`` are :class:`fastmeta.MAML` and
  :class:`fastmeta.MetaSGD` (learn2learn's positional arguments; ``meta_batch`` too).
- ``utils`` (and this module) hold learn2learn's utilities: :func:`clone_module`,
  :func:`update_module`, :func:`detach_module`, :func:`maml_update`,
  :func:`clone_parameters`, with learn2learn's behaviour, including the ``p.update``
  protocol of ``update_module``.

Written from learn2learn's documented API; learn2learn itself is not a dependency.
"""

from __future__ import annotations

import sys
import types
from typing import Iterable, Sequence

from torch import Tensor, nn

from fastmeta.learners.adapted import AdaptedModel
from fastmeta.learners.maml import MAML
from fastmeta.learners.model_aware import MetaSGD
from fastmeta.learners.module_tree import ModuleTree


def clone_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of ``module`` whose parameters are ``clone()``s of its own: differentiable
    back to them, so a loss on the copy gives the original parameters their gradient.

    Submodules are copied (shared and tied ones once); buffers are shared with
    ``module``, except those that require grad, which are cloned. memo: {id(tensor):
    its clone}, shared between calls to clone several modules with common tensors.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    memo = {} if memo is None else memo
    tree = ModuleTree(module)
    copies = tree.copy(tree.modules, [_cloned(p, memo) for p in tree.read(tree.modules)], transductive=False)
    for c in copies:
        buffers = c._buffers
        for key, b in buffers.items():
            if b is not None and b.requires_grad:
                buffers[key] = _cloned(b, memo)
    return copies[0]


def _cloned(t: Tensor, memo: dict) -> Tensor:
    c = memo.get(id(t))
    if c is None:
        c = memo[id(t)] = t.clone()
    return c


def clone_parameters(param_list: Iterable[Tensor]) -> list[Tensor]:
    """``[p.clone() for p in param_list]``: differentiable copies (MetaSGD's rates)."""
    return [p.clone() for p in param_list]


def update_module(module: nn.Module, updates: Sequence[Tensor | None] | None = None, memo: dict | None = None) -> nn.Module:
    """Replace each parameter (and buffer) ``p`` that carries an update by ``p + p.update``,
    in place, and return ``module``.

    updates: one tensor (or None: no update) per ``module.parameters()``; without it, the
    updates already set as ``p.update`` attributes are applied (learn2learn's protocol).
    Tied parameters are updated once. memo: {id(old tensor): new tensor}, shared between
    calls.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if updates is not None:
        params = list(module.parameters())
        updates = list(updates)
        if len(updates) != len(params):
            raise ValueError(
                f"updates holds {len(updates)} tensors but the module has {len(params)} parameters"
            )
        for p, u in zip(params, updates):
            p.update = u
    memo = {} if memo is None else memo
    for m in module.modules():
        for slots in (m._parameters, m._buffers):
            for key, t in slots.items():
                if t is None:
                    continue
                new = memo.get(id(t))
                if new is None:
                    update = getattr(t, "update", None)
                    if update is None:
                        continue
                    new = memo[id(t)] = t + update
                    t.update = None
                slots[key] = new
    return module


def maml_update(model: nn.Module, lr: float, grads: Sequence[Tensor | None] | None = None) -> nn.Module:
    """MAML's step in place: each parameter ``p`` with a gradient ``g`` becomes
    ``p − lr·g`` (via ``p.update = −lr·g`` and :func:`update_module`); returns ``model``.

    grads: one tensor (or None) per ``model.parameters()``; without it, the ``p.update``
    attributes already set are applied.
    """
    if grads is not None:
        params = list(model.parameters())
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"grads holds {len(grads)} tensors but the model has {len(params)} parameters")
        for p, g in zip(params, grads):
            if g is not None:
                p.update = -lr * g
    return update_module(model)


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Detach every parameter, and every buffer that requires grad, from the graph, in
    place (learn2learn's ``detach_()``); keep_requires_grad: those that required grad
    become leaves that still do. A tensor that is a view (which cannot be detached in
    place) is replaced in its slot by a detached one."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    done: dict[int, Tensor] = {}
    for m in module.modules():
        for slots, only_if_grad in ((m._parameters, False), (m._buffers, True)):
            for key, t in slots.items():
                if t is None or (only_if_grad and not t.requires_grad):
                    continue
                new = done.get(id(t))
                if new is None:
                    requires_grad = t.requires_grad
                    new = t.detach() if t._base is not None else t.detach_()
                    if keep_requires_grad and requires_grad:
                        new.requires_grad_()
                    done[id(t)] = new
                slots[key] = new


utils = types.ModuleType(
    f"{__name__}.utils", "learn2learn's utilities (``l2l.utils.clone_module`` ...)."
)
algorithms = types.ModuleType(
    f"{__name__}.algorithms", "learn2learn's algorithms: MAML, MetaSGD (``l2l.algorithms.MAML`` ...)."
)
for _name in ("clone_module", "clone_parameters", "update_module", "maml_update", "detach_module"):
    setattr(utils, _name, globals()[_name])
algorithms.MAML = MAML
algorithms.MetaSGD = MetaSGD
# ``from fastmeta.learners.l2l.algorithms import MAML`` works as learn2learn's does.
sys.modules[utils.__name__] = utils
sys.modules[algorithms.__name__] = algorithms

__all__ = [
    "MAML", "AdaptedModel", "MetaSGD", "algorithms", "clone_module", "clone_parameters", "detach_module",
    "maml_update", "update_module", "utils",
]
