"""The learn2learn-compatible API: the same gradients as ``meta_batch`` and as a plain
``functional_call`` loop, and a clone that is an ``nn.Module``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm
from fastmeta.testing.reference_loop import flat_grad, relative_error
from helpers import make_model, make_tasks


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


def functional_loop_meta_gradient(model, tasks, steps, lr, loss_fn, first_order=False):
    """The same loop with ``torch.func.functional_call`` and ``autograd.grad`` only."""
    sx, sy, qx, qy = tasks
    total = 0.0
    buffers = dict(model.named_buffers())
    for t in range(sx.size(0)):
        params = dict(model.named_parameters())
        for _ in range(steps):
            state = (params, {n: b.clone() for n, b in buffers.items()})
            loss = loss_fn(torch.func.functional_call(model, state, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        state = (params, {n: b.clone() for n, b in buffers.items()})
        total = total + loss_fn(torch.func.functional_call(model, state, (qx[t],)), qy[t])
    return flat_grad(total / sx.size(0), list(model.parameters()))


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


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True])
def test_clone_adapt_matches_the_functional_loop_in_float64(kind, first_order):
    steps, lr = 2, (0.01 if kind == "mlp" else 0.3)
    model = make_model(kind).double()
    tasks = [t.double() if t.is_floating_point() else t for t in make_tasks(kind)]
    loss_fn = F.mse_loss if kind == "mlp" else F.cross_entropy
    learner = fm.MAML(model, lr, first_order)
    via_clone = l2l_style_meta_gradient(learner, tasks, steps, loss_fn)
    want = functional_loop_meta_gradient(model, tasks, steps, lr, loss_fn, first_order)
    assert relative_error(via_clone, want) < 1e-12
    if not first_order:  # second order differs from first order here: the check can fail
        fo = functional_loop_meta_gradient(model, tasks, steps, lr, loss_fn, True)
        assert relative_error(fo, want) > 1e-4


def test_adapted_weights_are_the_functional_loops_bit_for_bit():
    """θ − lr·g rounded as the loop rounds it: on kinked nets one flipped bit can move a
    pre-activation across ReLU's kink (bench/bench_l2l.py's Omniglot shape had one)."""
    model = make_model("conv")
    sx, sy, _, _ = make_tasks("conv")
    learner = fm.MAML(model, 0.3)
    clone = learner.clone()
    params = dict(model.named_parameters())
    for _ in range(2):
        clone.adapt(F.cross_entropy(clone(sx[0]), sy[0]))
        state = (params, {n: b.clone() for n, b in model.named_buffers()})
        loss = F.cross_entropy(torch.func.functional_call(model, state, (sx[0],)), sy[0])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads)}
    for (name, got), want in zip(clone.module.named_parameters(), params.values()):
        assert torch.equal(got, want), name


def test_model_aware_clone_matches_meta_batch():
    model = make_model("conv")
    learner = fm.ModelAwareMAML(model, 0.2, steps=2, lr_mode="layer", gates=True, precondition=True)
    tasks = make_tasks("conv")
    via_clone = l2l_style_meta_gradient(learner, tasks, 2, F.cross_entropy)
    via_batch = flat_grad(learner.meta_batch(*tasks).loss, list(learner.parameters()))
    assert relative_error(via_clone, via_batch) < 1e-5


def test_anil_clone_adapts_only_the_head():
    model = make_model("conv")
    learner = fm.ModelAwareMAML(model, 0.2, steps=2, lr_mode="scalar", lr_per_step=False, adapt_layers="head")
    tasks = make_tasks("conv")
    clone = learner.clone()
    clone.adapt(F.cross_entropy(clone(tasks[0][0]), tasks[1][0]))
    for (name, got), want in zip(clone.module.named_parameters(), model.parameters()):
        assert torch.equal(got.detach(), want.detach()) == (not name.startswith("8.")), name
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
    assert again.steps_taken == 1


def test_metasgd_clone_lrs_are_the_rates_adapt_uses():
    model = make_model("mlp")
    meta = fm.MetaSGD(model, lr=0.1)
    clone = meta.clone()
    assert [l.shape for l in clone.lrs] == [p.shape for p in model.parameters()]
    assert all(a is b for a, b in zip(clone.lrs, meta.lrs))
    clone.lrs[0] = torch.zeros_like(clone.lrs[0])  # learn2learn code may set a clone's rates
    x = torch.randn(5, 1)
    clone.adapt(F.mse_loss(clone(x), torch.ones(5, 1)))
    adapted = dict(clone.named_parameters())
    assert torch.equal(adapted["module.0.weight"].detach(), model[0].weight.detach())
    assert not torch.equal(adapted["module.0.bias"].detach(), model[0].bias.detach())
    assert not hasattr(fm.MAML(make_model("mlp"), 0.1).clone(), "lrs")


def test_metasgd_meta_gradient_reaches_the_rates():
    torch.manual_seed(0)
    model = make_model("mlp").double()
    meta = fm.MetaSGD(model, lr=0.05)
    with torch.no_grad():
        for l in meta.lrs:
            l.mul_(1 + torch.rand_like(l))
    x, y = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    clone = meta.clone()
    clone.adapt(F.mse_loss(clone(x), y))
    got = flat_grad(F.mse_loss(clone(x), y), list(meta.parameters()))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, params, (x,)), y),
                                list(params.values()), create_graph=True)
    params = {n: p - l * g for (n, p), l, g in zip(params.items(), meta.lrs, grads)}
    want = flat_grad(F.mse_loss(torch.func.functional_call(model, params, (x,)), y), list(meta.parameters()))
    assert relative_error(got, want) < 1e-12
    assert all(l.grad is None for l in meta.lrs)  # flat_grad took them; nothing accumulated
    assert float(want[-sum(l.numel() for l in meta.lrs):].norm()) > 0


def test_adapt_raises_for_frozen_parameters_unless_allowed():
    model = make_model("mlp")
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    learner = fm.MAML(model, 0.1)
    clone = learner.clone()
    x = torch.randn(5, 1)
    loss = F.mse_loss(clone(x), torch.ones(5, 1))
    before = [p.detach().clone() for p in clone.parameters()]
    with pytest.raises(ValueError, match=r"2\.weight.*allow_nograd"):
        clone.adapt(loss)
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, clone.parameters()))
    clone.adapt(loss, allow_nograd=True)  # the same loss: nothing was consumed by the failure
    assert torch.equal(dict(clone.named_parameters())["module.2.weight"].detach(), frozen)
    assert torch.equal(model[2].weight, frozen)


def test_allow_unused_as_in_learn2learn():
    """learn2learn's test: a loss on every other parameter; unused ones get no step and
    no meta-gradient."""
    model = make_model("mlp")
    learner = fm.MAML(model, 0.1, allow_unused=True)
    clone = learner.clone()
    clone.adapt(sum(p.norm() for i, p in enumerate(clone.parameters()) if i % 2 == 0))
    sum(p.norm() for i, p in enumerate(clone.parameters()) if i % 2 == 0).backward()
    for i, (p, q) in enumerate(zip(model.parameters(), clone.parameters())):
        assert (p.grad is not None) == (i % 2 == 0)
        assert torch.equal(p.detach(), q.detach()) == (i % 2 == 1)

    strict = fm.MAML(make_model("mlp"), 0.1).clone()
    before = [p.detach().clone() for p in strict.parameters()]
    with pytest.raises(ValueError, match=r"module\.0\.bias|0\.bias.*allow_unused"):
        strict.adapt(sum(p.norm() for i, p in enumerate(strict.parameters()) if i % 2 == 0))
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, strict.parameters()))


def test_a_penalty_on_clone_parameters_counts_before_the_first_adapt():
    """Issue 13: before the first adapt, a term on clone.parameters() was silently dropped."""
    model = make_model("mlp").double()
    learner = fm.MAML(model, 0.1)
    clone = learner.clone()
    clone.adapt(sum(p.pow(2).sum() for p in clone.parameters()))  # the penalty alone
    want = [p - 0.1 * 2 * p for p in model.parameters()]
    for got, w in zip(clone.parameters(), want):
        assert torch.allclose(got, w, rtol=0, atol=1e-15)


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_zero_and_negative_rates_are_accepted_as_in_learn2learn(lr):
    model = make_model("mlp").double()
    learner = fm.MAML(model, lr)
    x, y = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    clone = learner.clone()
    loss = F.mse_loss(clone(x), y)
    grads = torch.autograd.grad(loss, list(clone.parameters()), retain_graph=True)
    clone.adapt(loss)
    for p, q, g in zip(clone.parameters(), model.parameters(), grads):
        assert torch.allclose(p, q - lr * g, rtol=0, atol=1e-15)
    assert learner.meta_batch(*[t.double() for t in make_tasks("mlp")]).loss.isfinite()


def test_the_clone_rate_can_be_changed_per_clone():
    model = make_model("mlp").double()
    learner = fm.MAML(model, 0.1)
    x, y = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    a, b = learner.clone(), learner.clone()
    b.lr = 0.2
    a.adapt(F.mse_loss(a(x), y))
    b.adapt(F.mse_loss(b(x), y))
    for p, q, base in zip(a.parameters(), b.parameters(), model.parameters()):
        assert torch.allclose(q - base, 2 * (p - base), rtol=1e-12, atol=1e-15)


def test_first_order_clone_drops_the_second_order_terms():
    model = make_model("mlp").double()
    tasks = [t.double() for t in make_tasks("mlp")]
    learner = fm.MAML(model, 0.01)
    want_fo = functional_loop_meta_gradient(model, tasks, 2, 0.01, F.mse_loss, first_order=True)
    sx, sy, qx, qy = tasks
    total = 0.0
    for t in range(sx.size(0)):
        clone = learner.clone(first_order=True)
        clone.adapt(F.mse_loss(clone(sx[t]), sy[t]))
        clone.adapt(F.mse_loss(clone(sx[t]), sy[t]), first_order=True)
        total = total + F.mse_loss(clone(qx[t]), qy[t])
    assert relative_error(flat_grad(total / sx.size(0), list(model.parameters())), want_fo) < 1e-12


def test_adapt_on_the_learner_itself_steps_its_model_in_place():
    """learn2learn's adapt() on the learner: the model then holds the adapted tensors,
    graph-connected to the parameters it had."""
    model = make_model("mlp").double()
    originals = list(model.parameters())
    x, y = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    learner = fm.MAML(model, 0.1)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, params, (x,)), y),
                                list(params.values()), create_graph=True)
    adapted = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    want_out = torch.func.functional_call(model, adapted, (x,))
    want_grad = flat_grad(want_out.sum(), originals)

    learner.adapt(F.mse_loss(learner(x), y))
    assert learner.steps_taken == 1
    out = learner(x)
    assert torch.allclose(out, want_out, rtol=0, atol=1e-14)
    assert relative_error(flat_grad(out.sum(), originals), want_grad) < 1e-12
    assert all(not p.is_leaf for p in model.parameters())
    # A clone of the adapted learner starts from the adapted weights.
    clone = learner.clone()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(clone.parameters(), model.parameters()))


# -- the clone is an nn.Module ---------------------------------------------------------------


class Scaled(nn.Module):
    """A custom module with an attribute, a method and a submodule."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.temperature = 2.0
        self.register_buffer("offset", torch.ones(2))

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.features(x)) / self.temperature + self.offset


def test_clone_is_an_nn_module_of_the_users_model():
    torch.manual_seed(0)
    model = Scaled()
    learner = fm.MAML(model, 0.1)
    clone = learner.clone()
    x = torch.randn(4, 3)
    clone.adapt(clone(x).pow(2).mean())
    assert isinstance(clone, nn.Module) and isinstance(clone.module, Scaled)
    assert clone.temperature == 2.0
    assert isinstance(clone.head, nn.Linear) and clone.head is not model.head
    # Methods and submodules run with the adapted weights.
    adapted = dict(clone.module.named_parameters())
    want = torch.func.functional_call(model, adapted, (x,))
    assert torch.equal(clone(x), want)
    assert torch.equal(clone.features(x), torch.tanh(F.linear(x, adapted["body.weight"], adapted["body.bias"])))
    assert torch.equal(clone.head(clone.features(x)), F.linear(clone.features(x), adapted["head.weight"],
                                                              adapted["head.bias"]))
    # state_dict and buffers, as learn2learn's clone (a learner holding `module`).
    state = clone.state_dict()
    assert sorted(state) == sorted(f"module.{k}" for k in model.state_dict())
    assert torch.equal(state["module.head.weight"], adapted["head.weight"].detach())
    assert [b for b in clone.buffers()] == [model.offset]
    # train/eval and hooks affect the copy, not the model.
    clone.eval()
    assert not clone.module.training and not clone.head.training and model.training and model.head.training
    seen = []
    clone.head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    clone(x)
    model(x)
    assert seen == [torch.Size([4, 2])] and not model.head._forward_hooks
    # zero_grad leaves the learner's gradients alone and warns about nothing.
    clone(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone.zero_grad()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(AttributeError, match="no attribute 'log_prob'"):
        clone.log_prob
    # The learner passes its model's attributes through too, as learn2learn's does.
    assert learner.temperature == 2.0 and torch.equal(learner.features(x), model.features(x))


def test_to_keeps_the_clone_in_the_graph():
    model = make_model("mlp")
    learner = fm.MAML(model, 0.1)
    x = torch.randn(4, 1, dtype=torch.float64)
    clone = learner.clone().to(torch.float64)
    assert all(p.dtype == torch.float64 and p.grad_fn is not None for p in clone.parameters())
    clone.adapt(F.mse_loss(clone(x), torch.zeros(4, 1, dtype=torch.float64)))
    clone(x).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    meta = fm.MetaSGD(make_model("mlp"), 0.1)
    assert all(l.dtype == torch.float64 for l in meta.clone().double().lrs)


def test_adapt_rejects_bad_losses_before_any_change():
    learner = fm.MAML(make_model("mlp"), 0.1)
    clone = learner.clone()
    before = [p.detach().clone() for p in clone.parameters()]
    x = torch.randn(3, 1)
    with pytest.raises(FloatingPointError):
        clone.adapt(clone(x).sum() * float("nan"))
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        clone.adapt(clone(x))
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        clone.adapt(1.0)
    with torch.no_grad():
        detached = clone(x).sum()
    with pytest.raises(ValueError, match="does not depend on the clone's parameters"):
        clone.adapt(detached)
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, clone.parameters()))
    assert clone.steps_taken == 0


def test_bad_batch_norm_mode_names_the_argument():
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        fm.MAML(make_model("mlp"), 0.1, batch_norm="eval")


def test_a_replaced_submodule_is_seen_by_the_next_clone():
    model = make_model("mlp")
    learner = fm.MAML(model, 0.1)
    learner.clone()
    model[1] = nn.Tanh()
    x = torch.randn(4, 1)
    assert torch.equal(learner.clone()(x), model(x))


def test_the_speed_bench_runs_and_checks_its_contenders(tmp_path):
    """bench/bench_l2l.py on the sine shape, one round: every contender's meta-gradient
    agrees with the loop's (the timings themselves are not asserted)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_l2l.py"
    spec = importlib.util.spec_from_file_location("bench_l2l", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--shapes", "sine", "--samples", "1", "--json", str(tmp_path / "l2l.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "l2l.json").read_text())["results"][0]["rows"]
    assert [r["contender"] for r in rows] == ["loop", "clone/adapt", "meta_batch"]
    assert all(r["meta_gradient_error_vs_loop"] < 1e-4 and r["median_ms"] > 0 for r in rows)


def test_learn2learn_checkpoints_load():
    """learn2learn's MAML and MetaSGD keep the model as `module` and MetaSGD's rates as a
    ParameterList `lrs`: their state_dicts load as they are."""
    model = make_model("mlp")
    l2l_maml = {f"module.{k}": v.clone() + 1 for k, v in model.state_dict().items()}
    maml = fm.MAML(make_model("mlp"), 0.1)
    maml.load_state_dict(l2l_maml)  # strict
    assert all(torch.equal(maml.state_dict()[k], v) for k, v in l2l_maml.items())
    l2l_metasgd = dict(l2l_maml)
    l2l_metasgd.update({f"lrs.{i}": torch.full_like(p, 0.3) for i, p in enumerate(model.parameters())})
    meta = fm.MetaSGD(make_model("mlp"), 1.0)
    meta.load_state_dict(l2l_metasgd)
    assert all(torch.equal(l, torch.full_like(l, 0.3)) for l in meta.lrs)
