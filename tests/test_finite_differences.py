"""Meta-gradients against central finite differences in float64, on smooth nets.

Smooth means tanh/sigmoid and AvgPool: ReLU and MaxPool kinks make the meta-loss jump
under a finite-difference step. BatchNorm is included: it is where torch.func's vmap gets
second order wrong (docs/benchmarks.md), so it is where a reference must be exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta.testing.reference_loop import relative_error
from test_learners import classification_tasks, regression_tasks


def smooth_conv_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )


def central_difference_gradient(meta_loss, theta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.empty_like(theta)
    for i in range(theta.numel()):
        step = torch.zeros_like(theta)
        step[i] = eps
        grad[i] = (meta_loss(theta + step) - meta_loss(theta - step)) / (2 * eps)
    return grad


def check_against_finite_differences(learner, tasks):
    params = list(learner.parameters())
    layout = fm.Layout([(str(i), tuple(p.shape)) for i, p in enumerate(params)])
    theta0 = layout.pack([p.detach() for p in params])

    def meta_loss(theta):
        with torch.no_grad():
            for p, v in zip(params, layout.views(theta)):
                p.copy_(v)
        with torch.enable_grad():
            return learner.meta_batch(*tasks).loss.detach()

    analytic = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(learner.meta_batch(*tasks).loss, params)]
    )
    numeric = central_difference_gradient(meta_loss, theta0)
    meta_loss(theta0)  # restore
    return relative_error(analytic, numeric)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_mlp_tanh(steps):
    torch.manual_seed(0)
    model = fm.models.mlp((1, 6, 6, 1), activation="tanh").double()
    learner = fm.MAML(model, 0.05, steps=steps)
    assert check_against_finite_differences(learner, regression_tasks(T=3, dtype=torch.float64)) < 1e-6


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_conv_batch_norm_avgpool(steps):
    torch.manual_seed(0)
    learner = fm.MAML(smooth_conv_bn_net().double(), 0.3, steps=steps)
    tasks = classification_tasks(T=2, shots=2, queries=2, image=8, dtype=torch.float64)
    assert check_against_finite_differences(learner, tasks) < 1e-6


def test_model_aware_conv_batch_norm_all_meta_parameters():
    torch.manual_seed(0)
    learner = fm.ModelAwareMAML(
        smooth_conv_bn_net().double(), 0.2, steps=2, lr_mode="layer", gates=True, precondition=True
    )
    tasks = classification_tasks(T=2, shots=1, queries=2, image=8, dtype=torch.float64)
    assert check_against_finite_differences(learner, tasks) < 1e-6


def test_the_check_detects_a_wrong_meta_gradient():
    # First-order MAML drops the Hessian terms: finite differences must see it.
    torch.manual_seed(0)
    learner = fm.MAML(smooth_conv_bn_net().double(), 0.3, first_order=True, steps=1)
    tasks = classification_tasks(T=2, shots=2, queries=2, image=8, dtype=torch.float64)
    assert check_against_finite_differences(learner, tasks) > 1e-3
