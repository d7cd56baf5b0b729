"""The per-op tests' harness: every backend's kernels against the op's reference.

Each module in tests/ops/ tests one op family (fastmeta/ops/<family>.py) on every backend
that implements it, with the same cases:

- :func:`check_kernel`: a backend's kernel called directly (a decline would compare the
  reference with itself, so it fails) against the reference on the same inputs;
- :func:`check_op`: the public op on a backend against the reference backend: outputs,
  first-order gradients (through the registered backward, i.e. the backend's backward
  kernels, with ``create_graph=True``) and second-order gradients (of Σ ⟨first-order
  grads, fixed random weights⟩ at every input and at the upstream gradient, as
  second-order MAML does it), and that the named kernels really ran;
- the gradcheck helper (``gradchecks`` fixture, tests/conftest.py): opcheck, gradcheck
  and gradgradcheck in float64.

Backends are parameters: :func:`backend_params` gives (backend, device) pairs, marked so
that a pair that cannot run here skips cleanly (triton on the CPU needs the interpreter,
cuda a GPU; the GPU ones are marked ``gpu``).
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

import fastmeta as fm
from fastmeta.backends import get_backend, invalidate_kernel_choices
from fastmeta.ops.registration import PUBLIC_OPS

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Triton runs where the tests run: compiled on a GPU, interpreted on the CPU otherwise.
TRITON_DEVICE = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"


def _backend_available(name: str) -> tuple[bool, str]:
    return get_backend(name).available()


def backend_params(*names: str):
    """pytest params (backend, device) for the named backends, each skipped where it cannot run."""
    params = []
    for name in names:
        if name == "triton":
            marks = [pytest.mark.skipif(not _backend_available("triton")[0],
                                        reason=f"triton: {_backend_available('triton')[1]}")]
            if TRITON_DEVICE == "cuda":
                marks.append(pytest.mark.gpu)
            params.append(pytest.param("triton", TRITON_DEVICE, id="triton", marks=marks))
        elif name == "cpu":
            params.append(pytest.param("cpu", "cpu", id="cpu"))
        elif name == "cuda":
            params.append(pytest.param("cuda", "cuda", id="cuda", marks=[
                pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]))
        else:
            raise ValueError(name)
    return params


def require(backend: str):
    """Inside a test: the backend must be available (the cpu/cuda extension builds)."""
    ok, reason = get_backend(backend).available()
    if not ok:
        if backend in ("cpu", "cuda"):
            pytest.fail(f"the {backend} backend is unavailable: {reason}")
        pytest.skip(reason)


def to(args, device, dtype=None):
    """The arguments on ``device`` (floats in ``dtype`` if given); everything else unchanged."""
    def move(a):
        if not isinstance(a, torch.Tensor):
            return a
        if dtype is not None and a.is_floating_point():
            a = a.to(dtype)
        return a.to(device)

    return [move(a) for a in args]


@contextmanager
def kernel_log(backend_name: str):
    """Count, per kernel name, the launches of ``backend_name`` that ran and that declined."""
    backend = get_backend(backend_name)
    backend.kernel("inner_step")  # loads the backend's table
    original = dict(backend.kernels)
    ran, declined = Counter(), Counter()

    def counted(name, fn):
        def wrapper(*args):
            out = fn(*args)
            (declined if out is NotImplemented else ran)[name] += 1
            return out

        return wrapper

    backend.kernels.update({name: counted(name, fn) for name, fn in original.items()})
    invalidate_kernel_choices()  # the ops cache their kernel: ask again, for the counted ones
    try:
        yield ran, declined
    finally:
        backend.kernels.clear()
        backend.kernels.update(original)
        invalidate_kernel_choices()


def direct(backend_name: str, kernel: str, *args):
    """A backend's kernel called itself: it must take the inputs."""
    require(backend_name)
    fn = get_backend(backend_name).kernel(kernel)
    assert fn is not None, f"the {backend_name} backend has no {kernel} kernel"
    out = fn(*args)
    assert out is not NotImplemented, f"{backend_name} kernel {kernel} declined inputs it should run"
    return out


def assert_fresh(outputs, inputs):
    """Kernel outputs alias neither the inputs nor each other (the custom-op contract)."""
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel() > 0]
    assert len(ptrs) == len(set(ptrs)), "outputs alias each other"
    ins = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel() > 0}
    assert not ins.intersection(ptrs), "an output aliases an input"


def _listed(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check_kernel(backend: str, kernel: str, reference, args, rtol: float, atol: float | None = None,
                 multilinear: bool = False):
    """The backend's kernel on ``args`` equals ``reference`` on them (same dtype, same
    shapes), elementwise within rtol/atol; outputs are fresh.

    multilinear: the kernel is a sum of products of its tensor arguments (a GEMM-like
    backward, addends included). Each element is then held to ``rtol`` times its own
    magnitude bound, the reference on the arguments' absolute values (Σ|a||b| of the
    products it sums, the scale of its rounding error): an element where large products
    cancel gets the tolerance of its products, not of the small difference left (an
    elementwise rtol/atol there fails on summation order alone), and every other element
    is held as tightly as rtol says."""
    got = _listed(direct(backend, kernel, *args))
    want = _listed(reference(*args))
    assert_fresh(got, args)
    assert len(got) == len(want)
    scales = _listed(reference(*[a.abs() if isinstance(a, torch.Tensor) else a for a in args])) if multilinear else None
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if scales is None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol if atol is None else atol)
            continue
        excess = (g - w).abs() - rtol * scales[i] - (0.0 if atol is None else atol)
        assert excess.numel() == 0 or excess.max() <= 0, (
            f"output {i}: {(excess > 0).sum().item()} elements over rtol {rtol} of their magnitude bound; "
            f"largest error {(g - w).abs().max().item():.3g}")


def evaluate(backend: str, fn, args, diff, seed: int = 1234):
    """Outputs, first- and second-order gradients of fn(*args) on ``backend``.

    diff: indices of the args to differentiate. The upstream gradients and the weights
    of the second-order objective come from a fixed seed, so every backend sees the same.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand_like(t):  # drawn in fp32 then cast: a float64 run sees the same values
        return torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)

    with fm.use_backend(backend):
        leaves = [a.detach().clone().requires_grad_(True) if i in diff else a for i, a in enumerate(args)]
        inputs = [leaves[i] for i in diff]
        outs = _listed(fn(*leaves))
        live = [o for o in outs if o.numel() > 0 and o.requires_grad]
        upstream = [rand_like(o).requires_grad_(True) for o in live]
        first = torch.autograd.grad(live, inputs, upstream, create_graph=True, allow_unused=True)
        objective = sum((f * rand_like(f)).sum() for f in first if f is not None and f.requires_grad)
        second = [None] * (len(inputs) + len(upstream))
        if torch.is_tensor(objective):
            second = torch.autograd.grad(objective, inputs + upstream, allow_unused=True)
    detach = lambda ts: [None if t is None else t.detach() for t in ts]  # noqa: E731
    return detach(outs), detach(first), detach(second)


def assert_close(actual, expected, what: str, rtol: float):
    """max |a − e| ≤ rtol · max |e| (+ a floor for all-zero tensors): a relative error on
    the tensor's scale, robust to entries that are tiny by cancellation."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one backend gave None"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: the reference is not finite"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
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


def float64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check_op(backend: str, fn, args, diff, kernels, rtol: float = 2e-5, float64_truth: bool = False, exclude=None):
    """The public op on ``backend`` against the reference backend: outputs, first and second
    order; ``kernels`` must have run on the backend, and none declined.

    float64_truth: judge both fp32 runs against the reference in float64 instead
    (:func:`assert_as_close_as_reference`), for shapes whose fp32 rounding exceeds rtol.
    exclude: a boolean mask of elements left out (with float64_truth only): the points
    where the function has a kink.
    """
    require(backend)
    expected = evaluate("torch", fn, args, diff)
    with kernel_log(backend) as (ran, declined):
        actual = evaluate(backend, fn, args, diff)
    missing = [k for k in kernels if not ran[k]]
    assert not missing, f"{backend} kernels did not run: {missing} (declined: {dict(declined)})"
    assert not declined, f"{backend} kernels declined: {dict(declined)}"
    truth = evaluate("torch", fn, float64(args), diff) if float64_truth else None
    runs = [("", actual)]
    if any(getattr(PUBLIC_OPS.get(k), "_native_node", None) is not None for k in kernels):
        # An op with a C++ node: kernel_log's counting wrappers send it to the Python node
        # (the C++ node calls the kernels itself), so run it again as a user would.
        runs.append((" (C++ node)", evaluate(backend, fn, args, diff)))
    for label, result in runs:
        for j, name in enumerate(("output", "first-order grad", "second-order grad")):
            for i, (a, e) in enumerate(zip(result[j], expected[j])):
                what = f"{name} {i}{label}"
                if truth is None:
                    assert_close(a, e, what, rtol)
                else:
                    assert_as_close_as_reference(a, e, truth[j][i], what, rtol, exclude=exclude)
    return ran


def workload_params(op: str):
    """pytest params for each W1–W4 shape of ``op`` (fastmeta.tools.workloads), GPU only."""
    from fastmeta.tools.workloads import WORKLOAD_OP_SHAPES

    for workload, table in WORKLOAD_OP_SHAPES.items():
        shapes = table.get(op)
        if shapes is None:
            continue
        for i, shape in enumerate(shapes if isinstance(shapes, list) else [shapes]):
            yield pytest.param(shape, id=f"{workload}-{i}", marks=[
                pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")])
