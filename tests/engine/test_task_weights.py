"""The flat task buffer's views and packing (fastmeta/engine/task_weights.py): one autograd
node each way, the same values and gradients as torch's split + view and cat, to second
order, for the Python nodes and for their C++ versions (csrc/engine/flat_segments.cpp),
which equal them bit for bit; and the stride test the conv launchers use instead of
``t[0].is_contiguous()``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import fastmeta as fm
from fastmeta.backends import extension
from fastmeta.engine import task_weights
from fastmeta.ops.task_linear import each_task_contiguous

NODE_NAMES = {"python": ("_SplitSegmentsBackward", "_JoinSegmentsBackward"), "cpp": ("CppFunction", "CppFunction")}


def _extension_or_skip() -> None:
    ok, reason = extension.build()
    if not ok:
        pytest.skip(f"the C++ extension is unavailable: {reason}")


@pytest.fixture(params=["python", "cpp"])
def nodes(request, monkeypatch):
    """Which implementation of the segment nodes runs: the Python reference or the C++ one."""
    if request.param == "cpp":
        _extension_or_skip()
    else:
        monkeypatch.setattr(task_weights, "native_segment_nodes", lambda tensors: None)
    return request.param

SHAPES = [("conv.weight", (3, 2, 3, 3)), ("conv.bias", (3,)), ("bn.weight", (3,)), ("head.weight", (4, 12)),
          ("head.bias", (4,))]


def _profiled_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_views_of_a_buffer_that_needs_grad_come_from_one_node_and_backward_runs_no_reshape_node(nodes):
    layout = fm.Layout(SHAPES)
    flat = torch.randn(2, layout.numel, dtype=torch.float64, requires_grad=True)
    views = layout.views(flat)
    assert [tuple(v.shape) for v in views] == [(2, *shape) for _, shape in SHAPES]
    assert len({id(v.grad_fn) for v in views}) == 1  # one node for all segments
    assert type(views[0].grad_fn).__name__ == NODE_NAMES[nodes][0]
    loss = sum((v.sin() * (k + 1)).sum() for k, v in enumerate(views))
    names = _profiled_names(lambda: torch.autograd.grad(loss, flat))
    assert "ViewBackward0" not in names and "aten::cat" in names


def test_views_and_their_gradients_equal_split_and_view_to_second_order(nodes):
    layout = fm.Layout(SHAPES)
    flat = torch.randn(2, layout.numel, dtype=torch.float64, requires_grad=True)
    reference = flat.detach().clone().requires_grad_(True)

    def loss_of(views):  # reads every segment but head.bias
        w, b, g, h, _ = views
        return (torch.tanh(w).pow(2).sum((1, 2, 3, 4)) * (b * g).sum(1) + h.sin().sum((1, 2))).sum()

    ref_views = [p.view(2, *shape) for p, (_, shape) in zip(reference.split(layout._sizes, dim=1), SHAPES)]
    for got, want in zip(layout.views(flat), ref_views):
        assert torch.equal(got, want)
    (grad,) = torch.autograd.grad(loss_of(layout.views(flat)), flat, create_graph=True)
    (want,) = torch.autograd.grad(loss_of(ref_views), reference, create_graph=True)
    assert torch.equal(grad.detach(), want.detach())
    (second,) = torch.autograd.grad((grad * grad.detach().cos()).sum(), flat)
    (second_want,) = torch.autograd.grad((want * want.detach().cos()).sum(), reference)
    torch.testing.assert_close(second, second_want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(
        lambda f: torch.autograd.grad(loss_of(layout.views(f)), f, create_graph=True)[0], (flat,))


def test_pack_is_one_node_whose_backward_hands_each_parameter_its_segment_to_second_order(nodes):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4)).double()
    layout = fm.Layout.of_module(model)
    params = list(model.parameters())
    theta = layout.pack(params)
    assert type(theta.grad_fn).__name__ == NODE_NAMES[nodes][1]
    assert torch.equal(theta.detach(), torch.cat([p.detach().reshape(-1) for p in params]))
    weights = torch.linspace(-1, 1, layout.numel, dtype=torch.float64)
    names = _profiled_names(lambda: torch.autograd.grad((theta.sin() * weights).sum(), params, retain_graph=True))
    assert "ViewBackward0" not in names
    grads = torch.autograd.grad((theta.sin() * weights).sum(), params)
    wants = torch.autograd.grad((torch.cat([p.reshape(-1) for p in params]).sin() * weights).sum(), params)
    for g, w in zip(grads, wants):
        assert g.shape == w.shape and torch.equal(g, w)
    assert torch.autograd.gradgradcheck(lambda *ps: (layout.pack(ps).sin() * weights).sum(), tuple(params))


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2), pad=st.integers(0, 3), start=st.integers(0, 2),
       step=st.sampled_from([1, 2]), expand=st.booleans())
def test_views_of_strided_and_expanded_buffers_equal_narrow_and_view(lead, pad, start, step, expand):
    layout = fm.Layout(SHAPES)
    P = layout.numel
    if expand:  # a per-segment coefficient expanded over the buffer (engine/plan.py): stride 0
        flat = torch.randn(()).expand(*lead, P)
    else:  # a window of a wider buffer, its last dim strided
        wide = torch.randn(*lead, start + step * P + pad)
        flat = wide[..., start:start + step * P:step]
    views = layout.views(flat)
    for s, v in zip(layout.segments, views):
        want = flat.narrow(-1, s.offset, s.numel).reshape(*lead, *s.shape)
        assert v.shape == want.shape and torch.equal(v, want)
        assert v.data_ptr() == flat.narrow(-1, s.offset, s.numel).data_ptr() or s.numel == 0  # a view, not a copy


def _run_both(fn):
    """fn() with the C++ nodes, then with the Python nodes (the reference)."""
    got = fn()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(task_weights, "native_segment_nodes", lambda tensors: None)
        want = fn()
    return got, want


def _assert_all_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == w.shape and g.stride() == w.stride() and torch.equal(g, w)


@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_cpp_nodes_equal_the_python_nodes_bit_for_bit_to_second_order(lead):
    """Views (their strides too), the joined gradient with segments nothing read (zeros from
    the cached zero), and the second-order gradient through the join's own backward."""
    _extension_or_skip()
    layout = fm.Layout(SHAPES)
    base = torch.randn(*lead, layout.numel, dtype=torch.float64)

    def run():
        flat = base.clone().requires_grad_(True)
        views = layout.views(flat)
        w, b, g, h, _ = views  # head.bias is never read
        loss = (torch.tanh(w).pow(2).sum() * (b * g).sum() + h.sin().sum() * 0.5)
        (grad,) = torch.autograd.grad(loss, flat, create_graph=True)
        (second,) = torch.autograd.grad((grad * grad.detach().cos()).sum(), flat)
        return [*(v.detach() for v in views), grad.detach(), second]

    got, want = _run_both(run)
    _assert_all_equal(got, want)


def test_cpp_join_equals_the_python_join_with_missing_segments_and_passes_gradgradcheck():
    _extension_or_skip()
    layout = fm.Layout(SHAPES)
    split, join = task_weights.native_segment_nodes(())
    parts = [None if k in (1, 4) else torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
             for k, (_, shape) in enumerate(SHAPES)]
    got = join(parts, layout.encoded_shapes, [2])
    want = task_weights._JoinSegments.apply((layout, (2,)), *parts)
    assert torch.equal(got, want)
    given = [p for p in parts if p is not None]

    def joined(*ts):
        it = iter(ts)
        return join([None if p is None else next(it) for p in parts], layout.encoded_shapes, [2]).sin()

    assert torch.autograd.gradcheck(joined, tuple(given))
    assert torch.autograd.gradgradcheck(joined, tuple(given))
    flat = torch.randn(2, layout.numel, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda f: tuple(v.sin() for v in split(f, layout.encoded_shapes)), (flat,))


def test_cpp_split_refuses_a_buffer_of_another_layout_by_name():
    _extension_or_skip()
    layout = fm.Layout(SHAPES)
    split, _ = task_weights.native_segment_nodes(())
    with pytest.raises(ValueError, match="flat must end in a dim of"):
        split(torch.randn(2, layout.numel + 1, requires_grad=True), layout.encoded_shapes)


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_the_python_nodes_run_under_dispatch_modes_subclasses_transforms_other_backends_and_devices():
    _extension_or_skip()
    layout = fm.Layout(SHAPES)
    flat = torch.randn(2, layout.numel, requires_grad=True)
    assert type(layout.views(flat)[0].grad_fn).__name__ == "CppFunction"
    with _Passthrough():
        assert type(layout.views(flat)[0].grad_fn).__name__ == "_SplitSegmentsBackward"
    with fm.use_backend("torch"):  # the reference backend: plain PyTorch throughout
        assert type(layout.views(flat)[0].grad_fn).__name__ == "_SplitSegmentsBackward"
    with fm.use_backend("cpu"):
        assert type(layout.views(flat)[0].grad_fn).__name__ == "CppFunction"
    assert task_weights.native_segment_nodes((torch.randn(3, device="meta"),)) is None  # CPU tensors only
    assert task_weights.native_segment_nodes((nn.Parameter(torch.randn(3)),)) is not None  # parameters are plain
    subclass = torch.randn(2, layout.numel).as_subclass(_Sub).requires_grad_(True)
    assert task_weights.native_segment_nodes((subclass,)) is None
    seen = []
    torch.func.vmap(lambda f: seen.append(task_weights.native_segment_nodes((f,))) or f.sum())(torch.randn(2, 3))
    assert seen == [None]


class _Sub(torch.Tensor):
    pass


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_each_task_contiguous_is_what_torch_says_of_each_task(data):
    rank = data.draw(st.integers(1, 4))
    shape = [data.draw(st.integers(1, 3))] + [data.draw(st.integers(0, 3)) for _ in range(rank)]
    permutation = data.draw(st.permutations(list(range(1, rank + 1))))
    t = torch.randn(*shape).permute(0, *permutation)
    if data.draw(st.booleans()) and t.size(1) > 1:
        t = t[:, ::2]
    if data.draw(st.booleans()):
        t = t[:1].expand(t.shape)  # a task stride of 0
    assert each_task_contiguous(t) == t[0].is_contiguous()
