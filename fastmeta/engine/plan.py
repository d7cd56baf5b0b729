"""The plan: what a learner hands the engine for one call, and the rule it describes.

A learner (:mod:`fastmeta.learners`) turns its state into an :class:`AdaptationPlan` at
every public call (``meta_batch``, ``fast_weights``, ``predict``, ``capture``, ``clone``).
The plan is immutable and holds tensors and plain values only: the learner's
meta-parameters (rates, gate logits, preconditioner, per-step BatchNorm values) as
tensors, and how they form each inner step's rule as plain values. It holds no callable
of the learner's and no reference to it; the one callable it may hold is the user's own
loss function. The engine reads the plan and never calls back into the learner.

The rule of inner step s, for parameter segment k (``θ`` packed as ``[P]``)::

    θ_k ← θ_k − α_{k,s} ⊙ m_k ⊙ p_k ⊙ g_k

is evaluated from the plan by :func:`step_rule` (the batched ``[T, P]`` path) and by
:func:`parameter_coefficients` / :func:`parameter_set_values` (one task's parameters,
``clone()``/``adapt()``): one encoding, two views of it. The rates are evaluated from the
plan's tensors at each call (``exp`` of log-rates, the gates' sigmoid), inside whatever
graph or capture the call runs in, so that a captured step recomputes them on replay.

>>> plan = learner.plan()                        # doctest: +SKIP
>>> out = engine.meta_batch(sx, sy, qx, qy, plan) # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastmeta.engine.task_weights import Layout
from fastmeta.ops.inner_step import step_coefficient

LossSpec = str | Callable[[Tensor, Tensor], Tensor] | None

# How the rates are stored (``AdaptationPlan.rate_mode``).
RATE_MODES = ("constant", "scalar", "layer", "param")


class StepRule(NamedTuple):
    """Inner step s, from weight state s (after s steps) to state s + 1, over ``[T, P]``.

    lr, mask, precond, segments: the arguments of ``inner_step`` besides θ and g.
    set_values: None, or (index int64 ``[n]``, values ``[n]``): parameters whose value at
    state s + 1 the plan sets, the same for every task, in place of the step (their
    support gradient is discarded). MAML++'s per-step BatchNorm weights are these.
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


@dataclass(frozen=True, eq=False)
class AdaptationPlan:
    """One call's plan: the inner-step rule, what adapts, the loss and the call's options.

    The rule (see the module docstring):

    - rate_mode: "constant" (MAML: ``lr``, a number, at every step), "scalar" (one rate
      tensor), "layer" (one per parameter segment, MAML++'s LSLR) or "param" (one tensor
      per parameter, shaped like it: Meta-SGD);
    - rates: the stored rate tensors (empty for "constant"): one tensor for "scalar" and
      "layer", one per parameter for "param"; with ``rates_per_step`` each has a leading
      ``[trained_steps]`` dim; with ``log_rates`` they are logarithms (α = exp(ρ));
    - gate_logits, gate_unit_index: per-unit gates m = 2σ(logit), read per parameter
      through ``gate_unit_index`` ``[P]`` (ungated parameters read a constant 1);
    - precond: a diagonal preconditioner ``[P]``;
    - set_index, set_per_step, set_segments: MAML++'s per-step BatchNorm values: row s
      of ``set_per_step`` ``[trained_steps, n]`` is the value of the parameters at flat
      positions ``set_index`` ``[n]`` (the segments ``set_segments``, in that order) after
      step s + 1;
    - trained_steps: the rule's steps; a later step reuses the last one's rule.

    What adapts and how the call runs:

    - adapting: per layout segment, whether it takes inner steps;
    - steps: inner steps this call runs; first_order; loss (a kind, the user's callable
      or None: inferred from the targets); step_weights: None or one weight per step
      (MAML++'s multi-step loss); task_chunk; allow_unused; allow_nograd; validate.
    """

    layout: Layout
    adapting: tuple[bool, ...]
    steps: int
    first_order: bool
    loss: LossSpec
    validate: bool
    allow_unused: bool
    allow_nograd: bool
    trained_steps: int
    rate_mode: str = "constant"
    lr: float = 0.0
    rates: tuple[Tensor, ...] = ()
    rates_per_step: bool = False
    log_rates: bool = False
    gate_logits: Tensor | None = None
    gate_unit_index: Tensor | None = None
    precond: Tensor | None = None
    set_index: Tensor | None = None
    set_per_step: Tensor | None = None
    set_segments: tuple[int, ...] = ()
    step_weights: tuple[float, ...] | None = None
    task_chunk: int | None = None

    def with_call(self, **options) -> "AdaptationPlan":
        """The same rule with other call options (``steps``, ``first_order``, ...)."""
        return replace(self, **options)

    @property
    def learned_rule(self) -> bool:
        """Whether the rule holds meta-parameters that the outer loop differentiates."""
        return any(t is not None and t.requires_grad for t in self.rule_tensors())

    def rule_tensors(self) -> tuple[Tensor | None, ...]:
        return (*self.rates, self.gate_logits, self.precond, self.set_per_step)

    def row(self, step: int) -> int:
        """The trained step whose rule inner step ``step`` uses."""
        return min(step, self.trained_steps - 1)

    def stored_rates(self, step: int) -> list[Tensor]:
        """The rate tensors of step ``step``, as stored (log-rates under ``log_rates``)."""
        row = self.row(step)
        return [r[row] for r in self.rates] if self.rates_per_step else list(self.rates)

    def rates_at(self, step: int) -> list[Tensor]:
        """The rates α of step ``step`` (``exp`` of the log-rates under ``log_rates``)."""
        stored = self.stored_rates(step)
        return [r.exp() for r in stored] if self.log_rates else stored

    def gate_mask(self) -> Tensor | None:
        """m ``[P]``: 2σ(logit) per gated parameter, 1 elsewhere; None without gates."""
        if self.gate_logits is None:
            return None
        values = torch.cat([2 * torch.sigmoid(self.gate_logits), self.gate_logits.new_ones(1)])
        return values[self.gate_unit_index]

    def set_values_at(self, step: int) -> tuple[Tensor, Tensor] | None:
        if self.set_per_step is None:
            return None
        return self.set_index, self.set_per_step[self.row(step)]


def constant_rate(plan: AdaptationPlan, like: Tensor, cache: dict) -> Tensor:
    """MAML's rate as a 0-dim tensor in ``like``'s dtype and device, made once per value
    (a tensor per call would be a dispatch; the fused path keys its rate stack on it)."""
    key = (plan.lr, like.dtype, like.device)
    rate = cache.get(key)
    if rate is None:
        rate = cache[key] = torch.tensor(plan.lr, dtype=like.dtype, device=like.device)
    return rate


def step_rule(plan: AdaptationPlan, step: int, like: Tensor, cache: dict) -> StepRule:
    """The :class:`StepRule` of inner step ``step`` over ``[T, P]`` (``like``: θ)."""
    segments = None
    if plan.rate_mode == "constant":
        lr = constant_rate(plan, like, cache)
    else:
        rates = plan.rates_at(step)
        if plan.rate_mode == "param":
            lr = torch.cat([r.reshape(-1) for r in rates])
        else:
            lr = rates[0]
            if plan.rate_mode == "layer":
                segments = plan.layout.segment_ids(like.device)
    return StepRule(lr, plan.gate_mask(), plan.precond, segments, plan.set_values_at(step))


def parameter_coefficients(plan: AdaptationPlan, step: int, like: Tensor, cache: dict) -> list[Tensor]:
    """Per parameter (layout order), what multiplies its gradient at inner step ``step``
    (lr · mask · precond), broadcastable to the parameter: the rule of :func:`step_rule`,
    for one task's parameters."""
    coefficient = step_rule(plan, step, like, cache).coefficient
    if coefficient.dim() == 0:
        return [coefficient] * len(plan.layout)
    return plan.layout.views(coefficient.expand(plan.layout.numel))


def parameter_set_values(plan: AdaptationPlan, step: int) -> dict[int, Tensor]:
    """Parameters (by layout index) whose value after inner step ``step`` the plan sets,
    shaped like them: :attr:`StepRule.set_values` for one task's parameters."""
    if plan.set_per_step is None:
        return {}
    row = plan.set_per_step[plan.row(step)]
    values, at = {}, 0
    for k in plan.set_segments:
        segment = plan.layout.segments[k]
        values[k] = row[at:at + segment.numel].view(segment.shape)
        at += segment.numel
    return values


def parameter_rates(plan: AdaptationPlan) -> list[Tensor] | None:
    """Meta-SGD's rates, one tensor per parameter shaped like it, when the rule is exactly
    θ − α ⊙ g at every step (learn2learn's ``clone.lrs``); else None. Without log-rates
    they are the plan's own tensors (the learner's parameters)."""
    if plan.rate_mode != "param" or plan.rates_per_step or plan.gate_logits is not None or plan.precond is not None:
        return None
    return plan.rates_at(0)


__all__ = [
    "AdaptationPlan", "LossSpec", "RATE_MODES", "StepRule", "constant_rate", "parameter_coefficients",
    "parameter_rates", "parameter_set_values", "step_rule",
]
