"""Issue 17's options, each against the per-task reference loop (fp32, 1e-5) and, on smooth
nets, against central finite differences in float64 (1e-6):

- ModelAwareMAML(log_lr=True): rates learned as logarithms, positive by construction;
- ModelAwareMAML(per_step_bn=...): MAML++'s per-step BatchNorm weights and biases;
- steps beyond the trained ones reuse the last step's rule;
- meta_batch(step_weights=...): the multi-step loss, for MAML and ModelAwareMAML;
- meta_batch(first_order=...): the per-call derivative order (derivative-order annealing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta.testing.reference_loop import flat_grad, learner_coefficient, per_task_query_losses, relative_error
from helpers import (
    check_against_finite_differences,
    classification_tasks,
    fastmeta_meta_gradient,
    loop_meta_gradient,
    make_model,
    make_tasks,
    per_step_bn_reference,
    regression_tasks,
    smooth_conv_bn_net,
)


def perturb_meta_parameters(learner, scale=0.3, seed=0):
    """Move every learner-owned parameter off its initial value (per-step BatchNorm rows
    off the model's own values, rates apart), so that each one matters in a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if not name.startswith("module."):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).abs().to(p.device))


def finite_difference_error(learner, tasks, names, directions=2, eps=1e-6, meta_batch=None):
    """Norm-wise error of the analytic meta-gradient against central differences in
    float64: coordinate by coordinate over the learner parameters ``names`` (an option's
    own), and along ``directions`` random directions over every parameter (the rest)."""
    meta_batch = meta_batch or learner.meta_batch
    params = dict(learner.named_parameters())
    analytic = dict(zip(params, torch.autograd.grad(meta_batch(*tasks).loss, list(params.values()))))

    def loss_at(shifts):
        with torch.no_grad():
            for name, shift in shifts.items():
                params[name].add_(shift)
        try:
            return meta_batch(*tasks).loss.detach()
        finally:
            with torch.no_grad():
                for name, shift in shifts.items():
                    params[name].sub_(shift)

    # An option's name covers its parameter list's entries ("log_lrs" is log_lrs.0, .1, ...).
    names = [n for n in params if any(n == x or n.startswith(x + ".") for x in names)]
    got, want = [], []
    for name in names:
        p = params[name]
        for i in range(p.numel()):
            step = torch.zeros_like(p).view(-1)
            step[i] = eps
            step = step.view_as(p)
            want.append((loss_at({name: step}) - loss_at({name: -step})) / (2 * eps))
            got.append(analytic[name].reshape(-1)[i])
    g = torch.Generator().manual_seed(0)
    for _ in range(directions):
        v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        norm = torch.cat([t.reshape(-1) for t in v.values()]).norm()
        v = {n: t / norm for n, t in v.items()}
        want.append((loss_at({n: eps * t for n, t in v.items()}) - loss_at({n: -eps * t for n, t in v.items()}))
                    / (2 * eps))
        got.append(sum((analytic[n] * t).sum() for n, t in v.items()))
    return relative_error(torch.stack(got), torch.stack(want))


def selection(learner):
    adapting = dict(zip([s.name for s in learner.layout.segments], learner.plan().adapting))
    return lambda name: adapting[name]


# -- per-step BatchNorm ----------------------------------------------------------------------


PER_STEP_BN_CASES = [
    (1, False, {}), (3, False, {}), (3, True, {}),
    (2, False, dict(gates=True, lr_mode="param")), (2, False, dict(adapt_layers="head", log_lr=True)),
]


@pytest.mark.parametrize("steps, first_order, options", PER_STEP_BN_CASES,
                         ids=["1-step", "3-steps", "3-steps-first-order", "param-gates", "head-log"])
def test_per_step_batch_norm_equals_reference_loop(steps, first_order, options):
    learner = fm.ModelAwareMAML(make_model("conv"), 0.2, first_order, steps=steps, per_step_bn=True, **options)
    perturb_meta_parameters(learner)
    tasks = make_tasks("conv")
    got, out = fastmeta_meta_gradient(learner, tasks)
    want, losses = loop_meta_gradient(learner, tasks, steps, first_order, selection(learner))
    assert relative_error(out.task_loss, losses) < 1e-5
    assert relative_error(got, want) < 1e-5
    # The per-step values are read: the same learner without them computes other losses.
    plain = per_task_query_losses(
        learner.module, *tasks, steps, first_order, learner_coefficient(learner), selection(learner)
    )
    assert relative_error(plain, losses) > 1e-3


def test_per_step_batch_norm_gradient_reaches_every_row():
    learner = fm.ModelAwareMAML(make_model("conv"), 0.2, steps=3, per_step_bn=True)
    perturb_meta_parameters(learner)
    (grad,) = torch.autograd.grad(learner.meta_batch(*make_tasks("conv")).loss, [learner.bn_per_step])
    assert grad.shape == (3, learner.bn_per_step.size(1))
    assert all(bool(row.abs().sum() > 0) for row in grad)


def test_per_step_batch_norm_finite_differences():
    torch.manual_seed(0)
    learner = fm.ModelAwareMAML(smooth_conv_bn_net().double(), 0.2, steps=2, per_step_bn=True, log_lr=True)
    perturb_meta_parameters(learner, scale=0.2)
    tasks = classification_tasks(T=2, shots=1, queries=2, image=8, dtype=torch.float64)
    assert finite_difference_error(learner, tasks, ["bn_per_step", "log_lrs", "module.1.weight"]) < 1e-6


def test_the_finite_difference_check_can_fail():
    # First order drops the second-order terms: the same check must see it.
    torch.manual_seed(0)
    learner = fm.ModelAwareMAML(smooth_conv_bn_net().double(), 0.2, True, steps=2, per_step_bn=True, log_lr=True)
    perturb_meta_parameters(learner, scale=0.2)
    tasks = classification_tasks(T=2, shots=1, queries=2, image=8, dtype=torch.float64)
    # (Row 0 of bn_per_step acts only through the first inner gradient: first order drops it.)
    assert finite_difference_error(learner, tasks, ["bn_per_step"], directions=0) > 1e-3


def test_per_step_batch_norm_state_zero_is_the_model_and_later_states_the_rows():
    model = make_model("conv")
    learner = fm.ModelAwareMAML(model, 0.2, steps=2, per_step_bn=True)
    perturb_meta_parameters(learner)
    sx, sy, _, _ = make_tasks("conv")
    names = [n for n, _ in model.named_parameters() if n.startswith(("1.", "5."))]  # the BatchNorms
    values = per_step_bn_reference(learner)
    unadapted = learner.fast_weights(sx, sy, steps=0)
    for name in names:
        assert torch.equal(unadapted[name][0], dict(model.named_parameters())[name])
    for steps in (1, 2, 5):  # 5: beyond the trained 2, the last row again
        fast = learner.fast_weights(sx, sy, steps=steps)
        for name in names:
            want = values(steps - 1)[name].detach()
            assert torch.equal(fast[name].detach(), want.expand_as(fast[name])), (steps, name)


def test_per_step_batch_norm_default_follows_the_model():
    assert fm.ModelAwareMAML(make_model("conv"), 0.1).per_step_bn
    assert not fm.ModelAwareMAML(make_model("mlp"), 0.1).per_step_bn
    assert not fm.ModelAwareMAML(make_model("conv"), 0.1, per_step_bn=False).per_step_bn
    assert not hasattr(fm.ModelAwareMAML(make_model("conv"), 0.1, per_step_bn=False), "bn_per_step")


def test_per_step_batch_norm_is_not_gated():
    learner = fm.ModelAwareMAML(make_model("conv"), 0.2, steps=1, gates=True, per_step_bn=True)
    plain = fm.ModelAwareMAML(make_model("conv"), 0.2, steps=1, gates=True, per_step_bn=False)
    channels = 4 + 4  # two BatchNorm2d(4): their units are set per step, not gated
    assert plain.gate_logits.numel() - learner.gate_logits.numel() == channels


# -- log-rates and steps beyond the trained ones ---------------------------------------------------


@pytest.mark.parametrize("lr_mode", ["scalar", "layer", "param"])
def test_log_rates_are_positive_and_start_at_lr(lr_mode):
    learner = fm.ModelAwareMAML(make_model("mlp"), 0.05, steps=2, lr_mode=lr_mode, log_lr=True)
    assert not hasattr(learner, "lrs")
    for step in range(2):
        rates = learner.rates(step)
        for r in rates if isinstance(rates, list) else [rates]:
            assert torch.allclose(r, torch.full_like(r, 0.05))
    with torch.no_grad():
        stored = learner.log_lrs if lr_mode != "param" else learner.log_lrs[0]
        stored.fill_(-50.0)  # a log-rate far below: the rate is tiny, never negative
    first = learner.rates(0)
    assert bool(((first[0] if isinstance(first, list) else first) > 0).all())


def test_log_rates_finite_differences():
    torch.manual_seed(0)
    model = fm.models.mlp((1, 6, 6, 1), activation="tanh").double()
    learner = fm.ModelAwareMAML(model, 0.05, steps=3, lr_mode="layer", log_lr=True)
    perturb_meta_parameters(learner)
    assert check_against_finite_differences(learner, regression_tasks(T=3, dtype=torch.float64)) < 1e-6
    assert finite_difference_error(learner, regression_tasks(T=3, dtype=torch.float64), ["log_lrs"]) < 1e-6


@pytest.mark.parametrize("log_lr", [False, True])
def test_steps_beyond_the_trained_ones_reuse_the_last_rule(log_lr):
    options = dict(lr_mode="layer", log_lr=log_lr, per_step_bn=True)
    learner = fm.ModelAwareMAML(make_model("conv"), 0.2, steps=2, **options)
    perturb_meta_parameters(learner, scale=0.1)
    sx, sy, qx, qy = make_tasks("conv")
    # A 5-step learner whose rows 2, 3, 4 repeat the 2-step learner's last row.
    extended = fm.ModelAwareMAML(make_model("conv"), 0.2, steps=5, **options)
    rates = "log_lrs" if log_lr else "lrs"
    with torch.no_grad():
        extended.module.load_state_dict(learner.module.state_dict())
        for name in (rates, "bn_per_step"):
            rows = getattr(learner, name)
            getattr(extended, name).copy_(torch.cat([rows, rows[-1:].expand(3, -1)]))
    fast = learner.fast_weights(sx, sy, steps=5)
    assert torch.allclose(fast.buffer, extended.fast_weights(sx, sy, steps=5).buffer, atol=1e-6)
    # And the reference loop, whose coefficient and BatchNorm rows clamp at the last step.
    losses = per_task_query_losses(
        learner.module, sx, sy, qx, qy, 5, False, learner_coefficient(learner), selection(learner),
        per_step_bn_reference(learner),
    )
    pred = learner.predict(fast, qx)
    got = torch.stack([nn.functional.cross_entropy(p, y) for p, y in zip(pred, qy)])
    assert relative_error(got, losses) < 1e-5


# -- the multi-step loss ----------------------------------------------------------------------


@pytest.mark.parametrize("learner_kind", ["maml", "model-aware"])
@pytest.mark.parametrize("kind, first_order", [("mlp", False), ("mlp", True), ("conv", False)])
def test_multi_step_loss_equals_reference_loop(learner_kind, kind, first_order):
    steps, weights = 3, [0.2, 0.0, 0.8]  # a zero weight: that step's query forward is skipped
    lr = 0.01 if kind == "mlp" else 0.2
    if learner_kind == "maml":
        learner = fm.MAML(make_model(kind), lr, first_order, steps=steps)
    else:
        learner = fm.ModelAwareMAML(make_model(kind), lr, first_order, steps=steps, log_lr=True)
        perturb_meta_parameters(learner, scale=0.1)
    tasks = make_tasks(kind)
    out = learner.meta_batch(*tasks, step_weights=weights)
    got = flat_grad(out.loss, [p for p in learner.parameters() if p.requires_grad])
    want, losses = loop_meta_gradient(learner, tasks, steps, first_order, selection(learner)
                                      if learner_kind != "maml" else (lambda n: True), step_weights=weights)
    assert relative_error(out.task_loss, losses) < 1e-5
    assert relative_error(got, want) < 1e-5
    plain, _ = loop_meta_gradient(learner, tasks, steps, first_order, step_weights=None)
    assert relative_error(plain, want) > 1e-3  # the weights change the meta-gradient


def test_multi_step_loss_finite_differences():
    torch.manual_seed(0)
    learner = fm.ModelAwareMAML(smooth_conv_bn_net().double(), 0.2, steps=2, log_lr=True, per_step_bn=True)
    perturb_meta_parameters(learner, scale=0.2)
    tasks = classification_tasks(T=2, shots=1, queries=2, image=8, dtype=torch.float64)
    weighted = lambda *t: learner.meta_batch(*t, step_weights=[0.4, 0.6])  # noqa: E731
    names = ["log_lrs", "module.8.bias"]  # the other parameters along random directions
    assert finite_difference_error(learner, tasks, names, meta_batch=weighted) < 1e-6


def test_multi_step_loss_accuracy_is_the_last_steps_and_chunks_agree():
    learner = fm.ModelAwareMAML(make_model("conv"), 0.2, steps=2)
    tasks = make_tasks("conv")
    weighted = learner.meta_batch(*tasks, step_weights=[0.5, 0.5])
    assert torch.equal(weighted.accuracy, learner.meta_batch(*tasks).accuracy)
    chunked = learner.meta_batch(*tasks, step_weights=[0.5, 0.5], task_chunk=1)
    params = [p for p in learner.parameters() if p.requires_grad]
    assert torch.allclose(chunked.task_loss, weighted.task_loss, atol=1e-6)
    assert relative_error(flat_grad(chunked.loss, params), flat_grad(weighted.loss, params)) < 1e-5


def test_multi_step_loss_on_the_last_step_alone_keeps_the_fused_path():
    # The sinusoid MLP takes the fused meta-step when the multi-step loss is only the last
    # step's, scaled; its meta-gradient is then the scaled plain one.
    learner = fm.MAML(fm.models.mlp((1, 40, 40, 1)), 0.01, steps=2)
    tasks = regression_tasks(T=4, shots=10, queries=10)
    params = list(learner.parameters())
    plain = learner.meta_batch(*tasks)
    scaled = learner.meta_batch(*tasks, step_weights=[0.0, 0.5])
    assert torch.allclose(scaled.task_loss, 0.5 * plain.task_loss, rtol=1e-6)
    assert relative_error(flat_grad(scaled.loss, params), 0.5 * flat_grad(plain.loss, params)) < 1e-6


# -- derivative order per call -------------------------------------------------------------


@pytest.mark.parametrize("learner_kind", ["maml", "model-aware"])
def test_first_order_per_call(learner_kind):
    cls = fm.MAML if learner_kind == "maml" else fm.ModelAwareMAML
    tasks = make_tasks("conv")
    second = cls(make_model("conv"), 0.2, steps=2)
    first = cls(make_model("conv"), 0.2, True, steps=2)
    params = [p for p in second.parameters() if p.requires_grad]
    got_first = flat_grad(second.meta_batch(*tasks, first_order=True).loss, params)
    want_first = flat_grad(first.meta_batch(*tasks).loss, [p for p in first.parameters() if p.requires_grad])
    assert relative_error(got_first, want_first) < 1e-6
    got_second = flat_grad(first.meta_batch(*tasks, first_order=False).loss,
                           [p for p in first.parameters() if p.requires_grad])
    assert relative_error(got_second, flat_grad(second.meta_batch(*tasks).loss, params)) < 1e-6
    assert relative_error(got_first, got_second) > 1e-4


# -- bad input ---------------------------------------------------------------------------------


def test_bad_options_are_named_before_any_change():
    with pytest.raises(ValueError, match="per_step_bn=True needs a model with affine BatchNorm"):
        fm.ModelAwareMAML(make_model("mlp"), 0.1, per_step_bn=True)
    with pytest.raises(TypeError, match="per_step_bn must be None, True or False"):
        fm.ModelAwareMAML(make_model("conv"), 0.1, per_step_bn="yes")
    model = make_model("mlp")
    zero = [torch.zeros(p.shape) for p in model.parameters()]
    with pytest.raises(ValueError, match="lrs must be > 0 with log_lr=True"):
        fm.ModelAwareMAML(model, 0.1, lr_mode="param", lr_per_step=False, lrs=zero, log_lr=True)


@pytest.mark.parametrize(
    "weights, error, message",
    [
        ([1.0], ValueError, r"step_weights must hold one weight per inner step \(2\), got 1"),
        ([0.5, -0.5], ValueError, "step_weights must be finite, >= 0 and not all 0"),
        ([0.0, 0.0], ValueError, "step_weights must be finite, >= 0 and not all 0"),
        ([float("nan"), 1.0], ValueError, "step_weights must be finite"),
        ([float("inf"), 1.0], ValueError, "step_weights must be finite"),
        (["a", 1.0], TypeError, "step_weights must be a sequence of 2 numbers"),
        (3, TypeError, "step_weights must be a sequence of 2 numbers"),
    ],
)
def test_bad_step_weights_are_named_before_any_change(weights, error, message):
    learner = fm.ModelAwareMAML(make_model("mlp"), 0.1, steps=2)
    before = [p.detach().clone() for p in learner.parameters()]
    with pytest.raises(error, match=message):
        learner.meta_batch(*make_tasks("mlp"), step_weights=weights)
    assert all(torch.equal(b, p) for b, p in zip(before, learner.parameters()))
