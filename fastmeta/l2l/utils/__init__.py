"""learn2learn's ``learn2learn.utils``: cloning, updating and detaching modules, and small
helpers, written from learn2learn's documentation (learn2learn is not a dependency).

>>> import fastmeta.l2l as l2l
>>> fast = l2l.clone_module(model)                                  # doctest: +SKIP
>>> l2l.update_module(fast, updates=[-0.1 * g for g in grads])      # doctest: +SKIP

- :func:`clone_module`, :func:`update_module`, :func:`detach_module`, :func:`clone_parameters`,
  :func:`clone_named_parameters`: learn2learn's behaviour, including the ``p.update``
  protocol of ``update_module``.
- :func:`magic_box` (DiCE), :func:`accuracy`, :func:`clone_distribution`,
  :func:`detach_distribution`, :func:`flatten_config`.
- ``fastmeta.l2l.utils.lightning`` needs PyTorch Lightning and raises ImportError naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from fastmeta.learners import ModuleTree


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




def clone_named_parameters(param_dict: dict) -> dict:
    """``{name: p.clone()}`` for a dict (or ``nn.ParameterDict``) of parameters:
    differentiable copies, in a plain dict."""
    if not hasattr(param_dict, "items"):
        raise TypeError(f"param_dict must be a dict (or ParameterDict) of tensors, got {type(param_dict).__name__}")
    return {k: v.clone() for k, v in param_dict.items()}


def magic_box(x):
    """DiCE's MagicBox (Foerster et al. 2018): ``exp(x − x.detach())``, which evaluates to 1
    and whose gradient is ``x``'s, times itself. Anything that is not a tensor is returned as is."""
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x


def accuracy(predictions: Tensor, targets: Tensor) -> Tensor:
    """The fraction of rows of ``predictions`` ``[N, K]`` whose argmax equals ``targets`` ``[N]``,
    as a float tensor."""
    if predictions.dim() < 1 or predictions.size(0) != targets.numel():
        raise ValueError(
            f"accuracy: predictions {list(predictions.shape)} need one row per target; targets has {targets.numel()}"
        )
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def _copy_distribution(dist, how):
    if not isinstance(dist, torch.distributions.Distribution):
        raise TypeError(f"dist must be a torch.distributions.Distribution, got {type(dist).__name__}")
    memo: dict[int, Tensor] = {}
    copy = dist.__class__.__new__(dist.__class__)
    state = dist.__dict__.copy()
    for key, value in state.items():
        if isinstance(value, Tensor):
            new = memo.get(id(value))
            if new is None:
                new = memo[id(value)] = how(value)
            state[key] = new
        elif isinstance(value, torch.distributions.Distribution):
            state[key] = _copy_distribution(value, how)
    copy.__dict__.update(state)
    return copy


def clone_distribution(dist):
    """A copy of a ``torch.distributions`` object whose tensors (parameters and cached
    properties) are ``clone()``s: differentiable back to the original's."""
    return _copy_distribution(dist, lambda t: t.clone())


def detach_distribution(dist):
    """A copy of a ``torch.distributions`` object whose tensors are detached from the graph."""
    return _copy_distribution(dist, lambda t: t.detach())


def flatten_config(args, prefix: str | None = None) -> dict:
    """A flat ``{"a.b.c": value}`` dict of a nested configuration (dicts, argparse
    Namespaces and dataclasses, nested in any way), for loggers that take flat keys."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif dataclasses.is_dataclass(args) and not isinstance(args, type):
        args = dataclasses.asdict(args)
    if not isinstance(args, dict):
        raise TypeError(f"flatten_config takes a dict, Namespace or dataclass, got {type(args).__name__}")
    flat = {}
    for key, value in args.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, argparse.Namespace)) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            flat.update(flatten_config(value, name))
        else:
            flat[name] = value
    return flat


__all__ = [
    "accuracy", "clone_distribution", "clone_module", "clone_named_parameters", "clone_parameters",
    "detach_distribution", "detach_module", "flatten_config", "magic_box", "maml_update", "update_module",
]
