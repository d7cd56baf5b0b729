"""Dispatch budgets of one meta-iteration on the plain user path (``meta_batch``,
``loss.backward()``, torch's fused Adam) on the CPU, per workload: a count is
deterministic, so each is pinned at what the engine achieves, and can only go down.

The counts follow issue 23's definition (fastmeta/tools/dispatches.py, ``is_dispatch``):
aten ops inside a fastmeta op's Python implementation count too, glue included. Measured
at this commit (second order; bench/RESULTS.md has first order and W3): W1 4, W2 226, W4
1 022; under the old definition, which skipped those aten ops, W2 196 and W4 852. The
issue's targets (W2 ≤ 120, W4 ≤ 450) are not met yet: what remains is mostly autograd's
gradient accumulation (``aten::add_``), bias sums (``aten::sum``), the activation
gradients as ops of their own, task_linear's reference on the CPU (``aten::bmm``,
``aten::add``), and the validation's checks (one host sync each).
"""

from __future__ import annotations

import pytest

from fastmeta.tools.profiling import count_paths
from fastmeta.tools.workloads import WORKLOADS
from helpers import build_or_skip

@pytest.fixture(scope="module")
def extension():
    build_or_skip()


# (workload, first order): (dispatches, host syncs) at most
BUDGETS = {("W1", False): (4, 0), ("W2", False): (226, 8), ("W4", False): (1022, 20), ("W2", True): (123, 6)}


@pytest.mark.parametrize("workload,first_order", sorted(BUDGETS), ids=lambda v: str(v))
def test_plain_path_dispatch_budget(extension, workload, first_order):
    dispatches, syncs = BUDGETS[(workload, first_order)]
    plain = count_paths(WORKLOADS[workload], backend="auto", first_order=first_order)["plain"]
    assert plain.dispatches <= dispatches and plain.host_syncs <= syncs, plain.describe()
    # The heavy ops run as fastmeta ops (one dispatch each), not as aten compositions.
    if workload != "W1":
        if not first_order:
            assert plain.by_name["fastmeta::task_batch_norm_double_backward"] >= 1, plain.describe()
        assert "aten::native_batch_norm_backward" not in plain.by_name, plain.describe()
