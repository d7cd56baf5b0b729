"""The model program (fm.trace): recognised layers become ops, everything else still runs correctly."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm
from fastmeta.engine import TracedProgram, PerTaskLoopProgram
from fastmeta.testing.reference_loop import adapt_task, flat_grad, per_task_query_losses, constant_coefficient, relative_error
from helpers import classification_tasks, regression_tasks


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ResidualNet(nn.Module):
    def __init__(self, ways=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.block = ResidualBlock(4)
        self.head = nn.Linear(4, ways)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = x.mean(dim=(2, 3))  # global average pool, written functionally
        return self.head(x)


class SharedSubmoduleNet(nn.Module):
    """The same Linear used twice, and a weight tied into a functional call."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, 8)
        self.shared = nn.Linear(8, 8)
        self.alias = self.shared  # the same module under a second name
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.alias(h))
        h = h + F.linear(h, self.shared.weight)  # the tied weight, read functionally
        return self.out(h)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:  # data-dependent
            h = h * 1.0
        return self.head(h.mean(dim=(2, 3)))


class HiddenNorm(nn.Module):
    """An unrecognised leaf module (torch.nn's own Sequential subclass trick) holding BN."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.norm_fn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        h = F.batch_norm(h, None, None, self.norm_fn.weight, self.norm_fn.bias, training=True)
        return self.head(h.mean(dim=(2, 3)))


class WithLayerNorm(nn.Module):
    """A LayerNorm between Linears: runs through task_layer_norm (before it had an op, under vmap)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def meta_gradient_pair(model, tasks, lr=0.1, steps=2):
    learner = fm.MAML(model, lr, steps=steps)
    params = list(model.parameters())
    got = flat_grad(learner.meta_batch(*tasks).loss, params)
    losses = per_task_query_losses(model, *tasks, steps, False, constant_coefficient(model, lr))
    want = flat_grad(losses.mean(), params)
    return learner, got, want


@pytest.mark.parametrize(
    "model_fn, tasks_fn",
    [
        (lambda: ResidualNet(), lambda: classification_tasks(image=8)),
        (lambda: SharedSubmoduleNet(), lambda: regression_tasks()),
        (lambda: WithLayerNorm(), lambda: regression_tasks()),
    ],
    ids=["residual", "shared-submodules", "layernorm"],
)
def test_traced_models_with_their_own_forward(model_fn, tasks_fn):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: these are traced
        learner, got, want = meta_gradient_pair(model_fn(), tasks_fn())
    assert isinstance(learner._engine.program, TracedProgram)
    assert relative_error(got, want) < 1e-5


def test_shared_submodule_reads_one_segment():
    model = SharedSubmoduleNet()
    learner = fm.MAML(model, 0.1)
    names = [s.name for s in learner.layout.segments]
    assert names == ["inp.weight", "inp.bias", "shared.weight", "shared.bias", "out.weight", "out.bias"]


@pytest.mark.parametrize("model_fn", [Untraceable, HiddenNorm], ids=["untraceable", "functional-batch-norm"])
def test_fallback_runs_the_per_task_loop_after_one_warning(model_fn):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="per-task loop") as record:
        learner, got, want = meta_gradient_pair(model_fn(), classification_tasks(image=6))
    assert len([w for w in record if "per-task loop" in str(w.message)]) == 1
    assert isinstance(learner._engine.program, PerTaskLoopProgram)
    assert relative_error(got, want) < 1e-5


def test_fallback_trains():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building the learner is silent: the warning waits for meta_batch
        learner = fm.MAML(Untraceable(), 0.1)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    tasks = classification_tasks(image=6)
    with pytest.warns(UserWarning, match="per-task loop") as record:
        first = learner.meta_batch(*tasks).loss.item()
    assert len([w for w in record if "per-task loop" in str(w.message)]) == 1
    for _ in range(15):
        opt.zero_grad()
        learner.meta_batch(*tasks).loss.backward()
        opt.step()
    assert learner.meta_batch(*tasks).loss.item() < first


def test_running_statistics_are_never_touched():
    model = fm.models.conv4(image_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    learner = fm.MAML(model, 0.4)
    sx, sy, qx, qy = classification_tasks(T=2, ways=5, image=16)
    learner.meta_batch(sx, sy, qx, qy).loss.backward()
    model.eval()  # evaluation uses batch statistics too: the same result
    after = {k: v for k, v in model.state_dict().items() if k in before}
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_batch_norm_uses_batch_statistics_in_eval_mode_too():
    torch.manual_seed(0)
    model = fm.models.conv4(image_size=16, ways=3)
    learner = fm.MAML(model, 0.4)
    tasks = classification_tasks(T=2, ways=3, image=16)
    train_loss = learner.meta_batch(*tasks).loss
    model.eval()
    eval_loss = learner.meta_batch(*tasks).loss
    assert torch.equal(train_loss, eval_loss)


def test_activations_fuse_into_linear_and_batch_norm():
    model = fm.models.conv4(image_size=16)
    program = fm.trace(model)
    graph_ops = [n.target for n in program.graph.nodes if n.op == "call_module"]
    assert graph_ops.count("2") == 1  # the ReLU after the first BN exists in the graph
    # ...but is an alias of the fused op's output: one step per node, relu steps aliased.
    x = torch.randn(2, 3, 1, 16, 16)
    weights = fm.Layout.of_module(model).views(fm.Layout.of_module(model).pack(model.parameters()))
    out = program(x, weights)
    ref = torch.stack([model.train()(x[t]) for t in range(2)])
    assert torch.allclose(out, ref, atol=1e-5)


def test_paper_models_have_the_paper_shapes():
    omniglot = fm.models.conv4()
    assert omniglot[-1].in_features == 256 and omniglot(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    mini = fm.models.conv4(in_channels=3, variant="pool")
    assert mini[-1].in_features == 800 and mini(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    sine = fm.models.mlp()
    assert [m.out_features for m in sine if isinstance(m, nn.Linear)] == [40, 40, 1]
    with pytest.raises(ValueError, match="variant"):
        fm.models.conv4(variant="dense")


# -- modules vmap cannot run: the per-task fallback ------------------------------------------


class SequenceRegressor(nn.Module):
    """A recurrent layer (vmap has no batching rule for aten::lstm / aten::gru) and a head."""

    def __init__(self, cell, features=2, hidden=5):
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(torch.tanh(out[:, -1]))


def sequence_tasks(T=3, shots=4, queries=5, length=6, features=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, shots, length, features, generator=g, dtype=dtype)
    qx = torch.randn(T, queries, length, features, generator=g, dtype=dtype)
    scale = torch.rand(T, 1, 1, generator=g, dtype=dtype) + 0.5
    return sx, scale * sx.sum((2, 3)).unsqueeze(-1).sin(), qx, scale * qx.sum((2, 3)).unsqueeze(-1).sin()


RECURRENT = pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=["lstm", "gru", "rnn"])


def recurrent_learner(cell, first_order=False, steps=2, dtype=torch.float32, hidden=5):
    torch.manual_seed(0)
    model = SequenceRegressor(cell, hidden=hidden).to(dtype)
    with pytest.warns(UserWarning, match=rf"module 'rnn' \({cell.__name__}\) runs task by task") as record:
        learner = fm.MAML(model, 0.1, first_order, steps=steps)
        learner.meta_batch(*sequence_tasks(T=2, dtype=dtype))  # the first run finds vmap cannot batch it
    assert len(record) == 1
    return model, learner


@RECURRENT
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_recurrent_modules_run_task_by_task_in_meta_batch(cell, first_order):
    model, learner = recurrent_learner(cell, first_order)
    assert isinstance(learner._engine.program, TracedProgram)  # only the recurrent layer loops
    tasks = sequence_tasks()
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, on the first run
        out = learner.meta_batch(*tasks)
    got = flat_grad(out.loss, params)
    want_losses = per_task_query_losses(model, *tasks, 2, first_order, constant_coefficient(model, 0.1))
    torch.testing.assert_close(out.task_loss, want_losses, rtol=1e-5, atol=1e-6)
    assert relative_error(got, flat_grad(want_losses.mean(), params)) < 1e-5


@RECURRENT
def test_recurrent_fast_weights_and_predictions_match_the_reference_loop(cell):
    model, learner = recurrent_learner(cell)
    sx, sy, qx, qy = sequence_tasks()
    fast = learner.fast_weights(sx, sy, steps=3)
    pred = learner.predict(fast, qx)
    params = dict(model.named_parameters())
    coefficient = constant_coefficient(model, 0.1)
    for t in range(sx.size(0)):
        adapted = adapt_task(model, params, sx[t], sy[t], 3, False, coefficient)
        weights = fast.task(t)
        assert weights.keys() == adapted.keys()
        for name, weight in weights.items():
            torch.testing.assert_close(weight, adapted[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pred[t], torch.func.functional_call(model, adapted, (qx[t],)), rtol=1e-5, atol=1e-6)


@RECURRENT
def test_recurrent_clone_adapt_matches_meta_batch(cell):
    model, learner = recurrent_learner(cell)
    tasks = sequence_tasks()
    sx, sy, qx, qy = tasks
    params = list(learner.parameters())
    total = 0.0
    for t in range(sx.size(0)):
        clone = learner.clone()
        for _ in range(2):
            clone.adapt(F.mse_loss(clone(sx[t]), sy[t]))
        total = total + F.mse_loss(clone(qx[t]), qy[t])
    via_clone = flat_grad(total / sx.size(0), params)
    via_batch = flat_grad(learner.meta_batch(*tasks).loss, params)
    assert relative_error(via_clone, via_batch) < 1e-5


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_recurrent_second_order_meta_gradient_against_finite_differences(cell):
    from helpers import check_against_finite_differences

    _, learner = recurrent_learner(cell, steps=2, dtype=torch.float64, hidden=3)
    tasks = sequence_tasks(T=2, shots=3, queries=3, length=4, dtype=torch.float64)
    assert check_against_finite_differences(learner, tasks) < 1e-6


def test_per_task_fallback_stacks_nested_outputs_and_keeps_agreed_constants():
    from fastmeta.engine.program import _per_task

    raw = [torch.arange(6.0).reshape(3, 2), 10.0]
    out, batched = _per_task(lambda x, c: (x * c, {"n": 2, "sum": x.sum()}), raw, (0, None))
    assert batched
    torch.testing.assert_close(out[0], raw[0] * 10)
    assert out[1]["n"] == 2
    torch.testing.assert_close(out[1]["sum"], raw[0].sum(1))
    with pytest.raises(fm.engine.program.TraceError, match="different non-tensor value per task"):
        _per_task(lambda x: int(x[0]), raw[:1], (0,))


def test_a_first_run_that_fails_either_way_decides_nothing():
    # Wrong inputs make vmap and the task-by-task run fail alike: the error is raised, no
    # warning claims vmap cannot batch the module, and correct inputs then run under vmap.
    torch.manual_seed(0)
    # GroupNorm: a module no op family runs (LayerNorm, the example before, is an op now).
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.Linear(4, 1))
    program = fm.trace(model)
    layout = fm.Layout.of_module(model)
    weights = layout.views(layout.pack(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            program(torch.randn(2, 3, 5), weights)  # GroupNorm(2, 4) gets 5 channels
        assert "_0" not in program._generic_strategy
        out = program(torch.randn(2, 3, 4), weights)
    assert out.shape == (2, 3, 1)
    assert program._generic_strategy["_0"] == "vmap"
