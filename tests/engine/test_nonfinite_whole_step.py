"""Issue 26, defect 3: a whole step skips the update of an iteration with a non-finite loss
or gradient and sets its flag. The GPU graph runs ``guarded_step``; here it runs on the CPU
against torch's plain step, and the real graph runs in the gpu-marked test."""

from __future__ import annotations

import pytest
import torch

import fastmeta as fm
from fastmeta.engine.whole_step import guarded_step


# How the guard undoes a non-finite update: torch's Adam (foreach or single-tensor) is
# copied and selected back; Adam(fused=True) skips it in its own kernel (found_inf).
ADAMS = {"plain": {}, "fused": {"fused": True}}


@pytest.fixture(params=sorted(ADAMS))
def adam(request):
    return request.param


def problem(seed=0, adam="plain"):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2).double()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=0.01, **ADAMS[adam])
    x = torch.randn(5, 3, dtype=torch.float64)
    return model, optimizer, x


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    return params, state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(
        d.keys() == e.keys() and all(torch.equal(d[k], e[k]) for k in d) for d, e in zip(sa, sb))


def one_step(model, optimizer, x, scale, guarded, flag):
    optimizer.zero_grad()
    loss = (model(x) * scale).pow(2).mean()
    loss.backward()
    if guarded:
        guarded_step(optimizer, loss, flag)
    else:
        optimizer.step()


def test_a_finite_step_equals_torchs_step(adam):
    a, b = problem(adam=adam), problem(adam=adam)
    flag = torch.zeros((), dtype=torch.bool)
    for _ in range(3):
        one_step(*a, 1.0, guarded=False, flag=flag)
        one_step(*b, 1.0, guarded=True, flag=flag)
    assert same(snapshot(*a[:2]), snapshot(*b[:2])) and not bool(flag)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_a_non_finite_step_is_skipped_and_flagged(scale, adam):
    model, optimizer, x = problem(adam=adam)
    flag = torch.zeros((), dtype=torch.bool)
    one_step(model, optimizer, x, 1.0, guarded=True, flag=flag)  # Adam's state exists
    before = snapshot(model, optimizer)
    one_step(model, optimizer, x, scale, guarded=True, flag=flag)
    assert bool(flag) and same(snapshot(model, optimizer), before)
    one_step(model, optimizer, x, 1.0, guarded=True, flag=flag)  # later finite steps still train
    assert not same(snapshot(model, optimizer), before) and bool(flag)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(value, adam):
    """The flag reads every gradient, not only the loss: one element of one gradient."""
    model, optimizer, x = problem(adam=adam)
    flag = torch.zeros((), dtype=torch.bool)
    one_step(model, optimizer, x, 1.0, guarded=True, flag=flag)
    before = snapshot(model, optimizer)
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    model.bias.grad[1] = value
    guarded_step(optimizer, loss, flag)
    assert bool(flag) and same(snapshot(model, optimizer), before)


def test_large_finite_gradients_are_not_flagged(adam):
    """|g| = 1e200 in float64: finite, though its 2-norm squared would overflow."""
    a, b = problem(adam=adam), problem(adam=adam)
    flag = torch.zeros((), dtype=torch.bool)
    for guarded, (model, optimizer, x) in ((False, a), (True, b)):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        model.weight.grad.fill_(1e200)
        guarded_step(optimizer, loss, flag) if guarded else optimizer.step()
    assert not bool(flag) and same(snapshot(*a[:2]), snapshot(*b[:2]))


def test_the_check_leaves_the_loss_and_every_gradient_bit_for_bit(adam):
    """The flag is torch's non-finite check at a scale of 1: the values it multiplies in
    place by 1.0 keep every bit (-0.0, a subnormal, 1e200, a NaN payload), the loss too."""
    model, optimizer, x = problem(adam=adam)
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    model.weight.grad.copy_(torch.tensor([[-0.0, 5e-324, 1e200], [-1e200, 3.0, -7.25]], dtype=torch.float64))
    grads = [p.grad.clone() for p in model.parameters()]
    loss_before = loss.detach().clone()
    flag = torch.zeros((), dtype=torch.bool)
    guarded_step(optimizer, loss, flag)
    assert not bool(flag)
    assert all(torch.equal(a.view(torch.int64), p.grad.view(torch.int64)) for a, p in zip(grads, model.parameters()))
    assert torch.equal(loss.detach().view(torch.int64), loss_before.view(torch.int64))


def test_a_fused_adam_skips_in_its_own_kernel_and_keeps_no_copies(monkeypatch):
    """The fused path hands the flag to the optimizer as GradScaler does (found_inf) and
    copies nothing: no _foreach_copy_, no where; the attributes are gone afterwards."""
    model, optimizer, x = problem(adam="fused")
    flag = torch.zeros((), dtype=torch.bool)
    one_step(model, optimizer, x, 1.0, guarded=True, flag=flag)
    seen = {}
    step = optimizer.step

    def spy():
        seen["found_inf"] = optimizer.found_inf.clone()
        return step()

    monkeypatch.setattr(optimizer, "step", spy)
    monkeypatch.setattr(torch, "where", lambda *a, **k: pytest.fail("the fused path selected with where"))
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a, **k: pytest.fail("the fused path copied the state"))
    before = snapshot(model, optimizer)
    one_step(model, optimizer, x, float("nan"), guarded=True, flag=flag)
    assert seen["found_inf"].dtype == torch.float32 and float(seen["found_inf"]) == 1.0
    assert bool(flag) and same(snapshot(model, optimizer), before)
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")


def test_a_gradient_scalers_optimizer_is_refused_by_name():
    model, optimizer, x = problem(adam="fused")
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.found_inf = torch.zeros(())
    with pytest.raises(ValueError, match="found_inf"):
        guarded_step(optimizer, loss, torch.zeros((), dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_the_captured_graph_skips_a_non_finite_update(fused):
    torch.manual_seed(0)
    meta = fm.MAML(fm.models.mlp((1, 16, 1)).cuda(), lr=0.01, validate=False)
    optimizer = torch.optim.Adam(meta.parameters(), 1e-3, capturable=True, fused=fused)
    g = torch.Generator().manual_seed(0)
    batch = [t.cuda() for t in (torch.randn(4, 5, 1, generator=g), torch.randn(4, 5, 1, generator=g),
                                torch.randn(4, 6, 1, generator=g), torch.randn(4, 6, 1, generator=g))]
    step = meta.capture(optimizer, *batch)
    step(*batch)
    before = [p.detach().clone() for p in meta.parameters()]
    bad = list(batch)
    bad[3] = torch.full_like(batch[3], float("nan"))
    step(*bad)
    assert all(torch.equal(p, q) for p, q in zip(meta.parameters(), before))
    with pytest.raises(FloatingPointError, match="skipped"):
        step.check_finite()
