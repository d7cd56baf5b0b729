"""The backend choice is resolved once per (op, device type, dtype, backend setting) and
cached; the cache is dropped exactly when what it was resolved from changes through the
project's API; an op call reads neither the environment nor the verification record; the
public op takes the eager path on plain tensors and the dispatcher's operator otherwise."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmeta as fm
from fastmeta import ops
from fastmeta.backends import REFERENCE, get_backend, invalidate_kernel_choices, kernel_choice, verification
from fastmeta.ops.registration import PUBLIC_OPS

backends = importlib.import_module("fastmeta.backends")  # fm.backends is the listing function


@pytest.fixture
def resolutions(monkeypatch):
    """Counts of kernel_for calls (one per resolution), from a cleared cache."""
    counts = []
    original = backends.kernel_for

    def counted(op, device_type):
        counts.append((op, device_type))
        return original(op, device_type)

    monkeypatch.setattr(backends, "kernel_for", counted)
    invalidate_kernel_choices()
    yield counts
    invalidate_kernel_choices()


def _linear_args(dtype=torch.float32):
    return (torch.randn(2, 3, 4, dtype=dtype), torch.randn(2, 5, 4, dtype=dtype), None, "relu", 0.0)


def test_an_op_resolves_its_backend_once_per_device_type_dtype_and_setting(resolutions):
    with fm.use_backend("cpu"):
        for _ in range(3):
            ops.task_linear(*_linear_args())
        assert resolutions == [("task_linear", "cpu")]
        ops.task_linear(*_linear_args(torch.float64))  # another dtype: its own entry
        assert len(resolutions) == 2
    with fm.use_backend("torch"):  # another setting: its own entry
        ops.task_linear(*_linear_args())
        assert kernel_choice("task_linear", "cpu", torch.float32) == (REFERENCE, None)
    assert len(resolutions) == 3
    with fm.use_backend("cpu"):  # back: the cached entry, no new resolution
        ops.task_linear(*_linear_args())
    assert len(resolutions) == 3


def test_the_cache_is_dropped_when_the_record_is_reloaded_or_a_table_replaced(resolutions):
    with fm.use_backend("cpu"):
        ops.task_linear(*_linear_args())
        verification.reload()
        ops.task_linear(*_linear_args())
        assert len(resolutions) == 2
        invalidate_kernel_choices()
        ops.task_linear(*_linear_args())
        assert len(resolutions) == 3


def test_the_cached_choice_is_the_backend_kernel_and_follows_a_replaced_table():
    backend = get_backend("cpu")
    backend.kernel("task_linear")
    original = backend.kernels["task_linear"]
    calls = []

    def replacement(*args):
        calls.append(1)
        return original(*args)

    with fm.use_backend("cpu"):
        ops.task_linear(*_linear_args())
        assert kernel_choice("task_linear", "cpu", torch.float32) == ("cpu", original)
        backend.kernels["task_linear"] = replacement
        try:
            ops.task_linear(*_linear_args())
            assert calls == []  # the cached choice: the table is not read per call
            invalidate_kernel_choices()
            ops.task_linear(*_linear_args())
            assert calls == [1]
        finally:
            backend.kernels["task_linear"] = original
            invalidate_kernel_choices()


def test_the_public_ops_one_scan_sends_only_uniform_arguments_to_the_native_kernel():
    """The public op scans its arguments once (device, dtype, and whether every tensor is on
    that device and every float one of that dtype) and calls the native launcher's
    ``after_uniform_scan``, which skips the launcher's own scan; mixed arguments reach the
    reference, never the kernel."""
    backend = get_backend("cpu")
    backend.kernel("task_linear")
    original = backend.kernels["task_linear"]
    scanned = []

    def full_launcher(*args):
        raise AssertionError("the public op calls after_uniform_scan where the launcher has one")

    def after_uniform_scan(dtype, *args):
        scanned.append(dtype)
        return original.after_uniform_scan(dtype, *args)

    full_launcher.after_uniform_scan = after_uniform_scan
    x, w, b, act, slope = _linear_args(torch.float64)
    with fm.use_backend("cpu"):
        backend.kernels["task_linear"] = full_launcher
        invalidate_kernel_choices()
        try:
            out = ops.task_linear(x, w, b, act, slope)
            assert scanned == [torch.float64]
            torch.testing.assert_close(out, torch.relu(torch.bmm(x, w.transpose(1, 2))), rtol=1e-12, atol=1e-12)
            with pytest.raises(RuntimeError):  # float32 x, float64 w: the reference's own error
                ops.task_linear(x.float(), w, b, act, slope)
            assert scanned == [torch.float64]  # the kernel never saw the mixed call
        finally:
            backend.kernels["task_linear"] = original
            invalidate_kernel_choices()


class _CountingEnviron(dict):
    def __init__(self, data):
        super().__init__(data)
        self.reads = 0

    def get(self, *args):
        self.reads += 1
        return super().get(*args)

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        self.reads += 1
        return super().__contains__(key)


def test_an_op_call_reads_neither_the_environment_nor_the_record(monkeypatch):
    x, w, b = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 5)
    with fm.use_backend("auto"):
        ops.task_linear(x, w, b, "tanh", 0.0).sum().backward()  # resolved and loaded
        environ = _CountingEnviron(os.environ)
        monkeypatch.setattr(os, "environ", environ)
        record_reads = []
        monkeypatch.setattr(verification, "is_verified", lambda *a: record_reads.append(a) or False)
        ops.task_linear(x, w, b, "tanh", 0.0).sum().backward()
        with torch.no_grad():
            ops.task_linear(x, w, b, "tanh", 0.0)
    assert environ.reads == 0
    assert record_reads == []


def test_refresh_environment_reads_triton_interpret_again():
    triton = get_backend("triton")
    before = os.environ.get("TRITON_INTERPRET")
    try:
        os.environ["TRITON_INTERPRET"] = "0"
        assert ("cpu" in triton.device_types()) == (before == "1")  # not read again by itself
        backends.refresh_environment()
        assert triton.device_types() == ("cuda",)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        backends.refresh_environment()
    assert ("cpu" in triton.device_types()) == (before == "1")


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_the_public_op_is_the_dispatchers_operator():
    """Modes, fake tensors, compile and transforms see ``fastmeta::<name>`` itself; the
    result is the eager path's."""
    args = _linear_args()
    with fm.use_backend("cpu"):
        eager = ops.task_linear(*args)
        with _SeenOps() as seen:
            traced = ops.task_linear(*args)
    assert seen.names == ["fastmeta::task_linear"]
    torch.testing.assert_close(traced, eager)


def test_the_eager_path_records_the_op_for_the_profiler():
    """Under torch.profiler, an eager call is one range named as the operator."""
    with fm.use_backend("cpu"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.task_linear(*_linear_args())
    names = [e.name for e in prof.events()]
    assert names.count("fastmeta::task_linear") == 1
    assert "fastmeta_ext::task_linear" in names


def test_every_public_op_is_its_dispatchers_operator():
    for name, op in PUBLIC_OPS.items():
        assert op.default is getattr(torch.ops.fastmeta, name).default
        assert op._qualname == f"fastmeta::{name}"


def test_a_mutating_op_bumps_the_versions_of_what_it_writes_on_the_eager_path():
    from fastmeta.backends.table import FAMILIES

    args = FAMILIES["mlp_meta_step_update"].sample_args["mlp_meta_step_update"]()
    params, exp_avgs, flag = args[0], args[1], args[4]
    before = [t._version for t in (*params, *exp_avgs, flag)]
    with fm.use_backend("cpu"), torch.no_grad():
        ops.mlp_meta_step_update(*args)
    after = [t._version for t in (*params, *exp_avgs, flag)]
    assert all(a > b for a, b in zip(after, before))
