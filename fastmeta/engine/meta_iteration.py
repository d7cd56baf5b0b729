"""The meta-iteration: every task's inner loop, the query loss, chunking and the fused path.

A :class:`MetaIteration` holds what it needs of a model (its parameters packed into a flat
θ ``[P]``, the traced program, and the plain-MLP structure when there is one) and runs
the meta-iteration for all tasks at once: each inner step is one fused ``inner_step``
over the ``[T, P]`` buffer. The learners (:mod:`fastmeta.learners`) own the
hyperparameters and meta-parameters, and hand every call an immutable
:class:`~fastmeta.engine.plan.AdaptationPlan` (the rule of each inner step, what adapts, the
loss, the call's options); the engine reads the plan and never calls back into the learner.
Only the engine calls the ops.

Checks happen once per call, here at the entry of each call (``check_tasks``: shapes,
dtypes, devices, counts; NaN/Inf and label range under ``plan.validate``); the ops the
engine calls are called on the trusted path (no second check, no second kernel choice).
In ``meta_batch``'s general path the NaN/Inf checks of the inputs and of every support and
query loss are taken together at the end of the call (:class:`FiniteChecks`: three ops and
one host sync), and the first non-finite one is named as a check at once would name it.
"""

from __future__ import annotations

import math

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from fastmeta.engine.plan import AdaptationPlan, LossSpec, StepRule, parameter_coefficients, step_rule
from fastmeta.engine.program import plain_mlp_structure, trace
from fastmeta.engine.task_weights import (Layout, TaskWeights, cached_one, expand_segments_node,
                                          segment_inner_step_node, segment_steps_node)
from fastmeta.engine.types import MetaBatchOutput
from fastmeta.engine.whole_step import FusedMLPStep
from fastmeta.ops import (LOSS_KINDS, inner_step, task_accuracy, task_loss, task_loss_and_accuracy, task_loss_and_grad,
                          task_loss_grad)
from fastmeta.ops.mlp_meta_step import choose_fused_kernel, mlp_meta_step_mean
from fastmeta.ops.mlp_meta_step_update import mlp_meta_step_update


def check_loss_spec(loss: LossSpec) -> LossSpec:
    """The ``loss`` argument of a learner, checked: a kind, a callable or None."""
    if isinstance(loss, str) and loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, a callable or None, got {loss!r}")
    if loss is not None and not isinstance(loss, str) and not callable(loss):
        raise TypeError(f"loss must be one of {LOSS_KINDS}, a callable or None, got {loss!r}")
    return loss


class MetaIteration:
    """The engine of one model: its layout, its program, and the meta-iteration over it."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to adapt")
        self.model = model
        self.layout = Layout.of_module(model)
        self.program = trace(model, self.layout, defer_warning=True)
        self.mlp = plain_mlp_structure(model)
        self.params = [p for _, p in model.named_parameters()]
        self._examples_run: set[tuple[int, ...]] = set()  # example shapes the program ran on
        self._rate_cache: dict = {}  # MAML's constant rate as a tensor, per (value, dtype, device)

    # -- model and buffer ------------------------------------------------------------

    def refresh(self) -> None:
        """Re-trace if the model's parameters were replaced (not just updated in place).

        The learner calls this when it makes a call's plan; the methods below then use the
        parameter list it keeps (walking ``named_parameters()`` once per call, not once
        per use, is a tenth of a small meta-step's time).
        """
        params = [p for _, p in self.model.named_parameters()]
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            self.layout = Layout.of_module(self.model)
            self.program = trace(self.model, self.layout, defer_warning=True)
            self.mlp = plain_mlp_structure(self.model)
            self._examples_run = set()
        self.params = params

    def pack(self) -> Tensor:
        """θ ``[P]``: the model's parameters in one differentiable buffer."""
        return self.layout.pack(self.params)

    def weights(self, theta: Tensor, fast: Tensor | list[Tensor] | None, adapting: Sequence[bool]) -> list[Tensor]:
        """Per segment: the task's fast weights if it adapts, else θ's shared view. ``fast``:
        the ``[T, P]`` buffer, or its segments (``[T, *shape]`` each, as the per-segment step
        makes them).

        Reading non-adapting segments from θ keeps their weight-gradient work out of the
        inner loop (autograd is asked for the gradient of ``fast`` only), and runs their
        layers with shared weights: one GEMM for all tasks.
        """
        shared = self.layout.views(theta)
        if fast is None:
            return shared
        per_task = fast if isinstance(fast, list) else self.layout.views(fast)
        return [pt if a else s for pt, s, a in zip(per_task, shared, adapting)]

    def run(self, x: Tensor, weights: list[Tensor], argument: str = "x") -> Tensor:
        """The model's outputs ``[T, N, ...]`` for inputs ``[T, N, ...]`` under per-segment weights.

        The first run on examples of a new shape is checked: an input the model cannot take
        raises a ValueError that names ``argument``, the layer that refused it and the shape
        expected, instead of torch's error from deep inside the model. Shapes that ran once
        are not checked again.
        """
        example = tuple(x.shape[2:])
        if example in self._examples_run:
            return self.program(x, weights)
        self.program.check_example_shape(argument, x)
        try:
            out = self.program(x, weights)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as error:
            raise ValueError(self._cannot_run(argument, x, error)) from error
        self._examples_run.add(example)
        return out

    def _cannot_run(self, argument: str, x: Tensor, error: Exception) -> str:
        at = f" at its {self.program.failed_at}" if self.program.failed_at else ""
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        message = f"{argument}: the model cannot run on examples of shape {list(x.shape[2:])}{at} ({reason})"
        if self.program.example_shape is not None:
            return message + f"; it was built for examples of shape {list(self.program.example_shape)}"
        if self._examples_run:
            return message + f"; it ran on examples of shape {list(min(self._examples_run))}"
        return message

    def take_inner_step(self, current: Tensor, grad: Tensor, rule: StepRule) -> Tensor:
        """One inner step: ``current − coefficient ⊙ grad`` (the fused ``inner_step`` op),
        then the values the rule sets, ``[T, P]`` either way."""
        fast = inner_step(current, grad, rule.lr, rule.mask, rule.precond, rule.segments)
        if rule.set_values is not None:
            index, values = rule.set_values
            fast = fast.index_copy(1, index, values.expand(fast.size(0), -1))
        return fast

    def step_rule(self, plan: AdaptationPlan, step: int, like: Tensor) -> StepRule:
        """The rule of inner step ``step`` under ``plan`` (:func:`fastmeta.engine.plan.step_rule`)."""
        return step_rule(plan, step, like, self._rate_cache)

    def parameter_coefficients(self, plan: AdaptationPlan, step: int, like: Tensor) -> list[Tensor]:
        """Per parameter, what multiplies its gradient at inner step ``step`` (``clone()``/``adapt()``)."""
        return parameter_coefficients(plan, step, like, self._rate_cache)

    # -- checks (once per call, at its entry) --------------------------------------------

    def check_nograd(self, allow_nograd: bool) -> None:
        if allow_nograd:
            return
        frozen = [s.name for s, p in zip(self.layout.segments, self.params) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"parameters {frozen} have requires_grad=False; pass allow_nograd=True to "
                "leave them unadapted (they are never changed)"
            )

    def check_unused(self, adapting: Sequence[bool], allow_unused: bool) -> None:
        if allow_unused:
            return
        unused = [
            s.name
            for k, (s, a) in enumerate(zip(self.layout.segments, adapting))
            if a and k not in self.program.reads
        ]
        if unused:
            raise ValueError(
                f"parameters {unused} are not used by the model's forward; pass "
                "allow_unused=True to adapt the others"
            )

    def check_tasks(self, validate: bool, finite_checks: "FiniteChecks | None" = None, **named: Tensor) -> None:
        """Checks at the public boundary, before any state changes: types, ranks, task and
        example counts, devices, dtypes, the model's example shape; NaN/Inf (a sync) under
        ``validate``, or, given ``finite_checks``, added to them (checked with the losses'
        in one sync at the end of the call)."""
        reference = self.params[0]
        T = None
        for name, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
            if t.layout != torch.strided:  # sparse inputs failed deep inside torch (issue 26)
                raise TypeError(f"{name} must be a dense (strided) Tensor, got layout {t.layout}; use .to_dense()")
            if t.is_complex():
                raise TypeError(f"{name} is {t.dtype}: complex inputs and labels are not supported")
            rank = 3 if name.endswith("_x") else 2
            if t.dim() < rank:
                expected = "[tasks, examples, features...]" if rank == 3 else "[tasks, examples, ...]"
                raise ValueError(f"{name} must be {expected}, got shape {list(t.shape)}")
            if T is None:
                T, first = t.size(0), name
            elif t.size(0) != T:
                raise ValueError(
                    f"{name} has {t.size(0)} tasks but {first} has {T}: every argument needs "
                    "the same task count"
                )
            if t.device != reference.device:
                raise ValueError(f"{name} is on {t.device} but the model is on {reference.device}")
            if name.endswith("_x") and t.dtype != reference.dtype:
                raise TypeError(f"{name} is {t.dtype} but the model is {reference.dtype}")
            if name.endswith("_x"):
                self.program.check_example_shape(name, t)
        if T == 0:
            raise ValueError(f"{first} holds no tasks")
        for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
            if x in named and y in named and named[x].size(1) != named[y].size(1):
                raise ValueError(
                    f"{x} has {named[x].size(1)} examples per task but {y} has {named[y].size(1)}"
                )
        for name, t in named.items():
            if t.size(1) == 0:
                kind = "support" if name.startswith("support") else "query"
                raise ValueError(f"{name} is empty: the {kind} set needs at least one example per task")
            if name.endswith("_x") and 0 in t.shape[2:]:
                raise ValueError(f"{name} {list(t.shape)} has a zero-size example dimension: "
                                 "each example needs at least one value")
        if validate:
            for name, t in named.items():
                if not t.is_floating_point():
                    continue
                if finite_checks is not None:
                    finite_checks.add_input(name, t)
                elif not all_finite(t):  # one op and a sync per input
                    raise_non_finite_input(name, t)

    # -- losses ------------------------------------------------------------------------

    @staticmethod
    def loss_kind(loss: LossSpec, target: Tensor) -> str | None:
        """The built-in loss for ``target`` under ``loss`` (None: the user's callable)."""
        if loss is None:
            return "mse" if target.is_floating_point() else "cross_entropy"
        return loss if isinstance(loss, str) else None

    def task_losses(self, plan: AdaptationPlan, pred: Tensor, target: Tensor, which: str,
                    check_range: bool = True) -> Tensor:
        """``[T]`` losses of predictions ``[T, N, ...]`` against targets (labels and targets
        as :func:`loss_targets` makes them). check_range: check the labels' range (a sync,
        under ``plan.validate``): once per call for each argument, at its first loss."""
        kind = self.loss_kind(plan.loss, target)
        T = target.size(0)
        if kind is None:
            losses = plan.loss(pred, target)
            if not isinstance(losses, Tensor) or losses.shape != (T,):
                raise ValueError(
                    f"the loss callable must return per-task losses of shape [{T}], got "
                    f"{getattr(losses, 'shape', type(losses).__name__)}"
                )
            return losses
        if kind == "cross_entropy" and pred.dim() != 3:
            raise ValueError(f"cross-entropy needs model outputs [T, N, classes], got {list(pred.shape)}")
        target = loss_targets(kind, target, list(pred.shape), pred.dtype, which, plan.validate and check_range)
        return task_loss(pred, target, kind)

    def query_losses_and_accuracy(self, plan: AdaptationPlan, pred: Tensor, target: Tensor,
                                  check_range: bool) -> tuple[Tensor, Tensor | None]:
        """(losses ``[T]``, accuracy ``[T]`` or None) of the last query: with the built-in
        cross-entropy on integer labels, both from one op (``task_loss_and_accuracy``: one
        pass over pred, one kernel where the loss and ``task_accuracy`` were two); otherwise
        :meth:`task_losses`, and the accuracy where the labels are integer class indices
        (``task_accuracy``, without a graph)."""
        if (self.loss_kind(plan.loss, target) == "cross_entropy" and pred.dim() == 3
                and not target.is_floating_point()):
            labels = loss_targets("cross_entropy", target, list(pred.shape), pred.dtype, "query",
                                  plan.validate and check_range)
            return task_loss_and_accuracy(pred, labels)
        losses = self.task_losses(plan, pred, target, "query", check_range=check_range)
        accuracy = None
        if not target.is_floating_point() and pred.dim() == 3:
            with torch.no_grad():
                accuracy = task_accuracy(pred, target)  # argmax, compare and mean: one kernel
        return losses, accuracy

    def support_losses(self, plan: AdaptationPlan, pred: Tensor, target: Tensor,
                       check_range: bool) -> tuple[Tensor | None, Tensor | None]:
        """(losses ``[T]`` or None, d Σ_t losses[t] / d pred or None) for an inner step.

        With a built-in loss the gradient at pred is ``task_loss_grad`` itself (an op with its
        own backward, so second order runs through it), and the inner step differentiates
        pred with it: the loss op's backward would compute the same gradient times the
        upstream ones, one ``mul`` more, and the outer backward one ``mul`` more for that
        (W4: 10 dispatches). The losses are then needed only for the NaN/Inf check: under
        ``plan.validate`` from the gradient's own pass (``task_loss_and_grad``: one kernel,
        the losses without a graph), not at all otherwise. A user's loss callable: its
        losses, differentiated as they are (gradient None)."""
        kind = self.loss_kind(plan.loss, target)
        if kind is None:
            return self.task_losses(plan, pred, target, "support", check_range), None
        if kind == "cross_entropy" and pred.dim() != 3:
            raise ValueError(f"cross-entropy needs model outputs [T, N, classes], got {list(pred.shape)}")
        target = loss_targets(kind, target, list(pred.shape), pred.dtype, "support", plan.validate and check_range)
        if plan.validate:
            return task_loss_and_grad(pred, target, kind)
        return None, task_loss_grad(pred, target, kind)

    # -- the inner loop ----------------------------------------------------------------

    def inner_loop(self, theta: Tensor, support_x: Tensor, support_y: Tensor, plan: AdaptationPlan) -> Tensor:
        """Fast weights ``[T, P]`` after ``plan.steps`` (>= 1) inner steps from θ."""
        fast = None
        for fast in self.inner_states(theta, support_x, support_y, plan):
            pass
        return fast

    def inner_states(self, theta: Tensor, support_x: Tensor, support_y: Tensor,
                     plan: AdaptationPlan, finite_checks: "FiniteChecks | None" = None,
                     per_segment: bool = False) -> Iterator[Tensor | list[Tensor]]:
        """The fast weights ``[T, P]`` after each of ``plan.steps`` inner steps from θ, in turn.
        The support losses are checked for NaN/Inf under ``plan.validate``: at once, or added
        to ``finite_checks``. ``per_segment``: where the per-segment step applies
        (:func:`segment_steps_node`), the last step's fast weights are its segments,
        ``[T, *shape]`` each, for :meth:`weights` (the query reads them with no split, so its
        gradient comes back with no ``[T, P]`` join)."""
        T, P = support_x.size(0), theta.numel()
        adapting = plan.adapting
        self.check_unused(adapting, plan.allow_unused)
        create_graph = not plan.first_order and torch.is_grad_enabled()
        fast = None
        for step in range(plan.steps):
            with torch.profiler.record_function(f"fastmeta.inner_step{step}"):
                current = theta if fast is None else fast
                rule = self.step_rule(plan, step, theta)
                # One rate for every parameter, on the CPU: the step reads the inner gradient
                # per segment, as autograd hands it, with no [T, P] join of it first; with
                # per_segment, the last step returns its fast weights per segment too.
                # (The two nodes apply under the same rule: one question, of the one wanted.)
                choose = segment_steps_node if per_segment and step == plan.steps - 1 else segment_inner_step_node
                segmented = choose(current, rule.lr, rule.mask, rule.precond, rule.segments,
                                   rule.set_values) if any(adapting) else None
                # The first step over the segments: θ's own segments, the adapting ones expanded
                # over the tasks, from one node that sums their gradients over the tasks itself.
                expand = expand_segments_node(theta) if fast is None and segmented is not None else None
                with torch.enable_grad():
                    if expand is not None:
                        src = None
                        weights = expand(theta, self.layout.encoded_shapes, T, [int(a) for a in adapting])
                    else:
                        src = theta.expand(T, P) if fast is None else fast
                        if not src.requires_grad:  # evaluation under no_grad: a leaf to differentiate
                            src = src.detach().requires_grad_(True)
                        weights = self.weights(theta, src, adapting)
                    pred = self.run(support_x, weights, "support_x")
                    losses, grad_pred = self.support_losses(plan, pred, support_y, check_range=step == 0)
                    if losses is not None and finite_checks is not None:
                        finite_checks.add_losses("support", losses)
                    elif losses is not None:
                        check_finite_losses(losses, "support", plan.validate)
                    if grad_pred is not None:  # a built-in loss: its gradient at pred, as an op
                        outputs, upstream = pred, grad_pred
                    else:
                        # d Σ_t losses[t]: the losses with a gradient of ones (a cached one,
                        # expanded), not their sum with the ones_like autograd would make.
                        outputs, upstream = losses, cached_one(losses.dtype, losses.device).expand_as(losses)
                    if not any(adapting):  # nothing adapts (every parameter frozen): the step is θ
                        grad = None
                    elif segmented is not None:
                        per_task = [w for w, a in zip(weights, adapting) if a]
                        found = torch.autograd.grad(outputs, per_task, upstream, create_graph=create_graph,
                                                    allow_unused=True)
                    else:
                        (grad,) = torch.autograd.grad(outputs, src, upstream, create_graph=create_graph,
                                                      allow_unused=True)
                if segmented is not None:
                    it = iter(found)
                    segment_grads = [next(it) if a else None for a in adapting]
                    if not create_graph:
                        segment_grads = [None if g is None else g.detach() for g in segment_grads]
                    grad = None if all(g is None for g in segment_grads) else segment_grads
                if grad is None:
                    grad = torch.zeros_like(theta.expand(T, P) if src is None else src)
                elif not create_graph and segmented is None:
                    grad = grad.detach()
                if isinstance(grad, list):  # segment_inner_step: [T, P]; segment_steps: its segments
                    fast = segmented(current, grad, self.layout.encoded_shapes, rule.lr)
                else:
                    fast = self.take_inner_step(current, grad, rule)
            yield fast

    # -- the meta-iteration ----------------------------------------------------------------

    def meta_batch(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   plan: AdaptationPlan) -> MetaBatchOutput:
        """Adapt to every task and evaluate on its query set (see ``MetaLearner.meta_batch``).

        ``plan.step_weights``: None (the query loss after the last step), or one weight per
        inner step: the loss is then Σ_s w_s · (query loss after step s + 1), MAML++'s
        multi-step loss; steps whose weight is 0 skip their query forward.
        """
        step_weights = plan.step_weights
        only_last = step_weights is None or not any(step_weights[:-1])
        # The one question of the fused path, asked once: the op's answer (a kernel, or None).
        fused = self.fused_kernel(plan, support_x, query_x, query_y) if only_last else None
        # The fused CPU kernel validates in its own loops (no dispatch, no sync): the NaN/Inf
        # checks here would cost more than the meta-step itself at W1's size.
        kernel_validates = fused is not None and support_x.device.type == "cpu"
        # The general path checks its inputs and every loss for NaN/Inf in one sync at the end
        # (FiniteChecks); the fused path checks its inputs here.
        finite_checks = FiniteChecks() if plan.validate and fused is None and (
            plan.task_chunk is None or plan.task_chunk >= support_x.size(0)) else None
        self.check_tasks(plan.validate and not kernel_validates, finite_checks, support_x=support_x,
                         support_y=support_y, query_x=query_x, query_y=query_y)
        self.check_nograd(plan.allow_nograd)
        T = support_x.size(0)
        if fused is not None:
            out = self._fused_mlp_meta_batch(fused, support_x, support_y, query_x, query_y, plan)
            if step_weights is None:
                return out
            w = step_weights[-1]
            return MetaBatchOutput(out.loss * w, out.task_loss * w, out.accuracy)
        task_chunk = plan.task_chunk
        if task_chunk is None or task_chunk >= T:
            task_losses, accuracy = self._adapt_and_evaluate(support_x, support_y, query_x, query_y, plan,
                                                             finite_checks)
            if finite_checks is not None:
                finite_checks.check()
        else:
            parts = [
                self._adapt_and_evaluate_checkpointed(
                    support_x[i : i + task_chunk], support_y[i : i + task_chunk],
                    query_x[i : i + task_chunk], query_y[i : i + task_chunk], plan,
                )
                for i in range(0, T, task_chunk)
            ]
            task_losses = torch.cat([p[0] for p in parts])
            accuracy = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return MetaBatchOutput(task_losses.mean(), task_losses, accuracy)

    def _adapt_and_evaluate(self, support_x, support_y, query_x, query_y, plan: AdaptationPlan,
                            finite_checks: "FiniteChecks | None" = None):
        """(query task losses ``[T]``, accuracy ``[T]`` or None) after the inner loop;
        with ``plan.step_weights``, the losses are the weighted sums over the steps and the
        accuracy is the last step's. The losses' NaN/Inf checks: at once, or added to
        ``finite_checks``."""
        theta = self.pack()
        steps, step_weights = plan.steps, plan.step_weights
        task_losses = accuracy = None
        for state, fast in enumerate(self.inner_states(theta, support_x, support_y, plan, finite_checks,
                                                       per_segment=True), 1):
            weight = (1.0 if state == steps else 0.0) if step_weights is None else step_weights[state - 1]
            if state < steps and weight == 0:
                continue
            with torch.profiler.record_function("fastmeta.query"):
                pred = self.run(query_x, self.weights(theta, fast, plan.adapting), "query_x")
                if state == steps:  # the last query: its accuracy too, from the loss's pass where it can
                    losses, accuracy = self.query_losses_and_accuracy(plan, pred, query_y,
                                                                      check_range=task_losses is None)
                else:
                    losses = self.task_losses(plan, pred, query_y, "query", check_range=task_losses is None)
            if finite_checks is not None:
                finite_checks.add_losses("query", losses)
            else:
                check_finite_losses(losses, "query", plan.validate)
            if step_weights is not None:
                losses = losses * weight
            task_losses = losses if task_losses is None else task_losses + losses
        return task_losses, accuracy

    def _adapt_and_evaluate_checkpointed(self, *args):
        """One chunk of tasks whose graph is recomputed in the backward, not kept.

        Non-reentrant checkpointing keeps only the chunk's inputs; the backward reruns
        the chunk (inner loop included: autograd.grad inside a non-reentrant region is
        supported) one chunk at a time, so peak memory is one chunk's graph.
        """
        if not torch.is_grad_enabled():
            return self._adapt_and_evaluate(*args)
        return torch.utils.checkpoint.checkpoint(self._adapt_and_evaluate, *args, use_reentrant=False)

    # -- the fused small-MLP meta-step ---------------------------------------------------

    def fused_kernel(self, plan: AdaptationPlan, support_x: Tensor, query_x: Tensor, query_y: Tensor):
        """The fused ``mlp_meta_step`` kernel that runs this whole meta-batch in one call, or
        None (the general path).

        The engine knows the model's side (a plain MLP, a built-in loss, every parameter
        adapting, no learner-set values); whether a backend's kernel takes the shapes is
        the op's one rule (:func:`fastmeta.ops.mlp_meta_step.choose_fused_kernel`), asked
        here once per call. The engine never takes the fused path only to have its kernel
        decline: the op's reference is no faster than the general path.
        """
        if self.mlp is None or callable(plan.loss) or not all(plan.adapting):
            return None
        # Asked before the entry checks: arguments they will refuse take the general path there.
        if not all(isinstance(t, Tensor) and t.layout == torch.strided for t in (support_x, query_x, query_y)):
            return None
        if support_x.dim() != 3 or query_x.dim() != 3 or query_y.dim() < 2:
            return None
        if plan.set_per_step is not None:
            return None
        layer_sizes, act, _ = self.mlp
        return choose_fused_kernel(layer_sizes, act, self.loss_kind(plan.loss, query_y), support_x.device,
                                   support_x.dtype, support_x.size(1), query_x.size(1), plan.steps)

    def fused_rates(self, plan: AdaptationPlan, like: Tensor) -> Tensor:
        """Every inner step's rule as one rate tensor: ``[steps]``, ``[steps, S]`` or ``[steps, P]``.

        Constant rules (MAML's fixed rate) are stacked once and kept (keyed on the rate
        tensors and their versions): a stack per iteration is one more dispatch.
        """
        rules = [self.step_rule(plan, s, like) for s in range(plan.steps)]
        constant = all(not t.requires_grad for r in rules for t in r if isinstance(t, Tensor))
        if constant:
            key = tuple((id(t), t._version) for r in rules for t in r if isinstance(t, Tensor))
            cached = self.__dict__.get("_constant_rates")
            if cached is not None and cached[0] == key:
                return cached[1]
            rates = self._stack_rates(rules)
            self._constant_rates = (key, rates, rules)  # the rules keep the keyed tensors alive
            return rates
        return self._stack_rates(rules)

    def _stack_rates(self, rules: list[StepRule]) -> Tensor:
        plain = all(r.mask is None and r.precond is None for r in rules)
        if plain and (all(r.lr.dim() == 0 for r in rules) or all(r.segments is not None for r in rules)):
            return torch.stack([r.lr for r in rules])  # [steps] or [steps, S]
        P = self.layout.numel
        return torch.stack([r.coefficient.expand(P) for r in rules])

    def _fused_targets(self, plan: AdaptationPlan, x: Tensor, y: Tensor, which: str) -> Tensor:
        layer_sizes = self.mlp[0]
        kind = self.loss_kind(plan.loss, y)
        # The label range is checked by the CPU kernel in its own loops; elsewhere here (a sync).
        validate = plan.validate and x.device.type != "cpu"
        return loss_targets(kind, y, [x.size(0), x.size(1), layer_sizes[-1]], self.params[0].dtype, which, validate)

    def _fused_mlp_meta_batch(self, kernel, support_x, support_y, query_x, query_y,
                              plan: AdaptationPlan) -> MetaBatchOutput:
        layer_sizes, act, slope = self.mlp
        like = self.params[0]
        kind = self.loss_kind(plan.loss, query_y)
        on_cpu = support_x.device.type == "cpu"
        support_y = self._fused_targets(plan, support_x, support_y, "support")
        query_y = self._fused_targets(plan, query_x, query_y, "query")
        with torch.profiler.record_function("fastmeta.mlp_meta_step"):
            mean, task_losses, pred = mlp_meta_step_mean(
                self.params, layer_sizes, act, slope, support_x, support_y, query_x, query_y,
                kind, self.fused_rates(plan, like), plan.steps, plan.first_order,
                validate=plan.validate and on_cpu, kernel=kernel,
            )
        if not on_cpu:
            check_finite_losses(task_losses, "query", plan.validate)
        accuracy = None
        if kind == "cross_entropy":
            accuracy = task_accuracy(pred, query_y)
        return MetaBatchOutput(mean, task_losses, accuracy)

    # -- whole-step execution on the CPU ------------------------------------------------

    def fused_update_step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[Tensor],
                          inputs: tuple[Tensor, Tensor, Tensor, Tensor], plan: AdaptationPlan) -> FusedMLPStep:
        """A :class:`FusedMLPStep` for this model: the meta-iteration and the optimizer's
        update of a plain MLP in one op per call (see that class). Checks the meta-batch
        given here once (shapes always; NaN/Inf under ``plan.validate``)."""
        support_x, support_y, query_x, query_y = inputs
        self.check_tasks(plan.validate, support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)
        if support_x.device.type != "cpu":
            raise ValueError("the fused whole step runs on the CPU; on a GPU, capture a CUDA graph")
        if self.fused_kernel(plan, support_x, query_x, query_y) is None:
            raise ValueError(
                "whole-step execution on the CPU runs a plain MLP (an nn.Sequential of biased Linear layers with "
                "one ReLU/LeakyReLU/Tanh kind between them), every parameter adapting, a built-in loss and a "
                "backend with the fused kernel; for this model use meta_batch, loss.backward() and the optimizer")
        layer_sizes, act, slope = self.mlp
        like = self.params[0]
        rates = self.fused_rates(plan, like)
        if rates.requires_grad:
            raise ValueError("whole-step execution on the CPU takes fixed inner rates (MAML); learned rates "
                             "train through meta_batch")
        if {id(p) for p in parameters} != {id(p) for p in self.params}:
            raise ValueError("whole-step execution on the CPU trains the model's own parameters only")
        kind = self.loss_kind(plan.loss, query_y)
        steps, first_order = plan.steps, plan.first_order
        targets = self._fused_targets

        def run(params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, sx, sy, qx, qy,
                adam_lr, beta1, beta2, weight_decay, eps):
            return mlp_meta_step_update(
                params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, layer_sizes, act, slope,
                sx, targets(plan, sx, sy, "support"), qx, targets(plan, qx, qy, "query"), kind, rates, steps,
                first_order, adam_lr, beta1, beta2, weight_decay, eps)

        return FusedMLPStep(run, self.params, optimizer, inputs)

    # -- adapted weights -----------------------------------------------------------------

    def fast_weights(self, support_x: Tensor, support_y: Tensor, plan: AdaptationPlan) -> TaskWeights:
        """The adapted weights of every task after ``plan.steps`` (>= 0) inner steps: a
        :class:`TaskWeights` over ``[T, P]``."""
        self.check_tasks(plan.validate, support_x=support_x, support_y=support_y)
        self.check_nograd(plan.allow_nograd)
        theta = self.pack()
        if plan.steps == 0:
            buffer = theta.expand(support_x.size(0), -1).clone()
        else:
            buffer = self.inner_loop(theta, support_x, support_y, plan)
        return TaskWeights(buffer, self.layout)

    def predict(self, fast: TaskWeights, query_x: Tensor, plan: AdaptationPlan) -> Tensor:
        """The model's outputs for each task's inputs under its fast weights."""
        if not isinstance(fast, TaskWeights):
            raise TypeError(f"fast must be TaskWeights (from fast_weights), got {type(fast).__name__}")
        self.check_tasks(plan.validate, query_x=query_x)
        if fast.layout != self.layout:
            raise ValueError("fast was made for a different model layout")
        if fast.num_tasks != query_x.size(0):
            raise ValueError(f"fast holds {fast.num_tasks} tasks but query_x has {query_x.size(0)}")
        return self.run(query_x, self.weights(self.pack(), fast.buffer, plan.adapting), "query_x")


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call (a dispatch) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def loss_targets(kind: str, target: Tensor, output_shape: list[int], dtype: torch.dtype, which: str,
                 validate: bool) -> Tensor:
    """The one coercion of targets for a built-in loss: integer labels in
    ``[0, classes)`` as int64 for ``"cross_entropy"`` (the range, a sync, under
    ``validate``); float targets reshaped to the model's outputs ``output_shape`` in
    ``dtype`` for ``"mse"``."""
    if kind == "cross_entropy":
        check_labels(target, output_shape[-1], which, validate)
        return _as_dtype(target, torch.long)
    if list(target.shape) != output_shape:
        if target.numel() != math.prod(output_shape):
            raise ValueError(f"{which}_y {list(target.shape)} does not match the model's outputs {output_shape}")
        target = target.reshape(output_shape)
    return _as_dtype(target, dtype)


def check_labels(target: Tensor, classes: int, which: str, validate: bool) -> None:
    """Integer labels in [0, classes); the range check syncs, so only under validate."""
    if target.is_floating_point():
        raise TypeError(f"{which} labels must be integers for cross-entropy, got {target.dtype}")
    # Two ops and a sync (a label clamped into range changes iff it is out of range;
    # torch.equal reads the comparison on the host itself); the failing task is looked for
    # only on failure.
    if validate and not torch.equal(target.clamp(0, classes - 1), target):
        t = int(((target < 0) | (target >= classes)).flatten(1).any(1).nonzero()[0])
        raise ValueError(
            f"{which} labels out of range for the model's {classes} outputs "
            f"(task {t} has labels {target[t].unique().tolist()})"
        )


def check_step_weights(step_weights: Sequence[float] | None, steps: int) -> tuple[float, ...] | None:
    """``step_weights`` checked: None, or ``steps`` finite non-negative numbers, not all 0."""
    if step_weights is None:
        return None
    if isinstance(step_weights, Tensor):
        step_weights = step_weights.tolist()
    try:
        weights = tuple(float(w) for w in step_weights)
    except (TypeError, ValueError):
        raise TypeError(f"step_weights must be a sequence of {steps} numbers, got {step_weights!r}") from None
    if len(weights) != steps:
        raise ValueError(f"step_weights must hold one weight per inner step ({steps}), got {len(weights)}")
    if not all(w >= 0 and w != float("inf") for w in weights) or not any(weights):
        raise ValueError(f"step_weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return weights


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or ±Inf: one op and one host read. Its largest magnitude
    (the ∞-norm) is NaN where t holds a NaN (the max reduction propagates it), ∞ where it
    holds ±Inf, and finite otherwise."""
    return t.numel() == 0 or math.isfinite(float(torch.linalg.vector_norm(t.detach(), float("inf"))))


def raise_non_finite_input(name: str, t: Tensor) -> None:
    bad = ~torch.isfinite(t.detach().flatten(1)).all(1)
    raise FloatingPointError(f"{name} has NaN or Inf in task {int(bad.nonzero()[0])}")


def raise_non_finite_losses(losses: Tensor, which: str) -> None:
    t = int((~torch.isfinite(losses.detach())).nonzero()[0])
    raise FloatingPointError(f"the {which} loss of task {t} is {float(losses[t].detach())}")


def check_finite_losses(losses: Tensor, which: str, validate: bool) -> None:
    if validate and not all_finite(losses):  # one op and a sync
        raise_non_finite_losses(losses, which)


class FiniteChecks:
    """The NaN/Inf checks of one ``meta_batch`` call, taken together: the inputs and every
    support and query loss, in the order the call meets them, checked by :meth:`check` in
    three ops and one host sync (``_foreach_norm`` of their 2-norms, a ``stack``, a ``max``;
    NaN propagates through both reductions, ±Inf gives ∞), where checking each at once cost
    one op and one sync apiece (W4: 8 and 8). The 2-norm is a filter: a tensor holding NaN
    or ±Inf always has a non-finite one, and finite tensors whose squares overflow (values
    beyond ~1e19 in float32) get ∞ too, which sends the check to the exact one below (the
    ∞-norm of each in turn), so a large finite input is never reported. Not the ∞-norm
    itself: on the CPU torch's ∞-norm reduction is ~30× slower than its 2-norm (996 against
    29 µs for W2-sized inputs, one thread; 1 ms of OmniglotFC's 22 ms iteration). On
    failure the first non-finite one, in that order, is named as the check at once would
    have named it: an input with NaN makes every loss NaN, and it is the input that is
    reported. Nothing a caller sees changes between
    the losses and the check: the call raises before it returns."""

    def __init__(self):
        self._items: list[tuple[str, str, Tensor]] = []  # (kind, name or which, tensor)

    def add_input(self, name: str, t: Tensor) -> None:
        self._items.append(("input", name, t.detach()))

    def add_losses(self, which: str, losses: Tensor) -> None:
        self._items.append(("losses", which, losses.detach()))

    def check(self) -> None:
        items = [item for item in self._items if item[2].numel()]
        self._items = []
        if not items:
            return
        tensors = [t for _, _, t in items]
        if len({t.dtype for t in tensors}) == 1 and len({t.device for t in tensors}) == 1:
            norms = torch._foreach_norm(tensors, 2.0)
            if math.isfinite(float(torch.stack(norms).max())):
                return
        for kind, name, t in items:  # the failure (or mixed dtypes): the first non-finite one
            if not all_finite(t):
                if kind == "input":
                    raise_non_finite_input(name, t)
                raise_non_finite_losses(t, name)


__all__ = [
    "AdaptationPlan", "LossSpec", "MetaBatchOutput", "MetaIteration", "StepRule", "check_labels",
    "FiniteChecks", "all_finite", "check_finite_losses", "check_loss_spec", "check_step_weights", "loss_targets",
]
