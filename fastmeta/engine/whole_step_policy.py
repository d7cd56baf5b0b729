"""Whether a training iteration runs as one whole step, and the optimizer surgery it needs.

A whole step (:mod:`fastmeta.engine.whole_step`: a CUDA graph on a GPU, the fused C++
meta-step with torch's fused Adam inside for a plain MLP on the CPU) replaces an eager
iteration (``meta_batch``, ``backward``, ``optimizer.step()``) where it gives the same
training. :class:`WholeStep` holds that decision for ``fastmeta train``, which asks it once
per iteration and captures the step itself (the policy never calls up into a learner).
"""

from __future__ import annotations

import torch


def set_outer_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """The meta learning rate of every group; a tensor rate (a captured step's) in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam as a CUDA graph can hold it: ``capturable`` (its step count on the device) and
    its rate a device tensor, so that a schedule changes the rate between replays; and,
    where torch offers it, ``fused`` (one multi-tensor kernel for the update, which also
    skips a non-finite iteration's update itself: :func:`fastmeta.engine.whole_step.guarded_step`).
    The state and the update's arithmetic are Adam's own; a checkpoint keeps these settings."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
    optimizer.defaults["capturable"] = True
    if can_fuse(optimizer, device):
        for group in optimizer.param_groups:
            group["fused"] = True
        optimizer.defaults["fused"] = True
        optimizer._step_supports_amp_scaling = True  # as Adam(fused=True) sets it: it takes found_inf
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and (step.device != device or step.dtype != torch.float32):
            state["step"] = step.to(device=device, dtype=torch.float32)


def can_fuse(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether ``optimizer`` is torch's Adam or AdamW and can run ``fused=True`` on
    ``device``: no ``foreach=True`` asked for (torch refuses both), not ``differentiable``,
    and floating parameters all on ``device`` (the fused kernels' dtypes; CUDA and, since
    torch 2.4, the CPU). Step counts already kept (a plain Adam that has stepped) are made
    the fused layout's, float32 on the device, by :func:`make_capturable`."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(group.get("foreach") or group.get("differentiable") for group in optimizer.param_groups):
        return False
    return device.type in ("cuda", "cpu") and all(
        p.device == device and p.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16) for p in params)


class WholeStep:
    """``fastmeta train``'s whole-step policy: which iterations run as one replayable step
    (meta-gradient and Adam's update) from the learner's ``capture``: a CUDA graph on a GPU,
    the fused C++ meta-step with torch's fused Adam inside for a plain MLP on the CPU.

    It applies to an iteration whose schedule is plain (no multi-step loss weights besides
    the last step's), in one process (several ranks all-reduce the meta-gradient between
    the backward and the update, ``distributed``), unless ``eager``. One step is held per
    meta-gradient order the run uses (derivative-order annealing uses two). The caller
    captures (:meth:`wants_capture`, then :meth:`hold` the step, or :meth:`decline` with the
    reason a model is not taken: learned rates on the CPU, a conv net on the CPU, ...); the
    run then trains eagerly, and :attr:`reason` says why. The policy never calls the learner.

    Validation: the CUDA graph validates the meta-batch once, at capture; the CPU step
    checks every meta-batch in its kernel. Neither syncs per iteration: a non-finite loss
    is flagged on the device and :meth:`check_finite` (a sync) raises, which the training
    loop calls before it logs, validates or writes a checkpoint, so a non-finite run never
    overwrites the last good checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, distributed: bool, eager: bool):
        self.optimizer, self.device = optimizer, device
        self.steps: dict[bool, object] = {}
        self.reason = None
        if eager:
            self.reason = "--eager"
        elif distributed:
            self.reason = "several ranks: the meta-gradient is all-reduced between the backward and the update"

    @staticmethod
    def plain(schedule) -> bool:
        weights = schedule.step_weights
        return weights is None or (not any(weights[:-1]) and weights[-1] == 1)

    def applies(self, schedule) -> bool:
        return self.reason is None and self.plain(schedule)

    def wants_capture(self, schedule) -> bool:
        """Whether this iteration runs as a whole step that is not captured yet. If so, the
        optimizer is made capturable on a GPU (:func:`make_capturable`) for the capture."""
        if not self.applies(schedule) or schedule.first_order in self.steps:
            return False
        if self.device.type == "cuda":
            make_capturable(self.optimizer, self.device)
        return True

    def hold(self, first_order: bool, step) -> None:
        self.steps[first_order] = step

    def decline(self, reason: str) -> None:
        """No whole step for this run: it trains eagerly, for ``reason``."""
        self.reason = reason

    def step_for(self, schedule):
        """The whole step for this iteration, or None (eager)."""
        return self.steps.get(schedule.first_order) if self.applies(schedule) else None

    def check_finite(self) -> None:
        for step in self.steps.values():
            step.check_finite()
