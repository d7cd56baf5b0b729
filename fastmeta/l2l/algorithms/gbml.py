"""``learn2learn.algorithms.gbml.GBML``: gradient-based meta-learning with a learned
gradient transform.

``GBML(module, transform, lr=1.0, adapt_transform=False, first_order=False,
allow_unused=False, allow_nograd=False)``. ``transform(p)`` makes, for each parameter p,
the module that maps its gradient g to its update u (or None: u = g); an inner step is
``p ← p − lr·u``, differentiable, so the transforms' parameters are meta-learned through
the outer loss (``gbml.parameters()``: the model's and the transforms'). adapt_transform:
after the first step, each ``adapt`` first steps the transforms' own parameters on the
loss, then the model's.

Which path runs (the numbers are the same; the speed is not):

- every transform None (the identity): fastmeta's :class:`fastmeta.MAML` runs ``clone()``
  and ``meta_batch``;
- every transform a ``fastmeta.l2l.nn.Scale`` shaped like its parameter, ``lr == 1`` and
  ``adapt_transform=False`` (Meta-SGD): :class:`fastmeta.MetaSGD`, whose per-parameter
  rates *are* the Scale modules' ``alpha``;
- anything else (``MetaCurvatureTransform``, ``KroneckerTransform``, ``ModuleTransform``,
  ``adapt_transform=True``): the transforms run on each task's gradients, task by task,
  through ``clone()``/``adapt()``; ``meta_batch`` refuses (fastmeta's engine has no
  Kronecker-factored step).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastmeta.l2l.nn.misc import Scale
from fastmeta.l2l.optim import DifferentiableSGD, ParameterUpdate
from fastmeta.l2l.utils import clone_module
from fastmeta.learners import MAML, MetaSGD


class GBML(nn.Module):
    def __init__(self, module: nn.Module, transform: Callable, lr: float = 1.0, adapt_transform: bool = False,
                 first_order: bool = False, allow_unused: bool = False, allow_nograd: bool = False, **kwargs):
        super().__init__()
        compute_update = kwargs.pop("compute_update", None)
        if kwargs:
            raise TypeError(f"GBML got unexpected keyword arguments {sorted(kwargs)} (it takes compute_update)")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.transform = transform
        self.lr = lr
        self.adapt_transform = bool(adapt_transform)
        self.first_order = bool(first_order)
        self.allow_unused = bool(allow_unused)
        self.allow_nograd = bool(allow_nograd)
        if compute_update is None:
            compute_update = ParameterUpdate(module.parameters(), transform)
            fast = self._fastmeta_learner(compute_update)
        else:
            fast = None  # a clone: it adapts through the transforms it was given
        self.compute_update = compute_update
        self.diff_sgd = DifferentiableSGD(lr)
        self._params_updated = False
        self.__dict__["_learner"] = fast  # not a submodule: it holds the same parameters

    def _fastmeta_learner(self, compute_update: ParameterUpdate):
        """fastmeta's own learner for the identity and the diagonal (Meta-SGD) transforms."""
        params = list(self.module.parameters())
        indices = compute_update.transforms_indices
        common = dict(allow_unused=self.allow_unused, allow_nograd=self.allow_nograd)
        if all(i is None for i in indices):
            return MAML(self.module, self.lr, self.first_order, self.allow_unused, self.allow_nograd)
        scales = [None if i is None else compute_update.transforms_modules[i] for i in indices]
        if (not self.adapt_transform and self.lr == 1.0 and all(
                type(s) is Scale and s.alpha.shape == p.shape for s, p in zip(scales, params))):
            meta = MetaSGD(self.module, 1.0, self.first_order, [s.alpha.detach() for s in scales], **common)
            for s, rate in zip(scales, meta.lrs):
                s.alpha = rate  # one tensor: the transform's parameter is the learner's rate
            return meta
        return None

    @property
    def fast_path(self) -> str:
        """Which learner runs this GBML: "MAML", "MetaSGD" or "per-task" (see the module docstring)."""
        learner = self.__dict__["_learner"]
        return "per-task" if learner is None else type(learner).__name__

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None, adapt_transform=None):
        """A copy for one task (graph-connected to this one): fastmeta's clone on the fast
        paths, else a GBML over clones of the model and of the transforms."""
        first_order = self.first_order if first_order is None else bool(first_order)
        allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        adapt_transform = self.adapt_transform if adapt_transform is None else bool(adapt_transform)
        learner = self.__dict__["_learner"]
        if learner is not None and adapt_transform == self.adapt_transform:
            return learner.clone(first_order, allow_unused, allow_nograd)
        return GBML(
            clone_module(self.module), self.transform, lr=self.lr, adapt_transform=adapt_transform,
            first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd,
            compute_update=clone_module(self.compute_update),
        )

    def adapt(self, loss: Tensor, first_order=None, allow_nograd=None, allow_unused=None) -> None:
        """One inner step on ``loss``, in place: ``p ← p − lr·transform(∂loss/∂p)``; with
        adapt_transform, the transforms' parameters are first stepped on the same loss."""
        first_order = self.first_order if first_order is None else bool(first_order)
        allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("adapt: loss must be a scalar tensor")
        second_order = not first_order and torch.is_grad_enabled()
        if self.adapt_transform and self._params_updated:
            transform_params = list(self.compute_update.parameters())
            grads = torch.autograd.grad(loss, transform_params, create_graph=second_order, retain_graph=True,
                                        allow_unused=allow_unused)
            self.diff_sgd(self.compute_update, grads)
            self._params_updated = False
        updates = self.compute_update(
            loss, self.module.parameters(), create_graph=second_order or self.adapt_transform,
            retain_graph=second_order or self.adapt_transform, allow_unused=allow_unused, allow_nograd=allow_nograd,
        )
        self.diff_sgd(self.module, updates)
        self._params_updated = True

    def meta_batch(self, support_x, support_y, query_x, query_y, **kwargs):
        """fastmeta's batched meta-iteration (see :meth:`fastmeta.MAML.meta_batch`), on the
        identity and Meta-SGD paths; other transforms refuse (use ``clone()``/``adapt()``)."""
        learner = self.__dict__["_learner"]
        if learner is None:
            raise ValueError(
                f"GBML.meta_batch: transform {getattr(self.transform, '__name__', type(self.transform).__name__)} "
                "runs task by task (fastmeta's engine has no such step); use clone()/adapt(), or the identity "
                "(None) or per-parameter Scale transforms at lr=1"
            )
        return learner.meta_batch(support_x, support_y, query_x, query_y, **kwargs)
