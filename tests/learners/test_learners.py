"""The learners' meta-gradients against a plain per-task autograd loop (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta.testing.reference_loop import (
    constant_coefficient,
    flat_grad,
    learner_coefficient,
    per_task_query_losses,
    relative_error,
)
from helpers import (
    classification_tasks,
    fastmeta_meta_gradient,
    loop_meta_gradient,
    make_model,
    make_tasks,
    regression_tasks,
)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_reference_loop(kind, steps, first_order):
    model = make_model(kind)
    lr = 0.01 if kind == "mlp" else 0.3
    learner = fm.MAML(model, lr, first_order, steps=steps)
    tasks = make_tasks(kind)
    got, out = fastmeta_meta_gradient(learner, tasks)
    want, losses = loop_meta_gradient(learner, tasks, steps, first_order)
    assert relative_error(out.task_loss, losses) < 1e-5
    assert relative_error(got, want) < 1e-5
    # Second order really differs from first order here: the check can fail.
    if not first_order:
        fo, _ = loop_meta_gradient(learner, tasks, steps, True)
        assert relative_error(fo, want) > 1e-4


MODEL_AWARE_CASES = [
    dict(lr_mode="scalar", lr_per_step=False, log_lr=False),
    dict(lr_mode="layer", lr_per_step=True, log_lr=False),
    dict(lr_mode="param", lr_per_step=True, log_lr=False),
    dict(lr_mode="layer", lr_per_step=True, gates=True, precondition=True, log_lr=False),
    dict(lr_mode="param", lr_per_step=False, gates=True, log_lr=False),
    dict(lr_mode="layer", lr_per_step=False, adapt_layers="head", log_lr=False),
    # The options of issue 17: log-rates, and per-step BatchNorm on and off explicitly
    # (per_step_bn=None turns it on for the conv net in the cases above).
    dict(lr_mode="layer", lr_per_step=True, log_lr=True),
    dict(lr_mode="param", lr_per_step=True, log_lr=True, gates=True),
    dict(lr_mode="layer", lr_per_step=True, per_step_bn=False),
    dict(lr_mode="scalar", lr_per_step=True, log_lr=True, adapt_layers="head"),
]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("options", MODEL_AWARE_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("first_order", [False, True])
def test_model_aware_meta_gradient_equals_reference_loop(kind, options, first_order):
    model = make_model(kind)
    steps = 2
    learner = fm.ModelAwareMAML(
        model, 0.01 if kind == "mlp" else 0.2, first_order, steps=steps, **options
    )
    # Move the meta-parameters off their initial values so each one matters.
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if not name.startswith("module."):
                p.mul_(1 + 0.3 * torch.rand_like(p))
    tasks = make_tasks(kind)
    selection = dict(zip([s.name for s in learner.layout.segments], learner.plan().adapting))
    got, out = fastmeta_meta_gradient(learner, tasks)
    want, losses = loop_meta_gradient(
        learner, tasks, steps, first_order, adapting=lambda n: selection[n]
    )
    assert relative_error(out.task_loss, losses) < 1e-5
    assert relative_error(got, want) < 1e-5


def test_anil_skips_the_body_and_leaves_it_unadapted():
    model = make_model("conv")
    learner = fm.ModelAwareMAML(model, 0.2, steps=1, adapt_layers="head")
    tasks = make_tasks("conv")
    fast = learner.fast_weights(tasks[0], tasks[1])
    theta = learner.layout.pack(model.parameters()).detach()
    for name, tensor in fast.named_tensors():
        base = dict(model.named_parameters())[name].detach()
        same = torch.equal(tensor.detach(), base.expand_as(tensor))
        assert same == (not name.startswith("8.")), name
    assert fast.buffer.shape == (tasks[0].size(0), theta.numel())


def test_metasgd_is_model_aware_per_parameter():
    model = make_model("mlp")
    meta = fm.MetaSGD(model, lr=0.05)
    assert len(meta.lrs) == len(list(model.parameters()))
    for l, p in zip(meta.lrs, model.parameters()):
        assert l.shape == p.shape and torch.all(l == 0.05)
    tasks = make_tasks("mlp")
    got, _ = fastmeta_meta_gradient(meta, tasks)
    want, _ = loop_meta_gradient(meta, tasks, 1, False)
    assert relative_error(got, want) < 1e-5


def test_parameters_are_listed_exactly_once_and_state_dict_round_trips():
    model = make_model("conv")
    options = dict(steps=2, lr_mode="param", gates=True, precondition=True, log_lr=True, per_step_bn=True)
    learner = fm.ModelAwareMAML(model, 0.1, **options)
    ids = [id(p) for p in learner.parameters()]
    assert len(ids) == len(set(ids))
    model_ids = {id(p) for p in model.parameters()}
    assert model_ids <= set(ids)
    meta = [p for p in learner.parameters() if id(p) not in model_ids]
    # log-rates, gate logits, preconditioner, per-step BatchNorm values
    assert len(meta) == len(list(learner.log_lrs)) + 3
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p))
    state = learner.state_dict()
    other = fm.ModelAwareMAML(make_model("conv"), 0.1, **options)
    other.load_state_dict(state)
    tasks = make_tasks("conv")
    assert torch.equal(learner.meta_batch(*tasks).loss, other.meta_batch(*tasks).loss)


def test_training_updates_the_models_own_parameters():
    model = make_model("mlp")
    learner = fm.MAML(model, 0.01)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    tasks = make_tasks("mlp")
    first = learner.meta_batch(*tasks).loss.item()
    for _ in range(30):
        opt.zero_grad()
        learner.meta_batch(*tasks).loss.backward()
        opt.step()
    assert learner.meta_batch(*tasks).loss.item() < first
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert set(model.state_dict()) == {k.removeprefix("module.") for k in learner.state_dict()}


def test_frozen_parameters_are_never_changed():
    model = make_model("mlp")
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="allow_nograd"):
        fm.MAML(model, 0.01).meta_batch(*make_tasks("mlp"))
    learner = fm.MAML(model, 0.01, allow_nograd=True)
    tasks = make_tasks("mlp")
    fast = learner.fast_weights(tasks[0], tasks[1], steps=3)
    frozen = model[0].weight.detach()
    assert torch.equal(fast["0.weight"].detach(), frozen.expand_as(fast["0.weight"]))
    assert not torch.equal(fast["0.bias"].detach(), model[0].bias.detach().expand_as(fast["0.bias"]))
    got, _ = fastmeta_meta_gradient(learner, tasks)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    losses = per_task_query_losses(
        model, *tasks, 1, False, constant_coefficient(model, 0.01), lambda n: n != "0.weight"
    )
    want = flat_grad(losses.mean(), trainable)
    assert relative_error(got, want) < 1e-5


def test_predict_with_fast_weights_matches_meta_batch():
    model = make_model("conv")
    learner = fm.MAML(model, 0.3, steps=2)
    tasks = make_tasks("conv")
    fast = learner.fast_weights(tasks[0], tasks[1])
    assert isinstance(fast, fm.TaskWeights) and fast.num_tasks == 3
    pred = learner.predict(fast, tasks[2])
    loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1), tasks[3].flatten())
    assert torch.allclose(loss, learner.meta_batch(*tasks).loss, rtol=1e-5)


def test_float64_works_end_to_end():
    model = make_model("conv").double()
    learner = fm.MAML(model, 0.3, steps=2)
    tasks = classification_tasks(dtype=torch.float64)
    got, _ = fastmeta_meta_gradient(learner, tasks)
    want, _ = loop_meta_gradient(learner, tasks, 2, False)
    assert got.dtype == torch.float64
    assert relative_error(got, want) < 1e-10


def test_evaluation_under_no_grad_adapts_without_a_graph():
    model = make_model("mlp")
    learner = fm.MAML(model, 0.01, steps=3)
    tasks = make_tasks("mlp")
    with torch.no_grad():
        fast = learner.fast_weights(tasks[0], tasks[1])
        pred = learner.predict(fast, tasks[2])
    assert not fast.buffer.requires_grad and not pred.requires_grad
    assert torch.allclose(fast.buffer, learner.fast_weights(tasks[0], tasks[1]).buffer, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2])
def test_task_chunks_give_the_same_meta_gradient(chunk):
    model = make_model("conv")
    learner = fm.ModelAwareMAML(model, 0.2, steps=2, gates=True)
    tasks = make_tasks("conv")
    whole, out = fastmeta_meta_gradient(learner, tasks)
    params = [p for p in learner.parameters() if p.requires_grad]
    chunked = learner.meta_batch(*tasks, task_chunk=chunk)
    assert torch.allclose(chunked.task_loss, out.task_loss, atol=1e-6)
    assert torch.equal(chunked.accuracy, out.accuracy)
    assert relative_error(flat_grad(chunked.loss, params), whole) < 1e-5


def test_task_chunk_lowers_the_memory_held_for_the_backward():
    # What the autograd graph keeps alive between forward and backward, measured through
    # saved-tensor hooks: the chunked meta-batch keeps only its inputs.
    model = make_model("conv")
    learner = fm.MAML(model, 0.2, steps=2)
    tasks = classification_tasks(T=8)

    def saved_bytes(**kwargs):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = learner.meta_batch(*tasks, **kwargs)
        return total[0], out

    whole, _ = saved_bytes()
    chunked, out = saved_bytes(task_chunk=1)
    out.loss.backward()  # the chunked graph still backpropagates
    assert chunked < whole / 4


def test_plain_mlps_are_recognised_for_the_fused_meta_step():
    from fastmeta.engine.program import plain_mlp_structure

    assert plain_mlp_structure(fm.models.mlp((1, 40, 40, 1))) == ([1, 40, 40, 1], "relu", 0.0)
    assert plain_mlp_structure(fm.models.mlp((3, 7, 2), activation="tanh")) == ([3, 7, 2], "tanh", 0.0)
    assert plain_mlp_structure(make_model("conv")) is None
    no_bias = nn.Sequential(nn.Linear(1, 4, bias=False), nn.ReLU(), nn.Linear(4, 1))
    assert plain_mlp_structure(no_bias) is None
    mixed = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    assert plain_mlp_structure(mixed) is None


def test_task_chunk_is_a_learner_option():
    tasks = make_tasks("conv")
    whole = fm.MAML(make_model("conv"), 0.3).meta_batch(*tasks)
    chunked = fm.MAML(make_model("conv"), 0.3, task_chunk=2).meta_batch(*tasks)
    assert torch.allclose(whole.task_loss, chunked.task_loss, atol=1e-6)
    with pytest.raises(ValueError, match="task_chunk must be >= 1"):
        fm.ModelAwareMAML(make_model("mlp"), 0.1, task_chunk=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_query_accuracy_is_each_tasks_share_of_argmax_hits(dtype):
    """``accuracy``: per task, the share of query examples whose argmax is the label, in the
    model's dtype (the cast inside the mean, one op)."""
    model = make_model("conv").to(dtype)
    learner = fm.MAML(model, 0.2, steps=1)
    sx, sy, qx, qy = make_tasks("conv")
    sx, qx = sx.to(dtype), qx.to(dtype)
    with torch.no_grad():
        out = learner.meta_batch(sx, sy, qx, qy)
        pred = learner.predict(learner.fast_weights(sx, sy), qx)
    want = torch.stack([(pred[t].argmax(-1) == qy[t]).double().mean() for t in range(qx.size(0))]).to(dtype)
    assert out.accuracy.dtype == dtype
    torch.testing.assert_close(out.accuracy, want, rtol=0, atol=1e-7)
