"""``task_conv2d`` and its backward ops (fastmeta/ops/task_conv2d.py) on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmeta as fm
from fastmeta import ops
from harness import backend_params, check_op, to, workload_params

KERNELS = ["task_conv2d", "task_conv2d_input_grad", "task_conv2d_weight_grad"]
TRITON = backend_params("triton")


def conv_weight(kind, T, O, C, k, device):
    if kind == "per_task":
        return torch.randn(T, O, C, k, k, device=device)
    if kind == "shared":
        return torch.randn(O, C, k, k, device=device)
    if kind == "expanded":
        return torch.randn(O, C, k, k, device=device).expand(T, O, C, k, k)
    return torch.randn(T, O * C * k * k + 3, device=device)[:, 3:].view(T, O, C, k, k)


def conv_bias(kind, T, O, device):
    return {"none": None, "per_task": torch.randn(T, O, device=device), "shared": torch.randn(O, device=device)}[kind]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize(
    "weight_kind,bias_kind,stride,padding",
    [
        ("per_task", "per_task", (1, 1), (1, 1)),
        ("per_task", "none", (2, 2), (1, 1)),  # W2's strided layer
        ("buffer_view", "shared", (2, 1), (0, 1)),
        ("shared", "shared", (1, 1), (0, 0)),
        ("shared", "per_task", (2, 2), (1, 0)),
        ("expanded", "none", (1, 2), (1, 1)),
    ],
)
def test_task_conv2d(backend, device, weight_kind, bias_kind, stride, padding):
    T, N, C, H, W, O = 2, 2, 3, 5, 6, 4
    args = [torch.randn(T, N, C, H, W, device=device), conv_weight(weight_kind, T, O, C, 3, device),
            conv_bias(bias_kind, T, O, device), list(stride), list(padding)]
    diff = [0, 1] + ([2] if args[2] is not None else [])
    check_op(backend, ops.task_conv2d, args, diff, KERNELS)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("shape", list(workload_params("task_conv2d")))
def test_task_conv2d_workload(backend, device, shape):
    T, N, C, H, W, O = (shape[k] for k in ("T", "N", "C", "H", "W", "O"))
    s, p = shape["stride"], shape["padding"]
    args = [torch.randn(T, N, C, H, W, device=device), conv_weight("buffer_view", T, O, C, 3, device),
            torch.randn(T, O, device=device), [s, s], [p, p]]
    check_op(backend, ops.task_conv2d, args, [0, 1, 2], KERNELS, rtol=1e-4)


@pytest.fixture
def small_tiles(monkeypatch):
    from fastmeta.kernels import task_conv2d

    gemm = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 1, "num_stages": 1}
    monkeypatch.setattr(task_conv2d, "conv_config", lambda *a: gemm)


@pytest.mark.parametrize("backend,device", TRITON)
def test_small_tiles(backend, device, small_tiles):
    # 18 filters over 4 channels (K = 36 → 3 K-steps), 7×7 maps, stride 2.
    args = to([torch.randn(2, 3, 4, 7, 7), torch.randn(2, 18, 4, 3, 3), None, [2, 2], [1, 1]], device)
    check_op(backend, ops.task_conv2d, args, [0, 1], KERNELS, rtol=1e-4)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_declines_a_zero_stride(backend, device):
    from fastmeta.backends import get_backend

    kernel = get_backend("triton").kernel("task_conv2d")
    args = to([torch.randn(2, 3, 3, 5, 5), torch.randn(2, 4, 3, 3, 3), None, [0, 1], [1, 1]], device)
    assert kernel(*args) is NotImplemented


def r(*shape, grad=True):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(grad)


GRAD_CASES = [
    ("conv", ops.task_conv2d, lambda: (r(2, 3, 2, 5, 5), r(2, 3, 2, 3, 3), r(2, 3), [1, 1], [1, 1])),
    ("conv-strided", ops.task_conv2d, lambda: (r(2, 3, 2, 5, 4), r(2, 3, 2, 3, 3), r(2, 3), [2, 2], [1, 1])),
    ("conv-shared", ops.task_conv2d, lambda: (r(2, 3, 2, 5, 5), r(3, 2, 3, 3), r(3), [2, 1], [0, 1])),
    ("input_grad", ops.task_conv2d_input_grad, lambda: (r(2, 3, 3, 3, 3), r(2, 3, 2, 3, 3), [5, 5], [2, 2], [1, 1])),
    ("input_grad-shared", ops.task_conv2d_input_grad,
     lambda: (r(2, 3, 3, 3, 3), r(3, 2, 3, 3), [6, 6], [2, 2], [1, 1])),
    ("weight_grad", ops.task_conv2d_weight_grad,
     lambda: (r(2, 3, 3, 3, 3), r(2, 3, 2, 5, 5), [3, 3], [2, 2], [1, 1], False)),
    ("weight_grad-shared", ops.task_conv2d_weight_grad,
     lambda: (r(2, 3, 3, 3, 3), r(2, 3, 2, 5, 5), [3, 3], [2, 2], [1, 1], True)),
]


@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, name, op, make):
    # Convolutions have the most inputs: fast mode checks random projections of the full
    # Jacobian (still fails on a wrong gradient) at a fraction of the cost.
    gradchecks(op, make(), fast_mode=True)


def test_reference_matches_torch_functional():
    xc, wc = r(2, 3, 2, 6, 6, grad=False), r(2, 4, 2, 3, 3, grad=False)
    got = ops.task_conv2d(xc, wc, None, [2, 2], [1, 1])
    want = torch.stack([F.conv2d(xc[t], wc[t], None, 2, 1) for t in range(2)])
    with fm.use_backend("torch"):
        assert torch.allclose(got, want)
