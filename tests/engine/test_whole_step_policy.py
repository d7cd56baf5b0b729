"""The whole-step policy (fastmeta/engine/whole_step_policy.py): which training iterations
run as a captured step, decided without calling the learner, and the optimizer surgery."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastmeta.engine.whole_step_policy import WholeStep, make_capturable, set_outer_lr


def schedule(first_order=False, step_weights=None):
    return SimpleNamespace(first_order=first_order, step_weights=step_weights)


class Step:
    def __init__(self):
        self.checked = 0

    def check_finite(self):
        self.checked += 1


def adam():
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.01)


def test_a_plain_iteration_is_captured_once_per_order_then_replayed():
    policy = WholeStep(adam(), torch.device("cpu"), distributed=False, eager=False)
    assert policy.reason is None
    assert policy.wants_capture(schedule()) and policy.step_for(schedule()) is None
    second, first = Step(), Step()
    policy.hold(False, second)
    assert not policy.wants_capture(schedule())
    assert policy.step_for(schedule()) is second
    # Derivative-order annealing: the first-order iterations get their own step.
    assert policy.wants_capture(schedule(first_order=True))
    policy.hold(True, first)
    assert policy.step_for(schedule(first_order=True)) is first
    policy.check_finite()
    assert (second.checked, first.checked) == (1, 1)


def test_annealed_multi_step_weights_run_eagerly_and_the_last_step_alone_does_not():
    policy = WholeStep(adam(), torch.device("cpu"), distributed=False, eager=False)
    policy.hold(False, Step())
    assert policy.step_for(schedule(step_weights=[0.5, 0.5])) is None
    assert not policy.wants_capture(schedule(step_weights=[0.5, 0.5]))
    assert policy.step_for(schedule(step_weights=[0.0, 1.0])) is not None


def test_eager_several_ranks_or_a_declined_capture_train_eagerly_with_a_reason():
    eager = WholeStep(adam(), torch.device("cpu"), distributed=False, eager=True)
    ranks = WholeStep(adam(), torch.device("cpu"), distributed=True, eager=False)
    assert eager.reason == "--eager" and "several ranks" in ranks.reason
    for policy in (eager, ranks):
        assert not policy.wants_capture(schedule()) and policy.step_for(schedule()) is None
    declined = WholeStep(adam(), torch.device("cpu"), distributed=False, eager=False)
    assert declined.wants_capture(schedule())
    declined.decline("a conv net on the CPU")
    assert declined.reason == "a conv net on the CPU"
    assert not declined.wants_capture(schedule()) and declined.step_for(schedule()) is None


def test_make_capturable_gives_adam_a_tensor_rate_that_set_outer_lr_fills_in_place():
    optimizer = adam()
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    make_capturable(optimizer, torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert group["capturable"] and optimizer.defaults["capturable"]
    rate = group["lr"]
    assert isinstance(rate, torch.Tensor) and rate.dtype == torch.float32 and abs(float(rate) - 0.01) < 1e-9
    set_outer_lr(optimizer, 0.5)
    assert group["lr"] is rate and float(rate) == 0.5
    plain = adam()
    set_outer_lr(plain, 0.25)
    assert plain.param_groups[0]["lr"] == 0.25


def test_make_capturable_fuses_adam_and_adamw_where_torch_can():
    """Fused: one multi-tensor kernel per update, and the non-finite skip in that kernel
    (guarded_step). Not where torch refuses it (foreach=True asked for) or has none (SGD)."""
    from fastmeta.engine.whole_step import skips_its_own_update

    cpu = torch.device("cpu")
    for make in (torch.optim.Adam, torch.optim.AdamW):
        optimizer = make([torch.nn.Parameter(torch.zeros(3))], lr=0.01)
        optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
        optimizer.step()  # a plain Adam that has stepped: its step count is a CPU float
        make_capturable(optimizer, cpu)
        assert optimizer.param_groups[0]["fused"] and skips_its_own_update(optimizer), make
        state = optimizer.state[optimizer.param_groups[0]["params"][0]]
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 1.0
    asked = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.01, foreach=True)
    make_capturable(asked, cpu)
    assert not asked.param_groups[0]["fused"] and not skips_its_own_update(asked)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.01)
    make_capturable(sgd, cpu)
    assert not sgd.param_groups[0].get("fused") and not skips_its_own_update(sgd)
    elsewhere = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.01)
    make_capturable(elsewhere, torch.device("meta"))  # parameters not on the device: left unfused
    assert not elsewhere.param_groups[0]["fused"]
