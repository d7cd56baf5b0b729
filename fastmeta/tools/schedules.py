"""The training schedules of ``fastmeta train``, the same for every learner.

Each is a pure function of the iteration (and the run's configuration), so a resumed run
follows the schedule exactly and nothing of it needs checkpointing:

- **a cosine-annealed meta learning rate** (``outer_lr_schedule="cosine"``): from
  ``outer_lr`` at iteration 0 to ``outer_lr_min`` at the last iteration, along half a
  cosine (Loshchilov & Hutter's SGDR without restarts, as MAML++ uses it);
- **the multi-step loss** (``multi_step_loss_iterations=N``, MAML++): the meta-loss is
  Σ_s w_s · (query loss after inner step s + 1). The weights start equal (1/S each) and
  move linearly, over the first N iterations, to the last step's alone (w = [0, …, 0, 1]):
  early on every step's adaptation gets a direct gradient, and after N iterations the
  objective is exactly the plain meta-loss;
- **derivative-order annealing** (``first_order_iterations=N``, MAML++): the first N
  iterations use the first-order meta-gradient (cheaper, and steadier while the
  initialisation is poor), the rest the exact second-order one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

OUTER_LR_SCHEDULES = ("constant", "cosine")


class IterationSchedule(NamedTuple):
    """What iteration i of a run uses: the meta learning rate, the multi-step loss weights
    (None: the last step's loss alone) and the derivative order."""

    outer_lr: float
    step_weights: tuple[float, ...] | None
    first_order: bool


def outer_lr_at(iteration: int, iterations: int, outer_lr: float, schedule: str, outer_lr_min: float) -> float:
    """The meta learning rate of ``iteration`` (0-based) of a run of ``iterations``."""
    if schedule == "constant":
        return outer_lr
    if schedule != "cosine":
        raise ValueError(f"outer_lr_schedule must be one of {OUTER_LR_SCHEDULES}, got {schedule!r}")
    progress = iteration / max(iterations - 1, 1)
    return outer_lr_min + (outer_lr - outer_lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def multi_step_loss_weights(iteration: int, steps: int, anneal_iterations: int) -> tuple[float, ...] | None:
    """The per-step weights of the multi-step loss at ``iteration``; None once it is the
    plain meta-loss (after the annealing, with one inner step, or when it is off)."""
    if steps == 1 or anneal_iterations <= 0 or iteration >= anneal_iterations:
        return None
    progress = iteration / anneal_iterations
    earlier = (1.0 - progress) / steps
    return (earlier,) * (steps - 1) + (1.0 - earlier * (steps - 1),)


def check_schedules(config) -> None:
    """The schedule fields of ``config`` (a RunConfig), checked before a run starts."""
    if config.outer_lr_schedule not in OUTER_LR_SCHEDULES:
        raise ValueError(f"outer_lr_schedule must be one of {OUTER_LR_SCHEDULES}, got {config.outer_lr_schedule!r}")
    if not 0 <= config.outer_lr_min <= config.outer_lr:
        raise ValueError(f"outer_lr_min must be in [0, outer_lr = {config.outer_lr}], got {config.outer_lr_min}")
    for name in ("multi_step_loss_iterations", "first_order_iterations"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def iteration_schedule(config, iteration: int) -> IterationSchedule:
    """Everything the schedules of ``config`` (a RunConfig) set for ``iteration``."""
    return IterationSchedule(
        outer_lr_at(iteration, config.iterations, config.outer_lr, config.outer_lr_schedule, config.outer_lr_min),
        multi_step_loss_weights(iteration, config.inner_steps, config.multi_step_loss_iterations),
        config.first_order or iteration < config.first_order_iterations,
    )
