"""learn2learn-style code on fastmeta's clones, against the same code on a reference clone
written with ``torch.func.functional_call`` (float64, norm-wise relative error).

Each scenario is written once, against "a clone": something callable with ``adapt()``,
``parameters()`` and the model's methods. It runs on ``fm.MAML(model).clone()`` and on
:class:`FunctionalClone`; the meta-gradients at the model's parameters must agree.
"""

from __future__ import annotations

import copy

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm
from fastmeta.testing.reference_loop import flat_grad, relative_error

DT = torch.float64


class _Method(nn.Module):
    """Runs one method of ``model``, so that functional_call can swap its parameters."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.name = name

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.name)(*args, **kwargs)


class FunctionalClone:
    """learn2learn's clone written with functional_call and autograd.grad: the reference.

    copy_buffers: give each call fresh copies of the buffers (BatchNorm's running
    statistics are then never updated: the transductive reference).
    """

    def __init__(self, model: nn.Module, lr: float, copy_buffers: bool = True):
        self.model, self.lr, self.copy_buffers = model, lr, copy_buffers
        self.params = dict(model.named_parameters())

    def _state(self, prefix=""):
        params = {prefix + n: p for n, p in self.params.items()}
        if not self.copy_buffers:
            return params
        return params, {prefix + n: b.clone() for n, b in self.model.named_buffers()}

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self._state(), args, kwargs)

    def __getattr__(self, name):
        attr = getattr(self.__dict__["model"], name)
        if not callable(attr):
            return attr
        wrapper = _Method(self.model, name)
        return lambda *a, **k: torch.func.functional_call(wrapper, self._state("model."), a, k)

    def parameters(self):
        return list(self.params.values())

    def adapt(self, loss, first_order=False):
        names = [n for n, p in self.params.items() if p.requires_grad]
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], create_graph=not first_order,
                                    allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                self.params[n] = self.params[n] - self.lr * g


def compare(model, scenario, lr=0.1, tolerance=1e-12, **learner_options):
    """Run ``scenario(clone)`` (which returns the meta-loss) both ways; return
    (relative error, fastmeta meta-gradient, reference meta-gradient)."""
    params = list(model.parameters())
    learner = fm.MAML(model, lr, **learner_options)
    got = flat_grad(scenario(learner.clone()), params)
    want = flat_grad(scenario(FunctionalClone(model, lr)), params)
    error = relative_error(got, want)
    assert error < tolerance, error
    return error, got, want


# -- reinforcement learning: a policy whose loss comes from log_prob ----------------------------


class GaussianPolicy(nn.Module):
    def __init__(self, observations=3, actions=2, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(observations, hidden), nn.Tanh())
        self.mean = nn.Linear(hidden, actions)
        self.log_std = nn.Parameter(torch.full((actions,), -0.5))
        self.action_dim = actions

    def forward(self, obs):
        return self.mean(self.body(obs))

    def density(self, obs):
        return torch.distributions.Normal(self(obs), self.log_std.exp())

    def log_prob(self, obs, actions):
        return self.density(obs).log_prob(actions).sum(-1)


def test_policy_log_prob_inner_and_outer_losses():
    torch.manual_seed(0)
    policy = GaussianPolicy().to(DT)
    obs, act, adv = torch.randn(16, 3, dtype=DT), torch.randn(16, 2, dtype=DT), torch.randn(16, dtype=DT)
    obs2, act2, adv2 = torch.randn(16, 3, dtype=DT), torch.randn(16, 2, dtype=DT), torch.randn(16, dtype=DT)

    def scenario(clone):
        assert clone.action_dim == 2
        for _ in range(2):
            clone.adapt(-(clone.log_prob(obs, act) * adv).mean())
        return -(clone.log_prob(obs2, act2) * adv2).mean() - 0.01 * clone.density(obs2).entropy().mean()

    compare(policy, scenario)


def test_metasgd_policy_gradient_with_log_prob():
    torch.manual_seed(1)
    policy = GaussianPolicy().to(DT)
    meta = fm.MetaSGD(policy, lr=0.05)
    obs, act, adv = torch.randn(12, 3, dtype=DT), torch.randn(12, 2, dtype=DT), torch.randn(12, dtype=DT)
    clone = meta.clone()
    clone.adapt(-(clone.log_prob(obs, act) * adv).mean())
    got = flat_grad(-(clone.log_prob(obs, act) * adv).mean(), list(meta.parameters()))
    ref = FunctionalClone(policy, 0.0)
    loss = -(ref.log_prob(obs, act) * adv).mean()
    grads = torch.autograd.grad(loss, ref.parameters(), create_graph=True)
    ref.params = {n: p - l * g for (n, p), l, g in zip(ref.params.items(), meta.lrs, grads)}
    want = flat_grad(-(ref.log_prob(obs, act) * adv).mean(), list(meta.parameters()))
    assert relative_error(got, want) < 1e-12


# -- outputs and inputs of any kind ---------------------------------------------------------------


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(2, 6)
        self.mean = nn.Linear(6, 1)
        self.log_var = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.mean(h), self.log_var(h)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(2, 6)
        self.logits = nn.Linear(6, 3)
        self.value = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.sigmoid(self.trunk(x))
        return {"logits": self.logits(h), "value": self.value(h).squeeze(-1)}


def gaussian_nll(out, y):
    mean, log_var = out
    return (0.5 * (log_var + (y - mean) ** 2 / log_var.exp())).mean()


def test_tuple_outputs():
    torch.manual_seed(2)
    x, y = torch.randn(10, 2, dtype=DT), torch.randn(10, 1, dtype=DT)

    def scenario(clone):
        out = clone(x)
        assert isinstance(out, tuple) and out[0].shape == (10, 1)  # no task dim
        clone.adapt(gaussian_nll(out, y))
        clone.adapt(gaussian_nll(clone(x), y))
        return gaussian_nll(clone(x + 0.5), y)

    compare(TupleOut().to(DT), scenario)


def test_dict_outputs():
    torch.manual_seed(3)
    x, labels, returns = torch.randn(10, 2, dtype=DT), torch.randint(0, 3, (10,)), torch.randn(10, dtype=DT)

    def loss(out):
        return F.cross_entropy(out["logits"], labels) + F.mse_loss(out["value"], returns)

    def scenario(clone):
        out = clone(x)
        assert set(out) == {"logits", "value"} and out["value"].shape == (10,)
        clone.adapt(loss(out))
        return loss(clone(-x))

    compare(DictOut().to(DT), scenario)


class Conditioned(nn.Module):
    """Several inputs and keyword arguments."""

    def __init__(self):
        super().__init__()
        self.x_in = nn.Linear(3, 5)
        self.c_in = nn.Linear(2, 5, bias=False)
        self.out = nn.Linear(5, 1)

    def forward(self, x, context, *, scale=1.0, mask=None):
        h = torch.tanh(self.x_in(x) + self.c_in(context))
        if mask is not None:
            h = h * mask
        return self.out(h) * scale


class Prototypes(nn.Module):
    """A model that takes no input."""

    def __init__(self):
        super().__init__()
        self.codes = nn.Parameter(torch.randn(4, 3))
        self.mix = nn.Linear(3, 3)

    def forward(self):
        return torch.tanh(self.mix(self.codes))


def test_several_inputs_and_keyword_arguments():
    torch.manual_seed(4)
    x, c, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT), torch.randn(8, 1, dtype=DT)
    mask = (torch.rand(8, 5) > 0.3).to(DT)

    def scenario(clone):
        clone.adapt(F.mse_loss(clone(x, c, scale=2.0, mask=mask), y))
        clone.adapt(F.mse_loss(clone(x, context=c), y))
        return F.mse_loss(clone(x, c, scale=0.5), y)

    # The fallback warning concerns meta_batch, which passes one input tensor; clones take
    # any, and a script that only clones hears nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(Conditioned().to(DT), scenario)


def test_a_model_without_inputs():
    torch.manual_seed(5)
    target = torch.randn(4, 3, dtype=DT)

    def scenario(clone):
        for _ in range(3):
            clone.adapt(F.mse_loss(clone(), target))
        return F.mse_loss(clone(), target.flip(0))

    compare(Prototypes().to(DT), scenario, lr=0.3)


# -- penalties on the clone's parameters ---------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_parameter_penalties_in_the_inner_loss(steps):
    """Issue 13 measured 5.7e-3 (1 step) and 4.7e-2 (3 steps) here before the fix."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)
    x, y = torch.randn(10, 1, dtype=DT), torch.randn(10, 1, dtype=DT)

    def scenario(clone, weight=0.05):
        for _ in range(steps):
            penalty = sum(p.pow(2).sum() for p in clone.parameters())
            clone.adapt(F.mse_loss(clone(x), y) + weight * penalty)
        return F.mse_loss(clone(x), y)

    _, got, _ = compare(model, scenario, lr=0.05)
    # The penalty matters: without it the meta-gradient differs (the check can fail).
    learner = fm.MAML(model, 0.05)
    without = flat_grad(scenario(learner.clone(), weight=0.0), list(model.parameters()))
    assert relative_error(without, got) > 1e-3


# -- BatchNorm, in training and evaluation mode ------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.head(self.pool(torch.tanh(self.norm(self.conv(x)))).flatten(1))


def bn_data(seed=7):
    g = torch.Generator().manual_seed(seed)
    sx, qx = torch.randn(6, 1, 6, 6, generator=g, dtype=DT), torch.randn(6, 1, 6, 6, generator=g, dtype=DT)
    return sx, torch.arange(6) % 4, qx, torch.arange(6) % 4


def bn_scenario(sx, sy, qx, qy, steps=2):
    def scenario(clone):
        for _ in range(steps):
            clone.adapt(F.cross_entropy(clone(sx), sy))
        return F.cross_entropy(clone(qx), qy)

    return scenario


def running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_transductive_default(mode):
    """Batch statistics in both modes; running statistics never read or written."""
    torch.manual_seed(8)
    model = ConvBN().to(DT)
    with torch.no_grad():
        model.norm.running_mean.fill_(0.7)  # would change every output if it were read
        model.norm.running_var.fill_(3.0)
    model.train(mode == "train")
    before = running_stats(model)
    scenario = bn_scenario(*bn_data())
    learner = fm.MAML(model, 0.2)
    got = flat_grad(scenario(learner.clone()), list(model.parameters()))
    model.train()  # the reference: training mode on copies of the buffers
    want = flat_grad(scenario(FunctionalClone(model, 0.2, copy_buffers=True)), list(model.parameters()))
    assert relative_error(got, want) < 1e-12
    for k, v in running_stats(model).items():
        assert torch.equal(v, before[k]), k


def test_batch_norm_running_mode_is_learn2learns():
    """batch_norm="running": training mode updates the model's running statistics in
    order, task by task; evaluation mode normalises with them."""
    torch.manual_seed(9)
    model = ConvBN().to(DT)
    twin = copy.deepcopy(model)
    tasks = [bn_data(seed) for seed in (10, 11)]
    learner = fm.MAML(model, 0.2, batch_norm="running")

    def meta_gradient(make_clone, params):
        total = sum(bn_scenario(*t)(make_clone()) for t in tasks)
        return flat_grad(total, params)

    got = meta_gradient(learner.clone, list(model.parameters()))
    want = meta_gradient(lambda: FunctionalClone(twin, 0.2, copy_buffers=False), list(twin.parameters()))
    assert relative_error(got, want) < 1e-12
    stats, twin_stats = running_stats(model), running_stats(twin)
    assert int(stats["norm.num_batches_tracked"]) == 2 * 3  # (2 inner steps + query) per task
    for k in stats:
        assert torch.allclose(stats[k], twin_stats[k], rtol=1e-13, atol=0), k

    model.eval()
    twin.eval()
    got = meta_gradient(learner.clone, list(model.parameters()))
    want = meta_gradient(lambda: FunctionalClone(twin, 0.2, copy_buffers=False), list(twin.parameters()))
    assert relative_error(got, want) < 1e-12
    for k, v in running_stats(model).items():  # evaluation mode reads, never writes
        assert torch.equal(v, stats[k]), k
    # ... and the running statistics matter there: the transductive clone differs.
    transductive = fm.MAML(model, 0.2)
    other = meta_gradient(transductive.clone, list(model.parameters()))
    assert relative_error(other, got) > 1e-3


def test_batched_calls_refuse_the_running_mode_on_batch_norm_models():
    model = ConvBN().to(DT)
    learner = fm.MAML(model, 0.2, batch_norm="running")
    sx, sy, qx, qy = (t.unsqueeze(0) for t in bn_data())
    before = running_stats(model)
    for call in (lambda: learner.meta_batch(sx, sy, qx, qy), lambda: learner.fast_weights(sx, sy)):
        with pytest.raises(ValueError, match="batch_norm='running'.*clone"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in running_stats(model).items())
    plain = fm.MAML(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), 0.1, batch_norm="running")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, generator=g)
    assert plain.meta_batch(x, x[..., :1], x, x[..., :1]).loss.isfinite()  # nothing to refuse


def test_batch_norm_second_order_against_finite_differences():
    """gradcheck of the meta-loss (its gradient is second order in the inner loss) on a
    smooth BatchNorm net with AvgPool."""
    torch.manual_seed(12)
    model = ConvBN().to(DT)
    learner = fm.MAML(model, 0.3)
    scenario = bn_scenario(*bn_data(13), steps=1)
    assert torch.autograd.gradcheck(lambda *params: scenario(learner.clone()), tuple(model.parameters()),
                                    eps=1e-6, atol=1e-7)


def test_mlp_second_order_against_finite_differences():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    learner = fm.MAML(model, 0.4)
    x, y = torch.randn(6, 2, dtype=DT), torch.randn(6, 1, dtype=DT)

    def meta_loss(*params):
        clone = learner.clone()
        for _ in range(2):
            clone.adapt(F.mse_loss(clone(x), y))
        return F.mse_loss(clone(-x), y)

    assert torch.autograd.gradcheck(meta_loss, tuple(model.parameters()), eps=1e-6, atol=1e-8)


# -- models whose structure a shallow copy must respect ----------------------------------------


class TiedAndShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6, bias=False)
        self.unembed = nn.Linear(6, 4, bias=False)
        self.unembed.weight = self.embed.weight  # tied (transposed use)
        self.block = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.block(torch.tanh(self.block(F.linear(x, self.embed.weight)))))
        return F.linear(h, self.unembed.weight.t())


def test_tied_weights_and_shared_submodules():
    torch.manual_seed(15)
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 4, dtype=DT)
    model = TiedAndShared().to(DT)

    def scenario(clone):
        clone.adapt(F.mse_loss(clone(x), y))
        clone.adapt(F.mse_loss(clone(x), y))
        return F.mse_loss(clone(y), x)

    compare(model, scenario)
    clone = fm.MAML(model, 0.1).clone()
    clone.adapt(F.mse_loss(clone(x), y))
    assert clone.module.embed.weight is clone.module.unembed.weight
    assert [n for n, _ in clone.module.named_parameters()] == [n for n, _ in model.named_parameters()]


class RecurrentPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_recurrent_model():
    """nn.GRU caches its weights in a list: a copy must run the adapted ones."""
    torch.manual_seed(16)
    x, y = torch.randn(4, 6, 3, dtype=DT), torch.randn(4, 2, dtype=DT)

    def scenario(clone):
        clone.adapt(F.mse_loss(clone(x), y))
        return F.mse_loss(clone(x), y)

    compare(RecurrentPolicy().to(DT), scenario, tolerance=1e-11)
