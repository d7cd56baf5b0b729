"""The meta-iteration: every task's inner loop, the query loss, chunking and the fused path.

A :class:`MetaIteration` holds what it needs of a model (its parameters packed into a flat
θ ``[P]``, the traced program, and the plain-MLP structure when there is one) and runs
the meta-iteration for all tasks at once: each inner step is one fused ``inner_step``
over the ``[T, P]`` buffer. The learners (:mod:`fastmeta.learners`) own the
hyperparameters and the step rule and call this; only the engine calls the ops.

What a learner supplies, as an :class:`AdaptationRule`:

- ``step_rule(step, like)``: the :class:`StepRule` of inner step ``step`` (rate, gate
  mask, preconditioner, segment ids; and the parameters the learner sets itself at the
  state the step leads to, e.g. MAML++'s per-step BatchNorm weights);
- ``adapting()``: per parameter segment, whether it takes inner steps.

``meta_batch`` also takes the training schedules' per-call arguments: ``step_weights``
(the multi-step loss: query losses after every inner step, weighted) and ``first_order``.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn

from fastmeta.engine.program import plain_mlp_structure, trace
from fastmeta.engine.task_weights import Layout, TaskWeights
from fastmeta.engine.types import MetaBatchOutput
from fastmeta.engine.whole_step import FusedMLPStep
from fastmeta.ops import LOSS_KINDS, inner_step, task_loss
from fastmeta.ops.inner_step import step_coefficient
from fastmeta.ops.mlp_meta_step import (
    bind_mlp_meta_step_update,
    fused_kernel_takes,
    mlp_meta_step_mean,
)

LossSpec = str | Callable[[Tensor, Tensor], Tensor] | None


class StepRule(NamedTuple):
    """Inner step s, from weight state s (after s steps) to state s + 1.

    lr, mask, precond, segments: the arguments of ``inner_step`` besides θ and g.
    set_values: None, or (index int64 ``[n]``, values ``[n]``): parameters whose value at
    state s + 1 the learner sets itself, the same for every task, in place of the step
    (their support gradient is discarded). MAML++'s per-step BatchNorm weights are these.
    """

    lr: Tensor
    mask: Tensor | None
    precond: Tensor | None
    segments: Tensor | None
    set_values: tuple[Tensor, Tensor] | None = None

    @property
    def coefficient(self) -> Tensor:
        """lr · mask · precond, broadcastable against ``[T, P]``."""
        return step_coefficient(self.lr, self.mask, self.precond, self.segments)


class AdaptationRule(Protocol):
    def step_rule(self, step: int, like: Tensor) -> StepRule: ...

    def adapting(self) -> list[bool]: ...


def check_loss_spec(loss: LossSpec) -> LossSpec:
    """The ``loss`` argument of a learner, checked: a kind, a callable or None."""
    if isinstance(loss, str) and loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, a callable or None, got {loss!r}")
    if loss is not None and not isinstance(loss, str) and not callable(loss):
        raise TypeError(f"loss must be one of {LOSS_KINDS}, a callable or None, got {loss!r}")
    return loss


class MetaIteration:
    """The engine of one model: its layout, its program, and the meta-iteration over it."""

    def __init__(self, model: nn.Module, loss: LossSpec):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to adapt")
        self.model = model
        self.loss = check_loss_spec(loss)
        self.layout = Layout.of_module(model)
        self.program = trace(model, self.layout, defer_warning=True)
        self.mlp = plain_mlp_structure(model)
        self.params = [p for _, p in model.named_parameters()]
        self._examples_run: set[tuple[int, ...]] = set()  # example shapes the program ran on

    # -- model and buffer ------------------------------------------------------------

    def refresh(self) -> None:
        """Re-trace if the model's parameters were replaced (not just updated in place).

        Every public entry point calls this first; the methods below then use the
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

    def weights(self, theta: Tensor, fast: Tensor | None, adapting: Sequence[bool]) -> list[Tensor]:
        """Per segment: the task's fast weights if it adapts, else θ's shared view.

        Reading non-adapting segments from θ keeps their weight-gradient work out of the
        inner loop (autograd is asked for the gradient of ``fast`` only), and runs their
        layers with shared weights: one GEMM for all tasks.
        """
        shared = self.layout.views(theta)
        if fast is None:
            return shared
        per_task = self.layout.views(fast)
        return [pt if a else s for pt, s, a in zip(per_task, shared, adapting)]

    def segment_coefficients(self, rule: StepRule) -> list[Tensor]:
        """Per segment, what multiplies its gradient in an inner step under ``rule``
        (lr · mask · precond), broadcastable to the segment's shape."""
        coefficient = rule.coefficient
        if coefficient.dim() == 0:
            return [coefficient] * len(self.layout)
        return self.layout.views(coefficient.expand(self.layout.numel))

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

    # -- checks --------------------------------------------------------------------------

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

    def check_tasks(self, validate: bool, **named: Tensor) -> None:
        """Checks at the public boundary, before any state changes."""
        reference = self.params[0]
        T = None
        for name, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
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
        if validate:
            for name, t in named.items():
                if t.is_floating_point():
                    bad = ~torch.isfinite(t.flatten(1)).all(1)
                    if bool(bad.any()):
                        raise FloatingPointError(
                            f"{name} has NaN or Inf in task {int(bad.nonzero()[0])}"
                        )

    # -- losses ------------------------------------------------------------------------

    def loss_kind(self, target: Tensor) -> str | None:
        if self.loss is None:
            return "mse" if target.is_floating_point() else "cross_entropy"
        return self.loss if isinstance(self.loss, str) else None

    def task_losses(self, pred: Tensor, target: Tensor, which: str, validate: bool) -> Tensor:
        """``[T]`` losses of predictions ``[T, N, ...]`` against targets."""
        kind = self.loss_kind(target)
        T = target.size(0)
        if kind is None:
            losses = self.loss(pred, target)
            if not isinstance(losses, Tensor) or losses.shape != (T,):
                raise ValueError(
                    f"the loss callable must return per-task losses of shape [{T}], got "
                    f"{getattr(losses, 'shape', type(losses).__name__)}"
                )
            return losses
        if kind == "cross_entropy":
            if pred.dim() != 3:
                raise ValueError(
                    f"cross-entropy needs model outputs [T, N, classes], got {list(pred.shape)}"
                )
            check_labels(target, pred.size(-1), which, validate)
            return task_loss(pred, target.long(), "cross_entropy")
        if pred.shape != target.shape:
            if pred.numel() == target.numel():
                target = target.reshape(pred.shape)
            else:
                raise ValueError(
                    f"{which} targets {list(target.shape)} do not match the model's outputs "
                    f"{list(pred.shape)}"
                )
        return task_loss(pred, target.to(pred.dtype), "mse")

    # -- the inner loop ----------------------------------------------------------------

    def inner_loop(
        self, theta: Tensor, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool,
        rule: AdaptationRule, allow_unused: bool, validate: bool,
    ) -> Tensor:
        """Fast weights ``[T, P]`` after ``steps`` (>= 1) inner steps from θ."""
        fast = None
        for fast in self.inner_states(theta, support_x, support_y, steps, first_order, rule, allow_unused, validate):
            pass
        return fast

    def inner_states(
        self, theta: Tensor, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool,
        rule: AdaptationRule, allow_unused: bool, validate: bool,
    ) -> Iterator[Tensor]:
        """The fast weights ``[T, P]`` after each of ``steps`` inner steps from θ, in turn."""
        T, P = support_x.size(0), theta.numel()
        adapting = rule.adapting()
        self.check_unused(adapting, allow_unused)
        create_graph = not first_order and torch.is_grad_enabled()
        fast = None
        for step in range(steps):
            with torch.profiler.record_function(f"fastmeta.inner_step{step}"):
                with torch.enable_grad():
                    src = theta.expand(T, P) if fast is None else fast
                    if not src.requires_grad:  # evaluation under no_grad: a leaf to differentiate
                        src = src.detach().requires_grad_(True)
                    pred = self.run(support_x, self.weights(theta, src, adapting), "support_x")
                    losses = self.task_losses(pred, support_y, "support", validate)
                    check_finite_losses(losses, "support", validate)
                    (grad,) = torch.autograd.grad(
                        losses.sum(), src, create_graph=create_graph, allow_unused=True
                    )
                if grad is None:
                    grad = torch.zeros_like(src)
                elif not create_graph:
                    grad = grad.detach()
                fast = self.take_inner_step(theta if fast is None else fast, grad, rule.step_rule(step, theta))
            yield fast

    # -- the meta-iteration ----------------------------------------------------------------

    def meta_batch(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *,
        rule: AdaptationRule, steps: int, first_order: bool, task_chunk: int | None,
        allow_unused: bool, allow_nograd: bool, validate: bool, step_weights: Sequence[float] | None = None,
    ) -> MetaBatchOutput:
        """Adapt to every task and evaluate on its query set (see ``MetaLearner.meta_batch``).

        step_weights: None (the query loss after the last step), or one weight per inner
        step: the loss is then Σ_s w_s · (query loss after step s + 1), MAML++'s multi-step
        loss; steps whose weight is 0 skip their query forward.
        """
        step_weights = check_step_weights(step_weights, steps)
        self.refresh()
        # The fused path validates in the CPU kernel's own loops (no dispatch, no sync): the
        # NaN/Inf checks here would cost more than the meta-step itself at W1's size.
        fused = self.fused_mlp_applies(support_x, query_x, query_y, rule, steps)
        kernel_validates = fused and support_x.device.type == "cpu"
        self.check_tasks(validate and not kernel_validates, support_x=support_x, support_y=support_y,
                         query_x=query_x, query_y=query_y)
        self.check_nograd(allow_nograd)
        T = support_x.size(0)
        args = (rule, steps, first_order, allow_unused, validate)
        only_last = step_weights is None or not any(step_weights[:-1])
        if fused and only_last:
            out = self._fused_mlp_meta_batch(support_x, support_y, query_x, query_y, *args)
            if step_weights is None:
                return out
            w = step_weights[-1]
            return MetaBatchOutput(out.loss * w, out.task_loss * w, out.accuracy)
        if task_chunk is None or task_chunk >= T:
            task_losses, accuracy = self._adapt_and_evaluate(support_x, support_y, query_x, query_y, *args,
                                                             step_weights)
        else:
            parts = [
                self._adapt_and_evaluate_checkpointed(
                    support_x[i : i + task_chunk], support_y[i : i + task_chunk],
                    query_x[i : i + task_chunk], query_y[i : i + task_chunk], *args, step_weights,
                )
                for i in range(0, T, task_chunk)
            ]
            task_losses = torch.cat([p[0] for p in parts])
            accuracy = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return MetaBatchOutput(task_losses.mean(), task_losses, accuracy)

    def _adapt_and_evaluate(self, support_x, support_y, query_x, query_y, rule, steps, first_order, allow_unused,
                            validate, step_weights=None):
        """(query task losses ``[T]``, accuracy ``[T]`` or None) after the inner loop;
        with ``step_weights``, the losses are the weighted sums over the steps and the
        accuracy is the last step's."""
        theta = self.pack()
        adapting = rule.adapting()
        task_losses = None
        states = self.inner_states(theta, support_x, support_y, steps, first_order, rule, allow_unused, validate)
        for state, fast in enumerate(states, 1):
            weight = (1.0 if state == steps else 0.0) if step_weights is None else step_weights[state - 1]
            if state < steps and weight == 0:
                continue
            with torch.profiler.record_function("fastmeta.query"):
                pred = self.run(query_x, self.weights(theta, fast, adapting), "query_x")
                losses = self.task_losses(pred, query_y, "query", validate)
            check_finite_losses(losses, "query", validate)
            if step_weights is not None:
                losses = losses * weight
            task_losses = losses if task_losses is None else task_losses + losses
        accuracy = None
        if not query_y.is_floating_point() and pred.dim() == 3:
            with torch.no_grad():
                accuracy = (pred.argmax(-1) == query_y).to(pred.dtype).mean(1)
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

    def fused_mlp_applies(self, support_x: Tensor, query_x: Tensor, query_y: Tensor, rule: AdaptationRule,
                          steps: int) -> bool:
        """Whether the whole meta-batch runs as one ``mlp_meta_step`` call on a fused kernel.

        It needs a plain MLP, a built-in loss and every parameter adapting; whether a
        backend's kernel takes the shapes is the op's own answer (``fused_kernel_takes``),
        so that the engine never picks the fused op only to have its kernel decline (the
        op's reference is no faster than the general path).
        """
        if self.mlp is None or callable(self.loss) or support_x.dim() != 3:
            return False
        if not all(rule.adapting()):
            return False
        layer_sizes, act, _ = self.mlp
        return fused_kernel_takes(layer_sizes, act, self.loss_kind(query_y), support_x.device, support_x.dtype,
                                  support_x.size(1), query_x.size(1), steps)

    def fused_rates(self, rule: AdaptationRule, steps: int, like: Tensor) -> Tensor:
        """Every inner step's rule as one rate tensor: ``[steps]``, ``[steps, S]`` or ``[steps, P]``.

        Constant rules (MAML's fixed rate) are stacked once and kept (keyed on the rate
        tensors and their versions): a stack per iteration is one more dispatch.
        """
        rules = [rule.step_rule(s, like) for s in range(steps)]
        if any(r.set_values is not None for r in rules):
            raise ValueError("the fused MLP meta-step has no learner-set values (set_values)")
        constant = all(not t.requires_grad for r in rules for t in r if isinstance(t, Tensor))
        if constant:
            key = tuple((id(t), t._version) for r in rules for t in r if isinstance(t, Tensor))
            cached = self.__dict__.get("_constant_rates")
            if cached is not None and cached[0] == key:
                return cached[1]
            rates = self._stack_rates(rules, steps)
            self._constant_rates = (key, rates, rules)  # the rules keep the keyed tensors alive
            return rates
        return self._stack_rates(rules, steps)

    def _stack_rates(self, rules: list[StepRule], steps: int) -> Tensor:
        plain = all(r.mask is None and r.precond is None for r in rules)
        if plain and (all(r.lr.dim() == 0 for r in rules) or all(r.segments is not None for r in rules)):
            return torch.stack([r.lr for r in rules])  # [steps] or [steps, S]
        P = self.layout.numel
        return torch.stack([r.coefficient.expand(P) for r in rules])

    def _fused_mlp_meta_batch(self, support_x, support_y, query_x, query_y, rule, steps, first_order, allow_unused,
                              validate) -> MetaBatchOutput:
        layer_sizes, act, slope = self.mlp
        like = self.params[0]
        kind = self.loss_kind(query_y)
        on_cpu = support_x.device.type == "cpu"
        if kind == "cross_entropy":
            for name, y in (("support", support_y), ("query", query_y)):
                # The dtype always; the range (a sync) only off the CPU: the CPU kernel checks it.
                check_labels(y, layer_sizes[-1], name, validate and not on_cpu)
            support_y, query_y = _as_dtype(support_y, torch.long), _as_dtype(query_y, torch.long)
        else:
            out = layer_sizes[-1]
            for name, x, y in (("support", support_x, support_y), ("query", query_x, query_y)):
                if y.numel() != x.size(0) * x.size(1) * out:
                    raise ValueError(
                        f"{name} targets {list(y.shape)} do not match the model's outputs "
                        f"{[x.size(0), x.size(1), out]}"
                    )
            support_y = _as_dtype(support_y.reshape(support_x.size(0), support_x.size(1), out), like.dtype)
            query_y = _as_dtype(query_y.reshape(query_x.size(0), query_x.size(1), out), like.dtype)
        with torch.profiler.record_function("fastmeta.mlp_meta_step"):
            mean, task_losses, pred = mlp_meta_step_mean(
                self.params, layer_sizes, act, slope, support_x, support_y, query_x, query_y,
                kind, self.fused_rates(rule, steps, like), steps, first_order, validate=validate and on_cpu,
            )
        if not on_cpu:
            check_finite_losses(task_losses, "query", validate)
        accuracy = None
        if kind == "cross_entropy":
            accuracy = (pred.argmax(-1) == query_y).to(pred.dtype).mean(1)
        return MetaBatchOutput(mean, task_losses, accuracy)

    # -- whole-step execution on the CPU ------------------------------------------------

    def fused_update_step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[Tensor],
                          inputs: tuple[Tensor, Tensor, Tensor, Tensor], *, rule: AdaptationRule, steps: int,
                          first_order: bool, validate: bool) -> FusedMLPStep:
        """A :class:`FusedMLPStep` for this model: the meta-iteration and the optimizer's
        update of a plain MLP in one op per call (see that class). Checks the meta-batch
        given here once (shapes always; NaN/Inf under ``validate``)."""
        self.refresh()
        support_x, support_y, query_x, query_y = inputs
        self.check_tasks(validate, support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)
        if support_x.device.type != "cpu":
            raise ValueError("the fused whole step runs on the CPU; on a GPU, capture a CUDA graph")
        if not self.fused_mlp_applies(support_x, query_x, query_y, rule, steps):
            raise ValueError(
                "whole-step execution on the CPU runs a plain MLP (an nn.Sequential of biased Linear layers with "
                "one ReLU/LeakyReLU/Tanh kind between them), every parameter adapting, a built-in loss and a "
                "backend with the fused kernel; for this model use meta_batch, loss.backward() and the optimizer")
        layer_sizes, act, slope = self.mlp
        like = self.params[0]
        rates = self.fused_rates(rule, steps, like)
        if rates.requires_grad:
            raise ValueError("whole-step execution on the CPU takes fixed inner rates (MAML); learned rates "
                             "train through meta_batch")
        if {id(p) for p in parameters} != {id(p) for p in self.params}:
            raise ValueError("whole-step execution on the CPU trains the model's own parameters only")
        kind = self.loss_kind(query_y)
        out = layer_sizes[-1]

        def targets(x: Tensor, y: Tensor, name: str) -> Tensor:
            if kind == "cross_entropy":
                check_labels(y, out, name, False)  # the kernel checks the range
                return _as_dtype(y, torch.long)
            if y.numel() != x.size(0) * x.size(1) * out:
                raise ValueError(f"{name} targets {list(y.shape)} do not match the model's outputs "
                                 f"{[x.size(0), x.size(1), out]}")
            return _as_dtype(y.reshape(x.size(0), x.size(1), out), like.dtype)

        update = bind_mlp_meta_step_update(support_x.device.type)

        def run(params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, sx, sy, qx, qy,
                adam_lr, beta1, beta2, weight_decay, eps):
            return update(
                params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, layer_sizes, act, slope,
                sx, targets(sx, sy, "support"), qx, targets(qx, qy, "query"), kind, rates, steps, first_order,
                adam_lr, beta1, beta2, weight_decay, eps)

        return FusedMLPStep(run, self.params, optimizer, inputs)

    # -- adapted weights -----------------------------------------------------------------

    def fast_weights(self, support_x: Tensor, support_y: Tensor, *, rule: AdaptationRule, steps: int,
                     first_order: bool, allow_unused: bool, allow_nograd: bool, validate: bool) -> TaskWeights:
        """The adapted weights of every task: a :class:`TaskWeights` over ``[T, P]``."""
        self.refresh()
        self.check_tasks(validate, support_x=support_x, support_y=support_y)
        self.check_nograd(allow_nograd)
        theta = self.pack()
        if steps == 0:
            buffer = theta.expand(support_x.size(0), -1).clone()
        else:
            buffer = self.inner_loop(theta, support_x, support_y, steps, first_order, rule, allow_unused, validate)
        return TaskWeights(buffer, self.layout)

    def predict(self, fast: TaskWeights, query_x: Tensor, *, rule: AdaptationRule, validate: bool) -> Tensor:
        """The model's outputs for each task's inputs under its fast weights."""
        if not isinstance(fast, TaskWeights):
            raise TypeError(f"fast must be TaskWeights (from fast_weights), got {type(fast).__name__}")
        self.refresh()
        self.check_tasks(validate, query_x=query_x)
        if fast.layout != self.layout:
            raise ValueError("fast was made for a different model layout")
        if fast.num_tasks != query_x.size(0):
            raise ValueError(f"fast holds {fast.num_tasks} tasks but query_x has {query_x.size(0)}")
        return self.run(query_x, self.weights(self.pack(), fast.buffer, rule.adapting()), "query_x")


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call (a dispatch) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def check_labels(target: Tensor, classes: int, which: str, validate: bool) -> None:
    """Integer labels in [0, classes); the range check syncs, so only under validate."""
    if target.is_floating_point():
        raise TypeError(f"{which} labels must be integers for cross-entropy, got {target.dtype}")
    if validate:
        bad = (target < 0) | (target >= classes)
        if bool(bad.any()):
            t = int(bad.flatten(1).any(1).nonzero()[0])
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


def check_finite_losses(losses: Tensor, which: str, validate: bool) -> None:
    if validate:
        bad = ~torch.isfinite(losses.detach())
        if bool(bad.any()):
            t = int(bad.nonzero()[0])
            raise FloatingPointError(f"the {which} loss of task {t} is {float(losses[t].detach())}")


__all__ = [
    "AdaptationRule", "LossSpec", "MetaBatchOutput", "MetaIteration", "StepRule", "check_labels",
    "check_finite_losses", "check_loss_spec", "check_step_weights",
]
