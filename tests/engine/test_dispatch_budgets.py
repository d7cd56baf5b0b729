"""Dispatch budgets of one second-order meta-iteration on the plain user path
(``meta_batch``, ``loss.backward()``, torch's fused Adam) on the CPU, per workload: a count
is deterministic, so each is pinned at what the engine achieves, and can only go down.

The issue's budgets (W2 ≤ 150, W4 ≤ 600) are not met yet: the figures below are the counts
as of this commit (issue 12's figures: W2 475 → 198, W4 2 199 → 874). What remains is
mostly autograd's gradient accumulation (``aten::add_``), bias sums (``aten::sum``), the
activation gradients as ops of their own, and the validation's checks (one host sync each).
"""

from __future__ import annotations

import pytest

from fastmeta.tools.profiling import count_paths
from fastmeta.tools.workloads import WORKLOADS
from helpers import build_or_skip

@pytest.fixture(scope="module")
def extension():
    build_or_skip()


# workload: (dispatches, host syncs) at most
BUDGETS = {"W1": (4, 0), "W2": (198, 8), "W4": (874, 24)}


@pytest.mark.parametrize("workload", sorted(BUDGETS))
def test_plain_path_dispatch_budget(extension, workload):
    dispatches, syncs = BUDGETS[workload]
    plain = count_paths(WORKLOADS[workload], backend="auto")["plain"]
    assert plain.dispatches <= dispatches and plain.host_syncs <= syncs, plain.describe()
    # The heavy ops run as fastmeta ops (one dispatch each), not as aten compositions.
    if workload != "W1":
        assert plain.by_name["fastmeta::task_batch_norm_double_backward"] >= 1, plain.describe()
        assert "aten::native_batch_norm_backward" not in plain.by_name, plain.describe()
