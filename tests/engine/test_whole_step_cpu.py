"""The CPU's whole step: ``learner.capture`` on a plain MLP returns a FusedMLPStep that runs
the meta-iteration and Adam's update in one op. It must train exactly as the plain path
(``meta_batch``, ``backward``, ``torch.optim.Adam``) does, keep the optimizer's state where
``state_dict`` finds it, and refuse what it does not cover with a message naming why."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fastmeta as fm
from fastmeta.engine import FusedMLPStep
from helpers import build_or_skip, classification_tasks, regression_tasks


@pytest.fixture(scope="module")
def extension():
    build_or_skip()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sinusoid_learner(seed=1, **kwargs):
    torch.manual_seed(seed)
    return fm.MAML(fm.models.mlp((1, 16, 16, 1)), lr=0.01, **kwargs)


def batches(n, seed=0, **kwargs):
    return [regression_tasks(T=5, shots=4, queries=3, seed=seed + i, **kwargs) for i in range(n)]


def plain_step(learner, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    out = learner.meta_batch(*batch)
    out.loss.backward()
    optimizer.step()
    return out


@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_whole_step_trains_as_the_plain_path(extension, steps, first_order):
    plain = sinusoid_learner(steps=steps, first_order=first_order)
    fused = sinusoid_learner(steps=steps, first_order=first_order)
    plain_opt = torch.optim.Adam(plain.parameters(), 1e-2, weight_decay=1e-3)
    fused_opt = torch.optim.Adam(fused.parameters(), 1e-2, weight_decay=1e-3)
    data = batches(6)
    with fm.use_backend("cpu"):
        step = fused.capture(fused_opt, *data[0])
        assert isinstance(step, FusedMLPStep)
        for batch in data:
            want = plain_step(plain, plain_opt, batch)
            got = step(*batch)
            assert rel(got.loss, want.loss.detach()) <= 1e-5
            assert rel(got.task_loss, want.task_loss.detach()) <= 1e-5
    step.check_finite()
    for p, q in zip(fused.parameters(), plain.parameters()):
        assert rel(p.detach(), q.detach()) <= 1e-5
    for p, q in zip(fused.parameters(), plain.parameters()):
        a, b = fused_opt.state[p], plain_opt.state[q]
        assert float(a["step"]) == float(b["step"]) == len(data)
        assert rel(a["exp_avg"], b["exp_avg"]) <= 1e-4 and rel(a["exp_avg_sq"], b["exp_avg_sq"]) <= 1e-4


def test_whole_step_classification(extension):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    plain = fm.MAML(model, lr=0.1)
    fused = fm.MAML(copy.deepcopy(model), lr=0.1)
    plain_opt, fused_opt = torch.optim.Adam(plain.parameters(), 1e-3), torch.optim.Adam(fused.parameters(), 1e-3)
    data = [classification_tasks(T=4, image=4, seed=s) for s in range(3)]
    data = [(sx.flatten(2), sy, qx.flatten(2), qy) for sx, sy, qx, qy in data]
    with fm.use_backend("cpu"):
        step = fused.capture(fused_opt, *data[0])
        for batch in data:
            want = plain_step(plain, plain_opt, batch)
            assert rel(step(*batch).loss, want.loss.detach()) <= 1e-5
    for p, q in zip(fused.parameters(), plain.parameters()):
        assert rel(p.detach(), q.detach()) <= 1e-5


def test_optimizer_state_dict_round_trips(extension):
    """Train 3 steps, save model and Adam state, load them into fresh objects: 2 more steps
    there equal 2 more steps here, bit for bit."""
    data = batches(5)
    learner = sinusoid_learner()
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    with fm.use_backend("cpu"):
        step = learner.capture(opt, *data[0])
        for batch in data[:3]:
            step(*batch)
        # Through bytes, as a checkpoint does: a state_dict shares the live tensors.
        buffer = io.BytesIO()
        torch.save({"model": learner.state_dict(), "optimizer": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        saved_model, saved_opt = saved["model"], saved["optimizer"]
        assert all(float(s["step"]) == 3.0 for s in saved_opt["state"].values())
        resumed = sinusoid_learner(seed=99)
        resumed.load_state_dict(saved_model)
        resumed_opt = torch.optim.Adam(resumed.parameters(), 1e-2)
        resumed_opt.load_state_dict(saved_opt)
        resumed_step = resumed.capture(resumed_opt, *data[0])
        for batch in data[3:]:
            step(*batch)
            resumed_step(*batch)
    for p, q in zip(learner.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_changed_shape_names_the_argument(extension):
    data = batches(1)
    learner = sinusoid_learner()
    with fm.use_backend("cpu"):
        step = learner.capture(torch.optim.Adam(learner.parameters(), 1e-3), *data[0])
        sx, sy, qx, qy = data[0]
        with pytest.raises(ValueError, match=r"query_x is \[5, 4, 1\]"):
            step(sx, sy, qx[:, :2].repeat(1, 2, 1), qy)
        with pytest.raises(ValueError, match="support_y is .*float64"):
            step(sx, sy.double(), qx, qy)
        before = [p.detach().clone() for p in learner.parameters()]
        with pytest.raises(ValueError, match="support_x is .* on meta, but the step was built for .* on cpu"):
            step(sx.to("meta"), sy, qx, qy)
        assert all(torch.equal(p, b) for p, b in zip(learner.parameters(), before))


def test_a_non_finite_iteration_is_skipped_and_reported(extension):
    data = batches(4)
    learner = sinusoid_learner(validate=False)
    with fm.use_backend("cpu"):
        step = learner.capture(torch.optim.Adam(learner.parameters(), 1e-2), *data[0])
        step(*data[0])
        before = [p.detach().clone() for p in learner.parameters()]
        sx, sy, qx, qy = data[1]
        bad = qy.clone()
        bad[2, 1, 0] = float("inf")
        step(sx, sy, qx, bad)
        for p, b in zip(learner.parameters(), before):
            assert torch.equal(p, b), "a non-finite iteration must not update"
        with pytest.raises(FloatingPointError, match="iteration 1 "):
            step.check_finite()
        step(*data[2])
        assert any(not torch.equal(p, b) for p, b in zip(learner.parameters(), before))


@pytest.mark.parametrize("why,make,match", [
    ("learned rates", lambda: fm.ModelAwareMAML(fm.models.mlp((1, 8, 1)), 0.01), "fixed inner rates"),
    ("sgd", None, "torch.optim.Adam"),
    ("two groups", None, "one parameter group"),
    ("amsgrad", None, "amsgrad"),
])
def test_what_the_whole_step_refuses(extension, why, make, match):
    learner = make() if make is not None else sinusoid_learner()
    params = list(learner.parameters())
    optimizer = {
        "sgd": lambda: torch.optim.SGD(params, 1e-3),
        "two groups": lambda: torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], 1e-3),
        "amsgrad": lambda: torch.optim.Adam(params, 1e-3, amsgrad=True),
    }.get(why, lambda: torch.optim.Adam(params, 1e-3))()
    with fm.use_backend("cpu"), pytest.raises(ValueError, match=match):
        learner.capture(optimizer, *batches(1)[0])


def test_whole_step_dispatch_budget(extension):
    """W1 whole step: the fused op and torch's fused Adam inside it; no host sync."""
    from fastmeta.tools.profiling import count_paths
    from fastmeta.tools.workloads import WORKLOADS

    counts = count_paths(WORKLOADS["W1"], backend="cpu")
    whole = counts["whole-step"]
    assert whole.dispatches == 2 and whole.host_syncs == 0, whole.describe()
    # The public op's eager path: one op, its native kernel inside it.
    assert whole.by_name["fastmeta::mlp_meta_step_update"] == 1 and whole.fastmeta_ops == 1
    plain = counts["plain"]
    assert plain.dispatches <= 4 and plain.host_syncs == 0, plain.describe()
