"""learn2learn's example scripts, with only the import changed: one test per script.

Each mirror in ``example_scripts/`` has the original's shape and makes the original's
``l2l`` calls, listed in its ``L2L_CALLS``, in the same order; here every listed call is
watched, the mirror runs a few iterations on tiny data, and the test asserts that each
call ran, in that order, and that the run did what the script is for.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastmeta as fm
import fastmeta.l2l as l2l
from published_fixtures import fc100_root, mini_imagenet_root  # noqa: F401 (fixtures)
from fastmeta.l2l.algorithms.gbml import GBML
from fastmeta.l2l.data import TaskDataset
from fastmeta.learners import AdaptedModel, MetaLearner

from example_scripts import (
    anil_fc100, maml_omniglot, maml_sine, maml_toy, maml_trpo, mamlpp, metacurvature_fc100, metamodule_toy,
    metasgd_a2c,
)

# Methods the scripts call on what l2l returns: label -> (class, method).
METHODS = {
    "MAML.clone": (MetaLearner, "clone"),
    "MetaSGD.clone": (MetaLearner, "clone"),
    "clone.adapt": (AdaptedModel, "adapt"),
    "TaskDataset.sample": (TaskDataset, "sample"),
    "GBML.clone": (GBML, "clone"),
    "GBML.adapt": (GBML, "adapt"),
    "BaseLearner.__init__": (l2l.algorithms.base_learner.BaseLearner, "__init__"),
}


def owner_of(label: str):
    if label in METHODS:
        return METHODS[label]
    assert label.startswith("l2l."), label
    owner = l2l
    *path, name = label.split(".")[1:]
    for part in path:
        owner = getattr(owner, part)
    return owner, name


@pytest.fixture
def watch(monkeypatch):
    """watch(labels) patches each call to record its label; returns the record (a list)."""
    seen: list[str] = []

    def install(labels):
        for label in labels:
            owner, name = owner_of(label)
            original = getattr(owner, name)

            def wrapper(*args, __original=original, __label=label, **kwargs):
                # Only the script's own calls: l2l calling itself (ConvBase initialising
                # its convolutions with maml_init_) is not a call of the script.
                if sys._getframe(1).f_globals.get("__name__", "").startswith("example_scripts"):
                    seen.append(__label)
                return __original(*args, **kwargs)

            if not isinstance(original, type):
                wrapper = functools.wraps(original)(wrapper)
            monkeypatch.setattr(owner, name, wrapper)
        return seen

    return install


def first_uses(seen: list[str]) -> list[str]:
    order: list[str] = []
    for label in seen:
        if label not in order:
            order.append(label)
    return order


def check_calls(script, seen):
    assert first_uses(seen) == script.L2L_CALLS, f"{script.__name__}: calls ran as {first_uses(seen)}"


def reference_sine_meta_loss(model, batch, adapt_lr, adapt_steps):
    """maml_sine's first meta-loss, with torch.func.functional_call and autograd.grad only."""
    x, y = batch
    total = 0.0
    for i in range(x.size(0)):
        params = dict(model.named_parameters())
        for _ in range(adapt_steps):
            loss = F.mse_loss(torch.func.functional_call(model, params, (x[i][::2],)), y[i][::2])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - adapt_lr * g for (n, p), g in zip(params.items(), grads)}
        total = total + F.mse_loss(torch.func.functional_call(model, params, (x[i][1::2],)), y[i][1::2])
    return total / x.size(0)


def test_maml_sine(watch):
    seen = watch(maml_sine.L2L_CALLS)
    losses = maml_sine.main(iterations=3)
    check_calls(maml_sine, seen)
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)
    # The first meta-loss is the plain loop's, bit for bit.
    torch.manual_seed(0)
    model = maml_sine.SineModel(16)
    batch = next(maml_sine.sine_batches(1, 4, 10, torch.Generator().manual_seed(0)))
    assert reference_sine_meta_loss(model, batch, 0.01, 5).item() == losses[0]


def test_maml_toy(watch):
    seen = watch(maml_toy.L2L_CALLS)
    losses = maml_toy.main(timesteps=3)
    check_calls(maml_toy, seen)
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)


def test_metamodule_toy(watch):
    seen = watch(metamodule_toy.L2L_CALLS)
    wrapped, trainable = metamodule_toy.main()
    check_calls(metamodule_toy, seen)
    # Only the LayerNorms train; the originals are frozen; the ReLUs became GELUs.
    assert trainable == {
        "wrapped_module.0.0.weight": False, "wrapped_module.0.0.bias": False,
        "wrapped_module.0.1.weight": True, "wrapped_module.0.1.bias": True,
        "wrapped_module.2.0.weight": False, "wrapped_module.2.0.bias": False,
        "wrapped_module.2.1.weight": True, "wrapped_module.2.1.bias": True,
    }
    assert isinstance(wrapped.wrapped_module[1], torch.nn.GELU) and wrapped(torch.randn(3, 10)).shape == (3, 10)


def test_maml_omniglot(watch, synthetic_omniglot):
    seen = watch(maml_omniglot.L2L_CALLS)
    errors = maml_omniglot.main(root=synthetic_omniglot)
    check_calls(maml_omniglot, seen)
    assert len(errors) == 2 and all(math.isfinite(e) for e in errors)
    assert seen.count("TaskDataset.sample") == 2 * 4 * 2 + 4  # train and validation per task, then test


def test_anil_fc100(watch, fc100_root):
    seen = watch(anil_fc100.L2L_CALLS)
    errors = anil_fc100.main(root=fc100_root)
    check_calls(anil_fc100, seen)
    assert len(errors) == 2 and all(math.isfinite(e) for e in errors)
    assert seen.count("l2l.vision.datasets.FC100") == 3 and seen.count("l2l.data.Taskset") == 3


def test_metacurvature_fc100(watch, fc100_root):
    seen = watch(metacurvature_fc100.L2L_CALLS)
    errors, gbml = metacurvature_fc100.main(root=fc100_root)
    check_calls(metacurvature_fc100, seen)
    assert len(errors) == 2 and all(math.isfinite(e) for e in errors)
    # The script hands GBML the MetaCurvatureTransform class: one transform per parameter,
    # and the meta-update moved them off the identity.
    assert gbml.fast_path == "per-task"
    transforms = list(gbml.compute_update.transforms_modules)
    assert len(transforms) == len(list(gbml.module.parameters()))
    assert all(type(t) is l2l.optim.transforms.MetaCurvatureTransform for t in transforms)
    moved = [t for t in transforms if t.dim == 2 and not torch.equal(t.mc_in, torch.eye(t.mc_in.size(0)))]
    assert moved


def test_mamlpp(watch, mini_imagenet_root):
    seen = watch(mamlpp.L2L_CALLS)
    losses, maml = mamlpp.main(root=mini_imagenet_root)
    check_calls(mamlpp, seen)
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    # The per-layer per-step rates are trained (their gradient flows through the clones).
    assert all(not torch.equal(p, torch.full_like(p, 0.01)) for p in maml.lrs.values())


def test_metasgd_a2c(watch):
    seen = watch(metasgd_a2c.L2L_CALLS)
    rewards, meta_learner = metasgd_a2c.main()
    check_calls(metasgd_a2c, seen)
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert all(not torch.equal(l, torch.full_like(l, 0.01)) for l in meta_learner.lrs)
    with pytest.raises(ImportError, match="gym"):
        l2l.gym  # what the original uses for its environments


def test_maml_trpo(watch):
    seen = watch(maml_trpo.L2L_CALLS)
    accepted, policy = maml_trpo.main()
    check_calls(maml_trpo, seen)
    assert len(accepted) == 2
    # The surrogate loss reaches the policy through clone_module and a second-order
    # maml_update: its gradient differs from the one through a detached adaptation.
    env = maml_trpo.SyntheticNavigationEnv(seed=1)
    env.set_task(env.sample_tasks(1)[0])
    replay = [env.run(policy, episodes=2), env.run(policy, episodes=2)]
    loss, _ = maml_trpo.meta_surrogate_loss([replay], [policy], policy, 0.95, 0.1)
    second = torch.autograd.grad(loss, list(policy.parameters()))
    clone = l2l.clone_module(policy)
    assert all(c.grad_fn is not None for c in clone.parameters())
    adapted = maml_trpo.fast_adapt_a2c(clone, replay[0], 0.1, 0.95, first_order=True)
    assert all(torch.isfinite(g).all() for g in second)
    assert any(not torch.equal(a, p) for a, p in zip(adapted.parameters(), policy.parameters()))
    with pytest.raises(ImportError, match="gym"):
        import fastmeta.l2l.gym  # noqa: F401
