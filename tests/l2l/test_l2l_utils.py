"""``fastmeta.l2l``: learn2learn's names and utilities, and the clone's BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm
import fastmeta.l2l as l2l
from fastmeta.testing.reference_loop import flat_grad, relative_error
from fastmeta.learners.module_tree import transductive_batch_norm

DT = torch.float64


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def test_the_learn2learn_names_import():
    from fastmeta.l2l import clone_module, detach_module, maml_update, update_module
    from fastmeta.l2l.algorithms import MAML, MetaSGD
    from fastmeta.l2l.utils import clone_module as utils_clone_module

    assert l2l.algorithms.MAML is MAML is fm.MAML and l2l.algorithms.MetaSGD is MetaSGD is fm.MetaSGD
    assert utils_clone_module is clone_module is l2l.utils.clone_module
    assert {update_module, detach_module, maml_update} == {
        l2l.utils.update_module, l2l.utils.detach_module, l2l.utils.maml_update}
    assert fm.l2l is l2l


def test_clone_module_copies_structure_and_stays_differentiable():
    model = small_net()
    model.register_buffer("scale", torch.tensor(2.0, dtype=DT))
    clone = l2l.clone_module(model)
    assert type(clone) is nn.Sequential and clone is not model and clone[0] is not model[0]
    for p, c in zip(model.parameters(), clone.parameters()):
        assert c is not p and torch.equal(c, p) and c.grad_fn is not None
    assert clone.scale is model.scale  # buffers are shared, as in learn2learn
    x = torch.randn(3, 2, dtype=DT)
    clone(x).sum().backward()
    want = flat_grad(model(x).sum(), list(model.parameters()))
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), want)


def test_clone_module_keeps_tied_weights_tied_and_shares_through_memo():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    pair = nn.ModuleList([a, b, a])  # a shared submodule too
    clone = l2l.clone_module(pair)
    assert clone[0] is clone[2] and clone[0].weight is clone[1].weight
    memo = {}
    first, second = l2l.clone_module(a, memo), l2l.clone_module(b, memo)
    assert first.weight is second.weight


def test_update_module_with_updates_and_with_the_update_protocol():
    model = small_net()
    clone = l2l.clone_module(model)
    updates = [torch.full_like(p, 0.5) for p in clone.parameters()]
    originals = [p for p in clone.parameters()]
    assert l2l.update_module(clone, updates=updates) is clone
    for p, o in zip(clone.parameters(), originals):
        assert torch.equal(p, o + 0.5)
    first = next(clone.parameters())
    first.update = -first.detach()  # learn2learn's protocol: set p.update, then update_module
    l2l.update_module(clone)
    assert torch.equal(next(clone.parameters()), torch.zeros_like(first))
    assert first.update is None
    with pytest.raises(ValueError, match="updates holds 1 tensors but the module has 4 parameters"):
        l2l.update_module(clone, updates=[torch.zeros(1)])


def test_update_module_updates_a_tied_weight_once():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight
    pair = l2l.clone_module(nn.ModuleList([a, b]))
    shared = pair[0].weight
    shared.update = torch.ones_like(shared)
    l2l.update_module(pair)
    assert pair[0].weight is pair[1].weight and torch.equal(pair[0].weight, shared + 1)


def test_maml_update_is_the_second_order_maml_step():
    model = small_net()
    x, y = torch.randn(6, 2, dtype=DT), torch.randn(6, 1, dtype=DT)
    clone = l2l.clone_module(model)
    grads = torch.autograd.grad(F.mse_loss(clone(x), y), list(clone.parameters()), create_graph=True)
    l2l.maml_update(clone, 0.3, grads)
    got = flat_grad(F.mse_loss(clone(-x), y), list(model.parameters()))
    learner = fm.MAML(model, 0.3)
    reference = learner.clone()
    reference.adapt(F.mse_loss(reference(x), y))
    want = flat_grad(F.mse_loss(reference(-x), y), list(model.parameters()))
    assert relative_error(got, want) < 1e-13
    with pytest.raises(ValueError, match="grads holds 2 tensors"):
        l2l.maml_update(clone, 0.3, grads[:2])


def test_anil_written_with_the_utilities():
    """learn2learn's ANIL: a plain feature extractor, MAML on the head only."""
    torch.manual_seed(1)
    features = nn.Sequential(nn.Linear(3, 6), nn.Tanh()).to(DT)
    head = fm.MAML(nn.Linear(6, 2).to(DT), 0.5)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    clone = head.clone()
    clone.adapt(F.cross_entropy(clone(features(x)), y))
    loss = F.cross_entropy(clone(features(x)), y)
    params = list(features.parameters()) + list(head.parameters())
    got = flat_grad(loss, params)
    h = features(x)
    w, b = head.module.weight, head.module.bias
    gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(h, w, b), y), (w, b), create_graph=True)
    want = flat_grad(F.cross_entropy(F.linear(h, w - 0.5 * gw, b - 0.5 * gb), y), params)
    assert relative_error(got, want) < 1e-13


def test_detach_module_in_place_and_keep_requires_grad():
    model = small_net()
    clone = l2l.clone_module(model)
    kept = list(clone.parameters())
    l2l.detach_module(clone)
    assert all(p.is_leaf and not p.requires_grad for p in clone.parameters())
    assert all(a is b for a, b in zip(kept, clone.parameters()))  # in place, as learn2learn's detach_()
    clone = l2l.clone_module(model)
    l2l.detach_module(clone, keep_requires_grad=True)
    assert all(p.is_leaf and p.requires_grad for p in clone.parameters())
    clone(torch.randn(2, 2, dtype=DT)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_detach_module_on_a_fastmeta_clone_then_adapt_needs_allow_nograd():
    model = small_net()
    learner = fm.MAML(model, 0.1)
    clone = learner.clone()
    l2l.detach_module(clone.module)
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    with pytest.raises(ValueError, match="allow_nograd"):
        clone.adapt(F.mse_loss(clone(x), y))
    clone = learner.clone()
    l2l.detach_module(clone.module, keep_requires_grad=True)
    clone.adapt(F.mse_loss(clone(x), y))  # the detached leaves adapt; no path to the model
    assert all(not p.is_leaf for p in clone.parameters())
    F.mse_loss(clone(x), y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_clone_parameters():
    lrs = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))]
    cloned = l2l.clone_parameters(lrs)
    assert all(c is not p and torch.equal(c, p) and c.grad_fn is not None for c, p in zip(cloned, lrs))


def test_utilities_name_a_bad_module():
    for fn in (l2l.clone_module, l2l.update_module, l2l.detach_module):
        with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
            fn([torch.zeros(1)])


# -- the clone's BatchNorm -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 4), (2, 2, 3, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_transductive_batch_norm_is_pytorchs_on_batch_statistics(shape, affine):
    torch.manual_seed(2)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    bn = cls(shape[1], affine=affine).to(DT).eval()  # evaluation mode: still batch statistics
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    x = torch.randn(*shape, dtype=DT)
    want = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.equal(transductive_batch_norm(bn, x), want)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 0.5))
    with pytest.raises(ValueError, match="expected 4D input"):
        transductive_batch_norm(nn.BatchNorm2d(3), torch.randn(4, 3))


class OwnNorm(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_batch_norm_subclass_with_its_own_forward_keeps_it():
    model = nn.Sequential(nn.Linear(2, 3), OwnNorm(3), nn.Linear(3, 1)).to(DT)
    clone = fm.MAML(model, 0.1).clone()
    x = torch.randn(5, 2, dtype=DT)
    assert torch.equal(clone(x), model(x))
    plain = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).to(DT)
    assert "forward" in fm.MAML(plain, 0.1).clone().module[1].__dict__
    assert "forward" not in fm.MAML(plain, 0.1, batch_norm="running").clone().module[1].__dict__
