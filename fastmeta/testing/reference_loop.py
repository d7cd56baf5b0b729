"""The reference loop: the plain autograd loop, task by task, that the engine is tested and
benchmarked against. A test and benchmark oracle, not part of the engine: nothing in the
product imports it but ``fastmeta bench`` (:mod:`fastmeta.tools`). Not
:class:`fastmeta.engine.PerTaskLoopProgram`, the engine's per-task loop that runs models it
cannot batch.

This is what learn2learn's ``clone()/adapt()`` computes, written with nothing of fastmeta's
engine: ``torch.func.functional_call`` per task, ``autograd.grad(create_graph=True)`` per
inner step, BatchNorm in training mode (batch statistics) on fresh copies of the buffers.
In float64 it agrees with central finite differences to 1e-8, through BatchNorm too
(docs/benchmarks.md), which is why it is the reference and torch.func's vmap is not.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.engine.plan import parameter_coefficients

Coefficient = Callable[[int], dict[str, Tensor | float]]
SetValues = Callable[[int], dict[str, Tensor]]


def single_task_loss(pred: Tensor, target: Tensor) -> Tensor:
    """One task's mean loss: MSE for float targets, cross-entropy for integer labels (the
    batched ``[T]`` op is :func:`fastmeta.ops.task_loss`)."""
    if target.is_floating_point():
        return F.mse_loss(pred, target.reshape(pred.shape))
    return F.cross_entropy(pred, target)


def _batch_statistics(model: nn.Module):
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    states = [m.training for m in norms]
    for m in norms:
        m.train()
    return norms, states


def task_states(
    model: nn.Module,
    params: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    steps: int,
    first_order: bool,
    coefficient: Coefficient,
    adapting: Callable[[str], bool] = lambda name: True,
    set_values: SetValues | None = None,
) -> Iterator[dict[str, Tensor]]:
    """One task's weights after each of ``steps`` inner steps from ``params`` (model in
    training mode: the caller sees to it, see :func:`per_task_query_losses`).

    coefficient(step) gives, per parameter name, what multiplies its gradient (lr, or
    lr·mask·precond), broadcastable to the parameter. set_values(step), when given, names
    the parameters whose value after step ``step`` the learner sets instead (MAML++'s
    per-step BatchNorm weights).
    """
    fast = dict(params)
    for step in range(steps):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        loss = single_task_loss(torch.func.functional_call(model, (fast, buffers), (support_x,)), support_y)
        names = [n for n in fast if adapting(n) and fast[n].requires_grad]
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order, allow_unused=True)
        coef = coefficient(step)
        fast = dict(fast)
        for n, g in zip(names, grads):
            if g is None:
                continue
            if first_order:
                g = g.detach()
            fast[n] = fast[n] - coef[n] * g
        if set_values is not None:
            fast.update(set_values(step))
        yield fast


def adapt_task(
    model: nn.Module,
    params: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    steps: int,
    first_order: bool,
    coefficient: Coefficient,
    adapting: Callable[[str], bool] = lambda name: True,
    set_values: SetValues | None = None,
) -> dict[str, Tensor]:
    """One task's weights after ``steps`` inner steps (see :func:`task_states`)."""
    fast = dict(params)
    for fast in task_states(model, params, support_x, support_y, steps, first_order, coefficient, adapting,
                            set_values):
        pass
    return fast


def task_query_loss(
    model: nn.Module,
    params: dict[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    steps: int,
    first_order: bool,
    coefficient: Coefficient,
    adapting: Callable[[str], bool] = lambda name: True,
    set_values: SetValues | None = None,
    step_weights: list[float] | None = None,
) -> Tensor:
    """One task's query loss after :func:`adapt_task`. step_weights: the multi-step loss,
    Σ_s w_s · (query loss after step s + 1); None is the last step's loss alone."""
    if step_weights is None:
        fast = adapt_task(model, params, support_x, support_y, steps, first_order, coefficient, adapting, set_values)
        return _query_loss(model, fast, query_x, query_y)
    total = 0.0
    states = task_states(model, params, support_x, support_y, steps, first_order, coefficient, adapting, set_values)
    for step, fast in enumerate(states):
        if step == steps - 1 or step_weights[step] != 0:
            total = total + step_weights[step] * _query_loss(model, fast, query_x, query_y)
    return total


def _query_loss(model: nn.Module, fast: dict[str, Tensor], query_x: Tensor, query_y: Tensor) -> Tensor:
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return single_task_loss(torch.func.functional_call(model, (fast, buffers), (query_x,)), query_y)


def per_task_query_losses(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    steps: int,
    first_order: bool,
    coefficient: Coefficient,
    adapting: Callable[[str], bool] = lambda name: True,
    set_values: SetValues | None = None,
    step_weights: list[float] | None = None,
) -> Tensor:
    """``[T]`` query losses after adapting each task on its own, from the model's parameters
    (``set_values``, ``step_weights``: see :func:`task_query_loss`)."""
    params = dict(model.named_parameters())
    norms, states = _batch_statistics(model)
    try:
        losses = [
            task_query_loss(model, params, support_x[t], support_y[t], query_x[t], query_y[t], steps, first_order,
                            coefficient, adapting, set_values, step_weights)
            for t in range(support_x.size(0))
        ]
    finally:
        for m, s in zip(norms, states):
            m.train(s)
    return torch.stack(losses)


def constant_coefficient(model: nn.Module, lr: float) -> Coefficient:
    """MAML's rule: the same rate ``lr`` for every parameter at every step."""
    names = [n for n, _ in model.named_parameters()]
    return lambda step: {n: lr for n in names}


def learner_coefficient(learner) -> Coefficient:
    """The per-parameter coefficient of a fastmeta learner's step rule, per name, as its
    plan describes it (:func:`fastmeta.engine.plan.parameter_coefficients`)."""
    plan = learner.plan()

    def coefficient(step: int) -> dict[str, Tensor]:
        like = next(learner.module.parameters())
        coefficients = parameter_coefficients(plan, step, like, {})
        return {s.name: c.expand(s.shape) for s, c in zip(plan.layout.segments, coefficients)}

    return coefficient


def relative_error(a: Tensor, b: Tensor) -> float:
    """Norm-wise: ‖a − b‖ / ‖b‖, in b's dtype and device (NaN stays NaN)."""
    a = a.detach().to(device=b.device, dtype=b.dtype)
    b = b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def flat_grad(outputs: Tensor, params) -> Tensor:
    """The gradient of ``outputs`` at ``params``, flattened and concatenated (zeros where unused)."""
    params = list(params)
    grads = torch.autograd.grad(outputs, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )
