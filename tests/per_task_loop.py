"""The correctness reference for the learners: a plain per-task autograd loop.

This is what learn2learn's ``clone()/adapt()`` does, written with nothing of fastmeta's:
``torch.func.functional_call`` per task, ``autograd.grad(create_graph=True)`` per inner
step, BatchNorm in training mode (batch statistics) on copies of the buffers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _batch_statistics(model: nn.Module):
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    states = [m.training for m in norms]
    for m in norms:
        m.train()
    return norms, states


def _task_loss(pred: Tensor, target: Tensor) -> Tensor:
    if target.is_floating_point():
        return F.mse_loss(pred, target.reshape(pred.shape))
    return F.cross_entropy(pred, target)


def per_task_query_losses(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    steps: int,
    first_order: bool,
    coefficient: Callable[[int], dict[str, Tensor]],
    adapting: Callable[[str], bool] = lambda name: True,
) -> Tensor:
    """[T] query losses after adapting each task on its own.

    coefficient(step) gives, per parameter name, the tensor that multiplies its gradient
    (lr, or lr·mask·precond), broadcastable to the parameter.
    """
    params = dict(model.named_parameters())
    norms, states = _batch_statistics(model)
    losses = []
    try:
        for t in range(support_x.size(0)):
            fast = dict(params)
            for step in range(steps):
                buffers = {n: b.clone() for n, b in model.named_buffers()}
                pred = torch.func.functional_call(model, (fast, buffers), (support_x[t],))
                loss = _task_loss(pred, support_y[t])
                names = [n for n in fast if adapting(n) and fast[n].requires_grad]
                grads = torch.autograd.grad(
                    loss, [fast[n] for n in names], create_graph=not first_order, allow_unused=True
                )
                coef = coefficient(step)
                for n, g in zip(names, grads):
                    if g is None:
                        continue
                    if first_order:
                        g = g.detach()
                    fast[n] = fast[n] - coef[n] * g
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            pred = torch.func.functional_call(model, (fast, buffers), (query_x[t],))
            losses.append(_task_loss(pred, query_y[t]))
    finally:
        for m, s in zip(norms, states):
            m.train(s)
    return torch.stack(losses)


def constant_coefficient(model: nn.Module, lr: float) -> Callable[[int], dict[str, Tensor]]:
    return lambda step: {n: lr for n, _ in model.named_parameters()}


def learner_coefficient(learner) -> Callable[[int], dict[str, Tensor]]:
    """The per-parameter coefficient of a fastmeta learner's step rule, per name."""
    from fastmeta.ops.inner_step import step_coefficient

    def coefficient(step: int) -> dict[str, Tensor]:
        like = next(learner.module.parameters())
        rule = learner._step_rule(step, like)
        coef = step_coefficient(*rule)
        if coef.dim() == 0:
            coef = coef.expand(learner.layout.numel)
        return {
            s.name: v for s, v in zip(learner.layout.segments, learner.layout.views(coef))
        }

    return coefficient


def relative_error(a: Tensor, b: Tensor) -> float:
    """Norm-wise: ‖a − b‖ / ‖b‖."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat_grad(outputs: Tensor, params) -> Tensor:
    grads = torch.autograd.grad(outputs, list(params), allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )
