"""The eager nodes of task_conv2d, task_batch_norm and task_linear return the inputs their
backward ops read as alias outputs (``register_autograd(..., aliased_inputs=...)``), and pass those
aliases' gradients to the backward ops as addends (fastmeta/ops/task_conv2d.py, "Why
addends"). Second-order MAML's outer backward then reaches x, w and γ through one node
each: autograd's engine no longer sums two nodes' gradients with an ``aten::add_`` per
read tensor. These tests check that the meta-gradient is unchanged (against float64
autograd of the plain-PyTorch references) and that the adds are gone, on a conv → BatchNorm
→ conv → linear model.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.ops.task_batch_norm import reference_task_batch_norm
from fastmeta.ops.task_conv2d import reference_task_conv2d
from fastmeta.ops.task_linear import reference_task_linear
from fastmeta.tools.dispatches import _enclosing

T, N, C, O, H = 2, 3, 2, 4, 5
CLASSES, FEATURES = 5, O * 3 * 3  # the linear head reads the second conv's [O, 3, 3] maps
LR = 0.3


def parameters(gamma_kind: str, weight_kind: str):
    g = torch.Generator().manual_seed(3)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = t(T, O, C, 3, 3) if weight_kind == "per_task" else t(O, C, 3, 3)
    if weight_kind == "expanded":
        w = w.expand(T, O, C, 3, 3)
    gamma = t(T, O) + 1 if gamma_kind == "per_task" else t(O) + 1
    beta = t(T, O) if gamma_kind == "per_task" else t(O)
    w2 = t(T, O, O, 3, 3)
    head = t(T, CLASSES, FEATURES) if weight_kind == "per_task" else t(CLASSES, FEATURES)
    x_support, x_query = t(T, N, C, H, H), t(T, N, C, H, H)
    return [w, gamma, beta, w2, head], x_support, x_query


def meta_loss(conv, batch_norm, linear, params, x_support, x_query):
    """One inner step on the support set (create_graph: second order), then the query loss
    at the adapted parameters. The second conv reads the first block's output and the head
    the second conv's, so their x are interior tensors whose gradient comes through both
    nodes."""

    def loss(p, x):
        w, gamma, beta, w2, head = p
        h = batch_norm(conv(x, w, None, [1, 1], [1, 1]), gamma, beta, 1e-5, "relu", 0.0)
        y = conv(h, w2, None, [2, 2], [1, 1])
        z = linear(y.reshape(T, N, FEATURES), head, None, "none", 0.0)
        return (z * z).mean() + z.mean()

    grads = torch.autograd.grad(loss(params, x_support), params, create_graph=True)
    adapted = [p - LR * g for p, g in zip(params, grads)]
    return loss(adapted, x_query)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("gamma_kind,weight_kind", [("per_task", "per_task"), ("shared", "shared"),
                                                     ("per_task", "expanded")])
def test_second_order_meta_gradient_equals_the_reference_loop(backend, gamma_kind, weight_kind):
    params, xs, xq = parameters(gamma_kind, weight_kind)

    def reference_bn(x, gamma, beta, eps, act, slope):
        return reference_task_batch_norm(x, gamma, beta, eps, act, slope)

    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    want = torch.autograd.grad(meta_loss(reference_task_conv2d, reference_bn, reference_task_linear, leaves, xs, xq),
                               leaves)
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    with fm.use_backend(backend):
        got = torch.autograd.grad(meta_loss(ops.task_conv2d, ops.task_batch_norm, ops.task_linear, leaves, xs, xq),
                                  leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def engine_adds(backend: str) -> list[tuple[int, ...]]:
    """The shapes of the adds autograd's engine runs in the outer backward while evaluating
    a node of task_conv2d, task_batch_norm, task_linear or their backward ops (``aten::add_`` /
    ``aten::add`` not inside any fastmeta op): where it sums two gradients of one tensor."""
    params, xs, xq = parameters("per_task", "per_task")
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    with fm.use_backend(backend):
        loss = meta_loss(ops.task_conv2d, ops.task_batch_norm, ops.task_linear, leaves, xs, xq)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            torch.autograd.grad(loss, leaves)
    shapes = []
    for event in prof.events():
        if event.name not in ("aten::add_", "aten::add"):
            continue
        enclosing = _enclosing(event)
        if any(n.startswith("fastmeta::") for n in enclosing):
            continue  # a backend's own add (the torch backend's references, a launcher's addend)
        if enclosing and enclosing[0].startswith(("autograd::engine::evaluate_function: task_",
                                                  "autograd::engine::evaluate_function: torch::autograd::CppNode<fastmeta::")):
            shapes.append(tuple(event.input_shapes[0]))
    return sorted(shapes)


@pytest.fixture
def without_aliases():
    """The layers' eager nodes as before the aliases (no alias outputs, the inputs saved),
    restored afterwards; the C++ nodes off meanwhile."""
    conv, bn, linear = (importlib.import_module(f"fastmeta.ops.{name}")
                        for name in ("task_conv2d", "task_batch_norm", "task_linear"))
    layers = [(conv.task_conv2d, conv._task_conv2d_backward, conv._task_conv2d_setup),
              (bn.task_batch_norm, bn._bn_backward, bn._bn_setup),
              (linear.task_linear, linear._task_linear_backward, linear._task_linear_setup)]
    native_nodes = {op: op._native_node for op, _, _ in layers}
    for op, backward, setup in layers:
        op._native_node = None  # the C++ nodes always alias: the Python nodes here
        op._register_aliased(backward, setup, ())
    yield
    for op, backward, setup in layers:
        op._register_aliased(backward, setup, (0, 1))
        op._native_node = native_nodes[op]


PARAMETER_SHAPES = sorted(tuple(p.shape) for p in parameters("per_task", "per_task")[0])
# The tensors a backward op reads and differentiates: the second conv's x (the batch norm's
# output, [T, N, O, H, H]) and w2, the batch norm's x and γ, the head's x and w. (The first
# conv's x is data, and its backward op's dw does not depend on w: no second gradient there.)
READ_BY_BACKWARD_OPS = sorted([(T, N, O, H, H), (T, O, O, 3, 3), (T, N, O, H, H), (T, O), (T, N, FEATURES),
                               (T, CLASSES, FEATURES)])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_no_gradient_accumulation_adds_for_tensors_the_backward_ops_read(backend):
    """What is left is one add per meta-parameter: each is read by the support pass's layer
    node and by the inner step's update (θ − lr·g), two nodes no alias merges."""
    assert engine_adds(backend) == PARAMETER_SHAPES


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_without_the_aliases_the_engine_adds_once_per_tensor_a_backward_op_reads(backend, without_aliases):
    assert engine_adds(backend) == sorted(PARAMETER_SHAPES + READ_BY_BACKWARD_OPS)


def test_the_public_op_returns_only_its_output_and_the_dispatcher_path_has_no_aliases():
    x = torch.randn(T, N, C, H, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, O, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = ops.task_conv2d(x, w, None, [1, 1], [1, 1])
    assert isinstance(y, torch.Tensor) and y.shape == (T, N, O, H, H)
    y_dispatcher = torch.ops.fastmeta.task_conv2d(x, w, None, [1, 1], [1, 1])
    torch.testing.assert_close(y, y_dispatcher)
    # Both paths' second order agree (the eager one through the aliases).
    def second_order(fn):
        g = torch.autograd.grad(fn(x, w, None, [1, 1], [1, 1]).square().sum(), (x, w), create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), (x, w))
    for a, b in zip(second_order(ops.task_conv2d), second_order(torch.ops.fastmeta.task_conv2d)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
