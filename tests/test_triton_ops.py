"""The triton backend against the torch reference: outputs, every gradient, double backward.

Each test runs a public op (fastmeta.ops) once under ``fm.use_backend("torch")`` and once
under ``fm.use_backend("triton")`` on the same fp32 inputs, then compares

- the outputs;
- the first-order gradients at every differentiable input (autograd through the op's
  registered backward, i.e. the triton backward kernels), with ``create_graph=True``;
- the second-order gradients: of Σ ⟨first-order grads, fixed random weights⟩ at every
  input *and* at the upstream gradient (double backward, as second-order MAML does it).

and asserts that the triton kernels really ran (a kernel that declined would make the
comparison vacuous). gradcheck/gradgradcheck need float64, which the fp32 kernels decline,
so the float64 tests check the other half of the contract: the kernels decline, the
reference runs, and gradgradcheck (fast_mode) passes through that path.

Tiers:
- CPU, in CI: under TRITON_INTERPRET=1 (tests/conftest.py switches it on without CUDA).
  The interpreter costs ~7 ms per program instance, so shapes are tiny (T ≤ 2, N ≤ 3,
  channels ≤ 4) and odd (not multiples of the 16-wide tiles); the ``small_tiles`` tests
  shrink the tiles so the multi-tile, split-K and multi-chunk paths run too.
- GPU (``@pytest.mark.gpu``): the tiny cases on CUDA, plus the W1–W4 shapes from
  fastmeta.tools.workloads. Skipped cleanly without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta import ops
from fastmeta.backends import get_backend
from fastmeta.tools.workloads import WORKLOAD_OP_SHAPES

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(
    not get_backend("triton").available()[0],
    reason=f"triton backend unavailable: {get_backend('triton').available()[1]}",
)
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")]


WORKLOADS = WORKLOAD_OP_SHAPES


def workload_cases(op: str):
    """pytest params (GPU tier) for each W1–W4 shape of ``op``."""
    for workload, table in WORKLOADS.items():
        shapes = table.get(op)
        if shapes is None:
            continue
        for i, shape in enumerate(shapes if isinstance(shapes, list) else [shapes]):
            yield pytest.param(shape, id=f"{workload}-{i}", marks=gpu_only)


@pytest.fixture(autouse=True)
def _fp32_reference():
    """The reference in true fp32 too: TF32 off in cuBLAS and cuDNN (docs/benchmarks.md)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------


@contextmanager
def kernel_log():
    """Count, per kernel name, the triton launches that ran and those that declined."""
    backend = get_backend("triton")
    backend.kernel("inner_step")  # loads the table
    original = dict(backend.kernels)
    ran, declined = Counter(), Counter()

    def counted(name, fn):
        def wrapper(*args):
            out = fn(*args)
            (declined if out is NotImplemented else ran)[name] += 1
            return out

        return wrapper

    backend.kernels.update({name: counted(name, fn) for name, fn in original.items()})
    try:
        yield ran, declined
    finally:
        backend.kernels.clear()
        backend.kernels.update(original)


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def evaluate(backend, fn, args, diff, seed=1234):
    """Outputs, first- and second-order gradients of fn(*args) on ``backend``.

    diff: indices of the args to differentiate. The upstream gradients and the weights
    of the second-order objective come from a fixed seed, so both backends see the same.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand_like(t):  # drawn in fp32 then cast: a float64 run sees the same values
        return torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)

    with fm.use_backend(backend):
        leaves = [a.detach().clone().requires_grad_(True) if i in diff else a for i, a in enumerate(args)]
        inputs = [leaves[i] for i in diff]
        outs = _as_list(fn(*leaves))
        live = [o for o in outs if o.numel() > 0 and o.requires_grad]
        upstream = [rand_like(o).requires_grad_(True) for o in live]
        first = torch.autograd.grad(live, inputs, upstream, create_graph=True, allow_unused=True)
        objective = sum((f * rand_like(f)).sum() for f in first if f is not None and f.requires_grad)
        second = [None] * (len(inputs) + len(upstream))
        if torch.is_tensor(objective):
            second = torch.autograd.grad(objective, inputs + upstream, allow_unused=True)
    detach = lambda ts: [None if t is None else t.detach() for t in ts]  # noqa: E731
    return detach(outs), detach(first), detach(second)


def assert_close(actual, expected, what, rtol):
    """max |a − e| ≤ rtol · max |e| (+ a floor for all-zero tensors): a relative error on
    the tensor's scale, robust to entries that are tiny by cancellation."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one backend gave None"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: the reference is not finite"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale + 1e-6, f"{what}: max error {error:.3g} on scale {scale:.3g} (rtol {rtol})"


def assert_as_close_as_reference(actual, reference, truth, what, rtol, factor=4.0, exclude=None):
    """Against the float64 truth: the kernel's max error is within ``rtol`` of the scale, or
    within ``factor`` times the fp32 reference's own error. For large reductions (W4's
    BatchNorm over 0.5M elements, second order through four conv+BN blocks) the fp32
    reference itself is off by more than any fixed rtol: the kernel must do as well."""
    if truth is None or actual is None:
        assert actual is None and truth is None and reference is None, f"{what}: one backend gave None"
        return
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(truth.shape)}"
    if exclude is not None and exclude.shape == truth.shape:
        keep = ~exclude
        actual, reference, truth = actual[keep], reference[keep], truth[keep]
    scale = truth.abs().max().item() if truth.numel() else 0.0
    error = (actual.double() - truth).abs().max().item() if truth.numel() else 0.0
    reference_error = (reference.double() - truth).abs().max().item() if truth.numel() else 0.0
    assert error <= max(rtol * scale, factor * reference_error) + 1e-6, (
        f"{what}: max error {error:.3g} against float64 (scale {scale:.3g}); the fp32 reference's is "
        f"{reference_error:.3g} (rtol {rtol}, factor {factor})")


def _float64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def compare_backends(fn, args, diff, kernels, rtol=2e-5, float64_truth=False, exclude=None):
    """Run fn on both backends; compare everything; check that ``kernels`` ran on triton.

    float64_truth: compare both fp32 backends with the reference in float64 instead
    (:func:`assert_as_close_as_reference`), for shapes whose fp32 rounding exceeds rtol.
    exclude: a boolean mask of elements left out of the comparison of tensors of its shape
    (with float64_truth only): the points where the function has a kink.
    """
    expected = evaluate("torch", fn, args, diff)
    with kernel_log() as (ran, declined):
        actual = evaluate("triton", fn, args, diff)
    missing = [k for k in kernels if not ran[k]]
    assert not missing, f"triton kernels did not run: {missing} (declined: {dict(declined)})"
    assert not declined, f"triton kernels declined: {dict(declined)}"
    truth = evaluate("torch", fn, _float64(args), diff) if float64_truth else None
    for j, name in enumerate(("output", "first-order grad", "second-order grad")):
        for i, (a, e) in enumerate(zip(actual[j], expected[j])):
            if truth is None:
                assert_close(a, e, f"{name} {i}", rtol)
            else:
                assert_as_close_as_reference(a, e, truth[j][i], f"{name} {i}", rtol, exclude=exclude)
    return ran


def randn(*shape, device=DEVICE):
    return torch.randn(*shape, device=device)


# ---------------------------------------------------------------------------------------
# inner_step
# ---------------------------------------------------------------------------------------


def inner_step_args(T, P, S, lr_kind, has_mask, has_precond, theta_kind, device=DEVICE):
    segments = (torch.arange(P, device=device) * S // P) if lr_kind == "segment" else None
    lr = {"scalar": torch.tensor(0.3, device=device), "segment": torch.rand(S, device=device) + 0.1,
          "param": torch.rand(P, device=device) + 0.1}[lr_kind]
    if theta_kind == "shared":
        theta = randn(P, device=device)
    elif theta_kind == "strided":  # rows of a wider buffer: task stride P + 3
        theta = randn(T, P + 3, device=device)[:, 3:]
    else:
        theta = randn(T, P, device=device)
    mask = torch.rand(P, device=device) if has_mask else None
    precond = torch.rand(P, device=device) + 0.5 if has_precond else None
    return [theta, randn(T, P, device=device), lr, mask, precond, segments]


def _inner_step_diff(args):
    return [i for i in range(5) if args[i] is not None]


@pytest.mark.parametrize("theta_kind", ["shared", "per_task", "strided"])
@pytest.mark.parametrize("has_mask,has_precond", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("lr_kind", ["scalar", "segment", "param"])
def test_inner_step(lr_kind, has_mask, has_precond, theta_kind):
    args = inner_step_args(2, 37, 3, lr_kind, has_mask, has_precond, theta_kind)
    compare_backends(ops.inner_step, args, _inner_step_diff(args), ["inner_step", "inner_step_backward"])


@pytest.mark.parametrize("shape", list(workload_cases("inner_step")))
def test_inner_step_workload(shape):
    args = inner_step_args(shape["T"], shape["P"], 9, "segment", True, True, "shared")
    compare_backends(ops.inner_step, args, _inner_step_diff(args), ["inner_step", "inner_step_backward"], rtol=1e-4)


def test_inner_step_backward_partial_needs():
    """Only some gradients wanted: the others come back empty, the wanted ones right."""
    grad_out, grad = randn(2, 37), randn(2, 37)
    lr, mask = torch.rand(37, device=DEVICE), torch.rand(37, device=DEVICE)
    for needs in ([False, False, True, False, False], [True, False, False, True, False]):
        args = (grad_out, grad, lr, mask, None, None, True, needs)
        with fm.use_backend("torch"):
            expected = ops.inner_step_backward(*args)
        with kernel_log() as (ran, _), fm.use_backend("triton"):
            actual = ops.inner_step_backward(*args)
        assert ran["inner_step_backward"] == 1
        for a, e in zip(actual, expected):
            assert_close(a, e, f"needs {needs}", 1e-6)


# ---------------------------------------------------------------------------------------
# task_linear (+ activation_grad)
# ---------------------------------------------------------------------------------------


def linear_weight(kind, T, O, I, device=DEVICE):
    if kind == "per_task":
        return randn(T, O, I, device=device)
    if kind == "shared":
        return randn(O, I, device=device)
    if kind == "expanded":  # θ.expand(T, ...): task stride 0
        return randn(O, I, device=device).expand(T, O, I)
    # A view of the flat [T, P] buffer: task stride P, offset into the row.
    return randn(T, O * I + 5, device=device)[:, 5:].view(T, O, I)


def linear_bias(kind, T, O, device=DEVICE):
    return {"none": None, "per_task": randn(T, O, device=device), "shared": randn(O, device=device)}[kind]


LINEAR_KERNELS = ["task_linear", "task_linear_input_grad", "task_linear_weight_grad"]


@pytest.mark.parametrize("bias_kind", ["none", "per_task", "shared"])
@pytest.mark.parametrize("weight_kind", ["per_task", "shared", "expanded", "buffer_view"])
def test_task_linear_layouts(weight_kind, bias_kind):
    T, N, I, O = 2, 3, 5, 7
    args = [randn(T, N, I), linear_weight(weight_kind, T, O, I), linear_bias(bias_kind, T, O), "tanh", 0.0]
    diff = [0, 1] + ([2] if args[2] is not None else [])
    compare_backends(ops.task_linear, args, diff, LINEAR_KERNELS + ["activation_grad"])


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu", "tanh", "sigmoid"])
def test_task_linear_activations(act):
    T, N, I, O = 2, 3, 5, 7
    args = [randn(T, N, I), randn(T, O, I), randn(T, O), act, 0.1]
    compare_backends(ops.task_linear, args, [0, 1, 2], LINEAR_KERNELS + ([] if act == "none" else ["activation_grad"]))


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_activation_grad(act):
    y = ops.task_linear(randn(2, 3, 5), randn(2, 7, 5), None, act, 0.2).detach()  # a real f(z)
    compare_backends(ops.activation_grad, [randn(2, 3, 7), y, act, 0.2], [0, 1], ["activation_grad"])


@pytest.mark.parametrize("shape", list(workload_cases("task_linear")))
@pytest.mark.parametrize("weight_kind", ["buffer_view", "expanded"])
def test_task_linear_workload(shape, weight_kind):
    T, N, I, O = shape["T"], shape["N"], shape["I"], shape["O"]
    args = [randn(T, N, I), linear_weight(weight_kind, T, O, I), randn(T, O), shape["act"], 0.0]
    compare_backends(ops.task_linear, args, [0, 1, 2], LINEAR_KERNELS, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# task_conv2d
# ---------------------------------------------------------------------------------------


def conv_weight(kind, T, O, C, k, device=DEVICE):
    if kind == "per_task":
        return randn(T, O, C, k, k, device=device)
    if kind == "shared":
        return randn(O, C, k, k, device=device)
    if kind == "expanded":
        return randn(O, C, k, k, device=device).expand(T, O, C, k, k)
    return randn(T, O * C * k * k + 3, device=device)[:, 3:].view(T, O, C, k, k)


CONV_KERNELS = ["task_conv2d", "task_conv2d_input_grad", "task_conv2d_weight_grad"]


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
def test_task_conv2d(weight_kind, bias_kind, stride, padding):
    T, N, C, H, W, O = 2, 2, 3, 5, 6, 4
    args = [randn(T, N, C, H, W), conv_weight(weight_kind, T, O, C, 3), linear_bias(bias_kind, T, O),
            list(stride), list(padding)]
    diff = [0, 1] + ([2] if args[2] is not None else [])
    compare_backends(ops.task_conv2d, args, diff, CONV_KERNELS)


@pytest.mark.parametrize("shape", list(workload_cases("task_conv2d")))
def test_task_conv2d_workload(shape):
    T, N, C, H, W, O = (shape[k] for k in ("T", "N", "C", "H", "W", "O"))
    s, p = shape["stride"], shape["padding"]
    args = [randn(T, N, C, H, W), conv_weight("buffer_view", T, O, C, 3), randn(T, O), [s, s], [p, p]]
    compare_backends(ops.task_conv2d, args, [0, 1, 2], CONV_KERNELS, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# task_batch_norm
# ---------------------------------------------------------------------------------------


def bn_param(kind, T, C, device=DEVICE):
    return {"none": None, "per_task": randn(T, C, device=device) + 1,
            "shared": randn(C, device=device) + 1}[kind]


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
def test_task_batch_norm(shape, gamma_kind, beta_kind, act):
    T, C = shape[0], shape[2]
    x = randn(*shape) * 2 + 3  # |μ| ≫ 0 catches one-pass variance
    args = [x, bn_param(gamma_kind, T, C), bn_param(beta_kind, T, C), 1e-5, act, 0.1]
    diff = [0] + [i for i in (1, 2) if args[i] is not None]
    kernels = ["task_batch_norm", "task_batch_norm_backward"] + ([] if act == "none" else ["activation_grad"])
    compare_backends(ops.task_batch_norm, args, diff, kernels, rtol=1e-4)


@pytest.mark.parametrize("shape", list(workload_cases("task_batch_norm")))
def test_task_batch_norm_workload(shape):
    """At W4's size (68M elements) some normalised values sit within fp32 rounding of ReLU's
    kink: there any fp32 implementation may take the other side, and its gradients at that
    element jump by O(1) (seen on an H100: 0.36 on a scale of 17.7, in the fp32 reference
    and the kernel alike). Those elements (|z| < 1e-4 in float64, ~0.01 % of them) are left
    out; everything else is judged against float64."""
    torch.manual_seed(0)
    T, N, C, H, W = (shape[k] for k in ("T", "N", "C", "H", "W"))
    args = [randn(T, N, C, H, W), bn_param("per_task", T, C), bn_param("per_task", T, C), 1e-5, shape["act"], 0.0]
    with fm.use_backend("torch"):
        z = ops.task_batch_norm(*_float64(args[:3]), 1e-5, "none", 0.0)
    kink = z.abs() < 1e-4 if shape["act"] in ("relu", "leaky_relu") else None
    del z
    compare_backends(ops.task_batch_norm, args, [0, 1, 2],
                     ["task_batch_norm", "task_batch_norm_backward", "activation_grad"], rtol=1e-3, float64_truth=True,
                     exclude=kink)


# ---------------------------------------------------------------------------------------
# task_loss
# ---------------------------------------------------------------------------------------


def loss_args(kind, T, N, K, device=DEVICE):
    pred = randn(T, N, K, device=device) * 3
    if kind == "cross_entropy":
        return [pred, torch.randint(0, K, (T, N), device=device), kind]
    return [pred, randn(T, N, K, device=device), kind]


@pytest.mark.parametrize("kind,T,N,K", [("cross_entropy", 2, 3, 5), ("cross_entropy", 1, 1, 2),
                                        ("cross_entropy", 2, 3, 17), ("mse", 2, 3, 1), ("mse", 2, 3, 5)])
def test_task_loss(kind, T, N, K):
    args = loss_args(kind, T, N, K)
    diff = [0] if kind == "cross_entropy" else [0, 1]
    compare_backends(ops.task_loss, args, diff, ["task_loss", "task_loss_grad"])


@pytest.mark.parametrize("shape", list(workload_cases("task_loss")))
def test_task_loss_workload(shape):
    args = loss_args(shape["kind"], shape["T"], shape["N"], shape["K"])
    diff = [0] if shape["kind"] == "cross_entropy" else [0, 1]
    compare_backends(ops.task_loss, args, diff, ["task_loss", "task_loss_grad"], rtol=1e-4)


def test_cross_entropy_bad_label_is_nan_not_a_number():
    """A label outside [0, K): the reference raises; the kernel must not return a plausible loss."""
    pred, target = randn(2, 3, 5), torch.tensor([[0, 7, 1], [2, 3, 4]], device=DEVICE)
    with fm.use_backend("triton"):
        loss = ops.task_loss(pred, target, "cross_entropy")
        grad = ops.task_loss_grad(pred, target, "cross_entropy")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(grad[0, 1]).all() and torch.isfinite(grad[1]).all()


# ---------------------------------------------------------------------------------------
# Multi-tile paths: tiles shrunk to 16 so that ragged edges, several tiles per task,
# split-K and multi-chunk loops all run at interpreter-sized shapes.
# ---------------------------------------------------------------------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    from fastmeta.kernels import activation, inner_step, task_batch_norm, task_conv2d, task_linear, task_loss

    gemm = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 1, "num_stages": 1}
    monkeypatch.setattr(task_linear, "matmul_config", lambda *a: gemm)
    monkeypatch.setattr(task_conv2d, "conv_config", lambda *a: gemm)
    monkeypatch.setattr(task_batch_norm, "batch_norm_config", lambda *a: {"BLOCK": 16, "num_warps": 1})
    monkeypatch.setattr(task_loss, "loss_config", lambda *a: {"BLOCK_N": 2, "BLOCK_K": 32, "num_warps": 1})
    monkeypatch.setattr(task_loss, "mse_config", lambda *a: {"BLOCK": 16, "num_warps": 1})
    monkeypatch.setattr(activation, "elementwise_config", lambda *a: {"BLOCK": 16, "num_warps": 1})
    monkeypatch.setattr(inner_step, "inner_step_config",
                        lambda *a: {"BLOCK_P": 16, "TASKS_PER_PROGRAM": 1, "num_warps": 1})
    monkeypatch.setattr(inner_step, "inner_step_backward_config", lambda *a: {"BLOCK_P": 16, "num_warps": 1})


def test_small_tiles_linear(small_tiles):
    # 37 rows × 18 outputs × 20 inputs: 3 × 2 tiles per task with ragged edges; the shared
    # weight-grad has K = 2 · 37 = 74 → 3 splits.
    args = [randn(2, 37, 20), randn(18, 20), randn(2, 18), "sigmoid", 0.0]
    compare_backends(ops.task_linear, args, [0, 1, 2], LINEAR_KERNELS + ["activation_grad"], rtol=1e-4)


def test_small_tiles_conv2d(small_tiles):
    # 18 filters over 4 channels (K = 36 → 3 K-steps), 7×7 maps, stride 2.
    args = [randn(2, 3, 4, 7, 7), randn(2, 18, 4, 3, 3), None, [2, 2], [1, 1]]
    compare_backends(ops.task_conv2d, args, [0, 1], CONV_KERNELS, rtol=1e-4)


def test_small_tiles_batch_norm_loss_inner_step(small_tiles):
    x = randn(2, 3, 2, 5, 7)  # 105 values per statistic: 7 chunks of 16
    compare_backends(ops.task_batch_norm, [x, bn_param("per_task", 2, 2), None, 1e-5, "relu", 0.0], [0, 1],
                     ["task_batch_norm", "task_batch_norm_backward", "activation_grad"], rtol=1e-4)
    compare_backends(ops.task_loss, loss_args("cross_entropy", 2, 5, 20), [0], ["task_loss", "task_loss_grad"])
    compare_backends(ops.task_loss, loss_args("mse", 2, 5, 7), [0, 1], ["task_loss", "task_loss_grad"])
    args = inner_step_args(2, 37, 3, "segment", True, True, "shared")
    compare_backends(ops.inner_step, args, _inner_step_diff(args), ["inner_step", "inner_step_backward"])


# ---------------------------------------------------------------------------------------
# Declines: float64 and unsupported inputs go to the reference, never to a wrong result
# ---------------------------------------------------------------------------------------


def _sample_kernel_args(device=DEVICE):
    """One fp32 argument tuple per kernel of the registry."""
    T, N, C, O = 2, 3, 3, 4
    x5, w5 = randn(T, N, C, 5, 5), randn(T, O, C, 3, 3)
    g5 = randn(T, N, O, 5, 5)
    return {
        "inner_step": (randn(37), randn(T, 37), torch.tensor(0.1), None, None, None),
        "inner_step_backward": (randn(T, 37), randn(T, 37), torch.tensor(0.1), None, None, None, True, [True] * 5),
        "task_linear": (randn(T, N, 5), randn(T, O, 5), randn(T, O), "relu", 0.0),
        "task_linear_input_grad": (randn(T, N, O), randn(T, O, 5)),
        "task_linear_weight_grad": (randn(T, N, O), randn(T, N, 5), False),
        "task_conv2d": (x5, w5, None, [1, 1], [1, 1]),
        "task_conv2d_input_grad": (g5, w5, [5, 5], [1, 1], [1, 1]),
        "task_conv2d_weight_grad": (g5, x5, [3, 3], [1, 1], [1, 1], False),
        "task_batch_norm": (x5, randn(T, C), randn(T, C), 1e-5, "relu", 0.0),
        "task_batch_norm_backward": (x5, x5 + 1, randn(T, C), 1e-5, [True] * 3),
        "task_loss": (randn(T, N, 5), torch.randint(0, 5, (T, N)), "cross_entropy"),
        "task_loss_grad": (randn(T, N, 5), randn(T, N, 5), "mse"),
        "activation_grad": (randn(T, N, 5), randn(T, N, 5), "tanh", 0.0),
    }


def _fix_scalar_devices(args, device):
    return tuple(a.to(device) if torch.is_tensor(a) else a for a in args)


def test_every_kernel_declines_float64():
    from fastmeta.kernels.registry import KERNELS

    samples = _sample_kernel_args()
    assert set(samples) == set(KERNELS), "a kernel without a decline test"
    for name, args in samples.items():
        args = _fix_scalar_devices(args, DEVICE)
        assert KERNELS[name](*args) is not NotImplemented, f"{name} declined its fp32 sample"
        doubled = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        assert KERNELS[name](*doubled) is NotImplemented, f"{name} accepted float64"


def test_unsupported_inputs_decline():
    from fastmeta.kernels.registry import KERNELS

    T, N = 2, 3
    pred = randn(T, N, 5)
    # MSE target that the reference would broadcast; CE with float labels; an unknown
    # activation; a bias of the wrong shape; an empty task batch; stride 0.
    cases = {
        "task_loss": (pred, randn(1, N, 5), "mse"),
        "task_loss_grad": (pred, torch.zeros(T, N, device=DEVICE), "cross_entropy"),
        "activation_grad": (pred, pred, "gelu", 0.0),
        "task_linear": (randn(T, N, 5), randn(T, 4, 5), randn(T, 3), "none", 0.0),
        "task_batch_norm": (randn(0, N, 3, 2, 2), None, None, 1e-5, "none", 0.0),
        "task_conv2d": (randn(T, N, 3, 5, 5), randn(T, 4, 3, 3, 3), None, [0, 1], [1, 1]),
    }
    for name, args in cases.items():
        assert KERNELS[name](*args) is NotImplemented, f"{name} accepted {args}"


@pytest.mark.parametrize(
    "op,args,diff",
    [
        (ops.inner_step, lambda d: [randn(5, device=d), randn(2, 5, device=d), torch.rand(5, device=d),
                                    torch.rand(5, device=d), None, None], [0, 1, 2, 3]),
        (ops.task_linear, lambda d: [randn(2, 3, 4, device=d), randn(2, 3, 4, device=d), randn(2, 3, device=d),
                                     "tanh", 0.0], [0, 1, 2]),
        (ops.task_conv2d, lambda d: [randn(2, 1, 2, 4, 4, device=d), randn(2, 2, 2, 3, 3, device=d), None,
                                     [2, 2], [1, 1]], [0, 1]),
        (ops.task_batch_norm, lambda d: [randn(2, 3, 2, 2, 2, device=d), randn(2, 2, device=d),
                                         randn(2, 2, device=d), 1e-5, "sigmoid", 0.0], [0, 1, 2]),
        (ops.task_loss, lambda d: [randn(2, 3, 4, device=d), torch.randint(0, 4, (2, 3), device=d),
                                   "cross_entropy"], [0]),
    ],
    ids=["inner_step", "task_linear", "task_conv2d", "task_batch_norm", "task_loss"],
)
def test_float64_falls_back_and_gradgradchecks(op, args, diff):
    """float64 under the triton backend: every kernel declines, the reference answers, and
    gradgradcheck (fast mode) passes through that path."""
    values = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args(DEVICE)]

    def fn(*inputs):
        full = list(values)
        for i, t in zip(diff, inputs):
            full[i] = t
        return op(*full)

    inputs = tuple(values[i].detach().requires_grad_(True) for i in diff)
    with kernel_log() as (ran, declined), fm.use_backend("triton"):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    assert not ran, f"a kernel accepted float64: {dict(ran)}"
    assert declined, "no triton kernel was asked: the test did not exercise the backend"


# ---------------------------------------------------------------------------------------
# Learners: one second-order meta-step, triton against torch
# ---------------------------------------------------------------------------------------


def _meta_gradient(backend, model_fn, tasks, lr, dtype=torch.float32):
    model = model_fn().to(dtype)
    tasks = [t.to(dtype) if t.is_floating_point() else t for t in tasks]
    with fm.use_backend(backend):
        learner = fm.MAML(model, lr=lr, first_order=False, steps=1)
        out = learner.meta_batch(*tasks)
        out.loss.backward()
    return out.loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(DEVICE)


def _conv_bn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).to(DEVICE)


def _regression_tasks(T=2, K=2):
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(T, K, 1, generator=g) * 10 - 5, torch.rand(T, K, 1, generator=g) * 10 - 5
    return [t.to(DEVICE) for t in (sx, torch.sin(sx), qx, torch.sin(qx))]


def _classification_tasks(T=2, K=1, ways=2):
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(T, ways * K, 1, 5, 5, generator=g), torch.randn(T, ways * K, 1, 5, 5, generator=g)
    y = torch.arange(ways).repeat_interleave(K).expand(T, -1).contiguous()
    return [t.to(DEVICE) for t in (sx, y, qx, y.clone())]


def _w1_mlp():
    torch.manual_seed(3)
    return fm.models.mlp((1, 40, 40, 1)).to(DEVICE)


def _conv4(variant):
    def make():
        torch.manual_seed(3)
        return fm.models.conv4(in_channels=1 if variant == "strided" else 3, ways=5, variant=variant).to(DEVICE)

    return make


def _image_tasks(T, ways, shots, queries, channels, size):
    def make():
        g = torch.Generator().manual_seed(0)
        sx = torch.randn(T, ways * shots, channels, size, size, generator=g)
        qx = torch.randn(T, ways * queries, channels, size, size, generator=g)
        sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
        qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
        return [t.to(DEVICE) for t in (sx, sy, qx, qy)]

    return make


MLP_KERNELS = ["task_linear", "task_linear_weight_grad", "task_loss", "inner_step"]
CONV_BN_KERNELS = ["task_conv2d", "task_conv2d_weight_grad", "task_batch_norm", "task_batch_norm_backward", "inner_step"]


@pytest.mark.parametrize("model_fn,tasks_fn,lr,kernels", [
    pytest.param(_mlp, _regression_tasks, 0.1, MLP_KERNELS, id="mlp"),
    pytest.param(_conv_bn, _classification_tasks, 0.4, CONV_BN_KERNELS, id="conv_bn"),
    # GPU tier: the full meta-gradient at the workloads' sizes (docs/benchmarks.md).
    pytest.param(_w1_mlp, lambda: _regression_tasks(T=25, K=10), 0.01, MLP_KERNELS, id="W1", marks=gpu_only),
    pytest.param(_conv4("strided"), _image_tasks(32, 5, 1, 1, 1, 28), 0.4, CONV_BN_KERNELS,
                 id="W2", marks=gpu_only),
    pytest.param(_conv4("pool"), _image_tasks(4, 5, 1, 15, 3, 84), 0.01, CONV_BN_KERNELS,
                 id="W4", marks=gpu_only),
])
def test_maml_second_order_step(model_fn, tasks_fn, lr, kernels):
    tasks = tasks_fn()
    expected_loss, expected = _meta_gradient("torch", model_fn, tasks, lr)
    with kernel_log() as (ran, declined):
        actual_loss, actual = _meta_gradient("triton", model_fn, tasks, lr)
    assert not [k for k in kernels if not ran[k]], f"kernels that did not run: {kernels} vs {dict(ran)}"
    assert not declined, dict(declined)
    assert_close(actual_loss, expected_loss, "query loss", 1e-5)
    # Second order through up to four conv+BN blocks: fp32 rounding grows with the reduction
    # sizes (and MaxPool ties flip), so at full size both fp32 backends are judged against
    # the float64 meta-gradient: triton must be as close to it as the fp32 reference is.
    if DEVICE == "cpu":
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"meta-gradient of parameter {i}", 1e-4)
        return
    _, truth = _meta_gradient("torch", model_fn, tasks, lr, torch.float64)
    for i, (a, e, t) in enumerate(zip(actual, expected, truth)):
        assert_as_close_as_reference(a, e, t, f"meta-gradient of parameter {i}", 1e-3)
