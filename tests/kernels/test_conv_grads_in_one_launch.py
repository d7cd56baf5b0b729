"""The conv backward's launches in one (kernels/task_conv2d.py, conv2d_grads_kernel): the
input- and weight-gradient launches of ``task_conv2d_backward``, and the double backward's
d grad_out (a forward launch, of one term or two), d x and d w, as one launch where the
protocol ``conv2d_grads_in_one_launch`` is in force.

Each part keeps its own plan, so the group must write what the single launches write, bit
for bit, on every route: per-task and shared weights (and an expanded one, whose input
gradient folds the tasks while its weight gradient does not), strides 1 and 2, K split in
one part, in another, in all (their tile counters must not overlap) or in none, one pass or
two, addends, every subset of the double backward's parts, and the parts in either order
(the plan puts the longest programs first). Every case but one is planned for a GPU of 8
SMs, so that small problems split as a GPU's do. On a GPU (``-m gpu``, the GPU check's
``triton:conv2d_grads_in_one_launch`` step, which then records the protocol as verified)
the parts' programs really run at the same time; under the interpreter they run one after
another, so an overlap of two parts' tile counters could not show here.
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
GROUP = conv.GRADS_IN_ONE_LAUNCH

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
    """run() with the launches grouped and without, planned for ``sms`` SMs."""
    with planned(sms):
        with verified_protocols.forced(GROUP, True):
            grouped = run()
        with verified_protocols.forced(GROUP, False):
            single = run()
    return grouped, single


def assert_bitwise(grouped, single, what):
    for i, (a, b) in enumerate(zip(grouped, single)):
        assert a.shape == b.shape, f"{what}, output {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(a, b), f"{what}, output {i}: max difference {(a - b).abs().max().item():.3g}"


def assert_norm_close(got, expected, tolerance, what):
    error = (torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30)).item()
    assert error <= tolerance, f"{what}: norm-wise relative error {error:.3g} > {tolerance}"


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("addends", [False, True], ids=["plain", "addends"])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_group_writes_what_the_single_launches_write(case, addends, one_pass):
    shape, O, stride, weight, sms = CASES[case]
    x, w, grad_out, dx_addend, dw_addend = operands(shape, O, stride, weight)
    if weight == "expanded":
        dw_addend = dw_addend.contiguous()
    args = (grad_out, x, w, stride, [1, 1], [True, True], *((dx_addend, dw_addend) if addends else ()))
    with split_k.one_pass_split_k(one_pass):
        grouped, single = both_ways(lambda: conv.task_conv2d_backward(*args), sms)
        with planned(sms), verified_protocols.forced(GROUP, True):
            plans = conv.conv_launch_plans("task_conv2d_backward", *args)
    assert len(plans) == 1 and isinstance(plans[0], conv.ConvLaunchGroup), plans
    assert [p.kernel for p in sorted(plans[0].parts, key=lambda p: p.kernel)] == ["input_grad", "weight_grad"]
    assert_bitwise(grouped, single, f"{case} backward")
    expected = reference_task_conv2d_backward(*args[:6])
    if addends:
        expected = (expected[0] + dx_addend, expected[1] + dw_addend)
    for i, (a, e) in enumerate(zip(grouped, expected)):
        assert_norm_close(a, e, 1e-5, f"{case} backward, output {i} against the reference")


@pytest.mark.parametrize("upstreams", ["both", "g_dx", "g_dw"])
@pytest.mark.parametrize("case", ["s2-per-task", "s1-shared", "dx-split", "both-split"])
def test_double_backward_group_writes_what_the_single_launches_write(case, upstreams):
    """Both upstreams: d grad_out's two-term forward, d x and d w in one launch; one: its
    forward term and the gradient it feeds (g_dx: d w; g_dw: d x), the other output zeros."""
    shape, O, stride, weight, sms = CASES[case]
    x, w, grad_out, g_dx, g_dw = operands(shape, O, stride, weight, seed=1)
    g_dx, g_dw = {"both": (g_dx, g_dw), "g_dx": (g_dx, None), "g_dw": (None, g_dw)}[upstreams]
    args = (g_dx, g_dw, grad_out, x, w, stride, [1, 1], [True, True, True])
    grouped, single = both_ways(lambda: conv.task_conv2d_double_backward(*args), sms)
    assert_bitwise(grouped, single, f"{case} double backward")
    for i, (a, e) in enumerate(zip(grouped, reference_task_conv2d_double_backward(*args))):
        assert_norm_close(a, e, 1e-5, f"{case} double backward, output {i} against the reference")
    with planned(sms), verified_protocols.forced(GROUP, True):
        (group,) = conv.conv_launch_plans("task_conv2d_double_backward", *args)
    expected = {"both": ["forward", "input_grad", "weight_grad"], "g_dx": ["forward", "weight_grad"],
                "g_dw": ["forward", "input_grad"]}[upstreams]
    assert sorted(p.kernel for p in group.parts) == expected


def test_every_part_first():
    """Across the cases each kind of part leads the grid somewhere (the plan orders the parts
    by MACs per program), so every part's offset is exercised at 0 and past it."""
    leaders = set()
    for case, (shape, O, stride, weight, sms) in CASES.items():
        x, w, grad_out, g_dx, g_dw = operands(shape, O, stride, weight, seed=1)
        with planned(sms), verified_protocols.forced(GROUP, True):
            (double,) = conv.conv_launch_plans("task_conv2d_double_backward", g_dx, g_dw, grad_out, x, w, stride,
                                               [1, 1], [True, True, True])
            (single,) = conv.conv_launch_plans("task_conv2d_backward", grad_out, x, w, stride, [1, 1], [True, True])
        leaders |= {double.parts[0].kernel, single.parts[0].kernel}
    assert leaders == {"forward", "input_grad", "weight_grad"}, leaders


def test_both_parts_split_in_one_pass_on_disjoint_counters():
    """Every part splits K and takes one pass: their tile counters are disjoint ranges of
    the stream's buffer, and every counter is back at zero after."""
    shape, O, stride, weight, sms = CASES["both-split"]
    x, w, grad_out, _, _ = operands(shape, O, stride, weight, seed=2)
    args = (grad_out, x, w, stride, [1, 1], [True, True])
    with planned(sms), verified_protocols.forced(GROUP, True):
        (group,) = conv.conv_launch_plans("task_conv2d_backward", *args)
    assert all(part.split_k > 1 for part in group.parts), [part.config for part in group.parts]
    with split_k.one_pass_split_k(True):
        grouped, single = both_ways(lambda: conv.task_conv2d_backward(*args), sms)
    assert_bitwise(grouped, single, "both parts split")
    g_dx, g_dw = torch.randn_like(x), torch.randn_like(w)
    double = (g_dx, g_dw, grad_out, x, w, stride, [1, 1], [True, True, True])
    with planned(sms), verified_protocols.forced(GROUP, True):
        (group,) = conv.conv_launch_plans("task_conv2d_double_backward", *double)
    assert len(group.parts) == 3 and all(part.split_k > 1 for part in group.parts), group
    with split_k.one_pass_split_k(True):
        grouped, single = both_ways(lambda: conv.task_conv2d_double_backward(*double), sms)
    assert_bitwise(grouped, single, "all three parts split")
    counters = split_k.tile_counters(torch.device(DEVICE), 1)
    assert int(counters.abs().sum()) == 0


def test_the_group_plan_is_its_parts():
    """The group's plan: its parts' plans unchanged, the grid their programs in one row, one
    part after another with the most MACs per program first, the MACs and busy programs
    their sums; ``grouped=False`` gives the parts."""
    for case, (shape, O, stride, weight, sms) in CASES.items():
        x, w, grad_out, g_dx, g_dw = operands(shape, O, stride, weight)
        for name, args in (("task_conv2d_backward", (grad_out, x, w, stride, [1, 1], [True, True])),
                           ("task_conv2d_double_backward", (g_dx, g_dw, grad_out, x, w, stride, [1, 1],
                                                            [True, True, True]))):
            with planned(sms), verified_protocols.forced(GROUP, True):
                (group,) = conv.conv_launch_plans(name, *args)
                parts = conv.conv_launch_plans(name, *args, grouped=False)
            what = f"{case} {name}"
            assert sorted(group.parts, key=lambda p: p.kernel) == sorted(parts, key=lambda p: p.kernel), what
            per_program = [p.issued_macs / p.busy_programs for p in group.parts]
            assert per_program == sorted(per_program, reverse=True), what
            assert group.grid == (sum(p.programs for p in parts), 1, 1), what
            assert [group.begin(p.kernel) for p in group.parts] == [
                sum(q.programs for q in group.parts[:i]) for i in range(len(group.parts))], what
            assert group.issued_macs == sum(p.issued_macs for p in parts), what
            assert group.useful_macs == sum(p.useful_macs for p in parts), what
            assert group.busy_programs == sum(p.busy_programs for p in parts), what
            assert group.config["num_warps"] == max(p.config["num_warps"] for p in parts), what
            assert group.config["num_stages"] == min(p.config["num_stages"] for p in parts), what
            tiles = group.launch_tiles()
            assert set(tiles) == {f"{a}_BLOCK_{b}" for a in ("FWD", "DX", "DW") for b in "MNK"}, what
            prefixes = {"forward": "FWD", "input_grad": "DX", "weight_grad": "DW"}
            assert all(tiles[f"{prefixes[p.kernel]}_BLOCK_M"] == p.config["BLOCK_M"] for p in parts), what


def test_a_group_takes_two_or_three_distinct_parts():
    x, w, grad_out, _, _ = operands((2, 2, 4, 7, 6), 5, [2, 2], "per_task")
    (launch,) = conv.conv_launch_plans("task_conv2d_backward", grad_out, x, w, [2, 2], [1, 1], [True, False])
    for parts in ([launch], [launch, launch]):
        with pytest.raises(ValueError, match="two or three launches of distinct kinds"):
            conv.ConvLaunchGroup.of(parts)


def test_one_wanted_gradient_launches_alone():
    x, w, grad_out, _, _ = operands((2, 2, 4, 7, 6), 5, [2, 2], "per_task")
    with verified_protocols.forced(GROUP, True):
        for mask, kind in (([True, False], "input_grad"), ([False, True], "weight_grad")):
            plans = conv.conv_launch_plans("task_conv2d_backward", grad_out, x, w, [2, 2], [1, 1], mask)
            assert [p.kernel for p in plans] == [kind]


def test_the_group_on_cuda_follows_the_verification_record():
    """On CUDA (and in the launch recorder) the group runs only once the GPU check has
    recorded it as verified; the interpreter runs it always; a test may force either; an
    unknown protocol's name is refused by name."""
    from fastmeta.backends import verification
    from fastmeta.backends.optional_backends import triton_launchers
    from fastmeta.kernels.launch_checks import recording_on_cpu
    from fastmeta.tools.launches import as_if_verified

    triton_launchers()  # installs the record's answer
    recorded = verification.is_verified("triton", GROUP, "cuda")
    assert verified_protocols.in_force(GROUP, torch.device("cuda")) == recorded
    with recording_on_cpu():
        assert verified_protocols.in_force(GROUP, torch.device("cpu")) == recorded
        with as_if_verified():
            assert verified_protocols.in_force(GROUP, torch.device("cpu"))
        with verified_protocols.forced(GROUP, False):
            assert not verified_protocols.in_force(GROUP, torch.device("cpu"))
    if INTERPRETED:
        assert verified_protocols.in_force(GROUP, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown launch protocol 'conv2d_grads_in_one_launches'"):
        verified_protocols.in_force("conv2d_grads_in_one_launches", torch.device("cpu"))


def test_the_environment_turns_protocols_off(monkeypatch):
    """FASTMETA_DISABLE_PROTOCOLS: names (or ``all``) turned off on every device, verified or
    not, below a test's forcing; an unknown name refused naming the variable; read at
    import (a fresh process sees it)."""
    import subprocess
    import sys

    parse = verified_protocols.disabled_by_environment
    assert parse("") == frozenset()
    assert parse("all") == frozenset(verified_protocols.PROTOCOLS)
    assert parse(" split_k_one_pass ,conv2d_grads_in_one_launch") == frozenset(verified_protocols.PROTOCOLS)
    with pytest.raises(ValueError, match="FASTMETA_DISABLE_PROTOCOLS='one_pass' names unknown launch protocols"):
        parse("one_pass")
    monkeypatch.setattr(verified_protocols, "_disabled", frozenset({GROUP}))
    assert not verified_protocols.in_force(GROUP, torch.device("cpu"))
    assert verified_protocols.in_force(split_k.ONE_PASS_KERNEL, torch.device("cpu"))  # the others untouched
    x, w, grad_out, _, _ = operands((2, 2, 4, 7, 6), 5, [2, 2], "per_task")
    plans = conv.conv_launch_plans("task_conv2d_backward", grad_out, x, w, [2, 2], [1, 1], [True, True])
    assert [p.kernel for p in plans] == ["input_grad", "weight_grad"]
    with verified_protocols.forced(GROUP, True):
        assert verified_protocols.in_force(GROUP, torch.device("cpu"))
    code = ("from fastmeta.kernels import verified_protocols as v; import torch; "
            "print(v.in_force('conv2d_grads_in_one_launch', torch.device('cpu')), "
            "v.in_force('split_k_one_pass', torch.device('cpu')))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTMETA_DISABLE_PROTOCOLS": GROUP}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["False", "True"], out.stdout + out.stderr
