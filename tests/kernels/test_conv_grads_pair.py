"""The conv gradients' pair (kernels/task_conv2d.py, conv2d_grads_kernel): the input- and
weight-gradient launches of ``task_conv2d_backward`` (and the double backward's d x and
d w) as one launch, where the protocol ``conv2d_grads_pair`` is in force.

Each part keeps its own plan, so the pair must write what the two single launches write,
bit for bit, on every route: per-task and shared weights (and an expanded one, whose input
gradient folds the tasks while its weight gradient does not), strides 1 and 2, K split in
one part, in the other, in both (their tile counters must not overlap) or in neither, one
pass or two, addends, and either part's programs first. Every case is planned for a GPU of
8 SMs, so that small problems split as a GPU's do. On a GPU (``-m gpu``, the GPU check's
``triton:conv2d_grads_pair`` step, which then records the protocol as verified) the two
parts' programs really run at the same time.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

from fastmeta.kernels import split_k  # noqa: E402
from fastmeta.kernels import task_conv2d as conv  # noqa: E402
from fastmeta.kernels import verified_protocols  # noqa: E402
from fastmeta.kernels.tiles import planned_for_sm_count  # noqa: E402
from fastmeta.ops.task_conv2d import (  # noqa: E402
    reference_task_conv2d_double_backward,
    reference_task_conv2d_backward,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1")]
if ON_GPU:
    pytestmark.append(pytest.mark.gpu)

SMS = 8
PAIR = conv.GRADS_PAIR

# (x's shape, O, stride, the weight: "per_task" [T, O, C, 3, 3], "shared" [O, C, 3, 3] or
# "expanded" (per-task shape, task stride 0), sms: the SMs planned for)
CASES = {
    "s2-per-task": ((2, 2, 4, 7, 6), 5, [2, 2], "per_task", SMS),
    "s1-shared": ((2, 3, 4, 6, 6), 6, [1, 1], "shared", SMS),
    "s2-expanded": ((3, 2, 3, 6, 5), 4, [2, 1], "expanded", SMS),
    "dx-split": ((2, 1, 16, 8, 8), 64, [2, 2], "per_task", SMS),
    "dw-split": ((2, 4, 16, 8, 8), 16, [1, 1], "shared", SMS),
    "both-split": ((1, 4, 2, 8, 8), 32, [1, 1], "per_task", SMS),
    "unsplit": ((2, 2, 3, 5, 5), 4, [1, 1], "per_task", None),
}


def operands(shape, O, stride, weight, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float32).to(DEVICE)

    T, N, C, H, W = shape
    x = randn(*shape)
    w = {"per_task": lambda: randn(T, O, C, 3, 3), "shared": lambda: randn(O, C, 3, 3),
         "expanded": lambda: randn(O, C, 3, 3).expand(T, O, C, 3, 3)}[weight]()
    HO, WO = (H + 2 - 3) // stride[0] + 1, (W + 2 - 3) // stride[1] + 1
    return x, w, randn(T, N, O, HO, WO), randn(*x.shape), randn(*w.shape)


def planned(sms):
    """Planned for ``sms`` SMs, or the interpreter's tiles (None)."""
    return planned_for_sm_count(sms) if sms else contextlib.nullcontext()


def both_ways(run, sms):
    """run() with the pair in force and without it, planned for ``sms`` SMs."""
    with planned(sms):
        with verified_protocols.forced(PAIR, True):
            paired = run()
        with verified_protocols.forced(PAIR, False):
            single = run()
    return paired, single


def assert_bitwise(paired, single, what):
    for i, (a, b) in enumerate(zip(paired, single)):
        assert a.shape == b.shape, f"{what}, output {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(a, b), f"{what}, output {i}: max difference {(a - b).abs().max().item():.3g}"


def assert_norm_close(got, expected, tolerance, what):
    error = (torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30)).item()
    assert error <= tolerance, f"{what}: norm-wise relative error {error:.3g} > {tolerance}"


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("addends", [False, True], ids=["plain", "addends"])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_pair_writes_what_the_single_launches_write(case, addends, one_pass):
    shape, O, stride, weight, sms = CASES[case]
    x, w, grad_out, dx_addend, dw_addend = operands(shape, O, stride, weight)
    if weight == "expanded":
        dw_addend = dw_addend.contiguous()
    args = (grad_out, x, w, stride, [1, 1], [True, True], *((dx_addend, dw_addend) if addends else ()))
    with split_k.one_pass_split_k(one_pass):
        paired, single = both_ways(lambda: conv.task_conv2d_backward(*args), sms)
        with planned(sms), verified_protocols.forced(PAIR, True):
            plans = conv.conv_launch_plans("task_conv2d_backward", *args)
    assert len(plans) == 1 and isinstance(plans[0], conv.ConvLaunchPair), plans
    assert_bitwise(paired, single, f"{case} backward")
    expected = reference_task_conv2d_backward(*args[:6])
    if addends:
        expected = (expected[0] + dx_addend, expected[1] + dw_addend)
    for i, (a, e) in enumerate(zip(paired, expected)):
        assert_norm_close(a, e, 1e-5, f"{case} backward, output {i} against the reference")


@pytest.mark.parametrize("case", ["s2-per-task", "s1-shared", "dx-split"])
def test_double_backward_pair_writes_what_the_single_launches_write(case):
    shape, O, stride, weight, sms = CASES[case]
    x, w, grad_out, g_dx, g_dw = operands(shape, O, stride, weight, seed=1)
    args = (g_dx, g_dw, grad_out, x, w, stride, [1, 1], [True, True, True])
    paired, single = both_ways(lambda: conv.task_conv2d_double_backward(*args), sms)
    assert_bitwise(paired, single, f"{case} double backward")
    for i, (a, e) in enumerate(zip(paired, reference_task_conv2d_double_backward(*args))):
        assert_norm_close(a, e, 1e-5, f"{case} double backward, output {i} against the reference")
    with planned_for_sm_count(sms), verified_protocols.forced(PAIR, True):
        kinds = [type(p).__name__ for p in conv.conv_launch_plans("task_conv2d_double_backward", *args)]
    assert kinds == ["ConvLaunch", "ConvLaunchPair"], kinds  # d grad_out's TWO_TERMS launch, then the pair


def test_both_parts_split_in_one_pass_on_disjoint_counters():
    """Both parts split K and take one pass: their tile counters are disjoint ranges of the
    stream's buffer, and every counter is back at zero after."""
    shape, O, stride, weight, sms = CASES["both-split"]
    x, w, grad_out, _, _ = operands(shape, O, stride, weight, seed=2)
    args = (grad_out, x, w, stride, [1, 1], [True, True])
    with planned(sms), verified_protocols.forced(PAIR, True):
        (pair,) = conv.conv_launch_plans("task_conv2d_backward", *args)
    assert all(part.split_k > 1 for part in pair.parts), [part.config for part in pair.parts]
    with split_k.one_pass_split_k(True):
        paired, single = both_ways(lambda: conv.task_conv2d_backward(*args), sms)
    assert_bitwise(paired, single, "both parts split")
    counters = split_k.tile_counters(torch.device(DEVICE), 1)
    assert int(counters.abs().sum()) == 0


def test_the_pair_plan_is_its_parts():
    """The pair's plan: its parts' plans unchanged, the grid their programs in one row, the
    MACs and busy programs their sums, the parts whose programs run more MACs each first;
    ``grouped=False`` gives the parts."""
    for case, (shape, O, stride, weight, sms) in CASES.items():
        x, w, grad_out, _, _ = operands(shape, O, stride, weight)
        args = (grad_out, x, w, stride, [1, 1], [True, True])
        with planned(sms), verified_protocols.forced(PAIR, True):
            (pair,) = conv.conv_launch_plans("task_conv2d_backward", *args)
            parts = conv.conv_launch_plans("task_conv2d_backward", *args, grouped=False)
        assert list(pair.parts) == parts, case
        assert [p.kernel for p in parts] == ["input_grad", "weight_grad"], case
        assert pair.grid == (sum(p.programs for p in parts), 1, 1), case
        assert pair.issued_macs == sum(p.issued_macs for p in parts), case
        assert pair.useful_macs == sum(p.useful_macs for p in parts), case
        assert pair.busy_programs == sum(p.busy_programs for p in parts), case
        dx, dw = parts
        assert pair.dw_first == (dw.issued_macs / dw.busy_programs > dx.issued_macs / dx.busy_programs), case
        assert pair.config["num_warps"] == max(p.config["num_warps"] for p in parts), case
        assert pair.config["num_stages"] == min(p.config["num_stages"] for p in parts), case
        assert set(pair.launch_tiles()) == {f"{a}_BLOCK_{b}" for a in ("DX", "DW") for b in "MNK"}, case


def test_one_wanted_gradient_launches_alone():
    x, w, grad_out, _, _ = operands((2, 2, 4, 7, 6), 5, [2, 2], "per_task")
    with verified_protocols.forced(PAIR, True):
        for mask, kind in (([True, False], "input_grad"), ([False, True], "weight_grad")):
            plans = conv.conv_launch_plans("task_conv2d_backward", grad_out, x, w, [2, 2], [1, 1], mask)
            assert [p.kernel for p in plans] == [kind]


def test_the_pair_on_cuda_follows_the_verification_record():
    """On CUDA (and in the launch recorder) the pair runs only once the GPU check has
    recorded it as verified; the interpreter runs it always; a test may force either; an
    unknown protocol's name is refused by name."""
    from fastmeta.backends import verification
    from fastmeta.backends.optional_backends import triton_launchers
    from fastmeta.kernels.launch_checks import recording_on_cpu
    from fastmeta.tools.launches import as_if_verified

    triton_launchers()  # installs the record's answer
    recorded = verification.is_verified("triton", PAIR, "cuda")
    assert verified_protocols.in_force(PAIR, torch.device("cuda")) == recorded
    with recording_on_cpu():
        assert verified_protocols.in_force(PAIR, torch.device("cpu")) == recorded
        with as_if_verified():
            assert verified_protocols.in_force(PAIR, torch.device("cpu"))
        with verified_protocols.forced(PAIR, False):
            assert not verified_protocols.in_force(PAIR, torch.device("cpu"))
    if INTERPRETED:
        assert verified_protocols.in_force(PAIR, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown launch protocol 'conv2d_grads_pairs'"):
        verified_protocols.in_force("conv2d_grads_pairs", torch.device("cpu"))
