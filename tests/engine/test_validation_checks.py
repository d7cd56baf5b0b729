"""The validation's one-op checks (fastmeta/engine/meta_iteration.py): ``all_finite`` (the
∞-norm, one op and one host read) and the label range (clamp, then ``torch.equal``) find
every NaN, ±Inf and out-of-range label wherever it sits, as the two- and three-op checks
they replace (``isfinite().all()``, ``clamp().ne().any()``) did."""

from __future__ import annotations

import pytest
import torch

from fastmeta.engine.meta_iteration import all_finite, check_labels, check_finite_losses


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 7, 64, 40_003])  # a vectorised reduction's main loop and its tail
def test_all_finite_finds_each_nan_and_inf_anywhere(dtype, size):
    torch.manual_seed(size)
    t = torch.randn(size, dtype=dtype) * 100
    assert all_finite(t) and bool(torch.isfinite(t).all())
    big = torch.full((size,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big) and all_finite(-big)  # the largest finite magnitude is finite
    for position in {0, size // 2, size - 1}:
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[position] = bad
            assert not all_finite(u), (position, bad)
            assert all_finite(u) == bool(torch.isfinite(u).all())
    mixed = t.clone()
    mixed[0], mixed[-1] = float("-inf"), float("nan")
    assert not all_finite(mixed)


def test_all_finite_of_an_empty_tensor_and_of_strided_views():
    assert all_finite(torch.empty(0, 3))
    t = torch.randn(6, 8)
    t[1, 3] = float("nan")
    assert not all_finite(t[:, 3]) and all_finite(t[:, 2]) and not all_finite(t.t())


def test_a_non_finite_loss_is_named_with_its_task():
    losses = torch.tensor([0.5, float("inf"), float("nan")], requires_grad=True)
    with pytest.raises(FloatingPointError, match="the query loss of task 1 is inf"):
        check_finite_losses(losses * 1, "query", True)
    check_finite_losses(losses * 1, "query", False)  # validate off: no check


@pytest.mark.parametrize("bad", [-1, 5, 1 << 40, -(1 << 40)])
def test_labels_out_of_range_are_found_anywhere(bad):
    target = torch.arange(4 * 10).remainder(5).view(4, 10)
    check_labels(target, 5, "support", True)
    for t, n in ((0, 0), (2, 5), (3, 9)):
        y = target.clone()
        y[t, n] = bad
        with pytest.raises(ValueError, match=f"support labels out of range for the model's 5 outputs \\(task {t} "):
            check_labels(y, 5, "support", True)
        check_labels(y, 5, "support", False)  # validate off: no check
