"""The plan a learner hands the engine: immutable, tensors and plain values only, enough on
its own (the engine runs it after the learner is gone), and each check once per call."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

import fastmeta as fm
from fastmeta.backends import extension
from fastmeta.engine import AdaptationPlan, MetaIteration
import importlib

mlp_op = importlib.import_module("fastmeta.ops.mlp_meta_step")


def conv_bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def classification_batch(T=3, N=6, classes=3, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, N, *shape, generator=g, dtype=torch.float64)
    y = (torch.arange(N) % classes).expand(T, N).clone()
    return x, y, x.flip(1).clone(), y.flip(1).clone()


def regression_batch(T=4, N=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, N, 1, generator=g)
    return x, torch.sin(x), x + 0.5, torch.sin(x + 0.5)


LEARNERS = {
    "maml-mlp": (lambda: fm.MAML(fm.models.mlp((1, 16, 16, 1)), 0.01, steps=2), regression_batch),
    "model-aware-conv-bn": (
        lambda: fm.ModelAwareMAML(conv_bn_model().double(), lr=0.05, steps=2, lr_mode="layer", gates=True,
                                  precondition=True, per_step_bn=True),
        classification_batch,
    ),
    "meta-sgd-mlp": (lambda: fm.MetaSGD(fm.models.mlp((1, 8, 1)), lr=0.1), regression_batch),
}


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_the_engine_runs_a_plan_after_the_learner_is_deleted(kind):
    make, batch = LEARNERS[kind]
    torch.manual_seed(0)
    learner = make()
    inputs = batch()
    want = learner.meta_batch(*inputs)
    want_grads = torch.autograd.grad(want.loss, list(learner.parameters()))
    plan, engine = learner.plan(), learner._engine
    meta_parameters = [p for p in learner.parameters()]
    alive = weakref.ref(learner)
    del learner
    gc.collect()
    assert alive() is None, "something below the learner keeps a reference to it"
    got = engine.meta_batch(*inputs, plan)
    got_grads = torch.autograd.grad(got.loss, meta_parameters)
    assert torch.equal(got.task_loss, want.task_loss)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)
    fast = engine.fast_weights(inputs[0], inputs[1], plan.with_call(steps=3))
    assert fast.buffer.shape == (inputs[0].size(0), plan.layout.numel)


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_a_plan_is_immutable_and_holds_tensors_and_plain_values_only(kind):
    make, _ = LEARNERS[kind]
    learner = make()
    plan = learner.plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 7
    plain = (bool, int, float, str, type(None))

    def check(value, where):
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                check(v, f"{where}[{i}]")
            return
        assert isinstance(value, (Tensor, *plain, fm.Layout)), f"{where} is a {type(value).__name__}"
        assert value is not learner

    for field in dataclasses.fields(AdaptationPlan):
        check(getattr(plan, field.name), field.name)


def test_a_clone_steps_by_the_plan_not_the_learner():
    """clone()/adapt() keep the learner's plan at clone(), not the learner: the clone's
    coefficients are the plan's, and the clone holds no reference to the learner."""
    torch.manual_seed(0)
    learner = fm.ModelAwareMAML(fm.models.mlp((1, 8, 1)).double(), lr=0.1, steps=2, lr_mode="layer", gates=True)
    clone = learner.clone()
    assert not any(v is learner for v in vars(clone).values())
    x = torch.randn(5, 1, dtype=torch.float64)
    before = [p.detach().clone() for p in clone.parameters()]
    loss = torch.nn.functional.mse_loss(clone(x), torch.zeros(5, 1, dtype=torch.float64))
    grads = torch.autograd.grad(loss, list(clone.parameters()), retain_graph=True)
    clone.adapt(loss)
    from fastmeta.engine.plan import parameter_coefficients
    coefficients = parameter_coefficients(learner.plan(), 0, before[0], {})
    for p, b, g, c in zip(clone.parameters(), before, grads, coefficients):
        torch.testing.assert_close(p.detach(), b - c.detach() * g, rtol=1e-12, atol=1e-12)


def _count(monkeypatch, owner, name, counts):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.skipif(not extension.availability("cpu")[0], reason="the C++ extension is not built here")
def test_a_w1_call_checks_its_arguments_and_chooses_its_kernel_once(monkeypatch):
    """One meta_batch call on the fused path: the engine's boundary check once, the op's
    kernel rule once; no second check in the op, the launcher or its ``takes``."""
    torch.manual_seed(0)
    learner = fm.MAML(fm.models.mlp((1, 40, 40, 1)), 0.01, steps=1)
    inputs = regression_batch(T=25, N=10)
    learner.meta_batch(*inputs)  # first call: the extension loaded, first-shape checks done
    counts: dict[str, int] = {}
    _count(monkeypatch, MetaIteration, "check_tasks", counts)
    for name in ("check_arguments", "_kernel_shape_ok", "_native_takes", "_kernel_inputs_ok"):
        _count(monkeypatch, mlp_op, name, counts)
    _count(monkeypatch, extension, "_devices_and_dtypes_ok", counts)
    out = learner.meta_batch(*inputs)
    assert counts.get("check_tasks") == 1
    assert counts.get("_kernel_shape_ok") == 1  # the op's one rule, asked once
    assert "check_arguments" not in counts
    assert "_native_takes" not in counts and "_kernel_inputs_ok" not in counts
    assert "_devices_and_dtypes_ok" not in counts
    counts.clear()
    out.loss.backward()  # one more op (weighing the per-task gradients): its one scan of the
    # arguments is the public op's (devices and dtypes, with the kernel choice), not the launcher's
    assert counts == {}


def test_the_direct_op_call_still_checks_its_arguments():
    """The op's own check still guards a direct call (the trusted path is the engine's only)."""
    theta = torch.zeros(mlp_op.num_parameters([1, 4, 1]))
    x = torch.zeros(2, 3, 2)  # the wrong input width
    with pytest.raises(ValueError, match="support_x and query_x must be"):
        fm.ops.mlp_meta_step(theta, [1, 4, 1], "relu", 0.0, x, torch.zeros(2, 3, 1), x, torch.zeros(2, 3, 1), "mse",
                             torch.full((1,), 0.1), 1, False)
