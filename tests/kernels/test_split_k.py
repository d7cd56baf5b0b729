"""Split-K in one launch (kernels/split_k.py): the last K range of each tile sums the
partial tiles, in split order, in its own epilogue.

Every case is planned for a GPU of 8 SMs, so that small problems split K as a GPU's large
ones do, and runs both routes: one pass, and two (the partial tiles summed by
``torch.sum``). On a GPU (``-m gpu``, the GPU check's ``triton:split_k`` step, which then
records the protocol as verified) the programs of a tile really race for its counter;
under the interpreter they run one after another.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from fastmeta.kernels import split_k  # noqa: E402
from fastmeta.kernels import task_conv2d as conv  # noqa: E402
from fastmeta.kernels import task_linear as linear  # noqa: E402
from fastmeta.kernels.tiles import planned_for_sm_count  # noqa: E402
from fastmeta.ops.task_conv2d import (  # noqa: E402
    reference_task_conv2d,
    reference_task_conv2d_double_backward,
    reference_task_conv2d_input_grad,
    reference_task_conv2d_weight_grad,
)
from fastmeta.ops.task_linear import (  # noqa: E402
    reference_task_linear,
    reference_task_linear_backward,
    reference_task_linear_weight_grad,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1")]
if ON_GPU:
    pytestmark.append(pytest.mark.gpu)

SMS = 8


class SumCounter(TorchDispatchMode):
    """Counts torch.sum calls: the two-pass route's second pass."""

    def __init__(self):
        super().__init__()
        self.sums = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::sum":
            self.sums += 1
        return func(*args, **(kwargs or {}))


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def conv_forward_case():
    x, w, b = randn(2, 2, 64, 8, 8, seed=1), randn(2, 64, 64, 3, 3, seed=2) / 24, randn(2, 64, seed=3)
    args = (x, w, b, [2, 2], [1, 1])
    return ("task_conv2d", args, lambda: conv.task_conv2d(*args), lambda: reference_task_conv2d(*args),
            conv.conv_launch_plan("task_conv2d", *args))


def conv_input_grad_case():
    """Stride 2: the four phases of one launch, each with its own counters."""
    gy, w = randn(2, 1, 128, 4, 4, seed=4), randn(2, 128, 16, 3, 3, seed=5) / 34
    args = (gy, w, [8, 8], [2, 2], [1, 1])
    return ("task_conv2d_input_grad", args, lambda: conv.task_conv2d_input_grad(*args),
            lambda: reference_task_conv2d_input_grad(*args), conv.conv_launch_plan("task_conv2d_input_grad", *args))


def conv_weight_grad_case(shared):
    gy, x = randn(2, 4, 16, 8, 8, seed=6), randn(2, 4, 16, 8, 8, seed=7)
    args = (gy, x, [3, 3], [1, 1], [1, 1], shared)
    return ("task_conv2d_weight_grad", args, lambda: conv.task_conv2d_weight_grad(*args),
            lambda: reference_task_conv2d_weight_grad(*args), conv.conv_launch_plan("task_conv2d_weight_grad", *args))


def conv_double_backward_case():
    """d grad_out = conv(g_dx, w) + conv(x, g_dw) as one launch over both terms' K
    (TWO_TERMS), split: the K ranges straddle the two terms."""
    x, w = randn(2, 2, 64, 8, 8, seed=8), randn(2, 64, 64, 3, 3, seed=9) / 24
    g_dx, g_dw, gy = randn(2, 2, 64, 8, 8, seed=10), randn(2, 64, 64, 3, 3, seed=11) / 24, randn(2, 2, 64, 4, 4, seed=12)
    args = (g_dx, g_dw, gy, x, w, [2, 2], [1, 1], [True, False, False])
    return ("task_conv2d_double_backward", args, lambda: conv.task_conv2d_double_backward(*args)[0],
            lambda: reference_task_conv2d_double_backward(*args)[0],
            conv.conv_launch_plan("task_conv2d_two_terms", g_dx, w, x, g_dw, [2, 2], [1, 1]))


def linear_forward_case():
    x, w, b = randn(2, 256, 256, seed=13), randn(2, 16, 256, seed=14) / 16, randn(2, 16, seed=15)
    args = (x, w, b, "none", 0.0)
    return ("task_linear", args, lambda: linear.task_linear(*args), lambda: reference_task_linear(*args),
            linear.linear_launch_plan("task_linear", *args))


def linear_weight_grad_case():
    """Shared: the tasks fold into K, and the output is written at its own strides."""
    gy, x = randn(2, 256, 16, seed=16), randn(2, 256, 256, seed=17)
    args = (gy, x, True)
    return ("task_linear_weight_grad", args, lambda: linear.task_linear_weight_grad(*args),
            lambda: reference_task_linear_weight_grad(*args),
            linear.linear_launch_plan("task_linear_weight_grad", *args))


def linear_backward_addends_case():
    """The backward's addends, added by the first K range of the split weight gradient (and
    by the input gradient's only range): each in the sum once."""
    gy, x, w = randn(2, 256, 16, seed=18), randn(2, 256, 256, seed=19), randn(2, 16, 256, seed=20) / 16
    add_x, add_w = randn(2, 256, 256, seed=21), randn(2, 16, 256, seed=22)
    args = (gy, x, w, [True, True], add_x, add_w)
    return ("task_linear_backward", args, lambda: torch.cat([t.flatten() for t in linear.task_linear_backward(*args)]),
            lambda: torch.cat([t.flatten() for t in reference_task_linear_backward(*args)]),
            linear.linear_launch_plan("task_linear_weight_grad", gy, x, False))


CASES = {
    "linear-backward-addends": linear_backward_addends_case,
    "conv-forward": conv_forward_case,
    "conv-input-grad-phases": conv_input_grad_case,
    "conv-weight-grad-per-task": lambda: conv_weight_grad_case(False),
    "conv-weight-grad-shared": lambda: conv_weight_grad_case(True),
    "conv-double-backward-two-terms": conv_double_backward_case,
    "linear-forward-bias": linear_forward_case,
    "linear-weight-grad-shared": linear_weight_grad_case,
}


def run(launch, one_pass: bool):
    counter = SumCounter()
    with split_k.one_pass_split_k(one_pass), counter:
        out = launch()
    return out, counter.sums


def counters_are_zero() -> bool:
    return all(int(c.count_nonzero()) == 0 for c in split_k._counters.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_pass_equals_the_reference_and_the_two_pass_sum(case):
    with planned_for_sm_count(SMS):
        name, _, launch, reference, plan = CASES[case]()
        assert plan.split_k > 1, (name, plan.config)
        one, sums_one = run(launch, True)
        again, _ = run(launch, True)
        two, sums_two = run(launch, False)
    expected = reference()
    assert sums_one == 0 and sums_two >= 1, (sums_one, sums_two)
    assert torch.equal(one, again), "one pass: the same inputs must give the same bits"
    # Both routes add the partial tiles in split order.
    assert torch.linalg.vector_norm(one - two) <= 1e-6 * torch.linalg.vector_norm(two)
    assert torch.linalg.vector_norm(one - expected) <= 1e-4 * torch.linalg.vector_norm(expected)
    assert counters_are_zero(), "every launch leaves its tile counters at zero"


def test_a_launch_with_more_tiles_than_counters_takes_two_passes(monkeypatch):
    monkeypatch.setattr(split_k, "COUNTERS", 1)
    with planned_for_sm_count(SMS):
        _, _, launch, reference, plan = conv_forward_case()
        assert plan.grid[0] * plan.grid[1] > 1 and plan.split_k > 1
        out, sums = run(launch, True)
    assert sums >= 1
    expected = reference()
    assert torch.linalg.vector_norm(out - expected) <= 1e-4 * torch.linalg.vector_norm(expected)


def test_counters_are_per_stream_and_made_once():
    device = torch.device(DEVICE)
    first = split_k.tile_counters(device, 10)
    assert first is split_k.tile_counters(device, 10) and first.dtype == torch.int32
    assert first.numel() == split_k.COUNTERS and split_k.tile_counters(device, split_k.COUNTERS + 1) is None
    if ON_GPU:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            assert split_k.tile_counters(device, 10) is not first


def test_the_route_on_cuda_follows_the_verification_record():
    """On CUDA (and in the launch recorder, which counts the CUDA path) one pass is taken
    only once the GPU check has recorded the protocol as verified; the interpreter takes
    it always; a test may force either."""
    from fastmeta.backends import verification
    from fastmeta.backends.optional_backends import triton_launchers
    from fastmeta.kernels.launch_checks import recording_on_cpu
    from fastmeta.tools.launches import as_if_verified

    triton_launchers()  # installs the record's answer
    recorded = verification.is_verified("triton", split_k.ONE_PASS_KERNEL, "cuda")
    with recording_on_cpu():
        assert split_k.one_pass(torch.device("cpu")) == recorded
        with as_if_verified():
            assert split_k.one_pass(torch.device("cpu"))
        assert split_k.one_pass(torch.device("cpu")) == recorded
        with split_k.one_pass_split_k(False):
            assert not split_k.one_pass(torch.device("cpu"))
    assert split_k.one_pass(torch.device("cuda")) == recorded
    if INTERPRETED:
        assert split_k.one_pass(torch.device("cpu"))
    assert split_k.split_reduction(torch.device(DEVICE), 1, 4) == (False, None)  # unsplit: nothing to sum
