"""``inner_step`` and ``inner_step_backward`` (fastmeta/ops/inner_step.py) on every backend."""

from __future__ import annotations

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.inner_step import reference_inner_step, reference_inner_step_backward
from harness import backend_params, check_kernel, check_op, kernel_log, assert_close, to, workload_params

KERNELS = ["inner_step", "inner_step_backward"]
ALL = backend_params("triton", "cpu", "cuda")
NATIVE = backend_params("cpu", "cuda")


def inner_step_args(T, P, S, lr_kind, has_mask, has_precond, theta_kind):
    segments = (torch.arange(P) * S // P) if lr_kind == "segment" else None
    lr = {"scalar": torch.tensor(0.3), "segment": torch.rand(S) + 0.1, "param": torch.rand(P) + 0.1}[lr_kind]
    if theta_kind == "shared":
        theta = torch.randn(P)
    elif theta_kind == "strided":  # rows of a wider buffer: task stride P + 3
        theta = torch.randn(T, P + 3)[:, 3:]
    else:
        theta = torch.randn(T, P)
    mask = torch.rand(P) if has_mask else None
    precond = torch.rand(P) + 0.5 if has_precond else None
    return [theta, torch.randn(T, P), lr, mask, precond, segments]


def differentiable(args):
    return [i for i in range(5) if args[i] is not None]


def on(device, args):
    # A strided θ must stay strided on the device: rebuild the view there.
    moved = to(args, device)
    theta = args[0]
    if theta.dim() == 2 and not theta.is_contiguous():
        base = torch.empty(theta.size(0), theta.size(1) + 3, device=device)
        base[:, 3:] = theta.to(device)
        moved[0] = base[:, 3:]
    return moved


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("theta_kind", ["shared", "per_task", "strided"])
@pytest.mark.parametrize("has_mask,has_precond", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("lr_kind", ["scalar", "segment", "param"])
def test_inner_step(backend, device, lr_kind, has_mask, has_precond, theta_kind):
    args = on(device, inner_step_args(2, 37, 3, lr_kind, has_mask, has_precond, theta_kind))
    check_op(backend, ops.inner_step, args, differentiable(args), KERNELS)


@pytest.mark.parametrize("backend,device", backend_params("triton", "cuda"))
@pytest.mark.parametrize("shape", list(workload_params("inner_step")))
def test_inner_step_workload(backend, device, shape):
    args = on(device, inner_step_args(shape["T"], shape["P"], 9, "segment", True, True, "shared"))
    check_op(backend, ops.inner_step, args, differentiable(args), KERNELS, rtol=1e-4)


@pytest.mark.parametrize("backend,device", ALL)
def test_inner_step_backward_partial_needs(backend, device):
    """Only some gradients wanted: the others come back empty, the wanted ones right."""
    grad_out, grad = torch.randn(2, 37, device=device), torch.randn(2, 37, device=device)
    lr, mask = torch.rand(37, device=device), torch.rand(37, device=device)
    for needs in ([False, False, True, False, False], [True, False, False, True, False]):
        args = (grad_out, grad, lr, mask, None, None, True, needs)
        with fm.use_backend("torch"):
            expected = ops.inner_step_backward(*args)
        with kernel_log(backend) as (ran, _), fm.use_backend(backend):
            actual = ops.inner_step_backward(*args)
        assert ran["inner_step_backward"] == 1
        for a, e in zip(actual, expected):
            assert_close(a, e, f"needs {needs}", 1e-6)


def kernel_cases():
    """(id, kernel, reference, args) with the layouts the launchers normalise."""
    T = 3
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1])
    P = seg.numel()
    t = torch.randn
    flat = t(T, 2 * P)
    return [
        ("shared-segments", "inner_step", reference_inner_step, (t(P), t(T, P), t(3), t(P), t(P), seg)),
        ("scalar", "inner_step", reference_inner_step, (t(T, P), t(T, P), t(1)[0], None, None, None)),
        ("param-view", "inner_step", reference_inner_step, (flat[:, :P], flat[:, P:], t(P), None, t(P), None)),
        ("expanded", "inner_step", reference_inner_step, (t(P).expand(T, P), t(T, P), t(P), t(P), None, None)),
        ("backward", "inner_step_backward", reference_inner_step_backward,
         (t(T, P), t(T, P), t(3), t(P), t(P), seg, True, [True] * 5)),
        ("backward-scalar", "inner_step_backward", reference_inner_step_backward,
         (t(T, P), t(T, P), t(1)[0], None, None, None, False, [True, True, True, False, False])),
        ("backward-partial", "inner_step_backward", reference_inner_step_backward,
         (t(T, P), t(T, P), t(P), None, t(P), None, False, [False, True, True, False, True])),
    ]


CASES = kernel_cases()


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference_float32(backend, device, name, kernel, reference, args):
    check_kernel(backend, kernel, reference, to(args, device), rtol=2e-5)


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference_float64(name, kernel, reference, args):
    check_kernel("cpu", kernel, reference, to(args, "cpu", torch.float64), rtol=1e-10, atol=1e-11)


def r(*shape):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(True)


GRAD_CASES = [
    ("segments", ops.inner_step, lambda: (r(7), r(2, 7), r(3), r(7), r(7), torch.tensor([0, 0, 1, 1, 1, 2, 2]))),
    ("scalar", ops.inner_step, lambda: (r(2, 7), r(2, 7), r(1)[0].detach().requires_grad_(), None, None, None)),
    ("param", ops.inner_step, lambda: (r(2, 7), r(2, 7), r(7), None, r(7), None)),
    ("backward", ops.inner_step_backward,
     lambda: (r(2, 7), r(2, 7), r(3), r(7), r(7), torch.tensor([0, 0, 1, 1, 1, 2, 2]), True, [True] * 5)),
    ("backward-partial", ops.inner_step_backward,
     lambda: (r(2, 7), r(2, 7), r(7), None, r(7), None, False, [False, True, True, False, True])),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, op, make):
    gradchecks(op, make(), backend=backend)


def blocked_pass_cases(P: int):
    """Every combination of the backward's outputs, a shared and a per-task θ, one rate
    (the coefficient as a scalar) and per-parameter rates with a mask: the passes over the
    [T, P] buffer in blocks of parameters (csrc/cpu/inner_step.cpp, step_columns)."""
    import itertools

    g = torch.Generator().manual_seed(11)
    T = 3

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    cases = []
    for shared, uniform in itertools.product([True, False], [True, False]):
        lr, mask = (t(1)[0], None) if uniform else (t(P), t(P))
        theta = t(P) if shared else t(T, P)
        cases.append(("inner_step", reference_inner_step, (theta, t(T, P), lr, mask, None, None)))
        for needs in itertools.product([False, True], repeat=4):
            needs = [*needs[:3], needs[3] and not uniform, False]
            cases.append(("inner_step_backward", reference_inner_step_backward,
                          (t(T, P), t(T, P), lr, mask, None, None, shared, needs)))
    return cases


def check_blocked_passes(P: int) -> int:
    cases = blocked_pass_cases(P)
    for kernel, reference, args in cases:
        check_kernel("cpu", kernel, reference, args, rtol=1e-10, atol=1e-11)
    return len(cases)


def test_cpu_kernels_over_many_parameter_blocks():
    """More parameters than one block (16 384 by default), the last block partial."""
    check_blocked_passes(2 * 16384 + 77)


def test_cpu_kernels_with_the_smallest_blocks():
    """FASTMETA_STEP_COLUMNS (read once per process, so in a process of its own) at its
    floor, 64: many blocks, the last one partial, on every combination of outputs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path.insert(0, {here!r})\n"
        "from test_inner_step import check_blocked_passes\n"
        "print('checked', check_blocked_passes(64 * 5 + 13))\n"
    ).format(here=str(Path(__file__).parent))
    env = {**os.environ, "FASTMETA_STEP_COLUMNS": "64"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"checked {len(blocked_pass_cases(8))}" in done.stdout


def test_a_bad_block_size_is_refused_naming_the_variable():
    import os
    import subprocess
    import sys

    code = ("import torch; from fastmeta.backends import extension; extension.build()\n"
            "torch.ops.fastmeta_ext.inner_step(torch.zeros(3), torch.zeros(2, 3), torch.tensor(0.1), None, None, None)\n")
    for bad in ("abc", "12", "64x"):
        env = {**os.environ, "FASTMETA_STEP_COLUMNS": bad}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode != 0 and "FASTMETA_STEP_COLUMNS must be a whole number" in done.stderr, done.stderr[-2000:]
