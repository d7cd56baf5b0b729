"""The kernel table (fastmeta/backends/table.py): every op's kernels are defined once and
every backend registers against it by name; every kernel declines what it does not take."""

from __future__ import annotations

import inspect

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.backends import get_backend
from fastmeta.backends.table import TABLE, families
from harness import HAS_CUDA, backend_params, kernel_log, require, to


def test_every_kernel_is_named_after_its_reference_and_owned_by_its_op_module():
    assert set(families()) == {"inner_step", "task_linear", "task_conv2d", "task_batch_norm", "task_loss", "activation",
                               "mlp_meta_step", "mlp_meta_step_update"}
    for name, spec in TABLE.items():
        assert spec.reference.__name__ == f"reference_{name}"
        assert spec.reference.__module__ == f"fastmeta.ops.{spec.family}"
        # The public op's schema is the kernel's, derived from the reference's annotations.
        schema = str(getattr(torch.ops.fastmeta, name).default._schema)
        assert schema == f"fastmeta::{name}{spec.schema}"
        params = list(inspect.signature(spec.reference).parameters)
        assert all(f" {p}" in spec.schema for p in params), (name, params, spec.schema)


def test_public_ops_are_registered_under_the_fastmeta_namespace():
    for name in ops.__all__:
        if name[0].islower() and name in TABLE:
            assert hasattr(torch.ops.fastmeta, name), name


def test_backends_register_only_kernels_of_the_table():
    from fastmeta.backends import extension

    require("cpu")
    assert set(extension.kernels("cpu")) <= set(TABLE)
    # The C++ sources implement these families on the CPU (csrc/cpu/<family>.cpp; the whole
    # step's update sits in csrc/cpu/mlp_meta_step.cpp, on the meta-step's core).
    assert set(extension.kernels("cpu")) == {
        n for n, s in TABLE.items() if s.family in {"inner_step", "task_linear", "task_conv2d", "task_batch_norm",
                                                     "task_loss", "activation", "mlp_meta_step",
                                                     "mlp_meta_step_update"}}
    triton = get_backend("triton")
    if triton.available()[0]:
        triton.kernel("inner_step")
        assert set(triton.kernels) <= set(TABLE)
        assert {n for n, s in TABLE.items()
                if s.family not in ("mlp_meta_step", "mlp_meta_step_update")} <= set(triton.kernels)


def test_backend_registry_reports_each_backend_with_a_reason():
    rows = {row["name"]: row for row in fm.backends()}
    assert {"torch", "triton", "cpu", "cuda"} <= set(rows)
    assert rows["torch"]["available"]
    for row in rows.values():
        assert row["available"] or row["reason"]
    with fm.use_backend("torch"):
        assert fm.current_backend() == "torch"


def sample_kernel_args(device):
    """One fp32 argument tuple per kernel (every kernel of the table but the fused MLP's)."""
    T, N, C, O = 2, 3, 3, 4
    r = torch.randn
    x5, w5, g5 = r(T, N, C, 5, 5), r(T, O, C, 3, 3), r(T, N, O, 5, 5)
    samples = {
        "inner_step": (r(37), r(T, 37), torch.tensor(0.1), None, None, None),
        "inner_step_backward": (r(T, 37), r(T, 37), torch.tensor(0.1), None, None, None, True, [True] * 5),
        "task_linear": (r(T, N, 5), r(T, O, 5), r(T, O), "relu", 0.0),
        "task_linear_input_grad": (r(T, N, O), r(T, O, 5)),
        "task_linear_weight_grad": (r(T, N, O), r(T, N, 5), False),
        "task_conv2d": (x5, w5, None, [1, 1], [1, 1]),
        "task_conv2d_input_grad": (g5, w5, [5, 5], [1, 1], [1, 1]),
        "task_conv2d_weight_grad": (g5, x5, [3, 3], [1, 1], [1, 1], False),
        "task_batch_norm": (x5, r(T, C), r(T, C), 1e-5, "relu", 0.0),
        "task_batch_norm_backward": (x5, x5 + 1, r(T, C), 1e-5, [True] * 3),
        "task_batch_norm_double_backward": (x5, x5 + 1, r(T, C), x5 * 2, r(T, C), r(C), 1e-5, [True] * 3),
        "task_loss": (r(T, N, 5), torch.randint(0, 5, (T, N)), "cross_entropy"),
        "task_loss_grad": (r(T, N, 5), r(T, N, 5), "mse"),
        "activation_grad": (r(T, N, 5), r(T, N, 5), "tanh", 0.0),
    }
    return {name: tuple(to(args, device)) for name, args in samples.items()}


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu", "cuda"))
def test_every_kernel_takes_its_fp32_sample_and_declines_float16_and_mixed_dtypes(backend, device):
    require(backend)
    b = get_backend(backend)
    b.kernel("inner_step")
    samples = sample_kernel_args(device)
    for name, args in samples.items():
        kernel = b.kernel(name)
        if kernel is None:
            continue
        assert kernel(*args) is not NotImplemented, f"{backend} {name} declined its fp32 sample"
        halved = tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        assert kernel(*halved) is NotImplemented, f"{backend} {name} accepted float16"
        floats = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point() and a.dim() > 0]
        if len(floats) >= 2:
            mixed = list(args)
            mixed[floats[-1]] = mixed[floats[-1]].double()
            assert kernel(*mixed) is NotImplemented, f"{backend} {name} accepted mixed dtypes"


@pytest.mark.parametrize("backend,device", backend_params("triton", "cuda"))
def test_float64_is_declined_where_the_kernels_are_fp32(backend, device):
    """Triton and CUDA kernels are fp32: float64 runs the reference, never a lower precision."""
    require(backend)
    b = get_backend(backend)
    b.kernel("inner_step")
    for name, args in sample_kernel_args(device).items():
        kernel = b.kernel(name)
        if kernel is None:
            continue
        doubled = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        assert kernel(*doubled) is NotImplemented, f"{backend} {name} accepted float64"


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize(
    "op,args,diff",
    [
        (ops.inner_step, lambda: [torch.randn(5), torch.randn(2, 5), torch.rand(5), torch.rand(5), None, None],
         [0, 1, 2, 3]),
        (ops.task_linear, lambda: [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3), "tanh", 0.0],
         [0, 1, 2]),
        (ops.task_conv2d, lambda: [torch.randn(2, 1, 2, 4, 4), torch.randn(2, 2, 2, 3, 3), None, [2, 2], [1, 1]],
         [0, 1]),
        (ops.task_batch_norm, lambda: [torch.randn(2, 3, 2, 2, 2), torch.randn(2, 2), torch.randn(2, 2), 1e-5,
                                       "sigmoid", 0.0], [0, 1, 2]),
        (ops.task_loss, lambda: [torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3)), "cross_entropy"], [0]),
    ],
    ids=["inner_step", "task_linear", "task_conv2d", "task_batch_norm", "task_loss"],
)
def test_float64_falls_back_and_gradgradchecks(backend, device, op, args, diff):
    """float64 under the triton backend: every kernel declines, the reference answers, and
    gradgradcheck (fast mode) passes through that path."""
    values = to(args(), device, torch.float64)

    def fn(*inputs):
        full = list(values)
        for i, t in zip(diff, inputs):
            full[i] = t
        return op(*full)

    inputs = tuple(values[i].detach().requires_grad_(True) for i in diff)
    with kernel_log(backend) as (ran, declined), fm.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    assert not ran, f"a kernel accepted float64: {dict(ran)}"
    assert declined, "no kernel was asked: the test did not exercise the backend"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["task_linear", "task_linear_input_grad", "task_linear_weight_grad", "task_loss",
                                  "task_loss_grad", "inner_step"])
def test_public_ops_on_the_cuda_backend_pass_opcheck(name):
    from torch.library import opcheck

    args = tuple(a.requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                 for a in sample_kernel_args("cuda")[name])
    with fm.use_backend("cuda"):
        opcheck(getattr(ops, name), args)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_kernels_run_on_the_current_stream():
    from harness import direct

    x, w = torch.randn(4, 9, 33, device="cuda"), torch.randn(4, 17, 33, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = direct("cuda", "task_linear", x, w, None, "relu", 0.0)
    s.synchronize()
    torch.testing.assert_close(y, torch.relu(torch.bmm(x, w.transpose(1, 2))), rtol=1e-5, atol=1e-5)

