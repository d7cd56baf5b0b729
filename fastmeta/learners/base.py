"""What every learner shares: the wrapped model, its hyperparameters and the public calls.

A learner is an ``nn.Module`` that owns the meta-learned quantities (the model's own
parameters, and whatever the learner adds) and the step rule; the meta-iteration itself
runs in the engine (:class:`fastmeta.engine.MetaIteration`).

>>> import fastmeta as fm
>>> learner = fm.MAML(fm.models.mlp((1, 40, 40, 1)), lr=0.01)
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)   # doctest: +SKIP
>>> out.loss.backward()                                                 # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastmeta.engine import (
    CapturedMetaStep,
    Layout,
    LossSpec,
    MetaBatchOutput,
    MetaIteration,
    StepRule,
    TaskWeights,
)
from fastmeta.learners.l2l import AdaptedModel


def check_positive_number(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class MetaLearner(nn.Module):
    """The base of MAML and ModelAwareMAML: hyperparameters, checks and the public API.

    Subclasses set the step rule (:meth:`step_rule`) and which segments adapt
    (:meth:`adapting`); the engine does the rest.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool,
        allow_unused: bool | None,
        allow_nograd: bool,
        steps: int,
        loss: LossSpec,
        validate: bool,
        task_chunk: int | None = None,
    ):
        super().__init__()
        engine = MetaIteration(model, loss)  # checks model and loss first
        self.module = model
        self.lr = check_positive_number("lr", lr)
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self.steps = check_count("steps", steps)
        self.loss = loss
        self.validate = bool(validate)
        self.task_chunk = None if task_chunk is None else check_count("task_chunk", task_chunk)
        self._engine = engine

    # -- what subclasses define --------------------------------------------------------

    def step_rule(self, step: int, like: Tensor) -> StepRule:
        """The rule of inner step ``step``: a constant rate ``lr`` for plain MAML."""
        return StepRule(self._constant_lr(like), None, None, None)

    def adapting(self) -> list[bool]:
        """Per parameter segment: does it take inner steps?"""
        return [p.requires_grad for p in self._engine.params]

    def _constant_lr(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        cache = self.__dict__.setdefault("_lr_tensors", {})
        if key not in cache:
            cache[key] = torch.tensor(self.lr, dtype=like.dtype, device=like.device)
        return cache[key]

    # -- the model ---------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """Run the wrapped model, as learn2learn's ``learner(x)`` does."""
        return self.module(*args, **kwargs)

    @property
    def layout(self) -> Layout:
        return self._engine.layout

    # -- public API --------------------------------------------------------------------

    def meta_batch(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        task_chunk: int | None = None,
        step_weights=None,
        first_order: bool | None = None,
    ) -> MetaBatchOutput:
        """Adapt to every task of a meta-batch and evaluate on its query set.

        support_x ``[T, Ns, ...]``, support_y ``[T, Ns, ...]``, query_x ``[T, Nq, ...]``,
        query_y ``[T, Nq, ...]``. Integer labels mean cross-entropy, float targets MSE,
        unless ``loss`` says otherwise. ``out.loss.backward()`` puts the meta-gradient on
        ``learner.parameters()``.

        task_chunk: run the tasks in chunks of this many (default: the learner's
        ``task_chunk``, None = all at once). The meta-gradient is the same; each chunk's
        graph is recomputed in the backward instead of kept, so peak memory falls towards
        the per-task loop's at chunk 1, at the cost of running the forward twice.

        The training schedules' per-call arguments (``fastmeta.tools.training``):

        - step_weights: None (the query loss after the last inner step), or one weight
          per inner step: ``loss`` is then Σ_s w_s · (query loss after step s + 1),
          MAML++'s multi-step loss (``task_loss`` likewise; ``accuracy`` is after the
          last step). Steps of weight 0 skip their query forward.
        - first_order: this call's derivative order (default: the learner's
          ``first_order``); derivative-order annealing passes True for the first
          iterations.
        """
        chunk = self.task_chunk if task_chunk is None else check_count("task_chunk", task_chunk)
        first_order = self.first_order if first_order is None else bool(first_order)
        return self._meta_batch(support_x, support_y, query_x, query_y, chunk, self.validate, step_weights,
                                first_order)

    def _meta_batch(self, support_x, support_y, query_x, query_y, task_chunk, validate, step_weights=None,
                    first_order=None) -> MetaBatchOutput:
        return self._engine.meta_batch(
            support_x, support_y, query_x, query_y, rule=self, steps=self.steps,
            first_order=self.first_order if first_order is None else first_order, task_chunk=task_chunk,
            allow_unused=self.allow_unused, allow_nograd=self.allow_nograd, validate=validate,
            step_weights=step_weights,
        )

    def fast_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> TaskWeights:
        """The adapted weights of every task: a :class:`TaskWeights` over ``[T, P]``."""
        steps = self.steps if steps is None else check_count("steps", steps, minimum=0)
        return self._engine.fast_weights(
            support_x, support_y, rule=self, steps=steps, first_order=self.first_order,
            allow_unused=self.allow_unused, allow_nograd=self.allow_nograd, validate=self.validate,
        )

    def predict(self, fast: TaskWeights, query_x: Tensor) -> Tensor:
        """The model's outputs for each task's inputs under its fast weights."""
        return self._engine.predict(fast, query_x, rule=self, validate=self.validate)

    def capture(
        self,
        optimizer: torch.optim.Optimizer,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        warmup: int = 3,
    ) -> CapturedMetaStep:
        """Capture a whole meta-iteration (with ``optimizer.step()``) in a CUDA graph.

        Returns a :class:`fastmeta.engine.CapturedMetaStep`; call it with each new
        meta-batch of the same shapes. See :mod:`fastmeta.engine.whole_step` for the rules.
        """
        inputs = (support_x, support_y, query_x, query_y)
        engine = self._engine
        engine.refresh()
        # Validation once, eagerly, on the meta-batch given at capture; the graph runs
        # unvalidated (a check that syncs cannot be captured).
        engine.check_tasks(self.validate, support_x=support_x, support_y=support_y, query_x=query_x,
                           query_y=query_y)
        with torch.no_grad():
            self._meta_batch(*inputs, self.task_chunk, self.validate)

        def step(sx, sy, qx, qy) -> MetaBatchOutput:
            return self._meta_batch(sx, sy, qx, qy, self.task_chunk, False)

        return CapturedMetaStep(step, list(self.parameters()), optimizer, inputs, warmup)

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None):
        """learn2learn's ``clone()``: a per-task copy that ``adapt()`` steps in place
        (:class:`fastmeta.learners.l2l.AdaptedModel`)."""
        self._engine.refresh()
        return AdaptedModel(
            self,
            self._engine.pack(),
            None,
            0,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
        )

    def extra_repr(self) -> str:
        return f"lr={self.lr}, steps={self.steps}, first_order={self.first_order}"
