"""The dispatch definition (fastmeta/tools/dispatches.py, ``is_dispatch``): one rule, shared
by the profiler's counter and a launch recorder, checked call by call and on a real op."""

from __future__ import annotations

import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.tools.dispatches import HOST_SYNC, count_events, is_dispatch
from helpers import build_or_skip


def test_fastmeta_ops_count_once_and_their_native_kernel_is_not_a_second_dispatch():
    assert is_dispatch("fastmeta::task_linear", [])
    assert is_dispatch("fastmeta::task_linear_input_grad", ["fastmeta::task_linear"])  # nested op: its own call
    assert not is_dispatch("fastmeta_ext::task_linear", ["fastmeta::task_linear"])
    assert is_dispatch("fastmeta_ext::mlp_meta_step_update", ["Optimizer.step#Adam.step"])  # a bound kernel


def test_aten_ops_count_wherever_they_are_called_from_but_not_inside_another_aten_op():
    assert is_dispatch("aten::add_", [])  # the user's code, autograd's accumulation
    assert is_dispatch("aten::bmm", ["fastmeta::task_linear"])  # a fastmeta op's Python implementation
    assert is_dispatch("aten::sum", ["fastmeta_ext::task_conv2d_weight_grad", "fastmeta::task_conv2d_weight_grad"])
    assert not is_dispatch("aten::addmm", ["aten::linear", "fastmeta::task_linear"])  # part of aten::linear
    assert is_dispatch("aten::bmm", ["fastmeta.meta_backward", "fastmeta::task_linear"])  # ranges are not ops


def test_views_and_allocations_are_not_dispatches_but_a_copy_they_make_is():
    for name in ("aten::view", "aten::empty", "aten::contiguous", "aten::reshape", "aten::transpose"):
        assert not is_dispatch(name, [])
    assert is_dispatch("aten::clone", ["aten::contiguous", "fastmeta::task_conv2d"])
    assert not is_dispatch("aten::copy_", ["aten::clone", "aten::contiguous"])
    assert not is_dispatch(HOST_SYNC, ["aten::item"])  # a host sync, counted apart
    assert not is_dispatch("autograd::engine::evaluate_function: AddBackward0", [])


def test_aten_ops_inside_a_fastmeta_ops_python_are_counted():
    """task_linear on the reference backend: the op, then its reference's bmm, add and relu
    (the old counter saw 1: the op alone). On the native backend: the op alone, its C++
    kernel allocating its output only."""
    x, w, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5)
    def count(backend):
        with fm.use_backend(backend):
            ops.task_linear(x, w, b, "relu", 0.0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                ops.task_linear(x, w, b, "relu", 0.0)
        return count_events(prof.events())

    reference = count("torch")
    assert reference.dispatches == 4 and reference.fastmeta_ops == 1, reference.describe()
    assert dict(reference.by_name) == {"fastmeta::task_linear": 1, "aten::bmm": 1, "aten::add": 1, "aten::relu": 1}
    build_or_skip()
    native = count("cpu")
    assert native.dispatches == 1 and dict(native.by_name) == {"fastmeta::task_linear": 1}, native.describe()
