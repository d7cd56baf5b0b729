"""The inner step over the inner gradient's segments (csrc/engine/flat_segments.cpp,
``segment_inner_step``; fastmeta/engine/meta_iteration.py's ``inner_states``): the same
values and meta-gradients as the joined gradient and ``inner_step``, bit for bit, where it
is taken; gradcheck, gradgradcheck and third order through the node; and where it is not
taken."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta.backends import extension
from fastmeta.engine import meta_iteration, task_weights

pytestmark = pytest.mark.skipif(not extension.availability("cpu")[0], reason="the C++ extension is not built here")

SHAPES = [("w", (3, 4)), ("b", (3,)), ("v", (2, 3)), ("c", ())]


def _model(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)]
    return nn.Sequential(*layers).double()


def _batch(T=3, N=4):
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(T, N, 1, 6, 6, generator=g, dtype=torch.float64)
    qx = torch.randn(T, N + 2, 1, 6, 6, generator=g, dtype=torch.float64)
    sy = torch.randint(0, 3, (T, N), generator=g)
    qy = torch.randint(0, 3, (T, N + 2), generator=g)
    return sx, sy, qx, qy


def _meta_gradient(model, segmented: bool, monkeypatch, **options):
    """The meta-batch's loss, task losses and meta-gradient with the segment nodes allowed
    (``segmented``) or not, and per inner step which node ran: "steps" (segment_steps, the
    last step's fast weights per segment), "inner" (segment_inner_step) or None (the joined
    gradient and inner_step)."""
    taken = []
    chosen = {}
    originals = {"steps": meta_iteration.segment_steps_node, "inner": meta_iteration.segment_inner_step_node}

    def chooser(kind):
        def choose(*args):
            node = originals[kind](*args) if segmented else None
            if node is not None:
                chosen["node"] = kind
            return node
        return choose

    monkeypatch.setattr(meta_iteration, "segment_steps_node", chooser("steps"))
    monkeypatch.setattr(meta_iteration, "segment_inner_step_node", chooser("inner"))
    record = meta_iteration.torch.profiler.record_function

    class Steps:  # one entry per inner step: the node that ran in it
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            if self.name.startswith("fastmeta.inner_step"):
                chosen.pop("node", None)
            return self

        def __exit__(self, *exc):
            if self.name.startswith("fastmeta.inner_step"):
                taken.append(chosen.get("node"))
            return False

    monkeypatch.setattr(meta_iteration.torch.profiler, "record_function", Steps)
    learner = fm.MAML(model, lr=0.3, **options)
    out = learner.meta_batch(*_batch())
    out.loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    monkeypatch.undo()
    return out.loss.detach(), out.task_loss.detach(), grads, taken


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("steps,first_order", [(1, False), (3, False), (2, True)])
def test_meta_gradient_equals_the_joined_path_bit_for_bit(bn, steps, first_order, monkeypatch):
    seg = _meta_gradient(_model(bn), True, monkeypatch, steps=steps, first_order=first_order)
    joined = _meta_gradient(_model(bn), False, monkeypatch, steps=steps, first_order=first_order)
    # taken at every step: the last one returning its fast weights per segment
    assert seg[3] == ["inner"] * (steps - 1) + ["steps"] and joined[3] == [None] * steps
    assert torch.equal(seg[0], joined[0]) and torch.equal(seg[1], joined[1])
    for a, b in zip(seg[2], joined[2]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_a_frozen_parameter_is_a_missing_segment(monkeypatch):
    """A parameter that does not adapt (requires_grad False, allow_nograd) gets no inner
    gradient: its segment of the fast weights is θ's."""
    def frozen():
        model = _model(False)
        model[0].bias.requires_grad_(False)
        return model

    seg = _meta_gradient(frozen(), True, monkeypatch, steps=2, allow_nograd=True)
    joined = _meta_gradient(frozen(), False, monkeypatch, steps=2, allow_nograd=True)
    assert seg[3] == ["inner", "steps"]
    assert torch.equal(seg[0], joined[0])
    for a, b in zip(seg[2], joined[2]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def _node(choose=task_weights.segment_inner_step_node):
    """The layout of SHAPES and the op the engine's chooser gives for MAML's rule in float64."""
    layout = fm.Layout(SHAPES)
    node = choose(torch.zeros(layout.numel, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64),
                  None, None, None, None)
    assert node is not None
    return layout, node


def _steps_node():
    return _node(task_weights.segment_steps_node)


def _step_inputs(layout, T: int, shared: bool, seed: int):
    """θ ([P] shared or [T, P]), one inner gradient per segment, the rate, in float64, and
    the generator for more."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(*((layout.numel,) if shared else (T, layout.numel)), generator=g,
                        dtype=torch.float64).requires_grad_(True)
    grads = [torch.randn(T, *shape, generator=g, dtype=torch.float64).requires_grad_(True) for _, shape in SHAPES]
    return theta, grads, torch.tensor(0.3, dtype=torch.float64), g


@pytest.mark.parametrize("shared", [True, False])
def test_node_passes_gradcheck_gradgradcheck_and_third_order(shared):
    layout, node = _node()
    T = 2
    theta, grads, lr, g = _step_inputs(layout, T, shared, seed=3)

    def step(theta, w, v, c):  # "b"'s gradient missing: its segment is θ's
        return node(theta, [w, None, v, c], layout.encoded_shapes, lr)

    inputs = (theta, grads[0], grads[2], grads[3])
    out = step(*inputs)
    want = (theta if shared else theta).expand(T, layout.numel) - 0.3 * torch.cat(
        [grads[0].reshape(T, -1), torch.zeros(T, 3, dtype=torch.float64), grads[2].reshape(T, -1),
         grads[3].reshape(T, -1)], 1)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)

    def first_order(*inputs):  # its gradgradcheck is third order, through the recording backward
        return torch.autograd.grad(step(*inputs).sin().sum(), inputs, create_graph=True)

    assert torch.autograd.gradgradcheck(first_order, inputs)


@pytest.mark.parametrize("shared", [True, False])
def test_per_segment_node_equals_the_step_then_the_split(shared):
    """segment_steps: segment_inner_step's [T, P] split into its segments, the same values
    bit for bit; its gradients those of that composition (gradcheck, gradgradcheck, and
    third order through its recording backward), a segment without an inner gradient
    (θ's values) and one whose output nothing reads included."""
    layout, node = _steps_node()
    _, joined_node = _node()
    T = 2
    theta, grads, lr, g = _step_inputs(layout, T, shared, seed=4)
    given = [grads[0], None, grads[2], grads[3]]
    segments = node(theta, given, layout.encoded_shapes, lr)
    flat = joined_node(theta, given, layout.encoded_shapes, lr)
    for got, want in zip(segments, layout.views(flat)):
        assert got.shape == want.shape and got.is_contiguous() and torch.equal(got, want)

    weights = [torch.randn(T, *shape, generator=g, dtype=torch.float64) for _, shape in SHAPES]

    def f(theta, w, v, c):  # "b" has no inner gradient; "v"'s output is never read
        out = node(theta, [w, None, v, c], layout.encoded_shapes, lr)
        return (out[0].sin() * weights[0]).sum() + out[1].tanh().sum() + (out[3] * weights[3]).exp().sum()

    inputs = (theta, grads[0], grads[2], grads[3])
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)

    def first_order(*inputs):  # its gradgradcheck is third order, through the recording backward
        found = torch.autograd.grad(f(*inputs), inputs, create_graph=True, allow_unused=True)
        return tuple(d for d in found if d is not None)  # v's: None (its output is unread)

    assert torch.autograd.gradgradcheck(first_order, inputs)


def test_the_query_gradient_is_not_joined(monkeypatch):
    """With the last step's fast weights per segment, the query's gradient reaches the step
    per segment: no [T, P] cat in the meta-backward (there was one, the split node's join)."""
    from fastmeta.tools.dispatches import count_events

    model = _model(True)
    learner = fm.MAML(model, lr=0.3, steps=1)
    batch = _batch()
    learner.meta_batch(*batch)  # loads the extension where this process has not yet
    out = learner.meta_batch(*batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.loss.backward()
    count = count_events(prof.events())
    assert count.by_name["fastmeta::inner_step_backward"] == 1, count.describe()
    assert count.by_name["aten::cat"] == 0, count.describe()


@pytest.mark.parametrize("make", [_node, _steps_node], ids=["segment_inner_step", "segment_steps"])
def test_node_refuses_arguments_by_name(make):
    layout, node = make()
    lr = torch.tensor(0.3, dtype=torch.float64)
    theta = torch.zeros(layout.numel, dtype=torch.float64)
    grads = [torch.zeros(2, *shape, dtype=torch.float64) for _, shape in SHAPES]
    with pytest.raises(ValueError, match="every gradient is missing"):
        node(theta, [None] * 4, layout.encoded_shapes, lr)
    with pytest.raises(ValueError, match="gradient 0 must be"):
        node(theta, [torch.zeros(2, 5, dtype=torch.float64)] + grads[1:], layout.encoded_shapes, lr)
    with pytest.raises(ValueError, match="theta must be"):
        node(theta[:-1], grads, layout.encoded_shapes, lr)
    with pytest.raises(ValueError, match="lr must be"):
        node(theta, grads, layout.encoded_shapes, lr.float())


def test_not_taken_for_rules_it_does_not_implement():
    """A mask, a preconditioner, per-segment or per-parameter rates, set values, a learned
    rate, another backend, a non-contiguous θ: the joined gradient and inner_step run."""
    P = 7
    theta = torch.zeros(P)
    lr = torch.tensor(0.1)
    ones = torch.ones(P)
    choose = task_weights.segment_inner_step_node
    assert choose(theta, lr, None, None, None, None) is not None
    assert choose(theta, lr, ones, None, None, None) is None
    assert choose(theta, lr, None, ones, None, None) is None
    assert choose(theta, torch.ones(3), None, None, torch.zeros(P, dtype=torch.long), None) is None
    assert choose(theta, ones, None, None, None, None) is None
    assert choose(theta, lr, None, None, None, (torch.tensor([0]), torch.zeros(1))) is None
    assert choose(theta, lr.clone().requires_grad_(True), None, None, None, None) is None
    assert choose(torch.zeros(2, P).t(), lr, None, None, None, None) is None
    with fm.use_backend("torch"):
        assert choose(theta, lr, None, None, None, None) is None


# -- θ's segments expanded over the tasks for the first step (expand_segments) -------------


def test_expanded_views_are_theta_expanded_and_split():
    layout = fm.Layout(SHAPES)
    theta = torch.randn(layout.numel, dtype=torch.float64, requires_grad=True)
    expand = task_weights.expand_segments_node(theta)
    assert expand is not None
    per_task = [1, 0, 1, 1]
    views = expand(theta, layout.encoded_shapes, 3, per_task)
    plain = layout._shaped_views(theta.detach())
    for v, p, flag, (_, shape) in zip(views, plain, per_task, SHAPES):
        want = p.expand(3, *shape) if flag else p
        assert v.shape == want.shape and v.stride() == want.stride() and torch.equal(v, want)
        assert v.data_ptr() == p.data_ptr() or p.numel() == 0  # views of θ, no copy


def test_expanded_views_pass_gradcheck_gradgradcheck_and_third_order():
    layout = fm.Layout(SHAPES)
    theta = torch.randn(layout.numel, dtype=torch.float64, requires_grad=True)
    expand = task_weights.expand_segments_node(theta)
    weights = [torch.randn(3, *shape, dtype=torch.float64) for _, shape in SHAPES]

    def f(theta):  # segment "b" not expanded, segment "v" never read (no gradient reaches it)
        w, b, v, c = expand(theta, layout.encoded_shapes, 3, [1, 0, 1, 1])
        return (w.sin() * weights[0]).sum((1, 2)) + b.tanh().sum() + (c * weights[3]).exp()

    assert torch.autograd.gradcheck(f, (theta,))
    assert torch.autograd.gradgradcheck(f, (theta,))

    def first_order(theta):  # its gradgradcheck is third order, through the recording backward
        return torch.autograd.grad(f(theta).sum(), theta, create_graph=True)

    assert torch.autograd.gradgradcheck(first_order, (theta,))


def test_meta_gradient_with_expanded_first_step_matches_the_split_path(monkeypatch):
    """Many tasks (the sum over them in another order than torch's): float64 agreement to
    rounding, and the node taken at the first step only."""
    def meta(expand_on: bool):
        calls = []
        original = meta_iteration.expand_segments_node

        def choose(theta):
            node = original(theta) if expand_on else None
            calls.append(node is not None)
            return node

        monkeypatch.setattr(meta_iteration, "expand_segments_node", choose)
        model = _model(True)
        learner = fm.MAML(model, lr=0.3, steps=2)
        g = torch.Generator().manual_seed(5)
        T = 40
        batch = (torch.randn(T, 4, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 4), generator=g),
                 torch.randn(T, 6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, 6), generator=g))
        learner.meta_batch(*batch)  # loads the extension where this process has not yet
        calls.clear()
        for p in model.parameters():
            p.grad = None
        learner.meta_batch(*batch).loss.backward()
        monkeypatch.undo()
        return [p.grad.clone() for p in model.parameters()], calls

    got, calls = meta(True)
    want, _ = meta(False)
    assert calls == [True]  # the first step; later steps read the [T, P] fast weights
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_nothing_adapting_is_theta_itself():
    """Every parameter frozen (allow_nograd): no segment to ask autograd about, and no inner
    gradient: the fast weights are θ (before, autograd raised from inside the inner loop)."""
    model = _model(False)
    for p in model.parameters():
        p.requires_grad_(False)
    learner = fm.MAML(model, lr=0.3, steps=2, allow_nograd=True)
    batch = _batch()
    with torch.no_grad():
        out = learner.meta_batch(*batch)
        fast = learner.fast_weights(batch[0], batch[1])
    assert torch.isfinite(out.loss)
    theta = torch.cat([p.reshape(-1) for p in model.parameters()])
    assert torch.equal(fast.buffer, theta.expand_as(fast.buffer))
