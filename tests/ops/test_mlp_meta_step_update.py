"""The whole step's update (fastmeta.ops.mlp_meta_step_update): the meta-gradient of the
mean query loss and Adam's update in one call, against the op's meta-gradient followed by
torch.optim.Adam's own fused step; a non-finite iteration is skipped and flagged."""

from __future__ import annotations

import sys

import pytest
import torch

import fastmeta as fm
from fastmeta.ops.mlp_meta_step_update import mlp_meta_step_update
from harness import kernel_log
from helpers import CASES, IDS, build_or_skip, make_problem


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def extension():
    return build_or_skip()


def _adam_state(params):
    return ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros((), dtype=torch.float32) for _ in params])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_update_equals_meta_gradient_then_torch_adam(extension, backend, case):
    """Three iterations of the fused update equal three of: the op's meta-gradient of the
    mean loss, then torch.optim.Adam (its own fused step) on the same parameters."""
    module = sys.modules["fastmeta.ops.mlp_meta_step"]
    layer_sizes, act, loss, lr_kind, steps, K, first_order = case
    theta, sx, sy, qx, qy, lr, _ = make_problem(layer_sizes, act, loss, lr_kind, steps, K, dtype=torch.float64)
    params = [t.clone() for t in theta.split([o * i if j % 2 == 0 else o for j, (i, o) in enumerate(
        (pair for l in zip(layer_sizes[:-1], layer_sizes[1:]) for pair in (l, l)))])]
    assert sum(p.numel() for p in params) == theta.numel()
    want = [p.clone().requires_grad_(True) for p in params]
    adam = torch.optim.Adam(want, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, fused=True)
    got = [p.clone() for p in params]
    exp_avgs, exp_avg_sqs, state_steps = _adam_state(got)
    flag = torch.zeros(2, dtype=torch.int64)
    for it in range(3):
        adam.zero_grad(set_to_none=True)
        with fm.use_backend(backend):
            mean, _, _ = module.mlp_meta_step_mean(want, layer_sizes, act, 0.1, sx, sy, qx, qy, loss, lr, steps,
                                                   first_order)
            mean.backward()
        adam.step()
        with fm.use_backend(backend), kernel_log("cpu") as (ran, declined):
            got_mean, got_losses = mlp_meta_step_update(
                got, exp_avgs, exp_avg_sqs, state_steps, flag, it, layer_sizes, act, 0.1, sx, sy, qx, qy, loss, lr,
                steps, first_order, 1e-2, 0.8, 0.99, 0.01, 1e-6)
        assert ran["mlp_meta_step_update"] == (backend == "cpu") and not declined
        assert rel(got_mean, mean.detach()) <= 1e-12 and got_losses.shape == (sx.size(0),)
    for a, b in zip(got, want):
        assert rel(a, b.detach()) <= 1e-10
    for p, m, v, s in zip(want, exp_avgs, exp_avg_sqs, state_steps):
        state = adam.state[p]
        assert rel(m, state["exp_avg"]) <= 1e-10 and rel(v, state["exp_avg_sq"]) <= 1e-10
        assert float(s) == float(state["step"]) == 3.0
    assert flag.tolist() == [0, 0]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_update_skips_a_non_finite_iteration_and_flags_it(extension, backend):
    module = sys.modules["fastmeta.ops.mlp_meta_step"]
    layer_sizes = [2, 7, 3]
    theta, sx, sy, qx, qy, lr, _ = make_problem(layer_sizes, "tanh", "mse", "step", 1, 4, dtype=torch.float64)
    params = [theta.clone()]
    exp_avgs, exp_avg_sqs, state_steps = _adam_state(params)
    flag = torch.zeros(2, dtype=torch.int64)
    args = (layer_sizes, "tanh", 0.0)
    rest = ("mse", lr, 1, False, 1e-3, 0.9, 0.999, 0.0, 1e-8)
    with fm.use_backend(backend), kernel_log("cpu") as (ran, declined):
        mlp_meta_step_update(params, exp_avgs, exp_avg_sqs, state_steps, flag, 0, *args, sx, sy, qx, qy, *rest)
        before = [t.clone() for t in (params[0], exp_avgs[0], exp_avg_sqs[0], state_steps[0])]
        bad = qy.clone()
        bad[1, 0, 0] = float("nan")
        mlp_meta_step_update(params, exp_avgs, exp_avg_sqs, state_steps, flag, 7, *args, sx, sy, qx, bad, *rest)
        # The update was skipped: parameters and state as before; the flag names iteration 7.
        for a, b in zip((params[0], exp_avgs[0], exp_avg_sqs[0], state_steps[0]), before):
            assert torch.equal(a, b)
        assert flag.tolist() == [1, 7]
        # A later bad iteration keeps the first one's number; a good one updates again.
        mlp_meta_step_update(params, exp_avgs, exp_avg_sqs, state_steps, flag, 9, *args, sx, sy, qx, bad, *rest)
        assert flag.tolist() == [1, 7]
        mlp_meta_step_update(params, exp_avgs, exp_avg_sqs, state_steps, flag, 10, *args, sx, sy, qx, qy, *rest)
        assert float(state_steps[0]) == 2.0 and not torch.equal(params[0], before[0])
    assert ran["mlp_meta_step_update"] == (4 if backend == "cpu" else 0) and not declined
