"""``mlp_meta_step_update``: a whole training step of a small MLP in one op: the meta-step
of :mod:`fastmeta.ops.mlp_meta_step` on the mean query loss, then Adam's update, in place.

Arguments: an Adam optimizer's ``params``, ``exp_avgs``, ``exp_avg_sqs`` and
``state_steps`` (``torch.optim.Adam``'s state, so its state_dict round-trips); ``nonfinite``
(int64 ``[2]``, the skipped-iteration flag) and ``iteration``; then the meta-step's
arguments (see :mod:`fastmeta.ops.mlp_meta_step`) and Adam's ``adam_lr``, ``beta1``,
``beta2``, ``weight_decay``, ``eps``. Returns (mean loss ``[]``, losses ``[T]``), without an
autograd graph.

Backends: the ``cpu`` backend runs it as one C++ call (csrc/cpu/mlp_meta_step.cpp, on the
meta-step's core); everything else runs the reference below, whose update is torch's own
fused Adam. A training loop's whole step (:class:`fastmeta.engine.FusedMLPStep`) calls the
op itself: its kernel choice is cached (per device type and dtype), so a call costs its
argument check and one dictionary lookup above the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmeta.ops.mlp_meta_step import (_check, _flat, _native_takes, _per_parameter, _sample_params,
                                        _sample_problem, analytic_meta_step)
from fastmeta.ops.registration import NativeCall, OpFamily, define_family, define_op


def reference_mlp_meta_step_update(
    params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], state_steps: list[Tensor],
    nonfinite: Tensor, iteration: int, layer_sizes: list[int], act: str, negative_slope: float, support_x: Tensor,
    support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_kind: str, lr: Tensor, steps: int, first_order: bool,
    adam_lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
) -> tuple[Tensor, Tensor]:
    """One meta-iteration and Adam's step on the mean query loss, in place: (mean loss,
    losses [T]). ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps`` are an
    Adam optimizer's (``torch.optim.Adam`` state, so its state_dict round-trips); the
    update is torch's own fused Adam (``torch._fused_adam_``), with no autograd graph.

    A non-finite loss or gradient skips the update (parameters and optimizer state stay
    as they were) and, the first time, writes [1, iteration] into ``nonfinite`` (int64 ``[2]``):
    a flag for the caller to read every N iterations, without a sync per iteration.
    """
    theta = _flat(params)
    T = support_x.size(0)
    w = theta.new_full((T,), 1.0 / T)
    losses, _, d_theta, _ = analytic_meta_step(
        theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
        loss_kind, lr, steps, first_order, loss_weights=w,
    )
    mean = losses.mean()
    if not (bool(torch.isfinite(losses).all()) and bool(torch.isfinite(d_theta).all())):
        if nonfinite[0] == 0:
            nonfinite.copy_(torch.tensor([1, iteration], dtype=nonfinite.dtype))
        return mean, losses.detach()
    grads = _per_parameter(d_theta.detach(), params)
    with torch.no_grad():
        torch._foreach_add_(state_steps, 1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], state_steps, lr=adam_lr, beta1=beta1,
                           beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    return mean.detach(), losses.detach()


def _update_takes(device_type, params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, *args) -> bool:
    # The native update increments the steps and reads the flag on the host: CPU tensors.
    return device_type == "cpu" and all(t.device.type == "cpu" for t in state_steps) and _native_takes(
        device_type, params, *args)


mlp_meta_step_update = define_op(
    reference_mlp_meta_step_update, NativeCall(takes=_update_takes),
    lambda params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, *args: _check(params, *args),
    mutates=("params", "exp_avgs", "exp_avg_sqs", "state_steps", "nonfinite"))


@mlp_meta_step_update.register_fake
def _(params, exp_avgs, exp_avg_sqs, state_steps, nonfinite, iteration, layer_sizes, act, negative_slope, support_x,
      support_y, query_x, query_y, loss_kind, lr, steps, first_order, adam_lr, beta1, beta2, weight_decay, eps):
    return params[0].new_empty(()), params[0].new_empty((support_x.size(0),))


# ---------------------------------------------------------------------------------------
# The family: its kernel's sample (CPU optimizer state: the native update reads it on the host)
# ---------------------------------------------------------------------------------------

def _sample_update():
    p = _sample_params()
    return (p, [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p],
            [torch.tensor(0.0) for _ in p], torch.zeros(2, dtype=torch.int64), 0, *_sample_problem(),
            1e-3, 0.9, 0.999, 0.0, 1e-8)


FAMILY = define_family(OpFamily(name="mlp_meta_step_update", sample_args={"mlp_meta_step_update": _sample_update},
                                check_seconds=12))
