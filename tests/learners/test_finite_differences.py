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
from helpers import check_against_finite_differences, classification_tasks, regression_tasks, smooth_conv_bn_net


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
