"""``task_batch_norm_max_pool2d`` and its backward ops
(fastmeta/ops/task_batch_norm_max_pool2d.py): the Triton kernels against the reference, the
fused kernels against the BatchNorm and max-pooling kernels they replace (bit for bit), the
op's autograd against the two ops', and the traced program's fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.task_batch_norm_max_pool2d import (
    reference_task_batch_norm_max_pool2d,
    reference_task_batch_norm_max_pool2d_backward,
    reference_task_batch_norm_max_pool2d_double_backward,
)
from harness import assert_as_close_as_reference, backend_params, check_kernel, check_op, direct, float64, workload_params

KERNELS = ["task_batch_norm_max_pool2d", "task_batch_norm_max_pool2d_backward",
           "task_batch_norm_max_pool2d_double_backward"]
TRITON = backend_params("triton")
ALL = backend_params("triton", "cpu")


def bn_param(kind, T, C):
    return {"none": None, "per_task": torch.randn(T, C) + 1, "shared": torch.randn(C) + 1}[kind]


def block(shape, gamma_kind="per_task", beta_kind="shared", seed=0):
    torch.manual_seed(seed)
    T, C = shape[0], shape[2]
    x = torch.randn(*shape) * 2 + 3  # |μ| ≫ 0: the statistics' cancellation is exercised
    return x, bn_param(gamma_kind, T, C), bn_param(beta_kind, T, C)


CASES = [
    # (shape, γ, β, act, kernel): W4-like; odd maps (a last row and column in no window);
    # a 3×3 window; no γ or β; leaky_relu's slope; one window per map.
    pytest.param((2, 3, 4, 6, 6), "per_task", "per_task", "relu", 2, id="small-relu"),
    pytest.param((2, 3, 3, 5, 7), "shared", "shared", "relu", 2, id="odd-maps-relu"),
    pytest.param((1, 2, 3, 7, 6), "per_task", "none", "leaky_relu", 3, id="k3-leaky_relu"),
    pytest.param((2, 2, 2, 4, 4), "none", "none", "none", 2, id="affine-free-none"),
    pytest.param((2, 4, 2, 2, 2), "per_task", "shared", "relu", 2, id="one-window-relu"),
]


def assert_same(got, want, exact, what):
    if exact:
        assert torch.equal(got, want), what
    else:  # the sums of g run over the windows' maxima: another order of the same terms
        assert got.shape == want.shape, what
        if want.numel():
            assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-7, what


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("shape,gamma_kind,beta_kind,act,kernel", CASES)
def test_fused_kernels_equal_the_kernels_they_replace(backend, device, shape, gamma_kind, beta_kind, act, kernel):
    """The forward writes exactly max_pool2d's pooled maps and indices of task_batch_norm's
    output, and the backward and double backward task_batch_norm's backward ops around
    max_pool2d's backward and gather: on Triton the same arithmetic, bit for bit; in C++
    the forward bit for bit, the backward ops with their sums of the (sparse) gradient
    taken over the windows, so to rounding."""
    exact = backend == "triton"
    x, gamma, beta = block(shape, gamma_kind, beta_kind)
    T, N = shape[:2]
    window = ([kernel] * 2, [kernel] * 2, [0, 0])
    pooled, indices = direct(backend, "task_batch_norm_max_pool2d", x, gamma, beta, 1e-5, act, 0.1, kernel)
    y = direct(backend, "task_batch_norm", x, gamma, beta, 1e-5, act, 0.1)
    want_pooled, want_indices = direct(backend, "max_pool2d", y.flatten(0, 1), *window)
    assert torch.equal(pooled, want_pooled.unflatten(0, (T, N)))
    assert torch.equal(indices, want_indices.unflatten(0, (T, N)))

    grad_pooled, up_x = torch.randn_like(pooled), torch.randn_like(x)
    up_gamma, up_beta = torch.randn(T, shape[2]), torch.randn(shape[2])
    grad_y = direct(backend, "max_pool2d_backward", grad_pooled.flatten(0, 1), indices.flatten(0, 1),
                    list(shape[3:]), *window).unflatten(0, (T, N))
    mask = (y, act) if act != "none" else (None, "none")
    got = direct(backend, "task_batch_norm_max_pool2d_backward", grad_pooled, x, gamma, pooled, indices, 1e-5,
                 [True, gamma is not None, True], act, 0.1, kernel)
    want = direct(backend, "task_batch_norm_backward", grad_y, x, gamma, 1e-5, [True, gamma is not None, True],
                  mask[0], mask[1], 0.1)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, exact, f"backward output {i}")

    got = direct(backend, "task_batch_norm_max_pool2d_double_backward", grad_pooled, x, gamma, pooled, indices, up_x,
                 up_gamma, up_beta, 1e-5, [True, True, gamma is not None], act, 0.1, kernel)
    d_grad_y, d_x, d_gamma = direct(backend, "task_batch_norm_double_backward", grad_y, x, gamma, up_x, up_gamma,
                                    up_beta, 1e-5, [True, True, gamma is not None], mask[0], mask[1], 0.1)
    d_grad_pooled = direct(backend, "max_pool2d_double_backward", d_grad_y.flatten(0, 1), indices.flatten(0, 1),
                           *window).unflatten(0, (T, N))
    for i, (g, w) in enumerate(zip(got, (d_grad_pooled, d_x, d_gamma))):
        assert_same(g, w, exact, f"double backward output {i}")


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("shape,gamma_kind,beta_kind,act,kernel", CASES)
def test_kernels_equal_the_reference(backend, device, shape, gamma_kind, beta_kind, act, kernel):
    x, gamma, beta = block(shape, gamma_kind, beta_kind)
    T, C = shape[0], shape[2]
    check_kernel(backend, "task_batch_norm_max_pool2d", reference_task_batch_norm_max_pool2d,
                 [x, gamma, beta, 1e-5, act, 0.1, kernel], rtol=1e-5)
    pooled, indices = reference_task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, act, 0.1, kernel)
    g = torch.randn_like(pooled)
    needs = [True, gamma is not None, True]
    # With the addends (the alias outputs' gradients) and without.
    for addends in ([], [torch.randn_like(x), torch.randn(T, C) if gamma is not None and gamma.dim() == 2 else None]):
        check_kernel(backend, "task_batch_norm_max_pool2d_backward", reference_task_batch_norm_max_pool2d_backward,
                     [g, x, gamma, pooled, indices, 1e-5, needs, act, 0.1, kernel, *addends], rtol=1e-4, atol=1e-5)
    # Every subset of the upstreams and of the outputs that has something to compute.
    for up in ([torch.randn_like(x), torch.randn(T, C), torch.randn(C)], [torch.randn_like(x), None, None],
               [None, torch.randn(T, C), None], [None, None, torch.randn(C)]):
        for wanted in ([True, True, True], [True, False, False], [False, True, True]):
            wanted = [wanted[0], wanted[1], wanted[2] and gamma is not None]
            check_kernel(backend, "task_batch_norm_max_pool2d_double_backward",
                         reference_task_batch_norm_max_pool2d_double_backward,
                         [g, x, gamma, pooled, indices, *up, 1e-5, wanted, act, 0.1, kernel], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("act", ["relu", "none"])
def test_the_op_and_its_gradients(backend, device, act):
    """The public op against the reference backend: outputs, first order (the fused
    backward) and second order (the fused double backward)."""
    x, gamma, beta = block((2, 3, 3, 4, 6), "per_task", "per_task")
    check_op(backend, ops.task_batch_norm_max_pool2d, [x, gamma, beta, 1e-5, act, 0.0, 2], [0, 1, 2], KERNELS,
             rtol=1e-4)


def _workload_blocks():
    """The BatchNorm layers of W1–W4 with spatial maps (W4's are followed by 2×2 pooling),
    GPU only (tests/ops/harness.py, workload_params)."""
    return [p for p in workload_params("task_batch_norm") if "H" in p.values[0]]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("shape", _workload_blocks())
def test_the_fused_ops_at_the_workloads_sizes(backend, device, shape):
    """At W4's sizes (0.5M values per statistic), every output of the three kernels against
    float64, as the BatchNorm family's workload tests judge theirs (elements within fp32
    rounding of ReLU's kink left out of the first order, and windows whose two largest
    values tie within it left out: there any fp32 implementation may pick either)."""
    torch.manual_seed(0)
    T, N, C, H, W = (shape[k] for k in ("T", "N", "C", "H", "W"))
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    x, gamma, beta = r(T, N, C, H, W), r(T, C) + 1, r(T, C)
    act = "relu"
    pooled, indices = direct(backend, "task_batch_norm_max_pool2d", x, gamma, beta, 1e-5, act, 0.0, 2)
    want = reference_task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, act, 0.0, 2)
    truth = reference_task_batch_norm_max_pool2d(*float64([x, gamma, beta]), 1e-5, act, 0.0, 2)
    assert_as_close_as_reference(pooled, want[0], truth[0], "pooled", 1e-4)
    agree = indices == truth[1]
    assert agree.float().mean().item() > 0.999, "the maxima differ from float64's beyond near-ties"
    g, up_x = r(*pooled.shape), r(*x.shape)
    args = [g, x, gamma, pooled, indices, 1e-5, [True, True, True], act, 0.0, 2]
    got = direct(backend, "task_batch_norm_max_pool2d_backward", *args)
    ref = reference_task_batch_norm_max_pool2d_backward(*args)
    tru = reference_task_batch_norm_max_pool2d_backward(*float64(args))
    for i, (a, b, c) in enumerate(zip(got, ref, tru)):
        assert_as_close_as_reference(a, b, c, f"backward output {i}", 1e-4)
    args = [g, x, gamma, pooled, indices, up_x, r(T, C), r(T, C), 1e-5, [True, True, True], act, 0.0, 2]
    got = direct(backend, "task_batch_norm_max_pool2d_double_backward", *args)
    ref = reference_task_batch_norm_max_pool2d_double_backward(*args)
    tru = reference_task_batch_norm_max_pool2d_double_backward(*float64(args))
    for i, (a, b, c) in enumerate(zip(got, ref, tru)):
        assert_as_close_as_reference(a, b, c, f"double backward output {i}", 1e-4)


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("gamma_kind,beta_kind", [("per_task", "shared"), ("shared", "per_task")])
def test_autograd_equals_the_two_ops_in_float64(act, gamma_kind, beta_kind):
    """Value, first and second order of the fused op equal those of task_batch_norm then
    max_pool2d (their own, tested, backward ops), in float64, alias addends included."""
    x, gamma, beta = (t.double().requires_grad_() for t in block((2, 3, 2, 5, 4), gamma_kind, beta_kind))
    T, N = x.shape[:2]

    def fused(x, gamma, beta):
        return ops.task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, act, 0.1, 2)[0]

    def two_ops(x, gamma, beta):
        y = ops.task_batch_norm(x, gamma, beta, 1e-5, act, 0.1)
        return ops.max_pool2d(y.flatten(0, 1), [2, 2], [2, 2], [0, 0])[0].unflatten(0, (T, N))

    upstream = torch.randn(T, N, 2, 2, 2, dtype=torch.float64)
    results = []
    for f in (fused, two_ops):
        out = f(x, gamma, beta)
        first = torch.autograd.grad((out * upstream).sum(), (x, gamma, beta), create_graph=True)
        objective = sum((g * g).sum() for g in first)
        second = torch.autograd.grad(objective, (x, gamma), allow_unused=True)
        results.append((out, *first, *second))
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"result {i}")


def test_gradcheck_and_gradgradcheck_in_float64():
    x, gamma, beta = (t.double().requires_grad_() for t in block((2, 2, 2, 4, 5), "per_task", "shared"))
    f = lambda x, gamma, beta: ops.task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, "relu", 0.0, 2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(f, (x, gamma, beta))


@pytest.mark.parametrize("act,kernel,shape,message", [
    ("tanh", 2, (2, 3, 2, 4, 4), "act must be one of"),
    ("relu", 5, (2, 3, 2, 4, 4), "kernel_size must be"),
    ("relu", 2, (2, 3, 2, 4), r"x must be \[T, N, C, H, W\]"),
])
def test_what_the_op_refuses_is_named(act, kernel, shape, message):
    with pytest.raises(ValueError, match=message):
        ops.task_batch_norm_max_pool2d(torch.randn(*shape), None, None, 1e-5, act, 0.0, kernel)


def test_the_backward_refuses_pooled_maps_of_another_shape():
    x, gamma, beta = block((2, 3, 2, 4, 4))
    pooled, indices = reference_task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, "relu", 0.0, 2)
    with pytest.raises(ValueError, match="grad_pooled must be the pooled maps' shape"):
        ops.task_batch_norm_max_pool2d_backward(torch.randn(2, 3, 2, 3, 3), x, gamma, pooled, indices, 1e-5,
                                                [True] * 3, "relu", 0.0, 2)
    with pytest.raises(TypeError, match="indices must be int64"):
        ops.task_batch_norm_max_pool2d_backward(torch.randn_like(pooled), x, gamma, pooled, indices.int(), 1e-5,
                                                [True] * 3, "relu", 0.0, 2)


# ---------------------------------------------------------------------------------------
# The traced program
# ---------------------------------------------------------------------------------------


def conv_block_model(act: nn.Module | None = nn.ReLU, pool: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)]
    if act is not None:
        layers.append(act())
    layers += [pool if pool is not None else nn.MaxPool2d(2), nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3),
               nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 4)]
    return nn.Sequential(*layers)


def _pooled_pairs(model):
    from fastmeta.engine.program import TracedProgram
    from fastmeta.engine.task_weights import Layout

    program = TracedProgram(model, Layout.of_module(model))
    return {norm: pool.target for norm, pool in program.pooled_batch_norms.items()}


def test_the_program_pairs_each_batch_norm_with_the_pool_that_alone_reads_it():
    assert _pooled_pairs(conv_block_model()) == {"_1": "3", "_5": "7"}
    assert _pooled_pairs(conv_block_model(act=None)) == {"_1": "2", "_4": "6"}
    assert _pooled_pairs(conv_block_model(act=nn.LeakyReLU)) == {"_1": "3", "_5": "7"}
    # A smooth activation, overlapping or padded windows: the first block runs as two ops.
    assert _pooled_pairs(conv_block_model(act=nn.Tanh)) == {"_5": "7"}
    assert _pooled_pairs(conv_block_model(pool=nn.MaxPool2d(3, stride=2))) == {"_5": "7"}
    assert _pooled_pairs(conv_block_model(pool=nn.MaxPool2d(2, padding=1))) == {"_5": "7"}

    class Residual(nn.Module):  # the BatchNorm's output read twice: not fused
        def __init__(self):
            super().__init__()
            self.norm, self.pool = nn.BatchNorm2d(3), nn.MaxPool2d(2)

        def forward(self, x):
            y = self.norm(x)
            return self.pool(y) + self.pool(y)

    assert _pooled_pairs(Residual()) == {}


def _meta_gradient(model, backend, tasks):
    learner = fm.MAML(model, lr=0.1, steps=1, validate=False)
    with fm.use_backend(backend):
        out = learner.meta_batch(*tasks)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    return out.loss.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.parameters())]


@pytest.mark.parametrize("backend,device", ALL)
def test_the_fused_program_equals_the_two_ops_on_the_reference(backend, device):
    """Second-order MAML through two conv blocks where the fused op runs (the C++ kernels;
    Triton as a GPU runs it once verified) against the reference backend (the two ops)."""

    model = conv_block_model()
    torch.manual_seed(1)
    tasks = (torch.randn(2, 3, 2, 4, 4), torch.randint(0, 4, (2, 3)), torch.randn(2, 4, 2, 4, 4),
             torch.randint(0, 4, (2, 4)))
    from harness import kernel_log

    with kernel_log(backend) as (ran, declined):
        fused_loss, fused_grads = _meta_gradient(model, backend, tasks)
    assert ran["task_batch_norm_max_pool2d"] and ran["task_batch_norm_max_pool2d_backward"]
    assert ran["task_batch_norm_max_pool2d_double_backward"]
    assert not ran["max_pool2d"] and not ran["max_pool2d_backward"] and not declined
    loss, grads = _meta_gradient(model, "torch", tasks)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for g, want in zip(fused_grads, grads):
        scale = want.abs().max().item()
        assert (g - want).abs().max().item() <= 1e-4 * scale + 1e-6


def test_without_the_fused_kernels_the_block_runs_as_its_two_ops(tmp_path, monkeypatch):
    """Where no backend has the fused op's kernels verified for the device (a GPU before
    the GPU check records them; here a verification record without them), the program
    runs task_batch_norm and max_pool2d, and the fused op never."""
    import json

    from fastmeta.backends import verification
    from harness import kernel_log

    record = json.loads(verification.record_path().read_text())
    for kernels in record.get("cpu", {}).values():
        for name in KERNELS:
            kernels.pop(name, None)
    path = tmp_path / "verified.json"
    path.write_text(json.dumps(record))
    monkeypatch.setenv(verification.RECORD_PATH_VARIABLE, str(path))
    verification.reload()
    try:
        model = conv_block_model()
        tasks = (torch.randn(2, 3, 2, 4, 4), torch.randint(0, 4, (2, 3)), torch.randn(2, 4, 2, 4, 4),
                 torch.randint(0, 4, (2, 4)))
        with kernel_log("cpu") as (ran, _):
            _meta_gradient(model, "auto", tasks)
        assert ran["max_pool2d"] and ran["task_batch_norm"] and not ran["task_batch_norm_max_pool2d"]
    finally:
        monkeypatch.delenv(verification.RECORD_PATH_VARIABLE)
        verification.reload()


def _r(*shape, grad=True):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(grad)


def _pooled_of(x, gamma, beta, act, kernel):
    pooled, indices = reference_task_batch_norm_max_pool2d(x.detach(), None if gamma is None else gamma.detach(),
                                                           None if beta is None else beta.detach(), 1e-5, act, 0.1,
                                                           kernel)
    return pooled, indices


def _backward_case(act, needs, addends=False):
    def make():
        x, gamma = _r(2, 3, 2, 4, 5), _r(2, 2)
        pooled, indices = _pooled_of(x, gamma, None, act, 2)
        extra = [_r(*x.shape), _r(2, 2)] if addends else []
        return (_r(*pooled.shape), x, gamma, pooled, indices, 1e-5, needs, act, 0.1, 2, *extra)

    return make


def _double_backward_case(act, needs, upstreams=(True, True, True)):
    def make():
        x, gamma = _r(2, 3, 2, 4, 4), _r(2)
        pooled, indices = _pooled_of(x, gamma, None, act, 2)
        up = [_r(*x.shape) if upstreams[0] else None, _r(2, 2) if upstreams[1] else None,
              _r(2) if upstreams[2] else None]
        return (_r(*pooled.shape), x, gamma, pooled, indices, *up, 1e-5, needs, act, 0.1, 2)

    return make


GRAD_CASES = [
    ("forward-relu", ops.task_batch_norm_max_pool2d, lambda: (_r(2, 3, 2, 4, 5), _r(2, 2), _r(2), 1e-5, "relu", 0.0, 2)),
    ("forward-none-k3", ops.task_batch_norm_max_pool2d, lambda: (_r(1, 2, 2, 6, 6), None, None, 1e-5, "none", 0.0, 3)),
    ("backward-relu", ops.task_batch_norm_max_pool2d_backward, _backward_case("relu", [True, True, True])),
    ("backward-leaky-partial", ops.task_batch_norm_max_pool2d_backward,
     _backward_case("leaky_relu", [True, False, True])),
    ("backward-addends", ops.task_batch_norm_max_pool2d_backward, _backward_case("relu", [True, True, True], True)),
    ("double_backward-relu", ops.task_batch_norm_max_pool2d_double_backward,
     _double_backward_case("relu", [True, True, True])),
    ("double_backward-none-partial", ops.task_batch_norm_max_pool2d_double_backward,
     _double_backward_case("none", [False, True, True], (True, False, True))),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,op,make", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_gradgradcheck_and_opcheck(gradchecks, backend, name, op, make):
    """opcheck, gradcheck and gradgradcheck in float64, through the registered backward
    ops, on the reference and on the C++ kernels."""
    gradchecks(op, make(), backend=backend)
