"""``task_conv2d`` and its backward ops (fastmeta/ops/task_conv2d.py) on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.task_conv2d import (
    reference_task_conv2d,
    reference_task_conv2d_backward,
    reference_task_conv2d_double_backward,
    reference_task_conv2d_input_grad,
    reference_task_conv2d_weight_grad,
)
from harness import assert_fresh, backend_params, check_kernel, check_op, direct, require, to, workload_params

# What task_conv2d's outputs, first and second order run: its backward is one op
# (task_conv2d_backward), whose backward is one op (task_conv2d_double_backward).
KERNELS = ["task_conv2d", "task_conv2d_backward", "task_conv2d_double_backward"]
TRITON = backend_params("triton")
ALL = backend_params("triton", "cpu")


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


@pytest.mark.parametrize("backend,device", ALL)
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
    monkeypatch.setattr(task_conv2d, "conv_config", lambda *a, **k: gemm)


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
    # grad_out, x, w: the backward is bilinear, so its double backward is checked here too
    ("backward", ops.task_conv2d_backward,
     lambda: (r(2, 2, 3, 3, 3), r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3), [2, 2], [1, 1], [True, True])),
    ("backward-shared-s1-p0", ops.task_conv2d_backward,
     lambda: (r(2, 2, 3, 3, 3), r(2, 2, 2, 5, 5), r(3, 2, 3, 3), [1, 1], [0, 0], [True, True])),
    ("backward-dw-only", ops.task_conv2d_backward,
     lambda: (r(2, 2, 3, 3, 3), r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3), [2, 2], [1, 1], [False, True])),
    # with the addends task_conv2d's eager node passes (its alias outputs' gradients):
    # their gradients are the upstream of dx / dw
    ("backward-addends", ops.task_conv2d_backward,
     lambda: (r(2, 2, 3, 3, 3), r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3), [2, 2], [1, 1], [True, True],
              r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3))),
    ("backward-addends-shared", ops.task_conv2d_backward,
     lambda: (r(2, 2, 3, 5, 5), r(2, 2, 2, 5, 5), r(3, 2, 3, 3), [1, 1], [1, 1], [True, True],
              r(2, 2, 2, 5, 5), r(3, 2, 3, 3))),
    ("backward-dw-addend-only", ops.task_conv2d_backward,
     lambda: (r(2, 2, 3, 3, 3), r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3), [2, 2], [1, 1], [False, True],
              None, r(2, 3, 2, 3, 3))),
    ("double_backward", ops.task_conv2d_double_backward,
     lambda: (r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3), r(2, 2, 3, 3, 3), r(2, 2, 2, 5, 5), r(2, 3, 2, 3, 3), [2, 2],
              [1, 1], [True, True, True])),
    ("double_backward-shared-no-g_dx", ops.task_conv2d_double_backward,
     lambda: (None, r(3, 2, 3, 3), r(2, 2, 3, 5, 5), r(2, 2, 2, 5, 5), r(3, 2, 3, 3), [1, 1], [1, 1],
              [True, True, False])),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, op, make):
    # Convolutions have the most inputs: fast mode checks random projections of the full
    # Jacobian (still fails on a wrong gradient) at a fraction of the cost.
    gradchecks(op, make(), backend=backend, fast_mode=True)


def test_reference_matches_torch_functional():
    xc, wc = r(2, 3, 2, 6, 6, grad=False), r(2, 4, 2, 3, 3, grad=False)
    got = ops.task_conv2d(xc, wc, None, [2, 2], [1, 1])
    want = torch.stack([F.conv2d(xc[t], wc[t], None, 2, 1) for t in range(2)])
    with fm.use_backend("torch"):
        assert torch.allclose(got, want)


# ---------------------------------------------------------------------------------------
# The C++ kernels (csrc/cpu/task_conv2d.cpp) against the reference, called directly
# ---------------------------------------------------------------------------------------


def kernel_cases():
    """Odd shapes through every path of the C++ kernels: output rows of ≤ 4 values (the
    offset table) and wider (row copies, stride 1, 2 and 3), ≥ 128 output positions per
    example (per-example weight-grad GEMMs), several chunks of examples (N·C·kh·kw·L past
    the im2col budget), a 1×1 and a 2×3 kernel, every weight and bias layout."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    def weight(kind, T, O, C, kh, kw):
        if kind == "per_task":
            return t(T, O, C, kh, kw)
        if kind == "shared":
            return t(O, C, kh, kw)
        if kind == "expanded":
            return t(O, C, kh, kw).expand(T, O, C, kh, kw)
        return t(T, O * C * kh * kw + 3)[:, 3:].view(T, O, C, kh, kw)  # a view of the flat buffer

    geometries = [
        # label, (T, N, C, H, W), (O, kh, kw), stride, padding, weight, bias
        ("narrow-s2", (2, 3, 3, 7, 7), (4, 3, 3), [2, 2], [1, 1], "per_task", "per_task"),
        ("wide-s1", (2, 3, 2, 9, 11), (5, 3, 3), [1, 1], [1, 1], "buffer_view", "shared"),
        ("wide-s2-nopad", (3, 2, 3, 13, 12), (4, 3, 3), [2, 2], [0, 0], "shared", None),
        ("s3-mixed", (2, 2, 2, 11, 14), (3, 3, 3), [3, 2], [1, 0], "expanded", "per_task"),
        ("per-example", (2, 3, 2, 14, 13), (3, 3, 3), [1, 1], [1, 1], "per_task", None),
        ("chunks", (2, 40, 8, 16, 16), (5, 3, 3), [1, 1], [1, 1], "buffer_view", "per_task"),
        ("1x1", (2, 3, 4, 5, 6), (3, 1, 1), [1, 1], [0, 0], "per_task", "shared"),
        ("2x3", (2, 2, 3, 6, 7), (4, 2, 3), [1, 2], [1, 0], "shared", "per_task"),
        ("single", (1, 1, 1, 4, 4), (2, 3, 3), [2, 2], [1, 1], "per_task", None),
    ]
    cases = []
    for label, (T, N, C, H, W), (O, kh, kw), stride, padding, wk, bk in geometries:
        x, w = t(T, N, C, H, W), weight(wk, T, O, C, kh, kw)
        b = None if bk is None else (t(O) if bk == "shared" else t(T, O))
        y = reference_task_conv2d(x, w, b, stride, padding)
        gy = t(*y.shape)
        cases += [
            (f"forward-{label}", "task_conv2d", reference_task_conv2d, (x, w, b, stride, padding)),
            # dx and dw with the addends summed in the kernels (col2im from dx_addend, the
            # weight GEMMs into dw_addend), both wanted and each alone
            (f"backward-addends-{label}", "task_conv2d_backward", reference_task_conv2d_backward,
             (gy, x, w, stride, padding, [True, True], t(*x.shape), t(*w.shape))),
            (f"backward-dx-addend-{label}", "task_conv2d_backward", reference_task_conv2d_backward,
             (gy, x, w, stride, padding, [True, False], t(*x.shape), None)),
            (f"backward-dw-addend-{label}", "task_conv2d_backward", reference_task_conv2d_backward,
             (gy, x, w, stride, padding, [False, True], None, t(*w.shape))),
            (f"input_grad-{label}", "task_conv2d_input_grad", reference_task_conv2d_input_grad,
             (gy, w, [H, W], stride, padding)),
            (f"weight_grad-{label}", "task_conv2d_weight_grad", reference_task_conv2d_weight_grad,
             (gy, x, [kh, kw], stride, padding, False)),
            (f"weight_grad-shared-{label}", "task_conv2d_weight_grad", reference_task_conv2d_weight_grad,
             (gy, x, [kh, kw], stride, padding, True)),
        ]
    return cases


CASES = kernel_cases()


def in_dtype(args, dtype):
    """The arguments in ``dtype``, keeping the weights' views views (expanded, flat buffer)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 5 and a.stride(0) == 0:
            out.append(a[0].to(dtype).expand(a.shape))
        elif isinstance(a, torch.Tensor) and a.dim() == 5 and not a.is_contiguous():
            T = a.size(0)
            flat = torch.zeros(T, a[0].numel() + 3, dtype=dtype)
            flat[:, 3:] = a.reshape(T, -1).to(dtype)
            out.append(flat[:, 3:].view(a.shape))
        else:
            out.append(to([a], "cpu", dtype)[0])
    return out


def check_both_dtypes(name, kernel, reference, args):
    """float32 within 2e-5 of each element and of the output's scale (a weight-grad sums up
    to 20 480 products: two fp32 summation orders differ by ~1e-6 of the scale, more on the
    elements that cancel), float64 within 1e-10."""
    args32 = in_dtype(args, torch.float32)
    outputs = reference(*args32)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)  # the backward op's (dx, dw)
    scale = max(o.abs().max().item() for o in outputs if o.numel())
    check_kernel("cpu", kernel, reference, args32, rtol=2e-5, atol=2e-5 * max(1.0, scale))
    check_kernel("cpu", kernel, reference, in_dtype(args, torch.float64), rtol=1e-10, atol=1e-11 * max(1.0, scale))


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference(name, kernel, reference, args):
    check_both_dtypes(name, kernel, reference, args)


def test_cpu_kernels_without_blas():
    """FASTMETA_CPU_BLAS=0: the kernels take gemm.h's GEMM (what runs where torch exports no
    Fortran BLAS), read once per process, so in a process of its own."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path.insert(0, {here!r}); import torch\n"
        "from test_task_conv2d import CASES, check_both_dtypes\n"
        "for case in CASES:\n"
        "    check_both_dtypes(*case)\n"
        "print('checked', len(CASES))\n"
    ).format(here=str(Path(__file__).parent))
    env = {**__import__("os").environ, "FASTMETA_CPU_BLAS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"checked {len(CASES)}" in done.stdout


def _run_on_route(route: str, code: str) -> str:
    """Runs ``code`` in a process whose CPU convolutions take ``route`` (FASTMETA_CPU_CONV is
    read once per process) with oneDNN's execution log on (ONEDNN_VERBOSE=1: a line
    ``onednn_verbose,...,exec,cpu,convolution,...`` per convolution oneDNN runs); its stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    header = "import sys; sys.path.insert(0, {here!r}); import torch\n".format(here=str(Path(__file__).parent))
    env = {**os.environ, "FASTMETA_CPU_CONV": route, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", header + code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _onednn_convolutions(log: str) -> int:
    return sum(1 for line in log.splitlines() if ",exec," in line and "convolution" in line)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_cpu_kernels_on_the_onednn_route():
    """FASTMETA_CPU_CONV=onednn: every fp32 convolution of the CPU kernels (forward, input
    and weight gradients, double backward, addends, shared and task-stride-0 weights) runs
    in oneDNN, and equals the reference as the im2col route does; float64 stays on im2col."""
    log = _run_on_route("onednn", (
        "from test_task_conv2d import CASES, check_both_dtypes\n"
        "for case in CASES:\n"
        "    check_both_dtypes(*case)\n"
        "print('checked', len(CASES))\n"))
    assert f"checked {len(CASES)}" in log
    assert _onednn_convolutions(log) >= len(CASES)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_auto_route_sends_large_convolutions_to_onednn_and_issues_no_dispatch():
    """The auto rule, pass by pass: W2's last layer (0.7 M multiply-adds per task) stays on
    im2col; W2's third layer (2.9 M, stride 2) runs its forward in oneDNN and its gradients
    on im2col; W2's second layer (9 M, stride 2, 7 × 7 outputs) runs all three in oneDNN, the
    input gradient as oneDNN's backward-data (from 8 M at a stride above 1), the weight
    gradient from 8 M and 32 output positions; OmniglotCNN's second layer at 25 queries too;
    CNN4's second layer at 25 queries (236 M, stride 1) all three, the input gradient as the
    forward convolution it is at stride 1 (flipped kernel); a 1×1 kernel stays on im2col.
    And oneDNN called from inside the kernel adds no dispatch (what the dispatch budgets
    count): one per op call, as on im2col; backward-data takes channels-last operands, so
    ATen's copies back and forth (an aten::clone each, a dispatch) do not happen."""
    code = (
        "import fastmeta as fm\n"
        "from fastmeta import ops\n"
        "from fastmeta.tools.dispatches import count_dispatches\n"
        "def run(T, N, C, O, H, stride, k):\n"
        "    x, w = torch.randn(T, N, C, H, H), torch.randn(T, O, C, k, k)\n"
        "    s, p = [stride, stride], [k // 2, k // 2]\n"
        "    with fm.use_backend('cpu'):\n"
        "        g = torch.randn(ops.task_conv2d(x, w, None, s, p).shape)\n"
        "        print('calls', count_dispatches(lambda: (ops.task_conv2d(x, w, None, s, p),\n"
        "              ops.task_conv2d_backward(g, x, w, s, p, [True, True]))).dispatches, flush=True)\n"
        "run(*SHAPE)\n")

    def passes(shape):
        log = _run_on_route("auto", code.replace("SHAPE", repr(shape)))
        assert "calls 2" in log, log[-2000:]
        lines = [line for line in log.splitlines() if ",exec," in line and "convolution" in line]
        return {kind: sum(kind in line for line in lines) for kind in ("forward", "backward_data", "backward_weights")}

    assert passes((2, 5, 64, 64, 4, 2, 3)) == {"forward": 0, "backward_data": 0, "backward_weights": 0}
    small = passes((2, 5, 64, 64, 7, 2, 3))
    assert small["forward"] > 0 and small["backward_data"] == 0 and small["backward_weights"] == 0, small
    mid = passes((2, 5, 64, 64, 14, 2, 3))
    assert min(mid.values()) > 0, mid
    omniglot_cnn = passes((1, 25, 64, 64, 14, 2, 3))
    assert min(omniglot_cnn.values()) > 0, omniglot_cnn
    large = passes((1, 25, 64, 64, 16, 1, 3))
    assert large["forward"] > 0 and large["backward_weights"] > 0 and large["backward_data"] == 0, large
    assert passes((1, 25, 64, 64, 16, 1, 1)) == {"forward": 0, "backward_data": 0, "backward_weights": 0}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_onednn_input_gradient_by_flipped_forward_or_backward_data():
    """On the oneDNN route a stride-1 input gradient runs as a forward convolution with the
    flipped kernel where the kernel is the smaller copy (O·k² ≤ n·H·W), else through ATen's
    convolution_backward (oneDNN's backward-data where ATen picks it); both equal the
    reference, with and without an addend."""
    code = (
        "import fastmeta as fm\n"
        "from fastmeta.backends import get_backend\n"
        "from fastmeta.ops.task_conv2d import reference_task_conv2d_backward\n"
        "k = get_backend('cpu').kernel('task_conv2d_backward')\n"
        "T, N, C, O, H = SHAPE\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(T, N, C, H, H, generator=g), torch.randn(T, O, C, 3, 3, generator=g)\n"
        "gy, add = torch.randn(T, N, O, H, H, generator=g), torch.randn(T, N, C, H, H, generator=g)\n"
        "for addend in (None, add):\n"
        "    dx, _ = k(gy, x, w, [1, 1], [1, 1], [True, False], addend)\n"
        "    want, _ = reference_task_conv2d_backward(gy.double(), x.double(), w.double(), [1, 1], [1, 1], [True, False],\n"
        "                                             None if addend is None else addend.double())\n"
        "    err = ((dx.double() - want).norm() / want.norm()).item()\n"
        "    assert err < 1e-5, err\n"
        "print('equal', flush=True)\n")
    flipped = _run_on_route("onednn", code.replace("SHAPE", "(2, 3, 4, 5, 6)"))  # 5·9 = 45 ≤ 3·36
    backward_data = _run_on_route("onednn", code.replace("SHAPE", "(2, 1, 4, 24, 3)"))  # 24·9 = 216 > 9
    for log in (flipped, backward_data):
        assert "equal" in log
    assert "backward_data" not in flipped and "forward" in flipped
    # ATen's convolution_backward, which may pick its own kernel for so small a problem:
    # not the flipped forward
    assert "forward" not in backward_data


def test_an_unknown_conv_route_is_refused_by_name():
    import os
    import subprocess
    import sys

    code = ("import torch, fastmeta as fm\nfrom fastmeta.backends import get_backend\n"
            "get_backend('cpu').kernel('task_conv2d')(torch.randn(1, 1, 2, 4, 4), torch.randn(1, 3, 2, 3, 3), None,"
            " [1, 1], [1, 1])\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTMETA_CPU_CONV": "fast"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "FASTMETA_CPU_CONV must be auto, onednn or im2col, got 'fast'" in done.stderr


def test_cpu_kernels_decline_what_they_do_not_compute():
    from fastmeta.backends import get_backend

    direct("cpu", "task_conv2d", torch.randn(2, 3, 3, 5, 5), torch.randn(2, 4, 3, 3, 3), None, [1, 1], [1, 1])
    cpu = get_backend("cpu")
    x, w = torch.randn(2, 3, 3, 5, 5), torch.randn(2, 4, 3, 3, 3)
    assert cpu.kernel("task_conv2d")(x, w, None, [0, 1], [1, 1]) is NotImplemented  # stride 0
    assert cpu.kernel("task_conv2d")(x, w, None, [1, 1], [-1, 0]) is NotImplemented  # negative padding
    assert cpu.kernel("task_conv2d")(x[..., :1, :1], w, None, [1, 1], [0, 0]) is NotImplemented  # empty output
    assert cpu.kernel("task_conv2d")(x, w[:, :, :2], None, [1, 1], [1, 1]) is NotImplemented  # channels
    assert cpu.kernel("task_conv2d")(x, w, torch.randn(3), [1, 1], [1, 1]) is NotImplemented  # bias shape
    gy = torch.randn(2, 3, 4, 5, 5)
    assert cpu.kernel("task_conv2d_input_grad")(gy, w, [6, 6], [1, 1], [1, 1]) is NotImplemented  # geometry
    assert cpu.kernel("task_conv2d_weight_grad")(gy, x, [3, 3], [2, 2], [1, 1], False) is NotImplemented
    # Through the public op, a decline runs the reference, which raises its own error.
    with fm.use_backend("cpu"), pytest.raises(RuntimeError):
        ops.task_conv2d(x, w[:, :, :2], None, [1, 1], [1, 1])


@pytest.mark.parametrize("shape", WORKLOAD_SHAPES := [
    pytest.param(shape, id=f"{workload}-{i}")
    for workload in ("W2",)
    for i, shape in enumerate(__import__("fastmeta.tools.workloads", fromlist=["x"]).WORKLOAD_OP_SHAPES[workload]
                              ["task_conv2d"])])
def test_cpu_backend_at_the_workload_shapes(shape):
    """W2's conv layers (32 tasks, second order) through the cpu backend, against the
    reference: the sizes where the kernels chunk, parallelise and take BLAS for real."""
    torch.manual_seed(0)
    T, N, C, H, W, O = (shape[k] for k in ("T", "N", "C", "H", "W", "O"))
    s, p = shape["stride"], shape["padding"]
    args = [torch.randn(T, N, C, H, W), conv_weight("buffer_view", T, O, C, 3, "cpu"), torch.randn(T, O), [s, s],
            [p, p]]
    check_op("cpu", ops.task_conv2d, args, [0, 1, 2], KERNELS, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Strides, kernels and paddings of every kind: the Triton input gradient splits a stride-s
# problem into s_h·s_w phases (kernels/task_conv2d.py), each with its own pixels and taps,
# some with none; the C++ kernels run the same cases. Outputs, first and second order.
# ---------------------------------------------------------------------------------------

GEOMETRY_CASES = [
    # label, (T, N, C, H, W), (O, kh, kw), stride, padding, weight
    ("s1-k1", (2, 2, 3, 5, 6), (4, 1, 1), [1, 1], [0, 0], "per_task"),
    ("s1-k5-p1", (2, 2, 2, 7, 6), (3, 5, 5), [1, 1], [1, 1], "shared"),
    ("s2-k1", (2, 2, 3, 7, 6), (4, 1, 1), [2, 2], [0, 0], "per_task"),  # odd pixels: a phase without taps
    ("s2-k3-p0-odd", (2, 2, 3, 9, 7), (4, 3, 3), [2, 2], [0, 0], "buffer_view"),
    ("s2-k3-p1-odd", (2, 3, 2, 7, 5), (3, 3, 3), [2, 2], [1, 1], "shared"),
    ("s2-k5-p1", (2, 2, 2, 9, 8), (3, 5, 5), [2, 2], [1, 1], "per_task"),
    ("s3-k3-p1", (2, 2, 3, 8, 7), (4, 3, 3), [3, 3], [1, 1], "expanded"),
    ("s3-k5-p0", (2, 2, 2, 11, 9), (3, 5, 5), [3, 3], [0, 0], "per_task"),
    ("s3-k1-tiny", (2, 2, 3, 2, 4), (4, 1, 1), [3, 3], [0, 1], "per_task"),  # a phase without pixels
    ("s3x2-k3-p10", (2, 2, 3, 7, 8), (4, 3, 3), [3, 2], [1, 0], "shared"),
    ("s1x3-k5x3", (2, 2, 2, 6, 10), (3, 5, 3), [1, 3], [0, 1], "buffer_view"),
]


def geometry_args(shape, kernel, stride, padding, weight_kind, device):
    (T, N, C, H, W), (O, kh, kw) = shape, kernel
    g = torch.Generator().manual_seed(7)
    if weight_kind == "buffer_view":
        w = torch.randn(T, O * C * kh * kw + 3, generator=g)[:, 3:].view(T, O, C, kh, kw)
    else:
        w = torch.randn(O, C, kh, kw, generator=g) if weight_kind != "per_task" else torch.randn(T, O, C, kh, kw, generator=g)
        w = w.expand(T, O, C, kh, kw) if weight_kind == "expanded" else w
    x = torch.randn(T, N, C, H, W, generator=g)
    return to([x, w], device) + [None, list(stride), list(padding)]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("label,shape,kernel,stride,padding,weight_kind", GEOMETRY_CASES,
                         ids=[c[0] for c in GEOMETRY_CASES])
def test_strides_kernels_and_paddings(backend, device, label, shape, kernel, stride, padding, weight_kind):
    args = geometry_args(shape, kernel, stride, padding, weight_kind, device)
    check_op(backend, ops.task_conv2d, args, [0, 1], KERNELS)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("label,shape,kernel,stride,padding", [
    # several tiles per phase on each side, and programs of the smaller phases that idle
    ("s2-k3", (2, 3, 18, 7, 7), (18, 3, 3), [2, 2], [1, 1]),
    ("s3x2-k5", (2, 2, 17, 9, 8), (9, 5, 5), [3, 2], [2, 1]),
], ids=["s2-k3", "s3x2-k5"])
def test_strided_input_grad_with_small_tiles(backend, device, small_tiles, label, shape, kernel, stride, padding):
    args = geometry_args(shape, kernel, stride, padding, "per_task", device)
    check_op(backend, ops.task_conv2d, args, [0, 1], KERNELS, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Split-K (kernels/tiles.py): the launches planned for a GPU of 8 SMs, so that tiny
# problems split K as a GPU's small layers do (fewer busy programs than two waves)
# ---------------------------------------------------------------------------------------

SPLIT_SMS = 8
# (T, N, C, H, W), (O, kh, kw), stride, padding, weight, bias; the kernels that split there.
SPLIT_CASES = [
    # forward K = 64·9 (18 steps) → 4 ranges; per-task bias (the first range adds it)
    ("s2-forward", (2, 2, 64, 8, 8), (64, 3, 3), [2, 2], [1, 1], "per_task", "per_task", {"task_conv2d"}),
    # input gradient: phases of 4 × 4 pixels and K = 128 · 4, 2, 2, 1 taps (16, 8, 8, 4
    # steps) → 3, 2, 2 and 1 ranges of 6 steps
    ("s2-input-grad", (2, 1, 16, 8, 8), (128, 3, 3), [2, 2], [1, 1], "per_task", "per_task",
     {"task_conv2d_input_grad"}),
    # weight gradient K = 4·8·8 per task (8 steps) → 2 ranges; shared: K = 2·4·8·8 → 4
    ("s1-shared", (2, 4, 16, 8, 8), (16, 3, 3), [1, 1], [1, 1], "shared", "shared",
     {"task_conv2d_weight_grad"}),
]


def split_args(shape, kernel, stride, padding, weight_kind, bias_kind, device):
    (T, N, C, H, W), (O, kh, kw) = shape, kernel
    g = torch.Generator().manual_seed(3)
    w = torch.randn(T, O, C, kh, kw, generator=g) if weight_kind == "per_task" else torch.randn(O, C, kh, kw, generator=g)
    b = torch.randn(T, O, generator=g) if bias_kind == "per_task" else torch.randn(O, generator=g)
    return to([torch.randn(T, N, C, H, W, generator=g), w, b], device) + [list(stride), list(padding)]


def split_plans(args, shared):
    from fastmeta.kernels.task_conv2d import conv_launch_plan

    x, w, b, stride, padding = args
    (T, N, C, H, W), O, (kh, kw) = x.shape, w.shape[-4], w.shape[-2:]
    HO, WO = (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1
    gy = torch.randn(T, N, O, HO, WO, device=x.device)
    return {"task_conv2d": conv_launch_plan("task_conv2d", x, w, b, stride, padding),
            "task_conv2d_input_grad": conv_launch_plan("task_conv2d_input_grad", gy, w, [H, W], stride, padding),
            "task_conv2d_weight_grad": conv_launch_plan("task_conv2d_weight_grad", gy, x, [kh, kw], stride, padding,
                                                        shared)}


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("label,shape,kernel,stride,padding,weight_kind,bias_kind,splitting", SPLIT_CASES,
                         ids=[c[0] for c in SPLIT_CASES])
def test_split_k_against_the_reference(backend, device, label, shape, kernel, stride, padding, weight_kind,
                                       bias_kind, splitting):
    """Outputs, first- and second-order gradients of launches that split K (the partial
    tiles summed in a second pass) against the reference."""
    from fastmeta.kernels.tiles import planned_for_sm_count

    args = split_args(shape, kernel, stride, padding, weight_kind, bias_kind, device)
    with planned_for_sm_count(SPLIT_SMS):
        plans = split_plans(args, weight_kind == "shared")
        assert {name for name, plan in plans.items() if plan.split_k > 1} == splitting, \
            {name: plan.config for name, plan in plans.items()}
        assert all(plan.sm_count == SPLIT_SMS and plan.issued_macs >= plan.useful_macs for plan in plans.values())
        check_op(backend, ops.task_conv2d, args, [0, 1, 2], KERNELS, rtol=1e-4)


@pytest.mark.parametrize("backend,device", TRITON)
def test_split_k_is_deterministic(backend, device):
    """The partial tiles are summed in split order: the same inputs give the same bits."""
    from fastmeta.kernels.tiles import planned_for_sm_count

    with planned_for_sm_count(SPLIT_SMS):
        for label, shape, kernel, stride, padding, weight_kind, bias_kind, _ in SPLIT_CASES[:2]:
            x, w, b, stride, padding = split_args(shape, kernel, stride, padding, weight_kind, bias_kind, device)
            plans = split_plans([x, w, b, stride, padding], False)
            (T, N, C, H, W), O = x.shape, w.shape[1]
            gy = torch.randn(T, N, O, (H + 1) // 2, (W + 1) // 2, device=device)
            for name, args in [("task_conv2d", (x, w, b, stride, padding)),
                               ("task_conv2d_input_grad", (gy, w, [H, W], stride, padding))]:
                first, second = direct(backend, name, *args), direct(backend, name, *args)
                assert torch.equal(first, second), (label, name, plans[name].config)


# ---------------------------------------------------------------------------------------
# task_conv2d_backward and task_conv2d_double_backward: every kernel against its reference
# (the C++ kernels in float32 and float64, the Triton ones in float32), every weight layout,
# stride 1 and 2, padding 0 and 1, every output mask and absent upstream
# ---------------------------------------------------------------------------------------

FUSED_GEOMETRIES = [
    # label, (T, N, C, H, W), O, stride, padding, weight
    ("s1-p1-per_task", (2, 3, 3, 6, 5), 4, [1, 1], [1, 1], "per_task"),
    ("s2-p1-shared", (3, 2, 2, 7, 7), 3, [2, 2], [1, 1], "shared"),
    ("s2-p0-buffer_view", (2, 2, 3, 7, 6), 4, [2, 2], [0, 0], "buffer_view"),
    ("s1-p0-expanded", (2, 2, 2, 5, 5), 3, [1, 1], [0, 0], "expanded"),
    ("one-example", (2, 1, 2, 6, 6), 3, [2, 2], [1, 1], "per_task"),  # the C++ GEMM accumulating in place
]
BACKWARD_MASKS = [[True, True], [False, True], [True, False]]
DOUBLE_MASKS = [[True, True, True], [True, False, False], [False, True, True]]


def fused_args(shape, O, stride, padding, weight_kind, device, dtype=torch.float32):
    (T, N, C, H, W) = shape
    g = torch.Generator().manual_seed(11)
    x, w = geometry_args(shape, (O, 3, 3), stride, padding, weight_kind, "cpu")[:2]
    HO, WO = (H + 2 * padding[0] - 3) // stride[0] + 1, (W + 2 * padding[1] - 3) // stride[1] + 1
    grad_out = torch.randn(T, N, O, HO, WO, generator=g)
    g_dx, g_dw = torch.randn(x.shape, generator=g), torch.randn(w.shape, generator=g)
    x, w, grad_out, g_dx, g_dw = in_dtype([x, w, grad_out, g_dx, g_dw], dtype)
    return to([x, w, grad_out, g_dx, g_dw], device) if device != "cpu" else [x, w, grad_out, g_dx, g_dw]


def assert_norm_close(got, want, rtol, label):
    """Norm-wise relative error: ‖got − want‖ ≤ rtol·‖want‖ (an empty output must be empty,
    zeros exact)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (label, got.shape, want.shape, got.dtype)
    if want.numel() == 0:
        return
    error = (got - want).norm().item()
    assert error <= rtol * want.norm().item(), f"{label}: relative error {error / max(want.norm().item(), 1e-300)}"


def check_fused(backend, device, dtype, rtol, label, shape, O, stride, padding, weight_kind):
    from fastmeta.backends import get_backend

    require(backend)
    x, w, grad_out, g_dx, g_dw = fused_args(shape, O, stride, padding, weight_kind, device, dtype)
    backward = get_backend(backend).kernel("task_conv2d_backward")
    double_backward = get_backend(backend).kernel("task_conv2d_double_backward")
    # Without and with the addends (the eager node's alias gradients), summed in the kernels.
    dx_addend, dw_addend = torch.randn_like(g_dx), torch.randn_like(g_dw)
    for mask, with_addends in [(m, a) for m in BACKWARD_MASKS for a in (False, True)]:
        addends = (dx_addend if mask[0] else None, dw_addend if mask[1] else None) if with_addends else (None, None)
        args = (grad_out, x, w, stride, padding, mask, *addends)
        got = backward(*args)
        assert got is not NotImplemented, f"{backend} task_conv2d_backward declined {label} {mask}"
        assert_fresh(got, [a for a in args if isinstance(a, torch.Tensor)])
        for i, (a, e) in enumerate(zip(got, reference_task_conv2d_backward(*args))):
            assert (a.numel() == 0) == (not mask[i]), (label, mask, i, a.shape)
            assert_norm_close(a, e, rtol, f"backward {label} {mask} output {i} (addends {with_addends})")
    for upstream in [(g_dx, g_dw), (None, g_dw), (g_dx, None)]:
        for mask in DOUBLE_MASKS:
            args = (*upstream, grad_out, x, w, stride, padding, mask)
            got = double_backward(*args)
            assert got is not NotImplemented, f"{backend} task_conv2d_double_backward declined {label} {mask}"
            assert_fresh(got, [a for a in args if isinstance(a, torch.Tensor)])
            for i, (a, e) in enumerate(zip(got, reference_task_conv2d_double_backward(*args))):
                assert (a.numel() == 0) == (not mask[i]), (label, mask, i, a.shape)
                if mask[i] and e.abs().max() == 0:  # its upstream is absent: exact zeros
                    assert a.abs().max() == 0, (label, mask, i)
                else:
                    assert_norm_close(a, e, rtol, f"double backward {label} {mask} output {i} "
                                                  f"(g_dx {upstream[0] is not None}, g_dw {upstream[1] is not None})")


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["float32", "float64"])
@pytest.mark.parametrize("label,shape,O,stride,padding,weight_kind", FUSED_GEOMETRIES,
                         ids=[c[0] for c in FUSED_GEOMETRIES])
def test_cpu_backward_and_double_backward_equal_the_reference(dtype, rtol, label, shape, O, stride, padding,
                                                              weight_kind):
    check_fused("cpu", "cpu", dtype, rtol, label, shape, O, stride, padding, weight_kind)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("label,shape,O,stride,padding,weight_kind", FUSED_GEOMETRIES[:4],
                         ids=[c[0] for c in FUSED_GEOMETRIES[:4]])
def test_triton_backward_and_double_backward_equal_the_reference(backend, device, label, shape, O, stride, padding,
                                                                 weight_kind):
    check_fused(backend, device, torch.float32, 1e-5, label, shape, O, stride, padding, weight_kind)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_double_backward_accumulates_through_a_split_launch(backend, device):
    """d grad_out's second convolution adds the first's result in its first K range's
    epilogue: planned for 8 SMs, both forward launches split K, and the sum still matches."""
    from fastmeta.kernels.task_conv2d import conv_launch_plan
    from fastmeta.kernels.tiles import planned_for_sm_count

    require(backend)
    shape, O, stride, padding = (2, 2, 64, 8, 8), 64, [2, 2], [1, 1]
    x, w, grad_out, g_dx, g_dw = fused_args(shape, O, stride, padding, "per_task", device)
    with planned_for_sm_count(SPLIT_SMS):
        assert conv_launch_plan("task_conv2d", x, w, None, stride, padding).split_k > 1
        args = (g_dx, g_dw, grad_out, x, w, stride, padding, [True, False, False])
        got = direct(backend, "task_conv2d_double_backward", *args)
    assert_norm_close(got[0], reference_task_conv2d_double_backward(*args)[0], 1e-5, "split d_grad_out")


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("shape,O,stride,weight_kind,splits", [
    ((2, 1, 16, 8, 8), 128, [2, 2], "per_task", 0),  # SPLIT_CASES' s2-input-grad: the input gradient splits
    ((2, 4, 16, 8, 8), 16, [1, 1], "shared", 1),  # s1-shared: the weight gradient splits
], ids=["dx-split", "dw-split"])
def test_triton_backward_adds_its_addends_once_through_split_launches(backend, device, shape, O, stride,
                                                                     weight_kind, splits):
    """dx_addend and dw_addend are added by the first K range only: planned for 8 SMs, a
    gradient launch splits K, and each addend is in the sum once."""
    from fastmeta.kernels.task_conv2d import conv_launch_plans
    from fastmeta.kernels.tiles import planned_for_sm_count

    require(backend)
    x, w, grad_out, g_dx, g_dw = fused_args(shape, O, stride, [1, 1], weight_kind, device)
    args = (grad_out, x, w, stride, [1, 1], [True, True], torch.randn_like(g_dx), torch.randn_like(g_dw))
    with planned_for_sm_count(SPLIT_SMS):
        assert conv_launch_plans("task_conv2d_backward", *args, grouped=False)[splits].split_k > 1
        got = direct(backend, "task_conv2d_backward", *args)
    for i, (a, e) in enumerate(zip(got, reference_task_conv2d_backward(*args))):
        assert_norm_close(a, e, 1e-5, f"split backward with addends, output {i}")


def test_cpu_fused_kernels_decline_what_they_do_not_compute():
    from fastmeta.backends import get_backend

    cpu = get_backend("cpu")
    x, w, gy = torch.randn(2, 3, 3, 5, 5), torch.randn(2, 4, 3, 3, 3), torch.randn(2, 3, 4, 5, 5)
    backward, double_backward = cpu.kernel("task_conv2d_backward"), cpu.kernel("task_conv2d_double_backward")
    assert backward(gy, x, w, [1, 1], [1, 1], [True, True]) is not NotImplemented
    assert backward(gy, x, w, [2, 2], [1, 1], [True, True]) is NotImplemented  # grad_out's maps: the geometry
    assert backward(gy, x, w[:, :, :2], [1, 1], [1, 1], [True, True]) is NotImplemented  # channels
    assert backward(gy, x, w, [0, 1], [1, 1], [True, True]) is NotImplemented  # stride 0
    assert backward(gy, x, w, [1, 1], [1, 1], [True]) is NotImplemented  # the mask's length
    assert double_backward(x, w, gy, x, w, [1, 1], [1, 1], [True, True, True]) is not NotImplemented
    assert double_backward(x, w[0], gy, x, w, [1, 1], [1, 1], [True, True, True]) is NotImplemented  # g_dw's shape
    assert double_backward(x[:, :2], w, gy, x, w, [1, 1], [1, 1], [True, True, True]) is NotImplemented
    assert double_backward(x, w, gy, x, w, [1, 1], [1, 1], [True, True]) is NotImplemented
    # The public ops refuse the shapes the reference would not (naming the argument).
    with fm.use_backend("cpu"), pytest.raises(ValueError, match="w .* does not match x"):
        ops.task_conv2d_backward(gy, x, w[:, :, :2], [1, 1], [1, 1], [True, True])
    with fm.use_backend("cpu"), pytest.raises(ValueError, match="g_dw must have w's shape"):
        ops.task_conv2d_double_backward(x, w[0], gy, x, w, [1, 1], [1, 1], [True, True, True])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_one_backward_node_per_conv(backend):
    """task_conv2d's backward is one op and one node (no input_grad / weight_grad pair,
    whose two gradients of grad_out autograd's engine summed with an aten add); its
    backward is one op: second order runs each once per conv, and the double backward's
    d grad_out is the two convolutions' sum."""
    from harness import kernel_log

    x = torch.randn(2, 3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    with fm.use_backend(backend):
        y = ops.task_conv2d(x, w, None, [2, 2], [1, 1])
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        assert type(gx.grad_fn) is type(gw.grad_fn) and gx.grad_fn is gw.grad_fn
        if backend == "cpu":  # the C++ nodes (csrc/cpu/task_conv2d.cpp)
            assert y.grad_fn.name().endswith("::TaskConv2dNode>")
            assert gx.grad_fn.name().endswith("::TaskConv2dBackwardNode>")
        else:
            assert "task_conv2d_backward" in type(gx.grad_fn).__name__
        (gx.sum() + gw.square().sum()).backward()
    with fm.use_backend("torch"):
        xr, wr = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        y = reference_task_conv2d(xr, wr, None, [2, 2], [1, 1])
        gxr, gwr = torch.autograd.grad(y.square().sum(), (xr, wr), create_graph=True)
        (gxr.sum() + gwr.square().sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    if backend == "cpu":
        with kernel_log("cpu") as (ran, declined):
            with fm.use_backend("cpu"):
                y = ops.task_conv2d(x, w, None, [2, 2], [1, 1])
                gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
                (gx.sum() + gw.square().sum()).backward()
        # The first-order gradient's backward, and again where the outer backward reaches
        # y's own gradient (2y); one double backward for both upstreams (g_dx, g_dw).
        assert ran["task_conv2d_backward"] == 2 and ran["task_conv2d_double_backward"] == 1, dict(ran)
        assert not ran["task_conv2d_input_grad"] and not ran["task_conv2d_weight_grad"], dict(ran)
        assert not declined, dict(declined)
