"""What every learner shares: the wrapped model, its hyperparameters and the public calls.

A learner is an ``nn.Module`` that owns the meta-learned quantities (the model's own
parameters, and whatever the learner adds) and the step rule. At every public call it
hands the engine (:class:`fastmeta.engine.MetaIteration`) an immutable plan
(:meth:`MetaLearner.plan`, :class:`fastmeta.engine.AdaptationPlan`) and the engine runs the
meta-iteration from it, never calling back into the learner. Arguments are checked here,
once, at the public boundary (the call's inputs by the engine's ``check_tasks`` at the
entry of the call); the layers below trust them.

>>> import fastmeta as fm
>>> learner = fm.MAML(fm.models.mlp((1, 40, 40, 1)), lr=0.01)
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)   # doctest: +SKIP
>>> out.loss.backward()                                                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastmeta.engine import (
    AdaptationPlan,
    CapturedMetaStep,
    FusedMLPStep,
    Layout,
    LossSpec,
    MetaBatchOutput,
    MetaIteration,
    TaskWeights,
)
from fastmeta.engine.eager_graphs import MetaBatchGraphs
from fastmeta.engine.meta_iteration import check_loss_spec, check_step_weights
from fastmeta.engine.plan import parameter_rates
from fastmeta.engine.whole_step import WatchedState
from fastmeta.learners.adapted import AdaptedModel, ModelAttributes, adapt_in_place
from fastmeta.learners.module_tree import ModuleTree

# How BatchNorm layers treat statistics in clone()/adapt() (docs in MetaLearner).
BATCH_NORM_MODES = ("transductive", "running")


def check_finite_number(name: str, value) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got bool")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class MetaLearner(ModelAttributes, nn.Module):
    """The base of MAML and ModelAwareMAML: hyperparameters, checks and the public API.

    Subclasses describe their step rule and which segments adapt in the plan
    (:meth:`_rule`, :meth:`_adapting`); the engine does the rest.

    batch_norm: how BatchNorm layers treat statistics in ``clone()/adapt()``.
    "transductive" (the default; MAML's setting, and what ``meta_batch`` always does):
    each forward normalises with its own batch statistics, in training and evaluation
    mode alike, and running statistics are never read or written. "running":
    learn2learn's (PyTorch's) behaviour: in training mode each forward of a clone
    normalises with batch statistics and updates the model's running statistics; in
    evaluation mode it normalises with them. The batched calls (``meta_batch``,
    ``fast_weights``, ``predict``, ``capture``) are transductive only and refuse "running"
    for a model with BatchNorm.

    cuda_graphs: ``meta_batch`` on a CUDA device replays CUDA graphs of its forward and
    meta-gradient, captured per input shape (:mod:`fastmeta.engine.eager_graphs`; what it
    did and why: ``learner.meta_batch_graphs``). False, or the environment's
    ``FASTMETA_CUDA_GRAPHS=0`` when the learner is made, runs every call eagerly; so does
    setting ``learner.cuda_graphs = False``.
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
        batch_norm: str = "transductive",
        cuda_graphs: bool = True,
    ):
        super().__init__()
        engine = MetaIteration(model)  # checks the model first
        check_loss_spec(loss)
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}")
        self.module = model
        self.lr = check_finite_number("lr", lr)  # learn2learn takes any rate, 0 and negative too
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self.steps = check_count("steps", steps)
        self.loss = loss
        self.validate = bool(validate)
        self.task_chunk = None if task_chunk is None else check_count("task_chunk", task_chunk)
        self.batch_norm = batch_norm
        self.steps_taken = 0  # inner steps adapt() took on the learner itself
        # meta_batch on a CUDA device replays CUDA graphs (fastmeta.engine.eager_graphs);
        # off with cuda_graphs=False, or FASTMETA_CUDA_GRAPHS=0 (read here, once).
        self.cuda_graphs = bool(cuda_graphs) and os.environ.get("FASTMETA_CUDA_GRAPHS", "1").strip() != "0"
        self._engine = engine

    # -- captured state: what a captured step reads from the learner, watched ------------

    # The plain attributes a captured step's plan reads (tensors the plan holds are read on
    # replay). Not ``validate``: captured steps validate outside their graphs, and
    # evaluation turns validation off around itself between training steps.
    _PLAN_ATTRIBUTES = frozenset({
        "lr", "steps", "first_order", "loss", "allow_unused", "allow_nograd", "task_chunk",
        "batch_norm", "lr_mode", "lr_per_step", "log_lr", "per_step_bn", "gates", "precondition",
    })

    def _watched_state(self, optimizer: torch.optim.Optimizer | None = None,
                       explicit: tuple[str, ...] = ()) -> WatchedState:
        """What a step captured now reads from this learner (and ``optimizer``), as a
        :class:`WatchedState`: the rule for captured state (README, "Whole steps"). The
        attributes in ``explicit`` were given to the capture and are not the learner's."""
        attributes = [name for name in self._PLAN_ATTRIBUTES if name not in explicit]
        return WatchedState(self, attributes, self.named_modules(), optimizer)

    @property
    def meta_batch_graphs(self) -> MetaBatchGraphs:
        """``meta_batch``'s CUDA graphs (:class:`fastmeta.engine.eager_graphs.MetaBatchGraphs`):
        ``eager_reason`` says why the last call ran eagerly, ``off_reason`` why they are
        off for good, ``captures`` and ``replays`` count. Made at first use; a copy or a
        pickle of the learner starts without them."""
        graphs = self.__dict__.get("_meta_batch_graphs")
        if graphs is None:
            graphs = MetaBatchGraphs(self._engine, self._watched_state())
            self.__dict__["_meta_batch_graphs"] = graphs
        return graphs

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_meta_batch_graphs", None)  # graphs and their memory belong to this object
        return state

    # -- the plan handed to the engine ---------------------------------------------------

    def plan(self, *, steps: int | None = None, first_order: bool | None = None, step_weights=None,
             task_chunk: int | None = None, validate: bool | None = None) -> AdaptationPlan:
        """This learner's :class:`fastmeta.engine.AdaptationPlan` for one call: the rule of
        every inner step, what adapts, the loss and the call's options (defaults: the
        learner's). Immutable, tensors and plain values only: the engine runs on it alone.
        The arguments are trusted: the public calls check them first."""
        engine = self._engine
        engine.refresh()
        trained = self.steps
        return AdaptationPlan(
            layout=engine.layout,
            adapting=self._adapting(engine.params),
            steps=trained if steps is None else steps,
            first_order=self.first_order if first_order is None else first_order,
            loss=self.loss,
            validate=self.validate if validate is None else validate,
            allow_unused=self.allow_unused,
            allow_nograd=self.allow_nograd,
            trained_steps=trained,
            step_weights=step_weights,
            task_chunk=self.task_chunk if task_chunk is None else task_chunk,
            **self._rule(),
        )

    def _rule(self) -> dict:
        """The plan's rule fields (:class:`AdaptationPlan`): MAML's constant rate ``lr``."""
        return {"rate_mode": "constant", "lr": self.lr}

    def _adapting(self, params: list[Tensor]) -> tuple[bool, ...]:
        """Per parameter segment: does it take inner steps?"""
        return tuple(p.requires_grad for p in params)

    # -- the model ---------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """Run the wrapped model, as learn2learn's ``learner(x)`` does (its other
        attributes and methods pass through too: ``learner.log_prob(...)``)."""
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
        the reference loop's (one task at a time) at chunk 1, at the cost of running the forward twice.

        The training schedules' per-call arguments (``fastmeta.tools.training``):

        - step_weights: None (the query loss after the last inner step), or one weight
          per inner step: ``loss`` is then Σ_s w_s · (query loss after step s + 1),
          MAML++'s multi-step loss (``task_loss`` likewise; ``accuracy`` is after the
          last step). Steps of weight 0 skip their query forward.
        - first_order: this call's derivative order (default: the learner's
          ``first_order``); derivative-order annealing passes True for the first
          iterations.
        """
        self._check_batch_norm_mode("meta_batch")
        chunk = self.task_chunk if task_chunk is None else check_count("task_chunk", task_chunk)
        first_order = self.first_order if first_order is None else bool(first_order)
        plan = self.plan(first_order=first_order, step_weights=check_step_weights(step_weights, self.steps),
                         task_chunk=chunk)
        if self.cuda_graphs:
            return self.meta_batch_graphs.meta_batch(support_x, support_y, query_x, query_y, plan)
        return self._engine.meta_batch(support_x, support_y, query_x, query_y, plan)

    def fast_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> TaskWeights:
        """The adapted weights of every task: a :class:`TaskWeights` over ``[T, P]``."""
        self._check_batch_norm_mode("fast_weights")
        steps = self.steps if steps is None else check_count("steps", steps, minimum=0)
        return self._engine.fast_weights(support_x, support_y, self.plan(steps=steps))

    def predict(self, fast: TaskWeights, query_x: Tensor) -> Tensor:
        """The model's outputs for each task's inputs under its fast weights."""
        self._check_batch_norm_mode("predict")
        return self._engine.predict(fast, query_x, self.plan())

    def capture(
        self,
        optimizer: torch.optim.Optimizer,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        warmup: int = 3,
        first_order: bool | None = None,
    ) -> CapturedMetaStep | FusedMLPStep:
        """A whole meta-iteration (with ``optimizer.step()``) as one replayable step.

        On a GPU: a :class:`fastmeta.engine.CapturedMetaStep`, the iteration captured in a
        CUDA graph. On the CPU, for a plain MLP with fixed inner rates: a
        :class:`fastmeta.engine.FusedMLPStep`, the iteration and Adam's update in one fused
        op (other models on the CPU raise ValueError: train them through ``meta_batch``).
        Call the result with each new meta-batch of the same shapes. The step runs the plan
        built here: after a change of what it read (the learner's ``lr``, ``steps``,
        ``first_order``, ..., train/eval mode, ``requires_grad``, the backend, the
        optimizer's non-tensor hyperparameters) calling it raises RuntimeError naming the
        change; capture again. See
        :mod:`fastmeta.engine.whole_step` for the rules. first_order: the meta-gradient's
        order for this step (default: the learner's).
        """
        explicit = () if first_order is None else ("first_order",)
        first_order = self.first_order if first_order is None else bool(first_order)
        self._check_batch_norm_mode("capture")
        inputs = (support_x, support_y, query_x, query_y)
        engine = self._engine
        plan = self.plan(first_order=first_order)
        if isinstance(support_x, Tensor) and support_x.device.type == "cpu":
            step = engine.fused_update_step(optimizer, list(self.parameters()), inputs, plan)
            step.watch = self._watched_state(explicit=explicit)  # Adam's options are read at every call
            return step
        # Checked once, eagerly, on the meta-batch given at capture (the engine's entry
        # checks); the graph runs unvalidated (a check that syncs cannot be captured).
        with torch.no_grad():
            engine.meta_batch(*inputs, plan)
        captured = CapturedMetaStep(self.captured_program(first_order), list(self.parameters()), optimizer, inputs,
                                    warmup)
        captured.watch = self._watched_state(optimizer, explicit)  # after the capture made Adam's state
        return captured

    def captured_program(self, first_order: bool | None = None):
        """The meta-batch function a ``capture()`` on a GPU records: the engine's
        ``meta_batch`` on this learner's plan alone (no learner code), unvalidated (the
        capture checks its meta-batch once, before). Called with (sx, sy, qx, qy)."""
        first_order = self.first_order if first_order is None else bool(first_order)
        plan = self.plan(first_order=first_order)
        return functools.partial(self._engine.meta_batch, plan=plan.with_call(validate=False))

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None) -> AdaptedModel:
        """learn2learn's ``clone()``: an ``nn.Module`` copy of the model, graph-connected to
        its parameters, that ``adapt()`` steps in place (:class:`AdaptedModel`). It steps
        by this call's plan of the learner."""
        tree = self._module_tree()
        params = tree.read(tree.modules)
        transductive = self.batch_norm == "transductive"
        copies = tree.copy(tree.modules, [p.clone() for p in params], transductive)
        return AdaptedModel(
            self.plan(), tree, copies, self.lr, self.steps_taken,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
            transductive,
        )

    def adapt(self, loss: Tensor, first_order=None, allow_unused=None, allow_nograd=None) -> None:
        """learn2learn's ``adapt()`` on the learner itself: one inner step on ``loss`` that
        replaces the model's parameters by the adapted tensors, in place.

        As in learn2learn, the model then holds tensors of the graph, not its
        ``nn.Parameter``s: an optimizer built before keeps stepping the old parameters.
        Use it where the learner is not trained any more (test-time adaptation);
        ``clone()`` is the training path.
        """
        tree = self._module_tree()
        plan = self.plan()
        adapt_in_place(
            plan, tree, tree.modules, loss, self.steps_taken,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
            self.lr, parameter_rates(plan), self.__dict__.setdefault("_rate_cache", {}),
        )
        self.steps_taken += 1

    def _check_batch_norm_mode(self, call: str) -> None:
        """The batched calls normalise transductively; with batch_norm="running" and a
        BatchNorm in the model they would silently do something else, so they refuse."""
        if self.batch_norm == "running" and any(isinstance(m, _BatchNorm) for m in self.module.modules()):
            raise ValueError(
                f"{call} normalises with each task's batch statistics; batch_norm='running' (learn2learn's "
                "running statistics) applies to clone()/adapt() only: use a learner with "
                "batch_norm='transductive' for the batched calls"
            )

    def _module_tree(self) -> ModuleTree:
        """The model's :class:`ModuleTree`, rebuilt (with the engine) when the model's
        submodules or parameters were replaced."""
        tree = self.__dict__.get("_tree")
        if tree is None or not tree.describes(self.module):
            self._engine.refresh()
            tree = ModuleTree(self.module)
            self.__dict__["_tree"] = tree
        return tree

    def extra_repr(self) -> str:
        return f"lr={self.lr}, steps={self.steps}, first_order={self.first_order}"
