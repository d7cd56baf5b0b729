"""The ``cuda`` backend (csrc/cuda) on a GPU: every CUDA kernel against its reference, and
the public ops on it through opcheck and gradcheck (float32 kernels: gradcheck runs the
float64 inputs on the reference, so here the checks compare float32 outputs and gradients
against the float64 reference instead). Skipped cleanly without a GPU; the fused
meta-step's GPU tests are in test_mlp_meta_step.py.

bench/gpu_check.py runs these under compute-sanitizer memcheck and records
the kernels that passed as verified for ``auto``.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import fastmeta as fm
from fastmeta import ops
from test_extension_build import assert_fresh, build_or_skip, direct
from test_extension_cpu import kernel_cases

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The CUDA backend's kernels (the rest of the CPU cases' kernels have no CUDA version).
CUDA_KERNELS = {"inner_step", "inner_step_backward", "task_linear", "task_linear_input_grad",
                "task_linear_weight_grad", "task_loss", "task_loss_grad"}


def to_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


CASES = [c for c in kernel_cases(torch.float32) if c[1] in CUDA_KERNELS]


@pytest.fixture(scope="module", autouse=True)
def extension():
    ext = build_or_skip()
    ok, reason = ext.availability("cuda")
    if not ok:
        pytest.fail(f"the cuda backend is unavailable on a GPU machine: {reason}")
    torch.backends.cuda.matmul.allow_tf32 = False
    return ext


@pytest.mark.parametrize("name, kernel, reference, args", CASES, ids=[c[0] for c in CASES])
def test_cuda_kernel_equals_reference(name, kernel, reference, args):
    cuda_args = to_cuda(args)
    got = direct("cuda", kernel, *cuda_args)
    assert_fresh(got, cuda_args)
    # The reference in float64 on the CPU: the error measured is the kernel's own.
    want = reference(*tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
    if isinstance(want, torch.Tensor):
        got, want = [got], [want]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32 and g.is_cuda
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-5, atol=1e-5)


def test_cuda_kernels_run_on_the_current_stream():
    x, w = torch.randn(4, 9, 33, device="cuda"), torch.randn(4, 17, 33, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = direct("cuda", "task_linear", x, w, None, "relu", 0.0)
    s.synchronize()
    torch.testing.assert_close(y, torch.relu(torch.bmm(x, w.transpose(1, 2))), rtol=1e-5, atol=1e-5)


def test_cuda_declines_float64_instead_of_lowering_precision():
    from fastmeta.backends import extension as ext

    x = torch.randn(2, 3, 4, device="cuda", dtype=torch.float64)
    assert ext.kernels("cuda")["task_linear"](x, x[0, :2], None, "none", 0.0) is NotImplemented


@pytest.mark.parametrize("op, args", [
    (ops.task_linear, (torch.randn(3, 5, 7), torch.randn(3, 6, 7), torch.randn(3, 6), "tanh", 0.0)),
    (ops.task_linear_input_grad, (torch.randn(3, 5, 6), torch.randn(6, 7))),
    (ops.task_linear_weight_grad, (torch.randn(3, 5, 6), torch.randn(3, 5, 7), False)),
    (ops.task_loss, (torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5)), "cross_entropy")),
    (ops.task_loss_grad, (torch.randn(3, 5, 4), torch.randn(3, 5, 4), "mse")),
    (ops.inner_step, (torch.randn(7), torch.randn(3, 7), torch.rand(3), None, torch.rand(7),
                      torch.tensor([0, 0, 1, 1, 2, 2, 2]))),
], ids=["task_linear", "input_grad", "weight_grad", "task_loss", "task_loss_grad", "inner_step"])
def test_public_ops_on_cuda_backend_opcheck(op, args):
    args = tuple(a.cuda().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in to_cuda(args))
    with fm.use_backend("cuda"):
        opcheck(op, args)
