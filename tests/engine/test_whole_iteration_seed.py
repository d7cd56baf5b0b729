"""whole_iteration's backward seed (fastmeta/engine/whole_step.py): made once, by the first
call that passes the seed list (a captured step's warm-up), and where the loss is the mean
of the task losses in the graph, started at the task losses with the mean's gradient 1/T
(no mean-backward kernel). The gradients must equal ``loss.backward()``'s bit for bit."""

from __future__ import annotations

import pytest
import torch

import fastmeta as fm
from fastmeta.engine.whole_step import _loss_is_mean_of_task_losses, whole_iteration
from helpers import build_or_skip, classification_tasks, regression_tasks


@pytest.fixture(scope="module")
def extension():
    build_or_skip()


def conv_learner():
    torch.manual_seed(0)
    return fm.MAML(fm.models.conv4(in_channels=1, ways=3, hidden=4, image_size=8), lr=0.1, first_order=False)


def mlp_learner():
    torch.manual_seed(0)
    return fm.MAML(fm.models.mlp((1, 8, 8, 1)), lr=0.01)


def plain_gradients(learner, batch):
    for p in learner.parameters():
        p.grad = None
    learner.meta_batch(*batch).loss.backward()
    return [p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("make, tasks, from_task_losses", [
    (conv_learner, lambda seed: classification_tasks(T=4, ways=3, shots=1, queries=2, image=8, seed=seed), True),
    (mlp_learner, lambda seed: regression_tasks(T=4, shots=3, queries=2, seed=seed), None),
], ids=["conv4-program", "mlp"])
def test_seeded_backward_equals_the_loss_backward(extension, make, tasks, from_task_losses):
    learner = make()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)  # the gradients stay readable after the step
    seed: list[torch.Tensor] = []
    for call in range(2):  # the first call makes the seed, the second reuses it
        batch = tasks(call)
        expected = plain_gradients(learner, batch)
        out = whole_iteration(learner.meta_batch, batch, optimizer, seed=seed)
        for p, e in zip(learner.parameters(), expected):
            assert torch.equal(p.grad, e)
    assert len(seed) == 1
    starts_at_task_losses = _loss_is_mean_of_task_losses(out)
    if from_task_losses is not None:
        assert starts_at_task_losses is from_task_losses
    if starts_at_task_losses:
        T = batch[0].size(0)
        assert seed[0].shape == (T,) and torch.equal(seed[0], torch.full((T,), 1.0 / T))
    else:
        assert seed[0].shape == () and seed[0].item() == 1.0


def test_a_loss_that_is_not_the_plain_mean_is_seeded_as_itself():
    task_losses = torch.rand(3, requires_grad=True) * 2
    weighted = fm.engine.types.MetaBatchOutput(task_losses.mean() * 0.5, task_losses, None)
    dim_mean = fm.engine.types.MetaBatchOutput(task_losses.view(3, 1).mean(0).squeeze(), task_losses, None)
    other = fm.engine.types.MetaBatchOutput(torch.rand(3, requires_grad=True).mean(), task_losses, None)
    plain = fm.engine.types.MetaBatchOutput(task_losses.mean(), task_losses, None)
    assert [_loss_is_mean_of_task_losses(o) for o in (weighted, dim_mean, other, plain)] == [False, False, False, True]
