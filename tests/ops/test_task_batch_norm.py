"""``task_batch_norm`` and its backward (fastmeta/ops/task_batch_norm.py) on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.task_batch_norm import (
    reference_task_batch_norm,
    reference_task_batch_norm_backward,
    reference_task_batch_norm_double_backward,
    task_batch_norm_double_backward,
)
from harness import (
    assert_as_close_as_reference,
    backend_params,
    check_kernel,
    check_op,
    direct,
    float64,
    to,
    workload_params,
)

# check_op's second order runs the backward of task_batch_norm_backward: the double backward.
KERNELS = ["task_batch_norm", "task_batch_norm_backward", "task_batch_norm_double_backward"]
ALL = backend_params("triton", "cpu")


def bn_param(kind, T, C, device):
    return {"none": None, "per_task": torch.randn(T, C, device=device) + 1,
            "shared": torch.randn(C, device=device) + 1}[kind]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize(
    "shape,gamma_kind,beta_kind,act",
    [
        ((2, 3, 4, 3, 5), "per_task", "per_task", "relu"),  # BatchNorm2d, W2-like
        ((2, 3, 4, 3, 5), "shared", "shared", "none"),
        ((2, 3, 4, 3, 5), "none", "none", "tanh"),
        ((2, 3, 3), "per_task", "shared", "leaky_relu"),  # BatchNorm1d on features
        ((1, 2, 3, 1, 1), "shared", "per_task", "sigmoid"),  # count 2: near-degenerate
    ],
)
def test_task_batch_norm(backend, device, shape, gamma_kind, beta_kind, act):
    """With 2 values per statistic, x̂ = ±√(1 − eps·rstd²): the projection P of the
    backward leaves ~eps/σ² of its argument, and second order is all cancellation. There
    the fp32 reference itself is off the float64 truth by up to 23 % (60 seeds), and two
    fp32 implementations that round differently disagree by up to 2 % (the C++ double
    backward, which sums in double, is off the truth by up to 19 %): that case is judged
    against float64, as close to it as the fp32 reference. The others match the fp32
    reference within 2.3e-6 of the scale (60 seeds)."""
    T, C = shape[0], shape[2]
    x = torch.randn(*shape, device=device) * 2 + 3  # |μ| ≫ 0 catches one-pass variance
    args = [x, bn_param(gamma_kind, T, C, device), bn_param(beta_kind, T, C, device), 1e-5, act, 0.1]
    diff = [0] + [i for i in (1, 2) if args[i] is not None]
    kernels = KERNELS + (["activation_grad"] if act in ("tanh", "sigmoid") else [])  # relu's is in the backward
    count = x.numel() // (T * C)
    check_op(backend, ops.task_batch_norm, args, diff, kernels, rtol=1e-4, float64_truth=count <= 2)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("shape", list(workload_params("task_batch_norm")))
def test_task_batch_norm_workload(backend, device, shape):
    """At W4's size (68M elements) some normalised values sit within fp32 rounding of ReLU's
    kink: there any fp32 implementation may take the other side, and its gradients at that
    element jump by O(1) (seen on an H100: 0.36 on a scale of 17.7, in the fp32 reference
    and the kernel alike). Those elements (|z| < 1e-4 in float64, ~0.01 % of them) are left
    out; everything else is judged against float64."""
    torch.manual_seed(0)
    T, N, C, H, W = (shape[k] for k in ("T", "N", "C", "H", "W"))
    args = [torch.randn(T, N, C, H, W, device=device), bn_param("per_task", T, C, device),
            bn_param("per_task", T, C, device), 1e-5, shape["act"], 0.0]
    with fm.use_backend("torch"):
        z = ops.task_batch_norm(*float64(args[:3]), 1e-5, "none", 0.0)
    kink = z.abs() < 1e-4 if shape["act"] in ("relu", "leaky_relu") else None
    del z
    smooth = ["activation_grad"] if shape["act"] in ("tanh", "sigmoid") else []  # relu's is in the backward
    check_op(backend, ops.task_batch_norm, args, [0, 1, 2], KERNELS + smooth, rtol=1e-3,
             float64_truth=True, exclude=kink)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("shape", list(workload_params("task_batch_norm")))
def test_task_batch_norm_double_backward_workload(backend, device, shape):
    """The double backward's kernel alone at the workloads' sizes (W4: 529 200 values per
    task and channel in each of its sums), every output judged against float64."""
    torch.manual_seed(0)
    T, N, C, H, W = (shape[k] for k in ("T", "N", "C", "H", "W"))
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    args = [r(T, N, C, H, W), r(T, N, C, H, W) * 2 + 3, bn_param("per_task", T, C, device), r(T, N, C, H, W),
            r(T, C), r(T, C), 1e-5, [True, True, True]]
    got = direct(backend, "task_batch_norm_double_backward", *args)
    want = reference_task_batch_norm_double_backward(*args)
    truth = reference_task_batch_norm_double_backward(*float64(args))
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        assert_as_close_as_reference(g, w, t, f"output {i}", 1e-4)


@pytest.fixture
def small_tiles(monkeypatch):
    from fastmeta.kernels import activation, task_batch_norm

    monkeypatch.setattr(task_batch_norm, "batch_norm_config", lambda *a: {"BLOCK": 16, "num_warps": 1})
    monkeypatch.setattr(activation, "elementwise_config", lambda *a: {"BLOCK": 16, "num_warps": 1})


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_small_tiles(backend, device, small_tiles):
    x = torch.randn(2, 3, 2, 5, 7, device=device)  # 105 values per statistic: 7 chunks of 16
    check_op(backend, ops.task_batch_norm, [x, bn_param("per_task", 2, 2, device), None, 1e-5, "relu", 0.0], [0, 1],
             KERNELS, rtol=1e-4)
    check_op(backend, ops.task_batch_norm, [x, bn_param("per_task", 2, 2, device), None, 1e-5, "tanh", 0.0], [0, 1],
             KERNELS + ["activation_grad"], rtol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_triton_declines_an_empty_task_batch(backend, device):
    from fastmeta.backends import get_backend

    kernel = get_backend("triton").kernel("task_batch_norm")
    assert kernel(torch.randn(0, 3, 3, 2, 2, device=device), None, None, 1e-5, "none", 0.0) is NotImplemented


def row_view(values: torch.Tensor) -> torch.Tensor:
    """values [T, C] as columns 1..C of a wider [T, C + 3] buffer: not contiguous, stride(1) 1."""
    T, C = values.shape
    wide = torch.zeros(T, C + 3, dtype=values.dtype, device=values.device)
    wide[:, 1:C + 1] = values
    return wide[:, 1:C + 1]


def kernel_cases():
    T, N = 3, 7
    t = torch.randn
    return [
        ("1d", "task_batch_norm", reference_task_batch_norm, (t(T, N, 5), t(T, 5), t(T, 5), 1e-5, "relu", 0.0)),
        ("2d", "task_batch_norm", reference_task_batch_norm, (t(T, N, 4, 3, 5), t(4), t(4), 1e-3, "tanh", 0.0)),
        ("noaffine", "task_batch_norm", reference_task_batch_norm,
         (t(T, N, 4, 2, 2), None, None, 1e-5, "leaky_relu", 0.1)),
        ("expanded", "task_batch_norm", reference_task_batch_norm,
         (t(T, N, 4, 3), t(4).expand(T, 4), t(4).expand(T, 4), 1e-5, "sigmoid", 0.0)),
        # Rows of the flat [T, P] fast-weight buffer: a task stride of P, taken uncopied.
        ("strided", "task_batch_norm", reference_task_batch_norm,
         (t(T, N, 4, 3), row_view(t(T, 4)), row_view(t(T, 4)), 1e-5, "relu", 0.0)),
        ("backward-strided", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 3, 5), t(T, N, 4, 3, 5), row_view(t(T, 4)), 1e-5, [True, True, True])),
        ("backward", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 3, 5), t(T, N, 4, 3, 5), t(T, 4), 1e-5, [True, True, True])),
        ("backward-partial", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4), t(T, N, 4), t(4), 1e-5, [True, False, True])),
        ("backward-nogamma", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 2), t(T, N, 4, 2), None, 1e-5, [True, False, False])),
        # The activation gradient fused: the first argument is the gradient at y, f'(y) a mask.
        ("backward-relu", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 3, 5), t(T, N, 4, 3, 5), t(T, 4), 1e-5, [True, True, True], t(T, N, 4, 3, 5).relu(), "relu",
          0.0)),
        ("backward-leaky-partial", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 5), t(T, N, 5), t(5), 1e-5, [True, False, True], t(T, N, 5), "leaky_relu", 0.1)),
        # The addends task_batch_norm's eager node passes (its alias outputs' gradients),
        # added in the write passes: spatial and feature layouts, with and without y.
        ("backward-addends", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 3, 5), t(T, N, 4, 3, 5), row_view(t(T, 4)), 1e-5, [True, True, True], None, "none", 0.01,
          t(T, N, 4, 3, 5), t(T, 4))),
        ("backward-addends-features-leaky", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 5), t(T, N, 5), t(5), 1e-5, [True, True, False], t(T, N, 5), "leaky_relu", 0.1,
          t(T, N, 5), t(T, 5))),
        ("backward-dx-addend-relu", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 4, 3, 5), t(T, N, 4, 3, 5), t(T, 4), 1e-5, [True, False, True], t(T, N, 4, 3, 5).relu(), "relu",
          0.0, t(T, N, 4, 3, 5), None)),
        ("backward-dgamma-addend-features", "task_batch_norm_backward", reference_task_batch_norm_backward,
         (t(T, N, 6), t(T, N, 6), t(T, 6), 1e-5, [False, True, True], None, "none", 0.01, None, t(T, 6))),
    ] + double_backward_cases(T, N)


def double_backward_cases(T, N):
    """(grad_z, x, γ, up_x, up_γ, up_β, eps, needs): odd shapes, every γ layout, upstreams
    present or absent (an absent one is None), partial needs. x has |μ| ≫ 0 (the sums are
    taken about μ) and 7 examples per task."""
    name = "task_batch_norm_double_backward"
    ref = reference_task_batch_norm_double_backward

    def case(label, shape, gamma, up_x, up_gamma, up_beta, needs, eps=1e-5, act="none"):
        C = shape[2]
        layouts = {None: None, "per_task": torch.randn(T, C) + 1, "shared": torch.randn(C) + 1,
                   "expanded": torch.randn(C).expand(T, C), "strided": row_view(torch.randn(T, C) + 1)}
        x = torch.randn(*shape) * 2 + 3
        args = (torch.randn(*shape), x, layouts[gamma], torch.randn(*shape) if up_x else None,
                layouts[up_gamma], layouts[up_beta], eps, needs)
        if act != "none":  # y: the forward's output, whose mask f'(y) the kernel applies
            args += (torch.randn(*shape), act, 0.2)
        return (f"double-{label}", name, ref, args)

    return [
        case("2d", (T, N, 4, 3, 5), "per_task", True, "per_task", "per_task", [True, True, True]),
        case("1d", (T, N, 5), "shared", True, "expanded", "shared", [True, True, True]),
        case("nogamma", (T, N, 4, 2), None, True, None, "per_task", [True, True, True], eps=1e-3),
        case("no-up_x", (T, N, 3, 2, 3), "per_task", False, "per_task", "shared", [True, True, True]),
        case("only-up_x", (T, N, 3, 5), "expanded", True, None, None, [True, True, True]),
        case("no-upstream", (T, N, 2, 3), "per_task", False, None, None, [True, True, True]),
        case("d_grad_z", (T, N, 4, 1, 1), "per_task", True, "shared", "per_task", [True, False, False]),
        case("d_x", (T, N, 3, 4, 3), "shared", True, "per_task", None, [False, True, False]),
        case("d_gamma", (T, N, 6), "per_task", True, "per_task", "per_task", [False, False, True]),
        case("d_x-d_gamma", (T, 2, 3, 2, 2), None, True, "per_task", None, [False, True, True]),
        case("relu", (T, N, 4, 3, 5), "per_task", True, "per_task", "per_task", [True, True, True], act="relu"),
        case("leaky-partial", (T, N, 5), "shared", True, None, "shared", [True, False, True], act="leaky_relu"),
        case("relu-no-up_x", (T, N, 3, 2), None, False, "per_task", "per_task", [True, True, True], act="relu"),
        case("strided", (T, N, 4, 3), "strided", True, "strided", "strided", [True, True, True]),
    ]


CASES = kernel_cases()


def on_device(args, device, dtype=None):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 2 and a.stride(0) == 0:
            out.append(a[0].to(device, dtype or a.dtype).expand(a.shape))  # keep the task stride 0
        elif isinstance(a, torch.Tensor) and a.dim() == 2 and not a.is_contiguous():
            out.append(row_view(a.to(device, dtype or a.dtype)))  # keep the rows' task stride
        else:
            out.append(to([a], device, dtype)[0])
    return out


@pytest.mark.parametrize("with_y", [False, True], ids=["no-act", "relu"])
def test_cpu_kernels_over_several_channel_blocks(with_y):
    """BatchNorm2d maps large enough that the CPU kernels split a task's channels into
    blocks (csrc/cpu/task_batch_norm.cpp channel_block: 512 KB of values per work item; here
    64 KB a channel and stream, so the forward takes 8 channels per block and the backward
    2 or 3, with a ragged last block): forward, backward and double backward against the
    reference."""
    g = torch.Generator().manual_seed(5)
    shape = (2, 4, 13, 64, 64)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 3
    gamma, beta = torch.randn(2, 13, generator=g, dtype=torch.float64), torch.randn(13, generator=g, dtype=torch.float64)
    act = "relu" if with_y else "none"
    check_kernel("cpu", "task_batch_norm", reference_task_batch_norm, [x, gamma, beta, 1e-5, act, 0.0],
                 rtol=1e-10, atol=1e-11)
    y = reference_task_batch_norm(x, gamma, beta, 1e-5, act, 0.0) if with_y else None
    extra = [y, act, 0.0] if with_y else []
    grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    check_kernel("cpu", "task_batch_norm_backward", reference_task_batch_norm_backward,
                 [grad, x, gamma, 1e-5, [True, True, True], *extra], rtol=1e-10, atol=1e-11)
    check_kernel("cpu", "task_batch_norm_backward", reference_task_batch_norm_backward,
                 [grad.float(), x.float(), gamma.float(), 1e-5, [True, False, True],
                  *([y.float(), act, 0.0] if with_y else [])], rtol=2e-5)
    # The double backward's work items are channel blocks too (four read streams: 1 channel
    # a block in float64, 2 in float32, the last ragged), with and without the upstream at x.
    up_x = torch.randn(*shape, generator=g, dtype=torch.float64)
    up_gamma, up_beta = torch.randn(2, 13, generator=g, dtype=torch.float64), torch.randn(13, generator=g, dtype=torch.float64)
    for upstream in (up_x, None):
        args = [grad, x, gamma, upstream, up_gamma, up_beta, 1e-5, [True, True, True], *extra]
        check_kernel("cpu", "task_batch_norm_double_backward", reference_task_batch_norm_double_backward, args,
                     rtol=1e-10, atol=1e-11)
        check_kernel("cpu", "task_batch_norm_double_backward", reference_task_batch_norm_double_backward,
                     [a.float() if isinstance(a, torch.Tensor) else a for a in args], rtol=2e-5)


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference(name, kernel, reference, args):
    check_kernel("cpu", kernel, reference, on_device(args, "cpu", torch.float32), rtol=2e-5)
    check_kernel("cpu", kernel, reference, on_device(args, "cpu", torch.float64), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_triton_kernel_equals_reference(backend, device, name, kernel, reference, args):
    check_kernel(backend, kernel, reference, on_device(args, device), rtol=2e-5)


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu"))
@pytest.mark.parametrize("gamma_kind", ["per_task", "shared", "none"])
def test_backward_of_the_backward(backend, device, gamma_kind):
    """task_batch_norm_backward through the public op: its first order is the double
    backward's kernel, its second order the double backward's reference VJP."""
    T, N, C = 2, 3, 4
    shape = (T, N, C, 3, 2)
    args = [torch.randn(*shape, device=device), torch.randn(*shape, device=device) * 2 + 3,
            bn_param(gamma_kind, T, C, device), 1e-5, [True, gamma_kind != "none", True]]
    diff = [0, 1] + ([2] if args[2] is not None else [])
    check_op(backend, ops.task_batch_norm_backward, args, diff,
             ["task_batch_norm_backward", "task_batch_norm_double_backward"], rtol=1e-4)


def test_the_double_backward_is_one_dispatch():
    """Second order through task_batch_norm: the backward of its backward is one fastmeta op
    (it was ~25 aten ops per layer, 1 700 of W4's 2 155 dispatches), with no aten op inside."""
    from fastmeta.tools.dispatches import count_events

    x = torch.randn(2, 3, 4, 3, 3, requires_grad=True)
    gamma = (torch.randn(2, 4) + 1).requires_grad_(True)
    beta = torch.randn(2, 4, requires_grad=True)
    with fm.use_backend("cpu"):
        y = ops.task_batch_norm(x, gamma, beta, 1e-5, "none", 0.0)
        first = torch.autograd.grad(y, (x, gamma, beta), torch.randn_like(y), create_graph=True)
        objective = sum((f * torch.randn_like(f)).sum() for f in first)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.autograd.grad(objective, (x, gamma))  # grad_β = Σ g does not depend on β
    count = count_events(prof.events())
    assert count.by_name["fastmeta::task_batch_norm_double_backward"] == 1, count.describe()
    batch_norm_math = {"aten::mean", "aten::sub", "aten::rsqrt", "aten::zeros_like"}
    assert not batch_norm_math & set(count.by_name), count.describe()
    native = [e.name for e in prof.events() if e.name == "fastmeta_ext::task_batch_norm_double_backward"]
    assert native, "the C++ kernel did not run"
    inside = [e.name for e in prof.events() if e.cpu_parent is not None
              and e.cpu_parent.name == "fastmeta_ext::task_batch_norm_double_backward"
              and e.name.startswith("aten::") and e.name not in ("aten::empty", "aten::empty_like")]
    assert not inside, f"the C++ kernel calls aten ops (each a dispatch): {inside}"


def r(*shape, grad=True):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(grad)


GRAD_CASES = [
    ("2d", ops.task_batch_norm, lambda: (r(2, 4, 3, 2, 2), r(2, 3), r(2, 3), 1e-5, "relu", 0.0)),
    ("1d", ops.task_batch_norm, lambda: (r(2, 5, 3), r(2, 3), r(2, 3), 1e-5, "tanh", 0.0)),
    ("shared", ops.task_batch_norm, lambda: (r(2, 4, 3, 2), r(3), r(3), 1e-3, "sigmoid", 0.0)),
    ("noaffine", ops.task_batch_norm, lambda: (r(2, 4, 3, 2, 2), None, None, 1e-5, "none", 0.0)),
    ("backward", ops.task_batch_norm_backward, lambda: (r(2, 4, 3, 2, 2), r(2, 4, 3, 2, 2), r(2, 3), 1e-5,
                                                        [True, True, True])),
    ("backward-partial", ops.task_batch_norm_backward, lambda: (r(2, 4, 3), r(2, 4, 3), r(3), 1e-5,
                                                                [True, False, True])),
    ("double_backward", task_batch_norm_double_backward,
     lambda: (r(2, 4, 3, 2, 2), r(2, 4, 3, 2, 2), r(2, 3), r(2, 4, 3, 2, 2), r(2, 3), r(2, 3), 1e-5, [True] * 3)),
    ("double_backward-partial", task_batch_norm_double_backward,
     lambda: (r(2, 4, 3), r(2, 4, 3), r(3), r(2, 4, 3), None, r(3), 1e-5, [False, True, True])),
    ("double_backward-nogamma", task_batch_norm_double_backward,
     lambda: (r(2, 3, 2, 3), r(2, 3, 2, 3), None, None, r(2, 2), r(2, 2), 1e-3, [True, True, False])),
    # y requires grad too: the numerical gradient at y is zero (f'(y) is piecewise constant), as the op says.
    ("backward-relu", ops.task_batch_norm_backward, lambda: (r(2, 4, 3, 2, 2), r(2, 4, 3, 2, 2), r(2, 3), 1e-5,
                                                             [True, True, True], r(2, 4, 3, 2, 2), "relu", 0.0)),
    ("backward-leaky", ops.task_batch_norm_backward, lambda: (r(2, 4, 3), r(2, 4, 3), r(3), 1e-5,
                                                              [True, True, False], r(2, 4, 3), "leaky_relu", 0.1)),
    # with the addends: their gradients are the upstream of grad_x / grad_γ
    ("backward-addends", ops.task_batch_norm_backward,
     lambda: (r(2, 4, 3, 2, 2), r(2, 4, 3, 2, 2), r(2, 3), 1e-5, [True, True, True], None, "none", 0.01,
              r(2, 4, 3, 2, 2), r(2, 3))),
    ("backward-relu-addends", ops.task_batch_norm_backward,
     lambda: (r(2, 4, 3), r(2, 4, 3), r(3), 1e-5, [True, True, False], r(2, 4, 3), "relu", 0.0, r(2, 4, 3),
              r(2, 3))),
    ("double_backward-relu", task_batch_norm_double_backward,
     lambda: (r(2, 4, 3, 2, 2), r(2, 4, 3, 2, 2), r(2, 3), r(2, 4, 3, 2, 2), r(2, 3), r(2, 3), 1e-5, [True] * 3,
              r(2, 4, 3, 2, 2), "relu", 0.0)),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, op, make):
    gradchecks(op, make(), backend=backend)


def test_reference_matches_torch_functional():
    xb, g, bb = r(2, 4, 3, 2, 2, grad=False), r(2, 3, grad=False), r(2, 3, grad=False)
    with fm.use_backend("torch"):
        got = ops.task_batch_norm(xb, g, bb, 1e-5, "none", 0.0)
    want = torch.stack([F.batch_norm(xb[t], None, None, g[t], bb[t], training=True) for t in range(2)])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_the_activation_gradient_runs_inside_the_batch_norm_kernels(act):
    """relu/leaky_relu after a BatchNorm: its backward and double backward apply f'(y)
    themselves, so neither order runs an activation_grad op (or an aten op), and the
    gradients at every order match the reference loop's composition in float64."""
    from fastmeta.tools.dispatches import count_events

    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    gamma = (torch.randn(2, 4, dtype=torch.float64) + 1).requires_grad_(True)
    beta = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 3, 3, dtype=torch.float64)
    weights = [torch.randn(2, 3, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64),
               torch.randn(2, 4, dtype=torch.float64)]

    def run(backend):
        with fm.use_backend(backend), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = ops.task_batch_norm(x, gamma, beta, 1e-5, act, 0.1)
            first = torch.autograd.grad(y, (x, gamma, beta), upstream, create_graph=True)
            objective = sum((f * w).sum() for f, w in zip(first, weights))
            second = torch.autograd.grad(objective, (x, gamma, beta), allow_unused=True)
        return first, second, count_events(prof.events())

    first, second, count = run("cpu")
    assert "fastmeta::activation_grad" not in count.by_name, count.describe()
    assert count.by_name["fastmeta::task_batch_norm_backward"] == 1, count.describe()
    assert count.by_name["fastmeta::task_batch_norm_double_backward"] == 1, count.describe()
    # The reference: the unfused composition, activation_grad then the plain backward.
    z = reference_task_batch_norm(x, gamma, beta, 1e-5, "none", 0.0)
    y = torch.nn.functional.relu(z) if act == "relu" else torch.nn.functional.leaky_relu(z, 0.1)
    want_first = torch.autograd.grad(y, (x, gamma, beta), upstream, create_graph=True)
    objective = sum((f * w).sum() for f, w in zip(want_first, weights))
    want_second = torch.autograd.grad(objective, (x, gamma, beta), allow_unused=True)
    # Where one side has no gradient (beta's second order: only through the mask), both are zero.
    for got, want, like in zip(first + second, want_first + want_second, (x, gamma, beta) * 2):
        got = torch.zeros_like(like) if got is None else got
        want = torch.zeros_like(like) if want is None else want
        assert (got - want).norm() <= 1e-10 * want.norm()


@pytest.mark.parametrize("op", ["backward", "double_backward"])
def test_a_fused_activation_that_is_not_piecewise_linear_is_refused(op):
    t = torch.randn(2, 3, 4)

    def call(y, act):
        if op == "backward":
            return ops.task_batch_norm_backward(t, t, None, 1e-5, [True, True, True], y, act, 0.0)
        return task_batch_norm_double_backward(t, t, None, t, None, None, 1e-5, [True, True, True], y, act, 0.0)

    with pytest.raises(ValueError, match="act must be one of .*relu.* when y is given, got 'tanh'"):
        call(t, "tanh")
    with pytest.raises(ValueError, match="act is 'relu' but y is None"):
        call(None, "relu")
