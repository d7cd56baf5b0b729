"""learn2learn's per-task API: ``clone()`` and ``adapt()``.

>>> learner = fm.MAML(model, lr=0.4)                    # doctest: +SKIP
>>> for task in tasks:                                   # doctest: +SKIP
...     clone = learner.clone()
...     clone.adapt(loss_fn(clone(sx), sy))             # one inner step, in place
...     loss_fn(clone(qx), qy).backward()               # meta-gradient into learner.parameters()

A clone runs one task through the learner's engine, with the same step rule and checks
as ``meta_batch``; ``meta_batch`` is the fast path for many tasks.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class AdaptedModel:
    """One task's adapted copy of the model, as learn2learn's ``clone()`` returns.

    ``clone(x)`` runs the model on ``x`` ``[N, ...]`` with the clone's weights;
    ``clone.adapt(loss)`` takes one inner step in place; ``clone.parameters()`` yields
    the adapted tensors. Gradients flow back to the learner's parameters.
    """

    def __init__(self, learner, theta, fast, steps_taken, first_order, allow_unused, allow_nograd):
        self.learner = learner
        self._theta = theta
        self._fast = fast  # [1, P], or None before the first adapt
        self._src = None  # the tensor the last forward read: adapt differentiates it
        self.steps_taken = steps_taken
        self.first_order = first_order
        self.allow_unused = allow_unused
        self.allow_nograd = allow_nograd

    def _source(self) -> Tensor:
        if self._src is None:
            src = self._theta.unsqueeze(0) if self._fast is None else self._fast
            if not src.requires_grad:
                src = src.detach().requires_grad_(True)
            self._src = src
        return self._src

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        engine = self.learner._engine
        weights = engine.weights(self._theta, self._source(), self.learner.adapting())
        return engine.run(x.unsqueeze(0), weights)[0]

    forward = __call__

    def adapt(self, loss: Tensor, first_order=None, allow_unused=None, allow_nograd=None) -> None:
        """One inner step on ``loss`` (a scalar computed from this clone's outputs)."""
        learner = self.learner
        engine = learner._engine
        first_order = self.first_order if first_order is None else bool(first_order)
        allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("adapt needs a scalar loss tensor")
        if learner.validate and not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(f"adapt got a loss of {float(loss.detach())}")
        engine.check_nograd(allow_nograd)
        engine.check_unused(learner.adapting(), allow_unused)
        rule = learner.step_rule(self.steps_taken, self._theta)  # may raise: before any change
        src = self._source()
        create_graph = not first_order and torch.is_grad_enabled()
        (grad,) = torch.autograd.grad(loss, src, create_graph=create_graph, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(src)
        elif not create_graph:
            grad = grad.detach()
        current = self._theta if self._fast is None else self._fast
        self._fast = engine.take_inner_step(current, grad, rule)
        if self._fast.dim() == 1:
            self._fast = self._fast.unsqueeze(0)
        self._src = None
        self.steps_taken += 1

    def _current(self) -> Tensor:
        return self._theta if self._fast is None else self._fast[0]

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        layout = self.learner.layout
        for s, v in zip(layout.segments, layout.views(self._current())):
            yield s.name, v

    def parameters(self) -> Iterator[Tensor]:
        for _, v in self.named_parameters():
            yield v

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None) -> "AdaptedModel":
        return AdaptedModel(
            self.learner,
            self._theta,
            self._fast,
            self.steps_taken,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
        )
