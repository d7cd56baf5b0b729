"""The validation's one-op checks (fastmeta/engine/meta_iteration.py): ``all_finite`` (the
∞-norm, one op and one host read) and the label range (clamp, then ``torch.equal``) find
every NaN, ±Inf and out-of-range label wherever it sits, as the two- and three-op checks
they replace (``isfinite().all()``, ``clamp().ne().any()``) did."""

from __future__ import annotations

import math

import pytest
import torch

import fastmeta as fm
from fastmeta.tools.dispatches import count_dispatches
from fastmeta.engine.meta_iteration import FiniteChecks, all_finite, check_labels, check_finite_losses


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


def _checks(*items):
    checks = FiniteChecks()
    for kind, name, t in items:
        (checks.add_input if kind == "input" else checks.add_losses)(name, t)
    return checks


def test_the_checks_of_one_call_find_the_first_non_finite_in_order():
    """Inputs, then support and query losses, checked together (one sync): the first
    non-finite one is named as the check at once named it; all finite, nothing raised."""
    x, losses = torch.randn(3, 4, 2), torch.tensor([0.5, 0.25, 1.0])
    _checks(("input", "support_x", x), ("losses", "support", losses), ("losses", "query", losses)).check()
    nan_x = x.clone()
    nan_x[2, 1, 0] = float("nan")
    bad = torch.tensor([0.5, float("inf"), float("nan")])
    with pytest.raises(FloatingPointError, match="support_x has NaN or Inf in task 2"):
        _checks(("input", "support_x", nan_x), ("losses", "support", bad), ("losses", "query", bad)).check()
    with pytest.raises(FloatingPointError, match="the support loss of task 1 is inf"):
        _checks(("input", "support_x", x), ("losses", "support", bad), ("losses", "query", bad)).check()
    with pytest.raises(FloatingPointError, match="the query loss of task 2 is nan"):
        _checks(("input", "query_x", x), ("losses", "support", losses),
                ("losses", "query", torch.tensor([1.0, 2.0, float("nan")]))).check()
    # Mixed dtypes are checked one by one, with the same outcome.
    with pytest.raises(FloatingPointError, match="the query loss of task 1 is inf"):
        _checks(("input", "query_x", x.double()), ("losses", "query", bad)).check()
    _checks(("input", "query_x", x.double()), ("losses", "query", losses)).check()
    _checks().check()  # nothing to check


def test_finite_values_whose_squares_overflow_pass_and_minus_inf_is_found():
    """The joint check filters by 2-norms: finite values whose squares overflow float32
    (1e30² = ∞) make it fall back to the exact check, which passes them; -Inf alone (no
    NaN, no +Inf) is found and named, in an input and in a loss."""
    huge = torch.full((2, 3, 4), 1e30)
    losses = torch.tensor([3e38, 1.0])
    assert not math.isfinite(float(torch._foreach_norm([huge], 2.0)[0]))  # the filter trips
    _checks(("input", "support_x", huge), ("losses", "support", losses)).check()
    low = huge.clone()
    low[1, 2, 3] = float("-inf")
    with pytest.raises(FloatingPointError, match="support_x has NaN or Inf in task 1"):
        _checks(("input", "support_x", low), ("losses", "support", losses)).check()
    with pytest.raises(FloatingPointError, match="the query loss of task 0 is -inf"):
        _checks(("input", "query_x", torch.ones(2, 3)), ("losses", "query", torch.tensor([float("-inf"), 1.0]))).check()


def test_a_meta_batch_checks_its_inputs_and_losses_in_one_host_sync():
    """A second-order meta_batch with validate=True, 3 inner steps: the inputs and the four
    losses' NaN/Inf checks take one host read, where one per check took six; a NaN input
    is still found and named, and a NaN loss from finite inputs too."""
    torch.manual_seed(0)
    # LayerNorm: not a plain MLP, so the general path (a plain MLP runs the fused kernel)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    meta = fm.MAML(model, lr=0.1, steps=3, validate=True)
    batch = [torch.randn(2, 4, 2), torch.randint(0, 3, (2, 4)), torch.randn(2, 5, 2), torch.randint(0, 3, (2, 5))]
    count = count_dispatches(lambda: meta.meta_batch(*batch))
    assert count.by_name["aten::_foreach_norm"] == 1 and "aten::linalg_vector_norm" not in count.by_name
    assert count.host_syncs == 1, count.describe()
    nan_batch = list(batch)
    nan_batch[2] = batch[2].clone()
    nan_batch[2][1, 3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="query_x has NaN or Inf in task 1"):
        meta.meta_batch(*nan_batch)
    with torch.no_grad():
        model[0].weight.mul_(1e38)  # finite parameters, overflowing losses
    with pytest.raises(FloatingPointError, match="the support loss of task"):
        meta.meta_batch(*batch)
