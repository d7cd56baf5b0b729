"""``task_linear`` and its backward ops (fastmeta/ops/task_linear.py) on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.task_linear import (
    reference_task_linear,
    reference_task_linear_backward,
    reference_task_linear_double_backward,
    reference_task_linear_input_grad,
    reference_task_linear_weight_grad,
)
from harness import backend_params, check_kernel, check_op, direct, to, workload_params

# The kernels first- and second-order gradients of task_linear run (the pair's one op and
# its backward; task_linear_input_grad and task_linear_weight_grad are tested on their own).
KERNELS = ["task_linear", "task_linear_backward", "task_linear_double_backward"]
ALL = backend_params("triton", "cpu", "cuda")
NATIVE = backend_params("cpu", "cuda")
ACTS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")


def linear_weight(kind, T, O, I, device):
    if kind == "per_task":
        return torch.randn(T, O, I, device=device)
    if kind == "shared":
        return torch.randn(O, I, device=device)
    if kind == "expanded":  # θ.expand(T, ...): task stride 0
        return torch.randn(O, I, device=device).expand(T, O, I)
    # A view of the flat [T, P] buffer: task stride P, offset into the row.
    return torch.randn(T, O * I + 5, device=device)[:, 5:].view(T, O, I)


def linear_bias(kind, T, O, device):
    return {"none": None, "per_task": torch.randn(T, O, device=device), "shared": torch.randn(O, device=device)}[kind]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("bias_kind", ["none", "per_task", "shared"])
@pytest.mark.parametrize("weight_kind", ["per_task", "shared", "expanded", "buffer_view"])
def test_task_linear_layouts(backend, device, weight_kind, bias_kind):
    T, N, I, O = 2, 3, 5, 7
    args = [torch.randn(T, N, I, device=device), linear_weight(weight_kind, T, O, I, device),
            linear_bias(bias_kind, T, O, device), "tanh", 0.0]
    diff = [0, 1] + ([2] if args[2] is not None else [])
    check_op(backend, ops.task_linear, args, diff, KERNELS + ["activation_grad"])


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("act", ACTS)
def test_task_linear_activations(backend, device, act):
    T, N, I, O = 2, 3, 5, 7
    args = to([torch.randn(T, N, I), torch.randn(T, O, I), torch.randn(T, O), act, 0.1], device)
    check_op(backend, ops.task_linear, args, [0, 1, 2], KERNELS + ([] if act == "none" else ["activation_grad"]))


@pytest.mark.parametrize("backend,device", backend_params("triton", "cuda"))
@pytest.mark.parametrize("shape", list(workload_params("task_linear")))
@pytest.mark.parametrize("weight_kind", ["buffer_view", "expanded"])
def test_task_linear_workload(backend, device, shape, weight_kind):
    T, N, I, O = shape["T"], shape["N"], shape["I"], shape["O"]
    args = [torch.randn(T, N, I, device=device), linear_weight(weight_kind, T, O, I, device),
            torch.randn(T, O, device=device), shape["act"], 0.0]
    check_op(backend, ops.task_linear, args, [0, 1, 2], KERNELS, rtol=1e-4)


@pytest.fixture
def small_tiles(monkeypatch):
    """Triton's tiles shrunk to 16 so that ragged edges, several tiles per task and split-K
    run at interpreter-sized shapes."""
    from fastmeta.kernels import activation, task_linear

    gemm = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 1, "num_stages": 1}
    monkeypatch.setattr(task_linear, "matmul_config", lambda *a, **k: gemm)
    monkeypatch.setattr(activation, "elementwise_config", lambda *a: {"BLOCK": 16, "num_warps": 1})


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_small_tiles(backend, device, small_tiles):
    # 37 rows × 18 outputs × 20 inputs: 3 × 2 tiles per task with ragged edges; the shared
    # weight-grad has K = 2 · 37 = 74 → 3 splits.
    args = to([torch.randn(2, 37, 20), torch.randn(18, 20), torch.randn(2, 18), "sigmoid", 0.0], device)
    check_op(backend, ops.task_linear, args, [0, 1, 2], KERNELS + ["activation_grad"], rtol=1e-4)


def kernel_cases():
    """Odd sizes: 7 rows (one 6-row tile + 1), 21 columns (one 16-wide tile + 5), 19 inputs,
    and every layout the launchers normalise."""
    T, N, I, O = 3, 7, 19, 21
    t = torch.randn
    cases = [(f"act-{act}", "task_linear", reference_task_linear, (t(T, N, I), t(T, O, I), t(T, O), act, 0.2))
             for act in ACTS]
    base_w, base_b = t(O, I), t(O)
    cases += [
        ("shared", "task_linear", reference_task_linear, (t(T, N, I), base_w, base_b, "tanh", 0.0)),
        ("expanded", "task_linear", reference_task_linear,
         (t(T, N, I), base_w.expand(T, O, I), base_b.expand(T, O), "relu", 0.0)),
        ("nobias-bigN", "task_linear", reference_task_linear, (t(T, 100, I), t(T, O, I), None, "none", 0.0)),
        ("noncontiguous", "task_linear", reference_task_linear,
         (t(T, I, N).transpose(1, 2), t(T, I, O).transpose(1, 2), t(O, T).t(), "leaky_relu", 0.01)),
        ("input_grad", "task_linear_input_grad", reference_task_linear_input_grad, (t(T, N, O), t(T, O, I))),
        ("input_grad-shared", "task_linear_input_grad", reference_task_linear_input_grad, (t(T, N, O), t(O, I))),
        ("input_grad-expanded", "task_linear_input_grad", reference_task_linear_input_grad,
         (t(T, N, O), base_w.expand(T, O, I))),
        ("weight_grad", "task_linear_weight_grad", reference_task_linear_weight_grad, (t(T, N, O), t(T, N, I), False)),
        ("weight_grad-shared", "task_linear_weight_grad", reference_task_linear_weight_grad,
         (t(T, N, O), t(T, N, I), True)),
        ("weight_grad-shared-bigO", "task_linear_weight_grad", reference_task_linear_weight_grad,
         (t(T, N, 100), t(T, N, I), True)),
    ]
    # The C++ kernels take BLAS from 1 024 multiply-adds per task's GEMM (forward) or 4 096
    # (the gradients), the micro-kernel below (csrc/cpu/blas.h): each route, per-task and
    # shared, at odd sizes. W2's head (5 × 256 → 5 per task: BLAS), W2S's (5 × 32 → 5: the
    # micro-kernel), and one above both thresholds.
    for label, (Tb, Nb, Ib, Ob) in {"w2-head": (4, 5, 256, 5), "w2s-head": (2, 5, 32, 5),
                                    "blas": (3, 33, 41, 23)}.items():
        x, w, b, g = t(Tb, Nb, Ib), t(Tb, Ob, Ib), t(Tb, Ob), t(Tb, Nb, Ob)
        cases += [
            (f"{label}", "task_linear", reference_task_linear, (x, w, b, "relu", 0.0)),
            (f"{label}-shared", "task_linear", reference_task_linear, (x, w[0], b[0], "sigmoid", 0.0)),
            (f"{label}-input_grad", "task_linear_input_grad", reference_task_linear_input_grad, (g, w)),
            (f"{label}-input_grad-shared", "task_linear_input_grad", reference_task_linear_input_grad, (g, w[0])),
            (f"{label}-weight_grad", "task_linear_weight_grad", reference_task_linear_weight_grad, (g, x, False)),
            (f"{label}-weight_grad-shared", "task_linear_weight_grad", reference_task_linear_weight_grad,
             (g, x, True)),
        ]
    return cases + pair_cases()


def pair_cases():
    """task_linear_backward and task_linear_double_backward: every weight layout (per task,
    shared, θ.expand, a view of the flat buffer), every output mask, absent upstreams, and
    the C++ kernels' two GEMM routes (W2's head: BLAS; the odd sizes: the micro-kernel)."""
    t = torch.randn
    cases = []
    for label, (T, N, I, O) in {"odd": (3, 7, 19, 21), "w2-head": (4, 5, 256, 5)}.items():
        x, g, g_dx = t(T, N, I), t(T, N, O), t(T, N, I)
        for kind in ("per_task", "shared", "expanded", "buffer_view"):
            w = linear_weight(kind, T, O, I, "cpu")
            g_dw = t(*w.shape)
            for mask in ([True, True], [True, False], [False, True]):
                cases.append((f"{label}-backward-{kind}-{mask}", "task_linear_backward", reference_task_linear_backward,
                              (g, x, w, mask)))
                # with the addends task_linear's eager node passes, summed by the GEMMs
                cases.append((f"{label}-backward-addends-{kind}-{mask}", "task_linear_backward",
                              reference_task_linear_backward,
                              (g, x, w, mask, t(T, N, I) if mask[0] else None, t(*w.shape) if mask[1] else None)))
            for mask in ([True, True, True], [True, False, False], [False, True, True]):
                cases.append((f"{label}-double_backward-{kind}-{mask}", "task_linear_double_backward",
                              reference_task_linear_double_backward, (g_dx, g_dw, g, x, w, mask)))
            cases.append((f"{label}-double_backward-{kind}-no-g_dw", "task_linear_double_backward",
                          reference_task_linear_double_backward, (g_dx, None, g, x, w, [True, True, True])))
            cases.append((f"{label}-double_backward-{kind}-no-g_dx", "task_linear_double_backward",
                          reference_task_linear_double_backward, (None, g_dw, g, x, w, [True, True, True])))
        # The bias's gradient in the pair op (grad_out summed over the examples, and the
        # tasks where shared), and its upstream g_db as d grad_out's broadcast term.
        w = linear_weight("per_task", T, O, I, "cpu")
        for shared in (False, True):
            g_db = t(O) if shared else t(T, O)
            for mask in ([True, True, True], [False, False, True], [True, False, True]):
                cases.append((f"{label}-backward-bias-{'shared' if shared else 'per_task'}-{mask}",
                              "task_linear_backward", reference_task_linear_backward,
                              (g, x, w, mask, t(T, N, I) if mask[0] else None, None, shared)))
            for name, upstreams in (("all", (g_dx, t(*w.shape))), ("g_db-only", (None, None)),
                                    ("g_dx", (g_dx, None))):
                cases.append((f"{label}-double_backward-bias-{'shared' if shared else 'per_task'}-{name}",
                              "task_linear_double_backward", reference_task_linear_double_backward,
                              (*upstreams, g, x, w, [True, True, True], g_db)))
    return cases


CASES = kernel_cases()


def on_device(args, device, dtype=None):
    """Keep views views (expanded, transposed) on the device: move their bases."""
    out = []
    for a in args:
        if a is None or isinstance(a, list):
            out.append(a)
            continue
        if isinstance(a, torch.Tensor) and (a.stride() != a.contiguous().stride()):
            if a.dim() >= 2 and 0 in a.stride():
                out.append(a[0].to(device, dtype or a.dtype).expand(a.shape))
            else:
                out.append(a.transpose(-1, -2).to(device, dtype or a.dtype).contiguous().transpose(-1, -2))
        else:
            out.append(to([a], device, dtype)[0])
    return out


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference_float32(backend, device, name, kernel, reference, args):
    # The backward pair ops are sums of products (no activation, no bias): each element is
    # held to rtol of its own magnitude bound (harness.check_kernel). Their double
    # backward's d grad_out sums two K = 256 products that can cancel to 1e-2 of their size:
    # elementwise, summation order alone (threads, blocking) moved one element 2.3e-5.
    check_kernel(backend, kernel, reference, on_device(args, device), rtol=2e-5,
                 multilinear=kernel in ("task_linear_backward", "task_linear_double_backward"))


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference_float64(name, kernel, reference, args):
    check_kernel("cpu", kernel, reference, on_device(args, "cpu", torch.float64), rtol=1e-10, atol=1e-11)


def test_cpu_kernel_declines_what_it_does_not_compile():
    x = torch.randn(2, 3, 4, dtype=torch.float16)
    w = torch.randn(5, 4, dtype=torch.float16)
    from fastmeta.backends import get_backend

    direct("cpu", "task_linear", x.float(), w.float(), None, "none", 0.0)  # loads and runs
    kernel = get_backend("cpu").kernel("task_linear")
    assert kernel(x, w, None, "none", 0.0) is NotImplemented
    assert kernel(x.float(), w.double(), None, "none", 0.0) is NotImplemented
    # Through the public op, a decline runs the reference: still right.
    with fm.use_backend("cpu"):
        y = ops.task_linear(x, w, None, "none", 0.0)
    torch.testing.assert_close(y, x @ w.t())


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_triton_declines_a_bias_of_the_wrong_shape(backend, device):
    from fastmeta.backends import get_backend

    kernel = get_backend("triton").kernel("task_linear")
    args = to([torch.randn(2, 3, 5), torch.randn(2, 4, 5), torch.randn(2, 3), "none", 0.0], device)
    assert kernel(*args) is NotImplemented


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,N,I,O", [(4, 5, 256, 5), (2, 5, 32, 5), (3, 33, 41, 23)],
                         ids=["w2-head", "w2s-head", "blas"])
def test_cpu_kernels_read_views_of_the_flat_buffer_in_place(dtype, T, N, I, O):
    """Weights and biases that are views of the flat ``[T, P]`` buffer (task stride P) reach
    the C++ kernels as they are, on the BLAS route and the micro-kernel's: no layout copy
    (no aten::clone), the reference's result."""
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-11}
    flat = torch.randn(T, 3 + O * I + O + 2, dtype=dtype)
    w, b = flat[:, 3:3 + O * I].view(T, O, I), flat[:, 3 + O * I:3 + O * I + O]
    x, g = torch.randn(T, N, I, dtype=dtype), torch.randn(T, N, O, dtype=dtype)
    calls = [("task_linear", reference_task_linear, (x, w, b, "relu", 0.0)),
             ("task_linear_input_grad", reference_task_linear_input_grad, (g, w))]
    for kernel, reference, args in calls:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = direct("cpu", kernel, *args)
        assert not [e.name for e in prof.events() if e.name in ("aten::clone", "aten::contiguous", "aten::copy_")]
        torch.testing.assert_close(got, reference(*args), **tol)


def r(*shape, grad=True):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(grad)


GRAD_CASES = [(f"act-{act}", ops.task_linear, (lambda act=act: (r(2, 3, 4), r(2, 5, 4), r(2, 5), act, 0.1)))
              for act in ACTS] + [
    ("shared", ops.task_linear, lambda: (r(2, 3, 4), r(5, 4), r(5), "tanh", 0.0)),
    ("nobias", ops.task_linear, lambda: (r(2, 3, 4), r(2, 5, 4), None, "sigmoid", 0.0)),
    ("input_grad", ops.task_linear_input_grad, lambda: (r(2, 3, 5), r(2, 5, 4))),
    ("input_grad-shared", ops.task_linear_input_grad, lambda: (r(2, 3, 5), r(5, 4))),
    ("weight_grad", ops.task_linear_weight_grad, lambda: (r(2, 3, 5), r(2, 3, 4), False)),
    ("weight_grad-shared", ops.task_linear_weight_grad, lambda: (r(2, 3, 5), r(2, 3, 4), True)),
    ("backward", ops.task_linear_backward, lambda: (r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, True])),
    ("backward-shared", ops.task_linear_backward, lambda: (r(2, 3, 5), r(2, 3, 4), r(5, 4), [True, True])),
    ("backward-dx-only", ops.task_linear_backward, lambda: (r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, False])),
    # with the addends: their gradients are the upstream of dx / dw
    ("backward-addends", ops.task_linear_backward,
     lambda: (r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, True], r(2, 3, 4), r(2, 5, 4))),
    ("backward-addends-shared", ops.task_linear_backward,
     lambda: (r(2, 3, 5), r(2, 3, 4), r(5, 4), [True, True], r(2, 3, 4), r(5, 4))),
    ("backward-dw-addend-only", ops.task_linear_backward,
     lambda: (r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [False, True], None, r(2, 5, 4))),
    ("double_backward", ops.task_linear_double_backward,
     lambda: (r(2, 3, 4), r(2, 5, 4), r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, True, True])),
    ("double_backward-shared", ops.task_linear_double_backward,
     lambda: (r(2, 3, 4), r(5, 4), r(2, 3, 5), r(2, 3, 4), r(5, 4), [True, True, True])),
    ("double_backward-no-g_dw", ops.task_linear_double_backward,
     lambda: (r(2, 3, 4), None, r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, True, True])),
    # the bias's gradient inside the pair, and its upstream in the double backward
    ("backward-bias", ops.task_linear_backward,
     lambda: (r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, True, True], r(2, 3, 4), None, False)),
    ("backward-bias-shared", ops.task_linear_backward,
     lambda: (r(2, 3, 5), r(2, 3, 4), r(5, 4), [False, True, True], None, None, True)),
    ("double_backward-g_db", ops.task_linear_double_backward,
     lambda: (r(2, 3, 4), r(2, 5, 4), r(2, 3, 5), r(2, 3, 4), r(2, 5, 4), [True, True, True], r(2, 5))),
    ("double_backward-g_db-shared-only", ops.task_linear_double_backward,
     lambda: (None, None, r(2, 3, 5), r(2, 3, 4), r(5, 4), [True, True, True], r(5))),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, op, make):
    gradchecks(op, make(), backend=backend)


def test_reference_matches_torch_functional():
    x, w, b = r(2, 3, 4, grad=False), r(2, 5, 4, grad=False), r(2, 5, grad=False)
    got = ops.task_linear(x, w, b, "relu", 0.0)
    want = torch.stack([F.relu(F.linear(x[t], w[t], b[t])) for t in range(2)])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_task_shared_weights_compute_per_task_weight_gradients(backend):
    # θ.expand(T, ...) has task stride 0: the forward is one GEMM, but the weight gradient
    # must still come back per task.
    x = r(2, 3, 4, grad=False)
    base = r(5, 4)
    w = base.expand(2, 5, 4)
    with fm.use_backend(backend):
        y = ops.task_linear(x, w, None, "tanh", 0.0)
        (g,) = torch.autograd.grad(y.sum(), w)
    want = torch.stack([torch.autograd.grad(torch.tanh(x[t] @ base.t()).sum(), base)[0] for t in range(2)])
    assert g.shape == (2, 5, 4) and torch.allclose(g, want)


# ---------------------------------------------------------------------------------------
# Split-K (kernels/tiles.py): the launches planned for a GPU of 8 SMs
# ---------------------------------------------------------------------------------------

SPLIT_SMS = 8


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("weight_kind", ["per_task", "shared"])
def test_split_k_against_the_reference(backend, device, weight_kind):
    """256 rows × 16 outputs × 256 inputs: the forward (K = 256, 8 steps) and the weight
    gradient (K = 256 rows, or 2 · 256 shared) have too few tiles for two waves of 8 SMs and
    split K; the bias is added by the first range. Outputs, first and second order."""
    from fastmeta.kernels.task_linear import linear_launch_plan
    from fastmeta.kernels.tiles import planned_for_sm_count

    T, N, I, O = 2, 256, 256, 16
    g = torch.Generator().manual_seed(5)
    w = torch.randn(T, O, I, generator=g) / 16 if weight_kind == "per_task" else torch.randn(O, I, generator=g) / 16
    b = torch.randn(T, O, generator=g) if weight_kind == "per_task" else torch.randn(O, generator=g)
    x = torch.randn(T, N, I, generator=g)
    args = to([x, w, b, "none", 0.0], device)
    with planned_for_sm_count(SPLIT_SMS):
        forward = linear_launch_plan("task_linear", *args)
        weight_grad = linear_launch_plan("task_linear_weight_grad", args[0].new_ones(T, N, O), args[0],
                                         weight_kind == "shared")
        assert forward.split_k > 1 and weight_grad.split_k > 1, (forward.config, weight_grad.config)
        assert forward.sm_count == SPLIT_SMS and forward.busy_programs >= 2 * SPLIT_SMS
        # An activation after the bias cannot apply to partial tiles: that launch does not split.
        assert linear_launch_plan("task_linear", args[0], args[1], args[2], "relu", 0.0).split_k == 1
        check_op(backend, ops.task_linear, args, [0, 1, 2], KERNELS, rtol=1e-4)
        again = [direct(backend, "task_linear", *args) for _ in range(2)]
        assert torch.equal(again[0], again[1])  # summed in split order: the same bits


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("weight_kind", ["per_task", "shared", "expanded"])
def test_second_order_through_the_backward_pair_equals_autograd_of_the_reference(backend, weight_kind):
    """Gradients of a function of task_linear's (dx, dw) — the second-order path, through
    task_linear_backward and task_linear_double_backward — equal those through plain
    autograd of the reference, in float64, for x, w and the upstream."""
    T, N, I, O = 2, 3, 4, 5
    x0 = torch.randn(T, N, I, dtype=torch.float64)
    w0 = linear_weight(weight_kind, T, O, I, "cpu").double()
    u0 = torch.randn(T, N, O, dtype=torch.float64)
    results = []
    for fn, context in ((ops.task_linear, fm.use_backend(backend)), (reference_task_linear, fm.use_backend("torch"))):
        with context:
            x = x0.clone().requires_grad_(True)
            w = w0.detach().clone().requires_grad_(True) if weight_kind != "expanded" else None
            base = w0[0].clone().requires_grad_(True) if weight_kind == "expanded" else None
            weight = base.expand(T, O, I) if base is not None else w
            if base is not None and fn is reference_task_linear:
                # The op's semantics for θ.expand: per-task weight gradients (the reference
                # alone would take w[0] and differentiate that); a dense per-task copy has them.
                weight = weight.clone()
            u = u0.clone().requires_grad_(True)
            y = fn(x, weight, None, "tanh", 0.0)
            dx, dw = torch.autograd.grad(y, (x, weight), u, create_graph=True)
            objective = (dx ** 2).sum() + (dw.sin()).sum()
            leaf = base if base is not None else w
            results.append(torch.autograd.grad(objective, (x, leaf, u)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("weight_kind", ["per_task", "shared", "expanded"])
def test_triton_backward_pair_equals_reference(backend, device, weight_kind):
    """The Triton launchers of the pair (TRITON_INTERPRET=1 on the CPU: tiny shapes), the
    accumulating launch of d grad_out included."""
    T, N, I, O = 2, 3, 5, 4
    x, g, g_dx = torch.randn(T, N, I), torch.randn(T, N, O), torch.randn(T, N, I)
    w = linear_weight(weight_kind, T, O, I, "cpu")
    g_dw = torch.randn(*w.shape)
    for mask in ([True, True], [False, True]):
        check_kernel(backend, "task_linear_backward", reference_task_linear_backward,
                     on_device((g, x, w, mask), device), rtol=2e-5)
    for upstreams in ((g_dx, g_dw), (None, g_dw), (g_dx, None)):
        check_kernel(backend, "task_linear_double_backward", reference_task_linear_double_backward,
                     on_device((*upstreams, g, x, w, [True, True, True]), device), rtol=2e-5)
    # The bias's gradient (A_ONES launch) and g_db as the first product's bias.
    for shared in (False, True):
        g_db = torch.randn(O) if shared else torch.randn(T, O)
        for mask in ([True, True, True], [False, False, True]):
            check_kernel(backend, "task_linear_backward", reference_task_linear_backward,
                         on_device((g, x, w, mask, None, None, shared), device), rtol=2e-5)
        for upstreams in ((g_dx, g_dw), (None, g_dw), (None, None)):
            check_kernel(backend, "task_linear_double_backward", reference_task_linear_double_backward,
                         on_device((*upstreams, g, x, w, [True, True, True], g_db), device), rtol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bias_kind", ["per_task", "shared"])
@pytest.mark.parametrize("act", ["none", "tanh"])
def test_second_order_through_the_bias_gradient_equals_autograd_of_the_reference(backend, bias_kind, act):
    """The bias's gradient comes out of task_linear_backward and its upstream goes into
    task_linear_double_backward's d grad_out: gradients of a function of (dx, dw, db) equal
    those of plain autograd through the reference (whose bias gradient is a sum), float64."""
    T, N, I, O = 3, 4, 5, 2
    x0, w0, u0 = (torch.randn(*s, dtype=torch.float64) for s in ((T, N, I), (T, O, I), (T, N, O)))
    b0 = torch.randn(O if bias_kind == "shared" else (T, O), dtype=torch.float64)
    results = []
    for fn, context in ((ops.task_linear, fm.use_backend(backend)), (reference_task_linear, fm.use_backend("torch"))):
        with context:
            x, w, b, u = (t.clone().requires_grad_(True) for t in (x0, w0, b0, u0))
            y = fn(x, w, b, act, 0.0)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), u, create_graph=True)
            objective = (dx ** 2).sum() + dw.sin().sum() + (db ** 3).sum()
            # b reaches the objective only through a nonlinear activation's derivative
            results.append(torch.autograd.grad(objective, (x, w, b, u), allow_unused=True, materialize_grads=True))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), *backend_params("triton")])
def test_double_backward_reads_g_db_at_its_task_stride(backend, device):
    """g_db arrives as a view of the flat gradient buffer (its rows contiguous, a task stride
    wider than O): the kernels read it in place, equal to the contiguous copy's result."""
    T, N, I, O = 3, 4, 6, 5
    g, x, w, g_dx = (torch.randn(*s, device=device) for s in ((T, N, O), (T, N, I), (T, O, I), (T, N, I)))
    flat = torch.randn(T, O + 7, device=device)
    g_db = flat[:, 2:2 + O]
    assert g_db.stride() == (O + 7, 1)
    with fm.use_backend(backend):
        for upstream in (g_dx, None):
            strided = ops.task_linear_double_backward(upstream, None, g, x, w, [True, True, True], g_db)
            dense = ops.task_linear_double_backward(upstream, None, g, x, w, [True, True, True], g_db.contiguous())
            for a, b in zip(strided, dense):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = reference_task_linear_double_backward(g_dx, None, g, x, w, [True, True, True], g_db)
    with fm.use_backend(backend):
        got = ops.task_linear_double_backward(g_dx, None, g, x, w, [True, True, True], g_db)
    torch.testing.assert_close(got[0], expected[0], rtol=2e-5, atol=2e-5)


def test_backward_refuses_an_output_mask_of_other_lengths():
    g, x, w = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="output_mask must have 2 or 3 entries"):
        ops.task_linear_backward(g, x, w, [True])
    with pytest.raises(ValueError, match="g_db must be"):
        ops.task_linear_double_backward(None, None, g, x, w, [True, False, False], torch.randn(3, 4))
