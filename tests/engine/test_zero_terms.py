"""Zero terms are never computed: a bias a batch-statistics BatchNorm cancels runs nowhere
(its meta-gradient comes back as zeros), and a segment no op reads gets its zero gradient
from a cached zero, not a zeros tensor per backward pass (fastmeta/engine/program.py,
fastmeta/engine/task_weights.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta.engine import TracedProgram
from fastmeta.testing.reference_loop import constant_coefficient, flat_grad, per_task_query_losses, relative_error
from helpers import classification_tasks, regression_tasks


def conv_bn_net() -> nn.Module:
    """Conv2d → BatchNorm2d twice (ReLU, then Tanh), MaxPool, a Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    )


def linear_bn_net() -> nn.Module:
    """learn2learn's OmniglotFC pattern, small: Linear → BatchNorm1d → ReLU, then a head."""
    return nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                         nn.Sigmoid(), nn.Linear(5, 1))


class ConvFeedsTwo(nn.Module):
    """A conv whose output feeds its BatchNorm and a residual sum: its bias matters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.bn = nn.BatchNorm2d(1)
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.head((self.bn(h) + h).flatten(1))


class SequenceLinearBn(nn.Module):
    """A Linear on [N, L, I] before BatchNorm1d(L): the bias runs along the statistics dim,
    so the BatchNorm does not cancel it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 4)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        return self.head(self.bn(self.inp(x)).flatten(1))


def meta_gradients(model, tasks, steps, first_order, dtype=torch.float64):
    model = model.to(dtype)
    tasks = tuple(t.to(dtype) if t.is_floating_point() else t for t in tasks)
    learner = fm.MAML(model, 0.1, steps=steps, first_order=first_order)
    params = list(model.parameters())
    got = flat_grad(learner.meta_batch(*tasks).loss, params)
    losses = per_task_query_losses(model, *tasks, steps, first_order, constant_coefficient(model, 0.1))
    want = flat_grad(losses.mean(), params)
    return learner, got, want


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize(
    "model_fn, tasks_fn, cancelled",
    [
        (conv_bn_net, lambda: classification_tasks(T=2, image=8), {"0", "4"}),
        (linear_bn_net, lambda: regression_tasks(T=3), {"0", "3"}),
    ],
    ids=["conv-bn", "linear-bn"],
)
def test_a_bias_before_batch_norm_is_skipped_and_its_meta_gradient_is_zero(model_fn, tasks_fn, cancelled,
                                                                          first_order):
    torch.manual_seed(0)
    model = model_fn()
    learner, got, want = meta_gradients(model, tasks_fn(), steps=2, first_order=first_order)
    program = learner._engine.program
    assert isinstance(program, TracedProgram)
    assert program.bias_cancelled == cancelled
    assert relative_error(got, want) < 1e-10  # float64, against the per-task reference loop
    # The cancelled biases are still parameters: their meta-gradient is exactly zero (not None)...
    learner.meta_batch(*(t.double() if t.is_floating_point() else t for t in tasks_fn())).loss.backward()
    for name in cancelled:
        grad = model.get_submodule(name).bias.grad
        assert grad is not None and torch.count_nonzero(grad) == 0, name
    # ...as the reference loop's is, up to rounding: it computes the bias and the BatchNorm removes it.
    offsets = {s.name: s for s in learner.layout.segments}
    for name in cancelled:
        s = offsets[f"{name}.bias"]
        assert want[s.offset:s.offset + s.numel].abs().max() < 1e-12


def test_the_output_is_the_same_with_the_bias_skipped():
    """The bias changes nothing after the BatchNorm: a huge one gives the same loss."""
    torch.manual_seed(0)
    model = conv_bn_net().double()
    tasks = tuple(t.double() if t.is_floating_point() else t for t in classification_tasks(T=2, image=8))
    learner = fm.MAML(model, 0.1)
    before = learner.meta_batch(*tasks).loss
    with torch.no_grad():
        model[0].bias.add_(1e3)
        model[4].bias.add_(-1e3)
    assert learner.meta_batch(*tasks).loss.item() == before.item()  # not computed at all: bit for bit
    losses = per_task_query_losses(model, *tasks, 1, False, constant_coefficient(model, 0.1))
    assert relative_error(before.detach(), losses.mean().detach()) < 1e-10


@pytest.mark.parametrize(
    "model_fn, tasks_fn",
    [(ConvFeedsTwo, lambda: classification_tasks(T=2, image=6)),
     (SequenceLinearBn, lambda: (torch.randn(2, 4, 3, 2), torch.randn(2, 4, 1), torch.randn(2, 5, 3, 2),
                                 torch.randn(2, 5, 1)))],
    ids=["conv-feeds-two", "linear-on-sequences"],
)
def test_a_bias_the_batch_norm_does_not_cancel_is_kept(model_fn, tasks_fn):
    torch.manual_seed(0)
    model = model_fn()
    learner, got, want = meta_gradients(model, tasks_fn(), steps=1, first_order=False)
    program = learner._engine.program
    if isinstance(model, ConvFeedsTwo):
        assert program.bias_cancelled == set()
    else:  # decided at run time, by the rank of the Linear's output
        assert program.bias_cancelled == {"inp"}
    assert relative_error(got, want) < 1e-10
    bias = [s for s in learner.layout.segments if s.name.endswith("bias")][0]
    assert want[bias.offset:bias.offset + bias.numel].abs().max() > 1e-6  # a real gradient, and it matches


def count_aten(fn, name):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == name)


def test_segments_no_op_reads_get_their_zero_gradient_without_a_zeros_tensor():
    layout = fm.Layout([("a", (2, 3)), ("unused", (4,)), ("b", (5,)), ("unused2", (1,))])
    flat = torch.randn(3, layout.numel, dtype=torch.float64, requires_grad=True)

    def loss_of(buffer):
        a, _, b, _ = layout.views(buffer)
        return (a.sin().sum((1, 2)) * b.cos().sum(1)).sum()

    grads = {}

    def backward():
        (grads["g"],) = torch.autograd.grad(loss_of(flat), flat, create_graph=True)

    assert count_aten(backward, "aten::zeros") == 0
    reference = flat.detach().clone().requires_grad_(True)
    parts = reference.split([6, 4, 5, 1], dim=1)
    ref_loss = (parts[0].view(3, 2, 3).sin().sum((1, 2)) * parts[2].cos().sum(1)).sum()
    (want,) = torch.autograd.grad(ref_loss, reference)
    assert torch.equal(grads["g"], want)
    assert torch.count_nonzero(grads["g"][:, 6:10]) == 0 and torch.count_nonzero(grads["g"][:, 15:]) == 0
    # Second order runs through the views' backward (a cat).
    assert torch.autograd.gradgradcheck(lambda f: torch.autograd.grad(loss_of(f), f, create_graph=True)[0],
                                        (flat,))
    # Shared θ [P] and a buffer that needs no gradient take the same views.
    theta = torch.arange(float(layout.numel))
    assert [v.shape for v in layout.views(theta)] == [(2, 3), (4,), (5,), (1,)]
    assert torch.equal(layout.views(theta)[2], theta[10:15])
