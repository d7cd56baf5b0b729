"""Issue 26, defect 8: ModelAwareMAML with log-rates refuses a rate that has no logarithm
(lr <= 0), at construction, naming ``lr`` and ``log_lr``; without log-rates it accepts it."""

from __future__ import annotations

import pytest
import torch

import fastmeta as fm


def model():
    torch.manual_seed(0)
    return fm.models.mlp((1, 8, 1))


@pytest.mark.parametrize("lr", [0.0, -0.0, -0.01, -5])
def test_a_rate_without_a_logarithm_is_refused_with_log_rates(lr):
    with pytest.raises(ValueError, match=r"lr must be > 0 with log_lr=True") as caught:
        fm.ModelAwareMAML(model(), lr=lr)
    assert "\n" not in str(caught.value) and "log_lr=False" in str(caught.value)


@pytest.mark.parametrize("lr_mode", ["scalar", "layer", "param"])
def test_without_log_rates_a_zero_or_negative_rate_is_kept(lr_mode):
    meta = fm.ModelAwareMAML(model(), lr=-0.01, log_lr=False, lr_mode=lr_mode, steps=1)
    rates = [p for n, p in meta.named_parameters() if n.startswith("lrs")]
    assert rates and all(bool((r == -0.01).all()) for r in rates)


def test_a_positive_rate_adapts_to_finite_outputs():
    meta = fm.ModelAwareMAML(model(), lr=0.01, steps=1)
    x = torch.linspace(-1, 1, 5).unsqueeze(-1)
    clone = meta.clone()
    clone.adapt(((clone(x) - x) ** 2).mean())
    assert torch.isfinite(clone(x)).all()
