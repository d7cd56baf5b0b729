"""Dispatch budgets of one meta-iteration on the plain user path (``meta_batch``,
``loss.backward()``, torch's fused Adam) on the CPU, per workload: a count is
deterministic, so each is pinned at what the engine achieves, and can only go down.

The counts follow issue 23's definition (fastmeta/tools/dispatches.py, ``is_dispatch``):
aten ops inside a fastmeta op's Python implementation count too, glue included. Second
order: W2 226 → 178, W4 1 022 → 842 with issue 23's "fewer ops" (under the old definition,
which skipped those aten ops: W2 196 → 148, W4 852 → 672); then 182 and 858 with issue 23's
one dispatch, where the linear head's backward calls ``fastmeta::task_linear_input_grad``
as a public op (one range, counted; its reference's ``aten::bmm`` counts too); then 162
and 726 once the C++ BatchNorm kernels read γ, β and their upstreams at their strides (the
per-task rows of the flat fast-weight buffer were copied contiguous first: 20
``aten::clone`` per W2 iteration). The issue's targets (W2 ≤ 120,
W4 ≤ 450) are not met yet: what remains is mostly autograd's gradient accumulation
(``aten::add_``), the validation's checks (one host sync each) and the CPU's reference
linear head (``aten::bmm``/``matmul``, see AUTO_PREFERENCE).
"""

from __future__ import annotations

import pytest

from fastmeta.tools.profiling import count_paths
from fastmeta.tools.workloads import WORKLOADS
from helpers import build_or_skip

@pytest.fixture(scope="module")
def extension():
    build_or_skip()


# (workload, order): (dispatches, host syncs) at most
BUDGETS = {
    ("W1", "second"): (4, 0),
    ("W2", "second"): (162, 8),
    ("W2", "first"): (89, 6),
    ("W4", "second"): (726, 20),
    ("W4", "first"): (285, 10),
}
# Glue that the fused kernels and the traced program leave out (issue 23, "fewer ops"): the
# activation gradient runs inside the BatchNorm backward kernels, ReLU's second derivative
# and the conv biases a BatchNorm cancels are never computed, and the flat buffer's views
# fill unread segments from a cached zero; the validation's checks take two ops per input and
# loss, three per label set; the BatchNorm kernels take γ and β at their strides (no layout copy).
NEVER = ("fastmeta::activation_grad", "aten::zeros_like", "aten::clone")
# conv4's conv biases feed batch-statistics BatchNorms: no bias sums. The aten::sum left are
# the linear head's bias and the task losses' sum per inner step, and θ's expand (second
# order). Before: W2 17 / 11, W4 61 / 35.
SUMS = {("W2", "second"): 5, ("W2", "first"): 3, ("W4", "second"): 17, ("W4", "first"): 11}


@pytest.mark.parametrize("workload, order", sorted(BUDGETS), ids=[f"{w}-{o}" for w, o in sorted(BUDGETS)])
def test_plain_path_dispatch_budget(extension, workload, order):
    dispatches, syncs = BUDGETS[workload, order]
    plain = count_paths(WORKLOADS[workload], backend="auto", first_order=order == "first")["plain"]
    assert plain.dispatches <= dispatches and plain.host_syncs <= syncs, plain.describe()
    if workload == "W1":
        return
    # The heavy ops run as fastmeta ops (one dispatch each), not as aten compositions.
    if order == "second":
        assert plain.by_name["fastmeta::task_batch_norm_double_backward"] >= 1, plain.describe()
    assert "aten::native_batch_norm_backward" not in plain.by_name, plain.describe()
    assert not set(NEVER) & set(plain.by_name), plain.describe()
    assert plain.by_name["aten::sum"] <= SUMS[workload, order], plain.describe()
