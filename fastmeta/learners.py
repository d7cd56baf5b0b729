"""The learners: MAML, ModelAwareMAML and MetaSGD.

They are thin: each packs the model's parameters into θ ``[P]``, runs the captured
program (:mod:`fastmeta.engine`) for all tasks at once, and takes each inner step with
one fused ``inner_step`` over the ``[T, P]`` buffer. What differs between them is only the
step rule: which rate, gate and preconditioner multiply the gradient.

Both learners also speak learn2learn's per-task API (``clone()`` / ``adapt()``), so that
existing training code switches by changing its import.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from fastmeta.backends import REFERENCE, kernel_for
from fastmeta.engine import Layout, TaskWeights, capture
from fastmeta.engine.capture import plain_mlp_structure
from fastmeta.ops import LOSS_KINDS, inner_step, mlp_meta_step, task_loss
from fastmeta.ops.inner_step import step_coefficient

LossSpec = str | Callable[[Tensor, Tensor], Tensor] | None


class MetaBatchOutput(NamedTuple):
    """What ``meta_batch`` returns.

    loss: the mean query loss, a scalar; ``loss.backward()`` gives the meta-gradient.
    task_loss: ``[T]`` query loss per task.
    accuracy: ``[T]`` query accuracy per task (classification), else None.
    """

    loss: Tensor
    task_loss: Tensor
    accuracy: Tensor | None


class StepRule(NamedTuple):
    """The arguments of one ``inner_step`` besides θ and g."""

    lr: Tensor
    mask: Tensor | None
    precond: Tensor | None
    segments: Tensor | None


def _check_positive_number(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_steps(name: str, steps, minimum: int = 1) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {steps}")
    return steps


class _MetaLearner(nn.Module):
    """What MAML and ModelAwareMAML share: the buffer, the program, the loops, the checks."""

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters to adapt")
        if isinstance(loss, str) and loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, a callable or None, got {loss!r}")
        if loss is not None and not isinstance(loss, str) and not callable(loss):
            raise TypeError(f"loss must be one of {LOSS_KINDS}, a callable or None, got {loss!r}")
        self.module = model
        self.lr = _check_positive_number("lr", lr)
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self.steps = _check_steps("steps", steps)
        self.loss = loss
        self.validate = bool(validate)
        self.task_chunk = None if task_chunk is None else _check_steps("task_chunk", task_chunk)
        self._layout = Layout.of_module(model)
        self._program = capture(model, self._layout)
        self._mlp = plain_mlp_structure(model)
        self._params = [p for _, p in model.named_parameters()]

    # -- model and buffer ------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """Run the wrapped model, as learn2learn's ``learner(x)`` does."""
        return self.module(*args, **kwargs)

    def _refresh_capture(self) -> None:
        """Re-capture if the model's parameters were replaced (not just updated in place).

        Every public entry point calls this first; the methods below then use the
        parameter list it keeps (walking ``named_parameters()`` once per call, not once
        per use, is a tenth of a small meta-step's time).
        """
        params = [p for _, p in self.module.named_parameters()]
        if len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)):
            self._layout = Layout.of_module(self.module)
            self._program = capture(self.module, self._layout)
            self._mlp = plain_mlp_structure(self.module)
        self._params = params

    @property
    def layout(self) -> Layout:
        return self._layout

    def _model_parameters(self) -> list[nn.Parameter]:
        return self._params

    def _pack(self) -> Tensor:
        return self._layout.pack(self._model_parameters())

    def _adapting(self) -> list[bool]:
        """Per segment: does it take inner steps?"""
        return [p.requires_grad for p in self._model_parameters()]

    def _weights(self, theta: Tensor, fast: Tensor | None, adapting: Sequence[bool]) -> list[Tensor]:
        """Per segment: the task's fast weights if it adapts, else θ's shared view.

        Reading non-adapting segments from θ keeps their weight-gradient work out of the
        inner loop (autograd is asked for the gradient of ``fast`` only), and runs their
        layers with shared weights: one GEMM for all tasks.
        """
        shared = self._layout.views(theta)
        if fast is None:
            return shared
        per_task = self._layout.views(fast)
        return [pt if a else s for pt, s, a in zip(per_task, shared, adapting)]

    def _check_nograd(self, allow_nograd: bool | None = None) -> None:
        if self.allow_nograd if allow_nograd is None else allow_nograd:
            return
        frozen = [s.name for s, p in zip(self._layout.segments, self._params) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"parameters {frozen} have requires_grad=False; pass allow_nograd=True to "
                "leave them unadapted (they are never changed)"
            )

    def _check_unused(self, adapting: Sequence[bool], allow_unused: bool | None = None) -> None:
        if self.allow_unused if allow_unused is None else allow_unused:
            return
        unused = [
            s.name
            for k, (s, a) in enumerate(zip(self._layout.segments, adapting))
            if a and k not in self._program.reads
        ]
        if unused:
            raise ValueError(
                f"parameters {unused} are not used by the model's forward; pass "
                "allow_unused=True to adapt the others"
            )

    # -- step rule (overridden by ModelAwareMAML) -------------------------------------

    def _step_rule(self, step: int, like: Tensor) -> StepRule:
        return StepRule(self._constant_lr(like), None, None, None)

    def _constant_lr(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        cache = self.__dict__.setdefault("_lr_tensors", {})
        if key not in cache:
            cache[key] = torch.tensor(self.lr, dtype=like.dtype, device=like.device)
        return cache[key]

    # -- loss --------------------------------------------------------------------------

    def _loss_kind(self, target: Tensor) -> str | None:
        if self.loss is None:
            return "mse" if target.is_floating_point() else "cross_entropy"
        return self.loss if isinstance(self.loss, str) else None

    def _task_losses(self, pred: Tensor, target: Tensor, which: str) -> Tensor:
        kind = self._loss_kind(target)
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
            self._check_labels(target, pred.size(-1), which)
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

    def _check_labels(self, target: Tensor, classes: int, which: str) -> None:
        """Integer labels in [0, classes); the range check syncs, so only under validate."""
        if target.is_floating_point():
            raise TypeError(f"{which} labels must be integers for cross-entropy, got {target.dtype}")
        if self.validate:
            bad = (target < 0) | (target >= classes)
            if bool(bad.any()):
                t = int(bad.flatten(1).any(1).nonzero()[0])
                raise ValueError(
                    f"{which} labels out of range for the model's {classes} outputs "
                    f"(task {t} has labels {target[t].unique().tolist()})"
                )

    def _check_finite_losses(self, losses: Tensor, which: str) -> None:
        if self.validate:
            bad = ~torch.isfinite(losses.detach())
            if bool(bad.any()):
                t = int(bad.nonzero()[0])
                raise FloatingPointError(f"the {which} loss of task {t} is {float(losses[t].detach())}")

    # -- input checks ------------------------------------------------------------------

    def _check_tasks(self, **named: Tensor) -> None:
        """Checks at the public boundary, before any state changes."""
        reference = self._params[0]
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
        if self.validate:
            for name, t in named.items():
                if t.is_floating_point():
                    bad = ~torch.isfinite(t.flatten(1)).all(1)
                    if bool(bad.any()):
                        raise FloatingPointError(
                            f"{name} has NaN or Inf in task {int(bad.nonzero()[0])}"
                        )

    # -- the inner loop ----------------------------------------------------------------

    def _inner_loop(
        self, theta: Tensor, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool
    ) -> Tensor:
        """Fast weights ``[T, P]`` after ``steps`` inner steps from θ."""
        T, P = support_x.size(0), theta.numel()
        adapting = self._adapting()
        self._check_unused(adapting)
        create_graph = not first_order and torch.is_grad_enabled()
        fast = None
        for step in range(steps):
            with torch.profiler.record_function(f"fastmeta.inner_step{step}"):
                with torch.enable_grad():
                    src = theta.expand(T, P) if fast is None else fast
                    if not src.requires_grad:  # evaluation under no_grad: a leaf to differentiate
                        src = src.detach().requires_grad_(True)
                    pred = self._program(support_x, self._weights(theta, src, adapting))
                    losses = self._task_losses(pred, support_y, "support")
                    self._check_finite_losses(losses, "support")
                    (grad,) = torch.autograd.grad(
                        losses.sum(), src, create_graph=create_graph, allow_unused=True
                    )
                if grad is None:
                    grad = torch.zeros_like(src)
                elif not create_graph:
                    grad = grad.detach()
                rule = self._step_rule(step, theta)
                fast = inner_step(theta if fast is None else fast, grad, *rule)
        return fast

    # -- public API --------------------------------------------------------------------

    def meta_batch(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        task_chunk: int | None = None,
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
        """
        self._refresh_capture()
        self._check_tasks(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)
        self._check_nograd()
        T = support_x.size(0)
        chunk = self.task_chunk if task_chunk is None else _check_steps("task_chunk", task_chunk)
        if self._fused_mlp_applies(support_x):
            task_losses, accuracy = self._fused_mlp_meta_batch(support_x, support_y, query_x, query_y)
        elif chunk is None or chunk >= T:
            task_losses, accuracy = self._adapt_and_evaluate(support_x, support_y, query_x, query_y)
        else:
            parts = [
                self._adapt_and_evaluate_checkpointed(
                    support_x[i : i + chunk], support_y[i : i + chunk],
                    query_x[i : i + chunk], query_y[i : i + chunk],
                )
                for i in range(0, T, chunk)
            ]
            task_losses = torch.cat([p[0] for p in parts])
            accuracy = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return MetaBatchOutput(task_losses.mean(), task_losses, accuracy)

    # -- the fused small-MLP meta-step ---------------------------------------------------

    def _fused_mlp_applies(self, support_x: Tensor) -> bool:
        """Whether the whole meta-batch can run as one ``mlp_meta_step`` call.

        It needs a plain MLP (``plain_mlp_structure``), a built-in loss, every parameter
        adapting, and a backend with a fused kernel for the device (the reference of
        ``mlp_meta_step`` is no faster than the general path, so it is not used alone).
        """
        if self._mlp is None or callable(self.loss) or support_x.dim() != 3:
            return False
        if not all(self._adapting()):
            return False
        name, _ = kernel_for("mlp_meta_step", support_x.device.type)
        return name != REFERENCE

    def _fused_rates(self, like: Tensor) -> Tensor:
        """The rule of every inner step as one rate tensor: ``[steps]``, ``[steps, S]`` or ``[steps, P]``."""
        rules = [self._step_rule(s, like) for s in range(self.steps)]
        plain = all(r.mask is None and r.precond is None for r in rules)
        if plain and (all(r.lr.dim() == 0 for r in rules) or all(r.segments is not None for r in rules)):
            return torch.stack([r.lr for r in rules])  # [steps] or [steps, S]
        P = self._layout.numel
        return torch.stack([step_coefficient(*r).expand(P) for r in rules])

    def _fused_mlp_meta_batch(self, support_x, support_y, query_x, query_y):
        layer_sizes, act, slope = self._mlp
        theta = self._pack()
        kind = self._loss_kind(query_y)
        if kind == "cross_entropy":
            for name, y in (("support", support_y), ("query", query_y)):
                self._check_labels(y, layer_sizes[-1], name)
            support_y, query_y = support_y.long(), query_y.long()
        else:
            out = layer_sizes[-1]
            for name, x, y in (("support", support_x, support_y), ("query", query_x, query_y)):
                if y.numel() != x.size(0) * x.size(1) * out:
                    raise ValueError(
                        f"{name} targets {list(y.shape)} do not match the model's outputs "
                        f"{[x.size(0), x.size(1), out]}"
                    )
            support_y = support_y.reshape(support_x.size(0), support_x.size(1), out).to(theta.dtype)
            query_y = query_y.reshape(query_x.size(0), query_x.size(1), out).to(theta.dtype)
        with torch.profiler.record_function("fastmeta.mlp_meta_step"):
            task_losses, pred = mlp_meta_step(
                theta, layer_sizes, act, slope, support_x, support_y, query_x, query_y,
                kind, self._fused_rates(theta), self.steps, self.first_order,
            )
        self._check_finite_losses(task_losses, "query")
        accuracy = None
        if kind == "cross_entropy":
            accuracy = (pred.argmax(-1) == query_y).to(pred.dtype).mean(1)
        return task_losses, accuracy

    def _adapt_and_evaluate(self, support_x, support_y, query_x, query_y):
        """(query task losses ``[T]``, accuracy ``[T]`` or None) after the inner loop."""
        theta = self._pack()
        fast = self._inner_loop(theta, support_x, support_y, self.steps, self.first_order)
        with torch.profiler.record_function("fastmeta.query"):
            pred = self._program(query_x, self._weights(theta, fast, self._adapting()))
            task_losses = self._task_losses(pred, query_y, "query")
        self._check_finite_losses(task_losses, "query")
        accuracy = None
        if not query_y.is_floating_point() and pred.dim() == 3:
            with torch.no_grad():
                accuracy = (pred.argmax(-1) == query_y).to(pred.dtype).mean(1)
        return task_losses, accuracy

    def _adapt_and_evaluate_checkpointed(self, support_x, support_y, query_x, query_y):
        """One chunk of tasks whose graph is recomputed in the backward, not kept.

        Non-reentrant checkpointing keeps only the chunk's inputs; the backward reruns
        the chunk (inner loop included: autograd.grad inside a non-reentrant region is
        supported) one chunk at a time, so peak memory is one chunk's graph.
        """
        if not torch.is_grad_enabled():
            return self._adapt_and_evaluate(support_x, support_y, query_x, query_y)
        return torch.utils.checkpoint.checkpoint(
            self._adapt_and_evaluate, support_x, support_y, query_x, query_y, use_reentrant=False
        )

    def fast_weights(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> TaskWeights:
        """The adapted weights of every task: a :class:`TaskWeights` over ``[T, P]``."""
        steps = self.steps if steps is None else _check_steps("steps", steps, minimum=0)
        self._refresh_capture()
        self._check_tasks(support_x=support_x, support_y=support_y)
        self._check_nograd()
        theta = self._pack()
        if steps == 0:
            buffer = theta.expand(support_x.size(0), -1).clone()
        else:
            buffer = self._inner_loop(theta, support_x, support_y, steps, self.first_order)
        return TaskWeights(buffer, self._layout)

    def predict(self, fast: TaskWeights, query_x: Tensor) -> Tensor:
        """The model's outputs for each task's inputs under its fast weights."""
        if not isinstance(fast, TaskWeights):
            raise TypeError(f"fast must be TaskWeights (from fast_weights), got {type(fast).__name__}")
        self._refresh_capture()
        self._check_tasks(query_x=query_x)
        if fast.layout != self._layout:
            raise ValueError("fast was made for a different model layout")
        if fast.num_tasks != query_x.size(0):
            raise ValueError(f"fast holds {fast.num_tasks} tasks but query_x has {query_x.size(0)}")
        return self._program(query_x, self._weights(self._pack(), fast.buffer, self._adapting()))

    def capture(
        self,
        optimizer: torch.optim.Optimizer,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        warmup: int = 3,
    ):
        """Capture a whole meta-iteration (with ``optimizer.step()``) in a CUDA graph.

        Returns a :class:`fastmeta.whole_step.CapturedMetaStep`; call it with each new
        meta-batch of the same shapes. See that module for the rules.
        """
        from fastmeta.whole_step import CapturedMetaStep

        return CapturedMetaStep(self, optimizer, (support_x, support_y, query_x, query_y), warmup)

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None) -> "AdaptedModel":
        """learn2learn's ``clone()``: a per-task copy that ``adapt()`` steps in place."""
        self._refresh_capture()
        return AdaptedModel(
            self,
            self._pack(),
            None,
            0,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
        )

    def extra_repr(self) -> str:
        return f"lr={self.lr}, steps={self.steps}, first_order={self.first_order}"


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
        learner = self.learner
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        weights = learner._weights(self._theta, self._source(), learner._adapting())
        return learner._program(x.unsqueeze(0), weights)[0]

    forward = __call__

    def adapt(self, loss: Tensor, first_order=None, allow_unused=None, allow_nograd=None) -> None:
        """One inner step on ``loss`` (a scalar computed from this clone's outputs)."""
        learner = self.learner
        first_order = self.first_order if first_order is None else bool(first_order)
        allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("adapt needs a scalar loss tensor")
        if learner.validate and not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(f"adapt got a loss of {float(loss.detach())}")
        learner._check_nograd(allow_nograd)
        adapting = learner._adapting()
        learner._check_unused(adapting, allow_unused)
        rule = learner._step_rule(self.steps_taken, self._theta)  # may raise: before any change
        src = self._source()
        create_graph = not first_order and torch.is_grad_enabled()
        (grad,) = torch.autograd.grad(loss, src, create_graph=create_graph, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(src)
        elif not create_graph:
            grad = grad.detach()
        current = self._theta if self._fast is None else self._fast
        self._fast = inner_step(current, grad, *rule)
        if self._fast.dim() == 1:
            self._fast = self._fast.unsqueeze(0)
        self._src = None
        self.steps_taken += 1

    def _current(self) -> Tensor:
        return self._theta if self._fast is None else self._fast[0]

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        for s, v in zip(self.learner.layout.segments, self.learner.layout.views(self._current())):
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


class MAML(_MetaLearner):
    """Model-agnostic meta-learning (Finn et al. 2017), first or second order.

    ``MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False, *,
    steps=1, loss=None, validate=True)``; the positional arguments are learn2learn's.

    - lr: the inner-loop learning rate (> 0).
    - first_order: drop the second-order terms of the meta-gradient.
    - allow_unused: tolerate parameters the forward does not use (default: allow_nograd).
    - allow_nograd: leave parameters with ``requires_grad=False`` unadapted; without it
      they are an error, as in learn2learn. They are never changed either way.
    - steps: inner steps per task in ``meta_batch`` (>= 1).
    - loss: None (integer labels → cross-entropy, float targets → MSE), "cross_entropy",
      "mse", or a callable ``(pred [T, N, ...], target [T, N, ...]) -> [T]``.
    - validate: run the checks that need a device sync (NaN/Inf, label range).
    - task_chunk: run ``meta_batch`` k tasks at a time, recomputing each chunk's graph in
      the backward (same meta-gradient, less memory); None runs all tasks at once.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        steps: int = 1,
        loss: LossSpec = None,
        validate: bool = True,
        task_chunk: int | None = None,
    ):
        super().__init__(
            model, lr, first_order, allow_unused, allow_nograd, steps, loss, validate, task_chunk
        )


LR_MODES = ("scalar", "layer", "param")


class ModelAwareMAML(_MetaLearner):
    """MAML that knows the network's structure and meta-learns how each part adapts.

    For parameter segment k at inner step s::

        θ_k ← θ_k − α_{k,s} ⊙ m_k ⊙ p_k ⊙ g_k

    - ``lr_mode``: α is one rate ("scalar"), one per parameter tensor ("layer", MAML++'s
      LSLR) or one per parameter ("param", Meta-SGD); ``lr_per_step`` gives each inner
      step its own. All start at ``lr``.
    - ``adapt_layers``: "all", "head" (ANIL: only the last module with parameters) or a
      list of module-name prefixes. Other segments keep θ and skip their weight-gradient
      work in the inner loop.
    - ``gates``: m is a learned per-output-unit gate, broadcast over the unit's weights and
      bias. fastmeta uses m = 2σ(logit) with logits starting at 0, so training starts
      exactly at MAML (m = 1) with a well-conditioned gradient (σ' = 1/4 there), rather
      than σ(logit) which would halve the initial rate or start saturated.
    - ``precondition``: p is a learned diagonal preconditioner over all parameters,
      starting at 1.

    Every meta-learned quantity is in ``parameters()`` and ``state_dict()``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        steps: int = 5,
        lr_mode: str = "layer",
        lr_per_step: bool = True,
        adapt_layers: str | Sequence[str] = "all",
        gates: bool = False,
        precondition: bool = False,
        loss: LossSpec = None,
        validate: bool = True,
        lrs: Sequence[Tensor] | None = None,
        task_chunk: int | None = None,
    ):
        super().__init__(
            model, lr, first_order, allow_unused, allow_nograd, steps, loss, validate, task_chunk
        )
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {LR_MODES}, got {lr_mode!r}")
        self.lr_mode = lr_mode
        self.lr_per_step = bool(lr_per_step)
        self._adapt_selection = self._select_adapting(adapt_layers)
        params = self._model_parameters()
        like = params[0]
        factory = {"dtype": like.dtype, "device": like.device}
        lead = (self.steps,) if self.lr_per_step else ()
        if lrs is not None:
            if lr_mode != "param":
                raise ValueError("lrs (initial per-parameter rates) needs lr_mode='param'")
            lrs = list(lrs)
            if len(lrs) != len(params) or any(
                tuple(l.shape) != lead + tuple(p.shape) for l, p in zip(lrs, params)
            ):
                raise ValueError(
                    "lrs must hold one tensor per model parameter, shaped like it"
                    + (" with a leading steps dim" if lead else "")
                )
            self.lrs = nn.ParameterList(
                [nn.Parameter(l.detach().clone().to(**factory)) for l in lrs]
            )
        elif lr_mode == "param":
            self.lrs = nn.ParameterList(
                [nn.Parameter(torch.full(lead + tuple(p.shape), self.lr, **factory)) for p in params]
            )
        elif lr_mode == "layer":
            self.lrs = nn.Parameter(torch.full(lead + (len(params),), self.lr, **factory))
        else:
            self.lrs = nn.Parameter(torch.full(lead, self.lr, **factory))
        self.gates = bool(gates)
        if self.gates:
            unit_index, units = self._gate_units()
            self.register_buffer("_gate_unit_index", unit_index.to(like.device), persistent=False)
            self.gate_logits = nn.Parameter(torch.zeros(units, **factory))
        self.precondition = bool(precondition)
        if self.precondition:
            self.precond = nn.Parameter(torch.ones(self._layout.numel, **factory))

    def _select_adapting(self, adapt_layers) -> list[bool]:
        names = [s.name for s in self._layout.segments]
        if adapt_layers == "all":
            return [True] * len(names)
        if adapt_layers == "head":
            head = names[-1].rpartition(".")[0]
            return [n.rpartition(".")[0] == head for n in names]
        if isinstance(adapt_layers, str) or not all(isinstance(p, str) for p in adapt_layers):
            raise ValueError(
                f"adapt_layers must be 'all', 'head' or a list of module-name prefixes, got {adapt_layers!r}"
            )
        chosen = [any(n == p or n.startswith(p + ".") for p in adapt_layers) for n in names]
        for p in adapt_layers:
            if not any(n == p or n.startswith(p + ".") for n in names):
                raise ValueError(f"adapt_layers: no parameter under {p!r}; parameters are {names}")
        return chosen

    def _adapting(self) -> list[bool]:
        return [a and p.requires_grad for a, p in zip(self._adapt_selection, self._model_parameters())]

    def _gate_units(self) -> tuple[Tensor, int]:
        """int64 ``[P]``: each parameter's gate; ungated parameters read the last entry (1).

        A module's parameters share its output units' gates: row i of a weight and entry
        i of its bias (or BatchNorm's γ, β for channel i) read gate i.
        """
        index = torch.full((self._layout.numel,), -1, dtype=torch.long)
        units, module_units = 0, {}
        for seg, adapt in zip(self._layout.segments, self._adapt_selection):
            if not adapt or not seg.shape:
                continue
            module = seg.name.rpartition(".")[0]
            rows = seg.shape[0]
            if module not in module_units or module_units[module][1] != rows:
                module_units[module] = (units, rows)
                units += rows
            start, _ = module_units[module]
            per_row = seg.numel // rows
            index[seg.offset : seg.offset + seg.numel] = torch.arange(
                start, start + rows
            ).repeat_interleave(per_row)
        index[index < 0] = units  # the constant 1 appended after the gates
        return index, units

    def _step_rule(self, step: int, like: Tensor) -> StepRule:
        if self.lr_per_step and step >= self.steps:
            raise ValueError(
                f"lr_per_step holds rates for {self.steps} steps; step {step + 1} has none "
                "(raise steps, or use lr_per_step=False)"
            )
        segments = None
        if self.lr_mode == "param":
            lr = torch.cat([(l[step] if self.lr_per_step else l).reshape(-1) for l in self.lrs])
        else:
            lr = self.lrs[step] if self.lr_per_step else self.lrs
            if self.lr_mode == "layer":
                segments = self._layout.segment_ids(like.device)
        mask = None
        if self.gates:
            values = torch.cat([2 * torch.sigmoid(self.gate_logits), self.gate_logits.new_ones(1)])
            mask = values[self._gate_unit_index]
        precond = self.precond if self.precondition else None
        return StepRule(lr, mask, precond, segments)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lr_mode={self.lr_mode!r}, lr_per_step={self.lr_per_step}, "
            f"gates={self.gates}, precondition={self.precondition}"
        )


class MetaSGD(ModelAwareMAML):
    """learn2learn's MetaSGD (Li et al. 2017): one learned rate per parameter.

    ``MetaSGD(model, lr=1.0, first_order=False, lrs=None)`` is
    ``ModelAwareMAML(lr_mode="param", lr_per_step=False, steps=1)``; ``meta.lrs`` holds
    one tensor per parameter, initialised to ``lr`` (or to ``lrs``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Sequence[Tensor] | None = None,
        *,
        steps: int = 1,
        loss: LossSpec = None,
        validate: bool = True,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
    ):
        super().__init__(
            model,
            lr,
            first_order,
            allow_unused,
            allow_nograd,
            steps=steps,
            lr_mode="param",
            lr_per_step=False,
            loss=loss,
            validate=validate,
            lrs=lrs,
        )
