"""The learn2learn-compatible API gives the same gradients as ``meta_batch``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmeta as fm
from fastmeta.engine.per_task_loop import flat_grad, relative_error
from test_learners import classification_tasks, make_model, make_tasks


def l2l_style_meta_gradient(learner, tasks, steps, loss_fn):
    """The loop a learn2learn user writes, with only the import changed."""
    sx, sy, qx, qy = tasks
    total = 0.0
    for t in range(sx.size(0)):
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(loss_fn(clone(sx[t]), sy[t]))
        total = total + loss_fn(clone(qx[t]), qy[t])
    meta_loss = total / sx.size(0)
    return flat_grad(meta_loss, list(learner.parameters()))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_clone_adapt_matches_meta_batch(kind, first_order):
    steps = 2
    model = make_model(kind)
    learner = fm.MAML(model, 0.01 if kind == "mlp" else 0.3, first_order, steps=steps)
    tasks = make_tasks(kind)
    loss_fn = F.mse_loss if kind == "mlp" else F.cross_entropy
    via_clone = l2l_style_meta_gradient(learner, tasks, steps, loss_fn)
    via_batch = flat_grad(learner.meta_batch(*tasks).loss, list(learner.parameters()))
    assert relative_error(via_clone, via_batch) < 1e-5


def test_model_aware_clone_matches_meta_batch():
    model = make_model("conv")
    learner = fm.ModelAwareMAML(model, 0.2, steps=2, lr_mode="layer", gates=True, precondition=True)
    tasks = make_tasks("conv")
    via_clone = l2l_style_meta_gradient(learner, tasks, 2, F.cross_entropy)
    via_batch = flat_grad(learner.meta_batch(*tasks).loss, list(learner.parameters()))
    assert relative_error(via_clone, via_batch) < 1e-5


def test_learner_call_runs_the_model_and_clone_parameters_are_adapted():
    model = make_model("mlp")
    learner = fm.MAML(model, 0.05)
    x = torch.randn(7, 1)
    assert torch.equal(learner(x), model(x))
    clone = learner.clone()
    before = [p.detach().clone() for p in clone.parameters()]
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())
    clone.adapt(F.mse_loss(clone(x), torch.zeros(7, 1)))
    after = list(clone.parameters())
    assert len(after) == len(before)
    assert any(not torch.equal(a.detach(), b) for a, b in zip(after, before))
    # The model itself is untouched: the clone is a copy.
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())
    # A clone of a clone continues from the adapted weights.
    again = clone.clone()
    assert all(torch.equal(a.detach(), c.detach()) for a, c in zip(after, again.parameters()))


def test_metasgd_clone_uses_learned_rates():
    model = make_model("mlp")
    meta = fm.MetaSGD(model, lr=0.1)
    with torch.no_grad():
        meta.lrs[0].fill_(0.0)  # the first weight must not move
    clone = meta.clone()
    x = torch.randn(5, 1)
    clone.adapt(F.mse_loss(clone(x), torch.ones(5, 1)))
    adapted = dict(clone.named_parameters())
    assert torch.equal(adapted["0.weight"].detach(), model[0].weight.detach())
    assert not torch.equal(adapted["0.bias"].detach(), model[0].bias.detach())


def test_adapt_raises_for_frozen_parameters_unless_allowed():
    model = make_model("mlp")
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    learner = fm.MAML(model, 0.1)
    clone = learner.clone()
    x = torch.randn(5, 1)
    with pytest.raises(ValueError, match="allow_nograd"):
        clone.adapt(F.mse_loss(clone(x), torch.ones(5, 1)))
    clone = learner.clone(allow_nograd=True)
    clone.adapt(F.mse_loss(clone(x), torch.ones(5, 1)))
    assert torch.equal(dict(clone.named_parameters())["2.weight"].detach(), frozen)
    assert torch.equal(model[2].weight, frozen)


def test_adapt_rejects_a_non_finite_loss_and_keeps_its_weights():
    learner = fm.MAML(make_model("mlp"), 0.1)
    clone = learner.clone()
    before = [p.detach().clone() for p in clone.parameters()]
    with pytest.raises(FloatingPointError):
        clone.adapt(clone(torch.randn(3, 1)).sum() * float("nan"))
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, clone.parameters()))
