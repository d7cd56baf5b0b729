"""``task_loss``, ``task_loss_grad`` and ``task_loss_grad_backward`` (fastmeta/ops/task_loss.py) on every backend."""

from __future__ import annotations

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.task_loss import reference_task_loss, reference_task_loss_grad, reference_task_loss_grad_backward
from harness import backend_params, check_kernel, check_op, require, to, workload_params

KERNELS = ["task_loss", "task_loss_grad", "task_loss_grad_backward"]
ALL = backend_params("triton", "cpu", "cuda")


def loss_args(kind, T, N, K, device):
    pred = torch.randn(T, N, K, device=device) * 3
    if kind == "cross_entropy":
        return [pred, torch.randint(0, K, (T, N), device=device), kind]
    return [pred, torch.randn(T, N, K, device=device), kind]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("kind,T,N,K", [("cross_entropy", 2, 3, 5), ("cross_entropy", 1, 1, 2),
                                        ("cross_entropy", 2, 3, 17), ("mse", 2, 3, 1), ("mse", 2, 3, 5)])
def test_task_loss(backend, device, kind, T, N, K):
    args = loss_args(kind, T, N, K, device)
    check_op(backend, ops.task_loss, args, [0] if kind == "cross_entropy" else [0, 1], KERNELS)


@pytest.mark.parametrize("backend,device", backend_params("triton", "cuda"))
@pytest.mark.parametrize("shape", list(workload_params("task_loss")))
def test_task_loss_workload(backend, device, shape):
    args = loss_args(shape["kind"], shape["T"], shape["N"], shape["K"], device)
    check_op(backend, ops.task_loss, args, [0] if shape["kind"] == "cross_entropy" else [0, 1], KERNELS, rtol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_cross_entropy_bad_label_is_nan_not_a_number(backend, device):
    """A label outside [0, K): the reference raises; the kernel must not return a plausible loss."""
    pred, target = torch.randn(2, 3, 5, device=device), torch.tensor([[0, 7, 1], [2, 3, 4]], device=device)
    with fm.use_backend(backend):
        loss = ops.task_loss(pred, target, "cross_entropy")
        grad = ops.task_loss_grad(pred, target, "cross_entropy")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(grad[0, 1]).all() and torch.isfinite(grad[1]).all()


@pytest.fixture
def small_tiles(monkeypatch):
    from fastmeta.kernels import task_loss

    monkeypatch.setattr(task_loss, "loss_config", lambda *a: {"BLOCK_N": 2, "BLOCK_K": 32, "num_warps": 1})
    monkeypatch.setattr(task_loss, "mse_config", lambda *a: {"BLOCK": 16, "num_warps": 1})


@pytest.mark.parametrize("backend,device", backend_params("triton"))
def test_small_tiles(backend, device, small_tiles):
    check_op(backend, ops.task_loss, loss_args("cross_entropy", 2, 5, 20, device), [0], KERNELS)
    check_op(backend, ops.task_loss, loss_args("mse", 2, 5, 7, device), [0, 1], KERNELS)


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu"))
def test_targets_the_kernels_do_not_take_are_declined(backend, device):
    from fastmeta.backends import get_backend

    require(backend)
    pred = torch.randn(2, 3, 5, device=device)
    loss, grad = get_backend(backend).kernel("task_loss"), get_backend(backend).kernel("task_loss_grad")
    assert loss(pred, torch.randn(1, 3, 5, device=device), "mse") is NotImplemented  # would broadcast
    assert grad(pred, torch.zeros(2, 3, device=device), "cross_entropy") is NotImplemented  # float labels


def kernel_cases():
    T, N = 3, 7
    t = torch.randn
    return [
        ("ce", "task_loss", reference_task_loss, (t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy")),
        ("mse", "task_loss", reference_task_loss, (t(T, N, 3), t(T, N, 3), "mse")),
        ("mse-4d", "task_loss", reference_task_loss, (t(T, N, 2, 3), t(T, N, 2, 3), "mse")),
        ("grad-ce", "task_loss_grad", reference_task_loss_grad,
         (t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy")),
        ("grad-mse", "task_loss_grad", reference_task_loss_grad, (t(T, N, 3), t(T, N, 3), "mse")),
        # The per-task scale (task_loss's upstream, handed over by its backward): a [T], and
        # an expanded scalar (task stride 0, as sum's backward hands it).
        ("grad-ce-scaled", "task_loss_grad", reference_task_loss_grad,
         (t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy", t(T))),
        ("grad-ce-scaled-expanded", "task_loss_grad", reference_task_loss_grad,
         (t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy", torch.full((), 0.25).expand(T))),
        ("grad-mse-scaled", "task_loss_grad", reference_task_loss_grad, (t(T, N, 3), t(T, N, 3), "mse", t(T))),
        ("grad-mse-4d-scaled-expanded", "task_loss_grad", reference_task_loss_grad,
         (t(T, N, 2, 3), t(T, N, 2, 3), "mse", torch.full((), -2.0).expand(T))),
        ("grad-backward-ce", "task_loss_grad_backward", reference_task_loss_grad_backward,
         (t(T, N, 5), t(T, N, 5) * 10, torch.randint(0, 5, (T, N)), "cross_entropy")),
        ("grad-backward-ce-wide", "task_loss_grad_backward", reference_task_loss_grad_backward,
         (t(T, N, 37), t(T, N, 37), torch.randint(0, 37, (T, N)), "cross_entropy")),
        ("grad-backward-mse", "task_loss_grad_backward", reference_task_loss_grad_backward,
         (t(T, N, 3), t(T, N, 3), t(T, N, 3), "mse")),
        ("grad-backward-mse-4d", "task_loss_grad_backward", reference_task_loss_grad_backward,
         (t(T, N, 2, 3), t(T, N, 2, 3), t(T, N, 2, 3), "mse")),
    ]


CASES = kernel_cases()


@pytest.mark.parametrize("backend,device", backend_params("cpu", "cuda"))
@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference_float32(backend, device, name, kernel, reference, args):
    check_kernel(backend, kernel, reference, to(args, device), rtol=2e-5)


@pytest.mark.parametrize("name,kernel,reference,args", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_equals_reference_float64(name, kernel, reference, args):
    check_kernel("cpu", kernel, reference, to(args, "cpu", torch.float64), rtol=1e-10, atol=1e-11)


def r(*shape):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(True)


GRAD_CASES = [
    ("ce", ops.task_loss, lambda: (r(2, 4, 5), torch.randint(0, 5, (2, 4)), "cross_entropy")),
    ("mse", ops.task_loss, lambda: (r(2, 4, 2), r(2, 4, 2), "mse")),
    ("grad-ce", ops.task_loss_grad, lambda: (r(2, 4, 5), torch.randint(0, 5, (2, 4)), "cross_entropy")),
    ("grad-mse", ops.task_loss_grad, lambda: (r(2, 4, 2), r(2, 4, 2), "mse")),
    ("grad-ce-scaled", ops.task_loss_grad, lambda: (r(2, 4, 5), torch.randint(0, 5, (2, 4)), "cross_entropy", r(2))),
    ("grad-mse-scaled", ops.task_loss_grad, lambda: (r(2, 4, 2), r(2, 4, 2), "mse", r(2))),
    ("grad-backward-ce", ops.task_loss_grad_backward,
     lambda: (r(2, 4, 5), r(2, 4, 5), torch.randint(0, 5, (2, 4)), "cross_entropy")),
    ("grad-backward-mse", ops.task_loss_grad_backward, lambda: (r(2, 4, 2), r(2, 4, 2), r(2, 4, 2), "mse")),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_and_gradgradcheck(gradchecks, backend, name, op, make):
    gradchecks(op, make(), backend=backend)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("kind,K", [("cross_entropy", 5), ("cross_entropy", 20), ("mse", 7)])
def test_triton_grad_backward_equals_reference(backend, device, kind, K):
    """The Triton VJP kernels (tiny shapes: TRITON_INTERPRET=1 on the CPU), with the
    full-tile and the small-tile configurations."""
    from fastmeta.kernels import task_loss as kernels

    args = to((torch.randn(2, 5, K), torch.randn(2, 5, K) * 3,
               torch.randint(0, K, (2, 5)) if kind == "cross_entropy" else torch.randn(2, 5, K), kind), device)
    check_kernel(backend, "task_loss_grad_backward", reference_task_loss_grad_backward, args, rtol=2e-5)
    small = {"loss_config": lambda *a: {"BLOCK_N": 2, "BLOCK_K": 32, "num_warps": 1},
             "mse_config": lambda *a: {"BLOCK": 16, "num_warps": 1}}
    with pytest.MonkeyPatch.context() as patch:
        for name, config in small.items():
            patch.setattr(kernels, name, config)
        check_kernel(backend, "task_loss_grad_backward", reference_task_loss_grad_backward, args, rtol=2e-5)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
@pytest.mark.parametrize("wants", [(True, False), (False, True), (True, True)], ids=["pred", "target", "both"])
def test_second_order_loss_gradients_equal_autograd_of_the_reference(kind, wants):
    """d/d(pred, target) of <u, task_loss_grad> through the op (task_loss_grad_backward,
    MSE's target as its negative) equals autograd through the reference, for each subset
    of inputs asking for a gradient."""
    pred = torch.randn(2, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 4)) if kind == "cross_entropy" else torch.randn(2, 4, 5, dtype=torch.float64)
    wants = wants if kind == "mse" else (True, False)
    u = torch.randn(2, 4, 5, dtype=torch.float64)
    results = []
    for fn in (ops.task_loss_grad, reference_task_loss_grad):
        p = pred.clone().requires_grad_(wants[0])
        t = target.clone().requires_grad_(wants[1]) if wants[1] else target
        inputs = [x for x, w in zip((p, t), wants) if w]
        results.append(torch.autograd.grad((fn(p, t, kind) * u).sum(), inputs))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_triton_scaled_grad_equals_reference(backend, device, kind):
    """task_loss_grad's per-task scale in the Triton kernels: a [T], an expanded scalar
    (stride 0), and a strided view (copied by the op layer)."""
    T, N, K = 3, 5, 7
    pred = torch.randn(T, N, K) * 3
    target = torch.randint(0, K, (T, N)) if kind == "cross_entropy" else torch.randn(T, N, K)
    for scale in (torch.randn(T), torch.full((), 0.5).expand(T), torch.randn(T, 2)[:, 1]):
        args = to((pred, target, kind, scale), device)
        check_kernel(backend, "task_loss_grad", reference_task_loss_grad,
                     (*args[:3], args[3] if args[3].stride(0) in (0, 1) else args[3].contiguous()), rtol=2e-5)
        with fm.use_backend(backend):
            got = ops.task_loss_grad(*args)
        torch.testing.assert_close(got, reference_task_loss_grad(*args), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_loss_backward_hands_its_upstream_to_the_gradient_kernel(backend, kind):
    """task_loss's backward is task_loss_grad with the upstream as its scale: the gradients
    equal the reference's autograd for a per-task upstream, the mean's and the sum's (an
    expanded scalar), with no multiply after the kernel (no aten::mul in the backward)."""
    from torch.profiler import ProfilerActivity, profile

    require(backend)
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    target = torch.randint(0, 5, (3, 4)) if kind == "cross_entropy" else torch.randn(3, 4, 5, dtype=torch.float64)
    weights = torch.randn(3, dtype=torch.float64)
    for weighted, reduce in ((True, lambda l: (l * weights).sum()), (False, lambda l: l.mean()),
                             (False, lambda l: l.sum())):
        p = pred.clone().requires_grad_(True)
        with fm.use_backend(backend):
            loss = reduce(ops.task_loss(p, target, kind))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                (got,) = torch.autograd.grad(loss, p)
        q = pred.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(reduce(reference_task_loss(q, target, kind)), q)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        names = [e.name for e in prof.events()]
        assert sum(n == "fastmeta::task_loss_grad" for n in names) == 1
        if backend == "cpu" and not weighted:  # (the reference multiplies; so does the weighted sum's backward)
            assert "aten::mul" not in names, names


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_scaled_loss_gradient_differentiates_to_autograd_of_the_reference(kind):
    """d/d(pred, scale) of <u, task_loss_grad(pred, target, kind, scale)> (the Python node:
    the unscaled VJP of u · scale, and Σ u · g per task for the scale) equals autograd
    through the reference."""
    torch.manual_seed(1)
    pred = torch.randn(2, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 4)) if kind == "cross_entropy" else torch.randn(2, 4, 5, dtype=torch.float64)
    scale, u = torch.randn(2, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    results = []
    for fn in (ops.task_loss_grad, reference_task_loss_grad):
        p, s = pred.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        results.append(torch.autograd.grad((fn(p, target, kind, s) * u).sum(), (p, s)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# task_accuracy: argmax, compare and mean over the rows in one kernel
# ---------------------------------------------------------------------------------------


def accuracy_cases():
    """Random logits; exact ties (the first largest wins); NaN rows (the first NaN wins, as
    torch.argmax); rows of -inf; labels outside [0, K) (never a hit); one class; W2's shape."""
    g = torch.Generator().manual_seed(0)
    cases = {}
    for T, N, K in ((2, 3, 5), (3, 7, 17), (1, 1, 1), (32, 5, 5), (4, 75, 5)):
        pred = torch.randn(T, N, K, generator=g)
        cases[f"random-{T}x{N}x{K}"] = (pred, torch.randint(0, K, (T, N), generator=g))
    ties = torch.randint(0, 3, (4, 9, 6), generator=g).float()  # many equal maxima per row
    cases["ties"] = (ties, ties.argmax(-1).roll(1, 1))
    special = torch.randn(3, 6, 5, generator=g)
    special[0, 1, 3] = float("nan")
    special[0, 2, 1] = special[0, 2, 4] = float("nan")
    special[1, 0] = float("-inf")
    special[1, 3, 2] = float("inf")
    special[2, 4, 0] = float("inf")
    special[2, 4, 2] = float("nan")
    cases["nan-inf"] = (special, special.argmax(-1))
    labels = torch.randint(0, 5, (3, 6), generator=g)
    labels[0, 0], labels[1, 1], labels[2, 2] = -1, 5, 99
    cases["labels-out-of-range"] = (torch.randn(3, 6, 5, generator=g), labels)
    return cases


ACCURACY_CASES = accuracy_cases()


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("name", list(ACCURACY_CASES))
def test_task_accuracy_kernel_equals_reference(backend, device, name):
    from fastmeta.ops.task_loss import reference_task_accuracy

    pred, target = ACCURACY_CASES[name]
    args = [pred.to(device), target.to(device)]
    # exact: a count of hits divided by N
    check_kernel(backend, "task_accuracy", reference_task_accuracy, args, rtol=0, atol=0)


def test_task_accuracy_cpu_kernel_float64():
    from fastmeta.ops.task_loss import reference_task_accuracy

    for name, (pred, target) in ACCURACY_CASES.items():
        check_kernel("cpu", "task_accuracy", reference_task_accuracy, [pred.double(), target], rtol=0, atol=0)


def test_task_accuracy_is_not_differentiable_and_refuses_bad_arguments():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randint(0, 4, (2, 3))
    for backend in ("torch", "cpu"):
        with fm.use_backend(backend):
            out = ops.task_accuracy(pred, target)
            assert not out.requires_grad and out.grad_fn is None
            torch.testing.assert_close(out, (pred.argmax(-1) == target).float().mean(1))
    with pytest.raises(ValueError, match="task_accuracy: pred must be"):
        ops.task_accuracy(torch.randn(2, 3), target)
    with pytest.raises(ValueError, match="task_accuracy: target must be integer class indices"):
        ops.task_accuracy(pred, target.float())
    with pytest.raises(ValueError, match="task_accuracy: target must be integer class indices"):
        ops.task_accuracy(pred, target[:, :2])
    # int32 labels: the reference (the kernels take int64)
    torch.testing.assert_close(ops.task_accuracy(pred, target.int()), ops.task_accuracy(pred, target))


# ---------------------------------------------------------------------------------------
# task_loss_and_accuracy: the query's loss and accuracy in one pass
# ---------------------------------------------------------------------------------------

# The accuracy cases whose loss the reference computes (its labels in range; NaN and ±inf
# logits give a NaN or infinite loss, which the kernels must give too).
LOSS_AND_ACCURACY_CASES = {k: v for k, v in ACCURACY_CASES.items() if k != "labels-out-of-range"}


def _same(got, want, rtol):
    """Equal where the reference is not finite (NaN where NaN, the same infinity), within
    rtol of its largest finite value elsewhere."""
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (got, want)
    finite = torch.isfinite(want)
    assert torch.equal(got[want.isinf()], want[want.isinf()])
    if finite.any():
        torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=rtol * want[finite].abs().max())


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("name", list(LOSS_AND_ACCURACY_CASES))
def test_task_loss_and_accuracy_kernel_equals_the_two_ops(backend, device, name):
    """One kernel: the losses as task_loss's kernel gives them, the accuracies exactly."""
    from fastmeta.backends import get_backend
    from fastmeta.ops.task_loss import reference_task_accuracy

    require(backend)
    pred, target = (t.to(device) for t in LOSS_AND_ACCURACY_CASES[name])
    backend_kernels = get_backend(backend)
    out = backend_kernels.kernel("task_loss_and_accuracy")(pred, target)
    assert out is not NotImplemented
    loss, accuracy = out
    assert torch.equal(accuracy, reference_task_accuracy(pred, target))
    _same(loss, reference_task_loss(pred, target, "cross_entropy"), 1e-5)
    alone = backend_kernels.kernel("task_loss")(pred, target, "cross_entropy")
    _same(loss, alone, 0)  # the same sums in the same order as the loss's own kernel


@pytest.mark.parametrize("name", list(LOSS_AND_ACCURACY_CASES))
def test_task_loss_and_accuracy_cpu_kernel_float64(name):
    from fastmeta.ops.task_loss import reference_task_accuracy

    require("cpu")
    pred, target = LOSS_AND_ACCURACY_CASES[name]
    loss, accuracy = torch.ops.fastmeta_ext.task_loss_and_accuracy(pred.double(), target)
    assert torch.equal(accuracy, reference_task_accuracy(pred.double(), target))
    _same(loss, reference_task_loss(pred.double(), target, "cross_entropy"), 1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_task_loss_and_accuracy_differentiates_as_the_loss(gradchecks, backend):
    """The losses' gradient is task_loss's (gradcheck and gradgradcheck in float64); the
    accuracy has none; both equal the two ops' outputs."""
    require(backend)
    torch.manual_seed(2)
    pred = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (3, 4))
    with fm.use_backend(backend):
        loss, accuracy = ops.task_loss_and_accuracy(pred, target)
        assert loss.requires_grad and not accuracy.requires_grad and accuracy.grad_fn is None
        torch.testing.assert_close(loss, ops.task_loss(pred, target, "cross_entropy"), rtol=0, atol=0)
        torch.testing.assert_close(accuracy, ops.task_accuracy(pred, target), rtol=0, atol=0)
        weights = torch.randn(3, dtype=torch.float64)
        (got,) = torch.autograd.grad((loss * weights).sum(), pred)
    (want,) = torch.autograd.grad((reference_task_loss(pred, target, "cross_entropy") * weights).sum(), pred)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    gradchecks(ops.task_loss_and_accuracy, (pred.detach().requires_grad_(True), target), backend=backend)


def test_task_loss_and_accuracy_refuses_bad_arguments():
    pred, target = torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3))
    with pytest.raises(ValueError, match="task_loss_and_accuracy: pred must be"):
        ops.task_loss_and_accuracy(torch.randn(2, 3), target)
    with pytest.raises(ValueError, match="task_loss_and_accuracy: target must be int64 class indices"):
        ops.task_loss_and_accuracy(pred, target.int())
    with pytest.raises(ValueError, match="task_loss_and_accuracy: target must be int64 class indices"):
        ops.task_loss_and_accuracy(pred, target[:, :2])


# ---------------------------------------------------------------------------------------
# task_loss_and_grad: an inner step's checked losses and their gradient in one pass
# ---------------------------------------------------------------------------------------


def loss_and_grad_cases():
    g = torch.Generator().manual_seed(4)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "ce": (t(3, 7, 5) * 10, torch.randint(0, 5, (3, 7), generator=g), "cross_entropy"),
        "ce-wide": (t(2, 4, 37), torch.randint(0, 37, (2, 4), generator=g), "cross_entropy"),
        "ce-one-class": (t(2, 3, 1), torch.zeros(2, 3, dtype=torch.int64), "cross_entropy"),
        "ce-many-rows": (t(2, 300, 3), torch.randint(0, 3, (2, 300), generator=g), "cross_entropy"),
        "mse": (t(3, 7, 3), t(3, 7, 3), "mse"),
        "mse-4d": (t(3, 7, 2, 3), t(3, 7, 2, 3), "mse"),
    }


LOSS_AND_GRAD_CASES = loss_and_grad_cases()


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("name", list(LOSS_AND_GRAD_CASES))
def test_task_loss_and_grad_kernel_equals_the_two_ops(backend, device, name):
    """One kernel: the losses and the gradient as the two ops' kernels give them, bit for
    bit (the same sums in the same order), and within rounding of the reference."""
    from fastmeta.backends import get_backend

    require(backend)
    pred, target, kind = to(LOSS_AND_GRAD_CASES[name], device)
    kernels = get_backend(backend)
    out = kernels.kernel("task_loss_and_grad")(pred, target, kind)
    assert out is not NotImplemented
    loss, grad = out
    torch.testing.assert_close(loss, kernels.kernel("task_loss")(pred, target, kind), rtol=0, atol=0)
    torch.testing.assert_close(grad, kernels.kernel("task_loss_grad")(pred, target, kind), rtol=0, atol=0)
    torch.testing.assert_close(loss, reference_task_loss(pred, target, kind), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, reference_task_loss_grad(pred, target, kind), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSS_AND_GRAD_CASES))
def test_task_loss_and_grad_cpu_kernel_float64(name):
    require("cpu")
    pred, target, kind = to(LOSS_AND_GRAD_CASES[name], "cpu", torch.float64)
    loss, grad = torch.ops.fastmeta_ext.task_loss_and_grad(pred, target, kind)
    torch.testing.assert_close(loss, reference_task_loss(pred, target, kind), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, reference_task_loss_grad(pred, target, kind), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_task_loss_and_grad_differentiates_as_the_gradient(gradchecks, backend, kind):
    """The losses carry no graph; the gradient differentiates as task_loss_grad's (its
    backward task_loss_grad_backward; MSE's target its negative): equal to autograd of the
    reference, and gradcheck / gradgradcheck in float64."""
    require(backend)
    torch.manual_seed(3)
    pred = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    target = (torch.randint(0, 5, (2, 4)) if kind == "cross_entropy"
              else torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True))
    u = torch.randn(2, 4, 5, dtype=torch.float64)
    inputs = (pred,) if kind == "cross_entropy" else (pred, target)
    with fm.use_backend(backend):
        loss, grad = ops.task_loss_and_grad(pred, target, kind)
        assert not loss.requires_grad and loss.grad_fn is None and grad.requires_grad
        torch.testing.assert_close(loss, ops.task_loss(pred, target, kind).detach(), rtol=0, atol=0)
        got = torch.autograd.grad((grad * u).sum(), inputs)
    want = torch.autograd.grad((reference_task_loss_grad(pred, target, kind) * u).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    gradchecks(ops.task_loss_and_grad, (pred.detach().requires_grad_(True),
                                        target if kind == "cross_entropy" else target.detach().requires_grad_(True),
                                        kind), backend=backend)
