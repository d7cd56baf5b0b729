"""The eager path's autograd nodes in C++ (csrc/cpu/task_conv2d.cpp, task_batch_norm.cpp, task_linear.cpp,
task_loss.cpp, inner_step.cpp, activation.cpp, max_pool2d.cpp, task_layer_norm.cpp):
where they are taken, and that they build the graph the Python nodes build. Every value
and gradient, to second order, equals the Python node's bit for bit (the same kernels on
the same arguments, the same addends); third order runs through the public ops'
dispatcher autograd. The op tests (harness.check_op) also run each case through them."""

from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.backends import extension

pytestmark = pytest.mark.skipif(not extension.availability("cpu")[0], reason="the C++ extension is not built here")

T, N, C, O, H = 2, 3, 2, 3, 6
# The second conv's weight is a fixed mix scaled by a function of w (so w reaches it too).
_MIX = torch.randn(O, O, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


# Every public op with a node in C++.
NODE_OPS = (ops.task_conv2d, ops.task_conv2d_backward, ops.task_conv2d_input_grad, ops.task_conv2d_weight_grad,
            ops.task_batch_norm, ops.task_batch_norm_backward, ops.task_batch_norm_max_pool2d,
            ops.task_batch_norm_max_pool2d_backward, ops.task_layer_norm, ops.task_linear, ops.task_linear_backward,
            ops.task_linear_input_grad, ops.task_linear_weight_grad, ops.activation_grad, ops.max_pool2d, ops.max_pool2d_backward,
            ops.max_pool2d_double_backward, ops.task_loss, ops.task_loss_grad, ops.task_loss_and_accuracy,
            ops.task_loss_and_grad, ops.inner_step)


@contextmanager
def _python_nodes():
    """Without the C++ nodes: the Python nodes run."""
    saved = [(op, op._native_node) for op in NODE_OPS]
    for op, _ in saved:
        op._native_node = None
    try:
        yield
    finally:
        for op, node in saved:
            op._native_node = node


def _weight(kind: str) -> torch.Tensor:
    if kind == "per_task":
        return torch.randn(T, O, C, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(O, C, 3, 3, dtype=torch.float64, requires_grad=True)
    # "expanded": θ over the tasks at a task stride of 0 (the first inner step's weights)
    return w.expand(T, O, C, 3, 3) if kind == "expanded" else w


def _assert_bitwise_equal(got_list, want_list):
    for got, want in zip(got_list, want_list, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


def _param(kind: str, size: int):
    if kind == "none":
        return None
    shape = (size,) if kind == "shared" else (T, size)
    return (torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_(True)


def _meta_gradient(x_s, x_q, params, layer):
    """Second-order MAML through ``layer``: the query loss after one inner step on the
    support loss, differentiated with respect to the initial parameters. The inner
    gradient's backward ops read the layer's inputs: the alias outputs and addends run."""
    support = layer(x_s, *params).square().mean() * 10
    grads = torch.autograd.grad(support, params, create_graph=True, allow_unused=True)
    fast = [p if g is None else p - 0.3 * g for p, g in zip(params, grads)]
    query = layer(x_q, *fast).tanh().sum()
    return torch.autograd.grad(query, params, allow_unused=True)


@pytest.mark.parametrize("weight_kind,bias_kind,stride", list(itertools.product(
    ["per_task", "shared", "expanded"], ["none", "shared", "per_task"], [1, 2])))
def test_conv_node_equals_the_python_node_to_second_order(weight_kind, bias_kind, stride):
    torch.manual_seed(0)
    w = _weight(weight_kind)
    b = _param(bias_kind, O)
    x_s = torch.randn(T, N, C, H, H, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, N, C, H, H, dtype=torch.float64)

    def layer(x, w, *bias):
        y = ops.task_conv2d(x, w, bias[0] if bias else None, [stride, stride], [1, 1])
        # a second conv reads y: its backward op differentiates y (the first node's output)
        return ops.task_conv2d(torch.tanh(y), _w2(w), None, [1, 1], [1, 1])

    params = [w] + ([b] if b is not None else [])
    with fm.use_backend("cpu"):
        y = ops.task_conv2d(x_s, w, b, [stride, stride], [1, 1])
        assert y.grad_fn.name().endswith("::TaskConv2dNode>"), y.grad_fn.name()
        native = _meta_gradient(x_s, x_q, params, layer)
        native_x = torch.autograd.grad(layer(x_s, *params).sin().sum(), x_s, create_graph=True)[0]
        native_xx = torch.autograd.grad(native_x.square().sum(), x_s)[0]
        with _python_nodes():
            y = ops.task_conv2d(x_s, w, b, [stride, stride], [1, 1])
            assert "task_conv2d_function" in type(y.grad_fn).__name__
            python = _meta_gradient(x_s, x_q, params, layer)
            python_x = torch.autograd.grad(layer(x_s, *params).sin().sum(), x_s, create_graph=True)[0]
            python_xx = torch.autograd.grad(python_x.square().sum(), x_s)[0]
    _assert_bitwise_equal(native + (native_x, native_xx), python + (python_x, python_xx))


def _w2(w):
    """The second conv's weight ([O, O, 3, 3] per task or shared), a function of w."""
    return _MIX * w.sum((-1, -2, -3)).tanh()[..., :, None, None, None]


@pytest.mark.parametrize("act,gamma_kind,beta_kind,spatial", list(itertools.product(
    ["none", "relu", "leaky_relu"], ["none", "shared", "per_task"], ["none", "shared", "per_task"], [(4, 4), ()])))
def test_batch_norm_node_equals_the_python_node_to_second_order(act, gamma_kind, beta_kind, spatial):
    torch.manual_seed(1)
    gamma = _param(gamma_kind, C)
    beta = _param(beta_kind, C)
    params = [p for p in (gamma, beta) if p is not None]
    x_s = torch.randn(T, N, C, *spatial, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, N, C, *spatial, dtype=torch.float64)

    def layer(x, *ps):
        it = iter(ps)
        g = next(it) if gamma is not None else None
        b = next(it) if beta is not None else None
        y = ops.task_batch_norm(x, g, b, 1e-5, act, 0.1)
        return ops.task_batch_norm(y * 1.5 + x, g, None, 1e-5, "none", 0.0)  # reads y and x again

    with fm.use_backend("cpu"):
        y = ops.task_batch_norm(x_s, gamma, beta, 1e-5, act, 0.1)
        assert y.grad_fn.name().endswith("::TaskBatchNormNode>"), y.grad_fn.name()
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                first = torch.autograd.grad(layer(x_s, *params).sin().sum(), [x_s, *params], create_graph=True)
                second = torch.autograd.grad(sum(f.square().sum() for f in first), [x_s, *params])
                meta = _meta_gradient(x_s, x_q, params, layer) if params else ()
            runs.append([t.detach() for t in first] + list(second) + list(meta))
    _assert_bitwise_equal(*runs)


def test_nodes_pass_gradcheck_and_gradgradcheck_and_third_order_through_the_dispatcher():
    torch.manual_seed(2)
    x = torch.randn(T, N, C, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, O, C, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(T, O, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(T, O, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(O, dtype=torch.float64, requires_grad=True)

    head = torch.randn(4, O * 9, dtype=torch.float64, requires_grad=True)

    def net(x, w, b, gamma, beta, head):  # smooth: no kink
        z = ops.task_batch_norm(ops.task_conv2d(x, w, b, [2, 2], [1, 1]), gamma, beta, 1e-5, "none", 0.0)
        return ops.task_linear(z.flatten(2), head, None, "none", 0.0)

    inputs = (x, w, b, gamma, beta, head)
    with fm.use_backend("cpu"):
        assert net(*inputs).grad_fn.name().endswith("::TaskLinearNode>")
        assert torch.autograd.gradcheck(net, inputs)
        assert torch.autograd.gradgradcheck(net, inputs)

        def first_order(*inputs):  # its gradgradcheck is third order of net
            out = net(*inputs)
            return torch.autograd.grad((out.sin()).sum(), inputs, create_graph=True)

        assert torch.autograd.gradgradcheck(first_order, inputs, atol=1e-5)


def test_the_python_node_runs_where_the_c_nodes_do_not_take_the_arguments():
    x = torch.randn(T, N, C, 5, 5, requires_grad=True)
    w = torch.randn(T, O, C, 3, 3, requires_grad=True)
    with fm.use_backend("torch"):  # the reference backend: no C++ kernels
        assert "task_conv2d_function" in type(ops.task_conv2d(x, w, None, [1, 1], [1, 1]).grad_fn).__name__
        y = ops.max_pool2d(x.flatten(0, 1), [2, 2], [2, 2], [0, 0])[0]
        assert "max_pool2d_function" in type(y.grad_fn).__name__
        grad_y = torch.randn(T, N, C, 5, 5, requires_grad=True)
        assert "activation_grad_function" in type(ops.activation_grad(grad_y, x, "tanh", 0.0).grad_fn).__name__
    with fm.use_backend("cpu"):
        x_t = x.transpose(3, 4)  # not contiguous: the kernels would need a copy
        assert "task_conv2d_function" in type(ops.task_conv2d(x_t, w, None, [1, 1], [1, 1]).grad_fn).__name__
        y = ops.task_batch_norm(x, None, None, 1e-5, "tanh", 0.0)  # f'(y) is no mask: activation_grad runs
        assert "task_batch_norm_function" in type(y.grad_fn).__name__
        x_linear = x.flatten(2).transpose(1, 2).contiguous().transpose(1, 2)  # not contiguous
        y = ops.task_linear(x_linear, torch.randn(3, 50), None, "relu", 0.0)
        assert "task_linear_function" in type(y.grad_fn).__name__
        with torch.no_grad():  # nothing records: no node at all
            assert ops.task_conv2d(x, w, None, [1, 1], [1, 1]).grad_fn is None


@pytest.mark.parametrize("weight_kind,bias_kind", list(itertools.product(
    ["per_task", "shared", "expanded", "strided"], ["none", "shared", "per_task"])))
def test_linear_node_equals_the_python_node_to_second_order(weight_kind, bias_kind):
    torch.manual_seed(3)
    I, F = 4, 5
    if weight_kind == "per_task":
        w = torch.randn(T, F, I, dtype=torch.float64, requires_grad=True)
    elif weight_kind == "shared":
        w = torch.randn(F, I, dtype=torch.float64, requires_grad=True)
    elif weight_kind == "expanded":  # θ expanded over the tasks: a task stride of 0
        w = torch.randn(F, I, dtype=torch.float64, requires_grad=True).expand(T, F, I)
    else:  # per task, a view of a wider buffer (each task's block contiguous, task stride > F·I)
        w = torch.randn(T, F * I + 3, dtype=torch.float64, requires_grad=True)[:, :F * I].view(T, F, I)
    b = None if bias_kind == "none" else (torch.randn(F, dtype=torch.float64) if bias_kind == "shared"
                                          else torch.randn(T, F, dtype=torch.float64)).requires_grad_(True)
    params = [w] + ([b] if b is not None else [])
    x_s = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, N, I, dtype=torch.float64)
    mix = torch.randn(F, F, dtype=torch.float64)

    def layer(x, w, *bias):
        y = ops.task_linear(x, w, bias[0] if bias else None, "none", 0.0)
        # a second layer reads y, and a weight made from w: their backward ops differentiate both
        return ops.task_linear(torch.tanh(y), torch.tanh(w.sum(-1, keepdim=True) * mix), None, "none", 0.0)

    with fm.use_backend("cpu"):
        y = ops.task_linear(x_s, w, b, "none", 0.0)
        assert y.grad_fn.name().endswith("::TaskLinearNode>"), y.grad_fn.name()
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                meta = _meta_gradient(x_s, x_q, params, layer)
                first = torch.autograd.grad(layer(x_s, *params).sin().sum(), [x_s, *params], create_graph=True)
                second = torch.autograd.grad(sum(f.square().sum() for f in first), [x_s, *params])
            runs.append(list(meta) + [f.detach() for f in first] + list(second))
    _assert_bitwise_equal(*runs)


def _loss_case(kind: str, target_grad: bool):
    K = 4
    pred_w = torch.randn(T, K, 3, dtype=torch.float64, requires_grad=True)  # pred = x · w per task
    x = torch.randn(T, N, 3, dtype=torch.float64)
    if kind == "cross_entropy":
        target = torch.randint(0, K, (T, N))
    else:
        target = torch.randn(T, N, K, dtype=torch.float64, requires_grad=target_grad)
    return pred_w, x, target


@pytest.mark.parametrize("kind,target_grad", [("cross_entropy", False), ("mse", False), ("mse", True)])
def test_loss_nodes_equal_the_python_nodes_to_second_order(kind, target_grad):
    """The inner step's gradient as task_loss_grad (its node's backward in the meta-gradient),
    the query loss as task_loss; and task_loss's own second order (its backward records
    task_loss_grad's node)."""
    torch.manual_seed(4)
    w, x, target = _loss_case(kind, target_grad)
    wrt = [w] + ([target] if target_grad else [])

    def run():
        pred = torch.einsum("tnd,tkd->tnk", x, w)
        g = ops.task_loss_grad(pred, target, kind)
        (inner,) = torch.autograd.grad(pred, w, g, create_graph=True)
        query = torch.einsum("tnd,tkd->tnk", x.flip(1), w - 0.4 * inner)
        meta = torch.autograd.grad(ops.task_loss(query, target, kind).sum(), wrt)
        pred = torch.einsum("tnd,tkd->tnk", x, w)
        first = torch.autograd.grad((ops.task_loss(pred, target, kind) * torch.arange(1.0, T + 1)).sum(), wrt,
                                    create_graph=True)
        second = torch.autograd.grad(sum(f.sin().sum() for f in first), wrt)
        return list(meta) + [f.detach() for f in first] + list(second)

    with fm.use_backend("cpu"):
        pred = torch.einsum("tnd,tkd->tnk", x, w)
        assert ops.task_loss(pred, target, kind).grad_fn.name().endswith("::TaskLossNode>")
        assert ops.task_loss_grad(pred, target, kind).grad_fn.name().endswith("::TaskLossGradNode>")
        native = run()
        with _python_nodes():
            assert "task_loss_function" in type(ops.task_loss(pred, target, kind).grad_fn).__name__
            python = run()
    _assert_bitwise_equal(native, python)


def _step_case(theta_kind: str, rate_kind: str, gates: bool):
    P, S = 7, 3
    theta = torch.randn(P, dtype=torch.float64, requires_grad=True)
    if theta_kind == "per_task":
        theta_arg = lambda: theta * torch.linspace(0.5, 1.5, T, dtype=torch.float64)[:, None]  # noqa: E731
    elif theta_kind == "expanded":
        theta_arg = lambda: theta.expand(T, P)  # noqa: E731
    else:
        theta_arg = lambda: theta  # noqa: E731
    segments = None
    if rate_kind == "scalar":
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    elif rate_kind == "per_segment":
        lr = torch.rand(S, dtype=torch.float64).add(0.1).requires_grad_(True)
        segments = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    else:
        lr = torch.rand(P, dtype=torch.float64).add(0.1).requires_grad_(True)
    mask = precond = None
    if gates:
        mask = torch.rand(P, dtype=torch.float64).requires_grad_(True)
        precond = torch.rand(P, dtype=torch.float64).add(0.5).requires_grad_(True)
    return theta, theta_arg, lr, mask, precond, segments


@pytest.mark.parametrize("theta_kind,rate_kind,gates", list(itertools.product(
    ["shared", "expanded", "per_task"], ["scalar", "per_segment", "per_parameter"], [False, True])))
def test_inner_step_node_equals_the_python_node_to_second_order(theta_kind, rate_kind, gates):
    torch.manual_seed(5)
    theta, theta_arg, lr, mask, precond, segments = _step_case(theta_kind, rate_kind, gates)
    leaves = [t for t in (theta, lr, mask, precond) if t is not None]
    weights = torch.randn(T, theta.numel(), dtype=torch.float64)

    def run():
        th = theta_arg()
        grad = torch.tanh(theta * 1.3 + weights)  # [T, P], a function of θ
        fast = ops.inner_step(th, grad, lr, mask, precond, segments)
        first = torch.autograd.grad((fast.sin() * weights).sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum(f.square().sum() for f in first), leaves)
        return [fast.detach()] + [f.detach() for f in first] + list(second)

    with fm.use_backend("cpu"):
        grad = torch.tanh(theta * 1.3 + weights)
        assert ops.inner_step(theta_arg(), grad, lr, mask, precond, segments).grad_fn.name().endswith(
            "::InnerStepNode>")
        native = run()
        with _python_nodes():
            assert "inner_step_function" in type(
                ops.inner_step(theta_arg(), grad, lr, mask, precond, segments).grad_fn).__name__
            python = run()
    _assert_bitwise_equal(native, python)


def test_loss_and_inner_step_nodes_pass_gradcheck_gradgradcheck_and_third_order():
    torch.manual_seed(6)
    w, x, target = _loss_case("mse", True)
    labels = torch.randint(0, 4, (T, N))
    theta, _, lr, mask, precond, segments = _step_case("shared", "per_segment", True)
    grad = torch.randn(T, theta.numel(), dtype=torch.float64, requires_grad=True)

    def losses(w, target):
        pred = torch.einsum("tnd,tkd->tnk", x, w)
        return (ops.task_loss(pred, target, "mse"), ops.task_loss(pred, labels, "cross_entropy"),
                ops.task_loss_grad(pred, target, "mse"), ops.task_loss_grad(pred, labels, "cross_entropy"))

    def step(theta, grad, lr, mask, precond):
        return ops.inner_step(theta, grad, lr, mask, precond, segments)

    with fm.use_backend("cpu"):
        assert torch.autograd.gradcheck(losses, (w, target))
        assert torch.autograd.gradgradcheck(losses, (w, target))
        assert torch.autograd.gradcheck(step, (theta, grad, lr, mask, precond))
        assert torch.autograd.gradgradcheck(step, (theta, grad, lr, mask, precond))

        def first_order(w, target):  # its gradgradcheck is third order
            return torch.autograd.grad(sum(o.sin().sum() for o in losses(w, target)), (w, target), create_graph=True)

        assert torch.autograd.gradgradcheck(first_order, (w, target))

        def step_first_order(theta, grad, lr, mask, precond):
            out = step(theta, grad, lr, mask, precond)
            return torch.autograd.grad(out.sin().sum(), (theta, grad, lr, mask, precond), create_graph=True)

        assert torch.autograd.gradgradcheck(step_first_order, (theta, grad, lr, mask, precond))


def test_loss_and_inner_step_take_the_python_node_where_the_c_nodes_do_not_take_the_arguments():
    pred = torch.randn(T, N, 4, requires_grad=True)
    labels = torch.randint(0, 4, (T, N))
    theta, grad = torch.randn(5, requires_grad=True), torch.randn(T, 5, requires_grad=True)
    with fm.use_backend("torch"):  # the reference backend: no C++ kernels
        assert "task_loss_function" in type(ops.task_loss(pred, labels, "cross_entropy").grad_fn).__name__
        assert "inner_step_function" in type(ops.inner_step(theta, grad, torch.tensor(0.1), None, None, None)
                                             .grad_fn).__name__
    with fm.use_backend("cpu"):
        # a float64 rate with float32 weights: no kernel takes mixed dtypes
        lr64 = torch.tensor(0.1, dtype=torch.float64)
        assert "inner_step_function" in type(ops.inner_step(theta, grad, lr64, None, None, None).grad_fn).__name__
        # an MSE target of another dtype
        target = torch.randn(T, N, 4, dtype=torch.float64)
        assert "task_loss_grad_function" in type(ops.task_loss_grad(pred, target, "mse").grad_fn).__name__


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_linear_node_with_a_fused_activation_equals_the_python_node_to_second_order(act):
    """The activation's gradient through activation_grad's C++ node, y read back from the
    node's saved output: where f' depends on y (tanh, sigmoid) the outer backward reaches y."""
    torch.manual_seed(7)
    I, F = 4, 5
    w = torch.randn(T, F, I, dtype=torch.float64, requires_grad=True)
    b = torch.randn(F, dtype=torch.float64, requires_grad=True)
    x_s = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, N, I, dtype=torch.float64)
    mix = torch.randn(F, F, dtype=torch.float64)

    def layer(x, w, b):
        y = ops.task_linear(x, w, b, act, 0.2)
        return ops.task_linear(y, torch.tanh(w.sum(-1, keepdim=True) * mix), None, act, 0.2)

    with fm.use_backend("cpu"):
        assert ops.task_linear(x_s, w, b, act, 0.2).grad_fn.name().endswith("::TaskLinearNode>")
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                meta = _meta_gradient(x_s, x_q, [w, b], layer)
                first = torch.autograd.grad(layer(x_s, w, b).sin().sum(), [x_s, w, b], create_graph=True)
                second = torch.autograd.grad(sum(f.square().sum() for f in first), [x_s, w, b])
            runs.append(list(meta) + [f.detach() for f in first] + list(second))
    _assert_bitwise_equal(*runs)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_nodes_equal_the_python_nodes_to_third_order(kernel, stride, padding):
    """Pooling, its scatter and its gather build each other at every order: a net that pools
    twice (overlapping windows where the stride is under the kernel), to the third derivative."""
    torch.manual_seed(8)
    window = ([kernel, kernel], [stride, stride], [padding, padding])
    x = torch.randn(T * N, C, 7, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(C, 1, 1, dtype=torch.float64, requires_grad=True)

    def net(x, scale):
        y = ops.max_pool2d(x * scale, *window)[0]
        return ops.max_pool2d(torch.tanh(y) * scale, [2, 2], [1, 1], [0, 0])[0]

    with fm.use_backend("cpu"):
        assert net(x, scale).grad_fn.name().endswith("::MaxPoolNode>")
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                first = torch.autograd.grad(net(x, scale).sin().sum(), [x, scale], create_graph=True)
                second = torch.autograd.grad(sum(f.square().sum() for f in first), [x, scale], create_graph=True)
                third = torch.autograd.grad(sum(f.sin().sum() for f in second), [x, scale])
            runs.append([f.detach() for f in first + second] + list(third))
    _assert_bitwise_equal(*runs)


def _public_backward_cases():
    """Each public backward op with a C++ node, called as a user writes a second-order graph
    by hand: (name, the op's call on the differentiated leaves, the leaves)."""
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x_conv, w_conv, g_conv = r(T, N, C, 6, 6), r(T, O, C, 3, 3), r(T, N, O, 3, 3)
    add_x, add_w = r(T, N, C, 6, 6), r(T, O, C, 3, 3)
    x_lin, w_lin, g_lin, add_lin = r(T, N, 4), r(5, 4), r(T, N, 5), r(T, N, 4)
    x_bn, g_bn, gamma = r(T, N, C, 3, 3), r(T, N, C, 3, 3), (torch.rand(T, C, dtype=torch.float64) + 0.5)
    gamma.requires_grad_(True)
    y_bn = torch.relu(torch.randn(T, N, C, 3, 3, dtype=torch.float64))
    grad_y, y_act = r(T, N, 5), torch.tanh(r(T, N, 5))
    indices = ops.max_pool2d(torch.randn(T * N, C, 6, 6, dtype=torch.float64), [2, 2], [2, 2], [0, 0])[1]
    g_pool, gg_pool = r(T * N, C, 3, 3), r(T * N, C, 6, 6)
    w_expanded = r(O, C, 3, 3).expand(T, O, C, 3, 3)
    x_block = r(T, N, C, 4, 4)
    pooled, block_indices = ops.task_batch_norm_max_pool2d(x_block.detach(), gamma.detach(), None, 1e-5, "relu", 0.0, 2)
    g_block, add_block = r(T, N, C, 2, 2), r(T, N, C, 4, 4)
    w_lin_tasks = r(T, 5, 4)
    return [
        ("task_conv2d_input_grad", lambda: [ops.task_conv2d_input_grad(g_conv, w_conv, [6, 6], [2, 2], [1, 1])],
         [g_conv, w_conv]),
        ("task_conv2d_input_grad", lambda: [ops.task_conv2d_input_grad(g_conv, w_expanded, [6, 6], [2, 2], [1, 1])],
         [g_conv, w_expanded]),
        ("task_conv2d_weight_grad",
         lambda: [ops.task_conv2d_weight_grad(g_conv, x_conv, [3, 3], [2, 2], [1, 1], False)], [g_conv, x_conv]),
        ("task_conv2d_weight_grad",
         lambda: [ops.task_conv2d_weight_grad(g_conv, x_conv, [3, 3], [2, 2], [1, 1], True)], [g_conv, x_conv]),
        ("task_linear_input_grad", lambda: [ops.task_linear_input_grad(g_lin, w_lin)], [g_lin, w_lin]),
        ("task_linear_input_grad", lambda: [ops.task_linear_input_grad(g_lin, w_lin_tasks)], [g_lin, w_lin_tasks]),
        ("task_linear_weight_grad", lambda: [ops.task_linear_weight_grad(g_lin, x_lin, True)], [g_lin, x_lin]),
        ("task_linear_weight_grad", lambda: [ops.task_linear_weight_grad(g_lin, x_lin, False)], [g_lin, x_lin]),
        ("task_conv2d_backward",
         lambda: ops.task_conv2d_backward(g_conv, x_conv, w_conv, [2, 2], [1, 1], [True, True], add_x, add_w),
         [g_conv, x_conv, w_conv, add_x, add_w]),
        ("task_linear_backward",
         lambda: ops.task_linear_backward(g_lin, x_lin, w_lin, [True, True, True], add_lin, None, True),
         [g_lin, x_lin, w_lin, add_lin]),
        ("task_batch_norm_backward",
         lambda: ops.task_batch_norm_backward(g_bn, x_bn, gamma, 1e-5, [True, True, True], y_bn, "relu", 0.0),
         [g_bn, x_bn, gamma]),
        ("task_batch_norm_max_pool2d_backward",
         lambda: ops.task_batch_norm_max_pool2d_backward(g_block, x_block, gamma, pooled, block_indices, 1e-5,
                                                         [True, True, True], "relu", 0.0, 2, add_block, None),
         [g_block, x_block, gamma, add_block]),
        ("activation_grad", lambda: [ops.activation_grad(grad_y, y_act, "sigmoid", 0.0)], [grad_y, y_act]),
        ("activation_grad", lambda: [ops.activation_grad(grad_y, y_act, "tanh", 0.0)], [grad_y, y_act]),
        ("activation_grad", lambda: [ops.activation_grad(grad_y, y_act, "leaky_relu", 0.1)], [grad_y, y_act]),
        ("max_pool2d_backward",
         lambda: [ops.max_pool2d_backward(g_pool, indices, [6, 6], [2, 2], [2, 2], [0, 0])], [g_pool]),
        ("max_pool2d_double_backward",
         lambda: [ops.max_pool2d_double_backward(gg_pool, indices, [2, 2], [2, 2], [0, 0])], [gg_pool]),
    ]


# The cases' names, in order (their tensors are made in the test, not at collection).
_PUBLIC_BACKWARD_CASES = (
    ["task_conv2d_input_grad"] * 2 + ["task_conv2d_weight_grad"] * 2 + ["task_linear_input_grad"] * 2
    + ["task_linear_weight_grad"] * 2 + ["task_conv2d_backward", "task_linear_backward", "task_batch_norm_backward",
                                         "task_batch_norm_max_pool2d_backward"] + ["activation_grad"] * 3
    + ["max_pool2d_backward", "max_pool2d_double_backward"])


@pytest.mark.parametrize("case", range(len(_PUBLIC_BACKWARD_CASES)), ids=_PUBLIC_BACKWARD_CASES)
def test_public_backward_ops_take_their_c_nodes_and_equal_the_python_nodes_to_second_order(case):
    torch.manual_seed(9)
    cases = _public_backward_cases()
    assert [c[0] for c in cases] == list(_PUBLIC_BACKWARD_CASES)
    name, call, leaves = cases[case]
    with fm.use_backend("cpu"):
        outs = [o for o in call() if o.numel()]
        assert all(o.grad_fn.name().endswith("Node>") for o in outs), [o.grad_fn.name() for o in outs]
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                outs = [o for o in call() if o.numel()]
                if python:
                    assert all(f"{name}_function" in type(o.grad_fn).__name__ for o in outs)
                first = torch.autograd.grad(sum(o.sin().sum() for o in outs), leaves, create_graph=True,
                                            allow_unused=True)
                used = [f for f in first if f is not None and f.requires_grad]
                second = torch.autograd.grad(sum(f.square().sum() for f in used), leaves, allow_unused=True)
            runs.append([o.detach() for o in outs] + [None if f is None else f.detach() for f in first]
                        + list(second))
    _assert_bitwise_equal(*runs)


def test_new_nodes_pass_gradcheck_and_gradgradcheck():
    """The fused activations' linear node, the pooling nodes and the public backward ops'
    nodes against float64 finite differences, to second order (smooth activations; the
    pooling's windows hold distinct values, away from ties)."""
    torch.manual_seed(10)
    x = torch.randn(T, N, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    planes = torch.randperm(T * N * C * 36).reshape(T * N, C, 6, 6).double().div(50).requires_grad_(True)

    def linears(x, w, b):
        return (ops.task_linear(x, w, b, "tanh", 0.0), ops.task_linear(x, w, b, "sigmoid", 0.0))

    def pool(planes):
        return ops.max_pool2d(planes, [3, 3], [2, 2], [1, 1])[0]

    grad_out = torch.randn(T, N, 5, dtype=torch.float64, requires_grad=True)

    def linear_pair(grad_out, x, w):
        return ops.task_linear_backward(grad_out, x, w, [True, True, True])

    g_conv = torch.randn(T, N, O, 3, 3, dtype=torch.float64, requires_grad=True)
    w_conv = torch.randn(T, O, C, 3, 3, dtype=torch.float64, requires_grad=True)
    x_conv = torch.randn(T, N, C, 5, 5, dtype=torch.float64, requires_grad=True)

    def grad_ops(g_conv, w_conv, x_conv, grad_out, x, w):  # the two pairs, as ops of their own
        return (ops.task_conv2d_input_grad(g_conv, w_conv, [5, 5], [2, 2], [1, 1]),
                ops.task_conv2d_weight_grad(g_conv, x_conv, [3, 3], [2, 2], [1, 1], False),
                ops.task_linear_input_grad(grad_out, w), ops.task_linear_weight_grad(grad_out, x, False))

    def grad_ops_first_order(*inputs):  # its gradgradcheck is third order (through the public ops)
        return torch.autograd.grad(sum(o.sin().sum() for o in grad_ops(*inputs)), inputs, create_graph=True)

    with fm.use_backend("cpu"):
        assert linears(x, w, b)[0].grad_fn.name().endswith("::TaskLinearNode>")
        assert pool(planes).grad_fn.name().endswith("::MaxPoolNode>")
        assert linear_pair(grad_out, x, w)[0].grad_fn.name().endswith("::TaskLinearBackwardNode>")
        grad_inputs = (g_conv, w_conv, x_conv, grad_out, x, w)
        assert [o.grad_fn.name().rsplit("::", 1)[1] for o in grad_ops(*grad_inputs)] == [
            "TaskConv2dInputGradNode>", "TaskConv2dWeightGradNode>", "TaskLinearInputGradNode>",
            "TaskLinearWeightGradNode>"]
        for fn, inputs in ((linears, (x, w, b)), (pool, (planes,)), (linear_pair, (grad_out, x, w)),
                           (grad_ops, grad_inputs)):
            assert torch.autograd.gradcheck(fn, inputs)
            assert torch.autograd.gradgradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(grad_ops_first_order, grad_inputs)
        grad_y = torch.randn(T, N, 5, dtype=torch.float64, requires_grad=True)
        y = torch.rand(T, N, 5, dtype=torch.float64, requires_grad=True)
        for act in ("tanh", "sigmoid"):  # the gradient at y in one pass (first order), aten ops above it

            def activation(grad_y, y, act=act):
                return ops.activation_grad(grad_y, y, act, 0.0)

            assert activation(grad_y, y).grad_fn.name().endswith("::ActivationGradNode>")
            assert torch.autograd.gradcheck(activation, (grad_y, y))
            assert torch.autograd.gradgradcheck(activation, (grad_y, y))


@pytest.mark.parametrize("gamma_kind,beta_kind", list(itertools.product(
    ["none", "shared", "per_task", "expanded"], ["none", "shared", "per_task"])))
def test_layer_norm_node_equals_the_python_node_to_second_order(gamma_kind, beta_kind):
    torch.manual_seed(11)
    D = 6

    def param(kind):
        if kind == "none":
            return None
        if kind == "expanded":  # θ over the tasks at a task stride of 0
            return torch.randn(D, dtype=torch.float64, requires_grad=True).expand(T, D)
        return torch.randn(D if kind == "shared" else (T, D), dtype=torch.float64, requires_grad=True)

    gamma, beta = param(gamma_kind), param(beta_kind)
    params = [p for p in (gamma, beta) if p is not None]
    x_s = torch.randn(T, N, D, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, N, D, dtype=torch.float64)

    def layer(x, *ps):
        it = iter(ps)
        g = next(it) if gamma is not None else None
        b = next(it) if beta is not None else None
        return ops.task_layer_norm(torch.tanh(ops.task_layer_norm(x, g, b, 1e-5)) + x, g, None, 1e-5)

    with fm.use_backend("cpu"):
        assert ops.task_layer_norm(x_s, gamma, beta, 1e-5).grad_fn.name().endswith("::TaskLayerNormNode>")
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                if python:
                    assert "task_layer_norm_function" in type(ops.task_layer_norm(x_s, gamma, beta, 1e-5).grad_fn
                                                              ).__name__
                first = torch.autograd.grad(layer(x_s, *params).sin().sum(), [x_s, *params], create_graph=True)
                second = torch.autograd.grad(sum(f.square().sum() for f in first), [x_s, *params])
                meta = _meta_gradient(x_s, x_q, params, layer) if params else ()
            runs.append([f.detach() for f in first] + list(second) + list(meta))
    _assert_bitwise_equal(*runs)
    if gamma_kind == "per_task" and beta_kind == "shared":
        with fm.use_backend("cpu"):
            assert torch.autograd.gradcheck(lambda x, g, b: ops.task_layer_norm(x, g, b, 1e-5), (x_s, gamma, beta))
            assert torch.autograd.gradgradcheck(lambda x, g, b: ops.task_layer_norm(x, g, b, 1e-5),
                                                (x_s, gamma, beta))


@pytest.mark.parametrize("act,gamma_kind,beta_kind", list(itertools.product(
    ["none", "relu", "leaky_relu"], ["none", "shared", "per_task"], ["none", "shared", "per_task"])))
def test_batch_norm_max_pool_node_equals_the_python_node_to_second_order(act, gamma_kind, beta_kind):
    torch.manual_seed(12)
    gamma = _param(gamma_kind, C)
    beta = _param(beta_kind, C)
    params = [p for p in (gamma, beta) if p is not None]
    x_s = torch.randn(T, N, C, 4, 6, dtype=torch.float64, requires_grad=True)
    x_q = torch.randn(T, N, C, 4, 6, dtype=torch.float64)

    def layer(x, *ps):
        it = iter(ps)
        g = next(it) if gamma is not None else None
        b = next(it) if beta is not None else None
        pooled = ops.task_batch_norm_max_pool2d(x, g, b, 1e-5, act, 0.1, 2)[0]
        # reads the pooled maps, x and γ again: the alias outputs and addends run
        again = pooled * 1.5 + x[..., ::2, ::2]
        return ops.task_batch_norm_max_pool2d(again.contiguous(), g, None, 1e-5, "none", 0.0, 1)[0]

    with fm.use_backend("cpu"):
        pooled, indices = ops.task_batch_norm_max_pool2d(x_s, gamma, beta, 1e-5, act, 0.1, 2)
        assert pooled.grad_fn.name().endswith("::TaskBatchNormMaxPoolNode>"), pooled.grad_fn.name()
        assert not indices.requires_grad
        runs = []
        for python in (False, True):
            with _python_nodes() if python else nullcontext():
                if python:
                    out = ops.task_batch_norm_max_pool2d(x_s, gamma, beta, 1e-5, act, 0.1, 2)[0]
                    assert "task_batch_norm_max_pool2d_function" in type(out.grad_fn).__name__
                first = torch.autograd.grad(layer(x_s, *params).sin().sum(), [x_s, *params], create_graph=True)
                second = torch.autograd.grad(sum(f.square().sum() for f in first), [x_s, *params])
                meta = _meta_gradient(x_s, x_q, params, layer) if params else ()
            runs.append([f.detach() for f in first] + list(second) + list(meta))
    _assert_bitwise_equal(*runs)


def test_batch_norm_max_pool_nodes_pass_gradcheck_gradgradcheck_and_third_order():
    """A smooth net around the block ("none": f' constant), inputs spread so that no window
    holds a tie, against float64 finite differences; third order through the dispatcher."""
    torch.manual_seed(13)
    x = torch.randperm(T * N * C * 16).reshape(T, N, C, 4, 4).double().div(40).requires_grad_(True)
    gamma = (torch.rand(T, C, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(C, dtype=torch.float64, requires_grad=True)

    def block(x, gamma, beta):
        return ops.task_batch_norm_max_pool2d(x, gamma, beta, 1e-5, "none", 0.0, 2)[0]

    def first_order(x, gamma, beta):
        return torch.autograd.grad(block(x, gamma, beta).sin().sum(), (x, gamma, beta), create_graph=True)

    with fm.use_backend("cpu"):
        assert block(x, gamma, beta).grad_fn.name().endswith("::TaskBatchNormMaxPoolNode>")
        assert first_order(x, gamma, beta)[0].grad_fn is not None
        assert torch.autograd.gradcheck(block, (x, gamma, beta))
        assert torch.autograd.gradgradcheck(block, (x, gamma, beta))
        assert torch.autograd.gradgradcheck(first_order, (x, gamma, beta), atol=1e-5)
