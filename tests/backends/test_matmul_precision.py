"""The matmul precision (fastmeta/backends/precision.py): the setting and its validation,
TF32 rounding on hand-computed bit patterns, the references' emulation of each mode
against float64, backends that implement only "ieee" declining, and the Triton launchers
launching with the mode as a constexpr."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import fastmeta as fm
from fastmeta.backends import Backend, get_backend, kernel_for, register_backend, use_backend, _REGISTRY
from fastmeta.backends.precision import MATMUL_PRECISIONS, round_to_tf32

linear_ops = importlib.import_module("fastmeta.ops.task_linear")
conv_ops = importlib.import_module("fastmeta.ops.task_conv2d")


def bits_to_float(bits: int) -> torch.Tensor:
    return torch.tensor([bits - (1 << 32) if bits >= 1 << 31 else bits], dtype=torch.int32).view(torch.float32)


def float_bits(x: torch.Tensor) -> int:
    return int(x.view(torch.int32).item()) & 0xFFFFFFFF


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- the setting ------------------------------------------------------------------------


def test_default_is_ieee_and_the_block_restores():
    assert fm.matmul_precision() == "ieee"
    with fm.matmul_precision("tf32x3") as mode:
        assert mode == "tf32x3" and fm.matmul_precision() == "tf32x3"
        with fm.matmul_precision("tf32"):
            assert fm.matmul_precision() == "tf32"
        assert fm.matmul_precision() == "tf32x3"
    assert fm.matmul_precision() == "ieee"
    block = fm.matmul_precision("tf32")  # nothing changes until entered
    assert fm.matmul_precision() == "ieee"
    with block:
        assert fm.matmul_precision() == "tf32"
    assert fm.matmul_precision() == "ieee"


def test_set_for_the_process():
    try:
        fm.set_matmul_precision("tf32")
        assert fm.matmul_precision() == "tf32"
    finally:
        fm.set_matmul_precision("ieee")
    assert fm.matmul_precision() == "ieee"


@pytest.mark.parametrize("bad", ["TF32", "fp32", "bf16x3", "", 3, None])
def test_a_bad_mode_is_refused_by_name(bad):
    if bad is None:  # matmul_precision(None) reads the mode; set_matmul_precision(None) refuses
        with pytest.raises(ValueError, match=r"mode=None.*'ieee', 'tf32x3', 'tf32'"):
            fm.set_matmul_precision(None)
        return
    with pytest.raises(ValueError, match=r"mode=.*allowed: 'ieee', 'tf32x3', 'tf32'"):
        fm.set_matmul_precision(bad)
    with pytest.raises(ValueError, match=r"mode=.*allowed"):
        fm.matmul_precision(bad)
    assert fm.matmul_precision() == "ieee"


def test_the_environment_variable_sets_the_default():
    code = "import fastmeta as fm; print(fm.matmul_precision())"
    env = {**os.environ, "FASTMETA_MATMUL_PRECISION": "tf32x3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "tf32x3", out.stderr[-2000:]
    env["FASTMETA_MATMUL_PRECISION"] = "half"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "FASTMETA_MATMUL_PRECISION='half'" in out.stderr


# -- TF32 rounding: cvt.rna.tf32.f32 -------------------------------------------------------

# (fp32 bits, TF32 bits): the 13 low mantissa bits rounded to nearest, ties away from zero.
ROUNDING = [
    (0x3F800000, 0x3F800000),  # 1.0: already TF32
    (0x3F800FFF, 0x3F800000),  # below half of the dropped unit: down
    (0x3F801000, 0x3F802000),  # exactly half: a tie, away from zero (up)
    (0x3F803000, 0x3F804000),  # a tie with an odd kept part: still away (not to even)
    (0xBF801000, 0xBF802000),  # negative tie: away from zero (more negative)
    (0xBF800FFF, 0xBF800000),  # negative, below half: towards zero
    (0x3F801001, 0x3F802000),  # above half: up
    (0x3FFFF000, 0x40000000),  # 1.99951171875: the carry moves into the exponent (2.0)
    (0x7F7FFFFF, 0x7F800000),  # fp32's largest rounds past TF32's largest: +inf
    (0x00000FFF, 0x00000000),  # a subnormal below half: zero
    (0x00001000, 0x00002000),  # a subnormal tie: away from zero
    (0x7F800000, 0x7F800000),  # +inf kept
    (0xFF800000, 0xFF800000),  # -inf kept
    (0x00000000, 0x00000000),  # +0
    (0x80000000, 0x80000000),  # -0
]


@pytest.mark.parametrize("before, after", ROUNDING, ids=[f"{b:08x}" for b, _ in ROUNDING])
def test_round_to_tf32_bit_patterns(before, after):
    assert float_bits(round_to_tf32(bits_to_float(before))) == after


def test_round_to_tf32_keeps_nan_and_refuses_other_dtypes():
    nan_low_bits = bits_to_float(0x7F800001)  # a NaN whose payload is only in the dropped bits
    assert torch.isnan(round_to_tf32(nan_low_bits)).all()
    with pytest.raises(ValueError, match="float32"):
        round_to_tf32(torch.ones(2, dtype=torch.float64))


def test_round_to_tf32_is_within_half_a_unit_and_idempotent():
    x = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    r = round_to_tf32(x)
    assert ((r - x).abs() <= x.abs() * 2.0**-11 * (1 + 2.0**-10)).all()
    assert torch.equal(round_to_tf32(r), r)
    assert (float_bits_all(r) & 0x1FFF == 0).all()


def float_bits_all(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


# -- the references' emulation against float64 ------------------------------------------------

def _linear_cases():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 40, 96, generator=g), torch.randn(3, 24, 96, generator=g)
    grad = torch.randn(3, 40, 24, generator=g)
    return {
        "task_linear": (linear_ops.reference_task_linear, (x, w, None, "none", 0.0)),
        "task_linear_shared": (linear_ops.reference_task_linear, (x, w[0], None, "none", 0.0)),
        "task_linear_input_grad": (linear_ops.reference_task_linear_input_grad, (grad, w)),
        "task_linear_weight_grad": (linear_ops.reference_task_linear_weight_grad, (grad, x, False)),
        "task_linear_weight_grad_shared": (linear_ops.reference_task_linear_weight_grad, (grad, x, True)),
    }


def _conv_cases():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 3, 8, 9, 9, generator=g), torch.randn(2, 16, 8, 3, 3, generator=g), torch.randn(2, 16)
    grad = torch.randn(2, 3, 16, 5, 5, generator=g)
    return {
        "task_conv2d": (conv_ops.reference_task_conv2d, (x, w, b, [2, 2], [1, 1])),
        "task_conv2d_shared": (conv_ops.reference_task_conv2d, (x, w[0], b[0], [2, 2], [1, 1])),
        "task_conv2d_input_grad": (conv_ops.reference_task_conv2d_input_grad, (grad, w, [9, 9], [2, 2], [1, 1])),
        "task_conv2d_input_grad_shared": (conv_ops.reference_task_conv2d_input_grad,
                                          (grad, w[0], [9, 9], [2, 2], [1, 1])),
        "task_conv2d_weight_grad": (conv_ops.reference_task_conv2d_weight_grad,
                                    (grad, x, [3, 3], [2, 2], [1, 1], False)),
        "task_conv2d_weight_grad_shared": (conv_ops.reference_task_conv2d_weight_grad,
                                           (grad, x, [3, 3], [2, 2], [1, 1], True)),
    }


CASES = {**_linear_cases(), **_conv_cases()}


def _as64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_modes_against_float64(case):
    """ieee and tf32x3 at fp32's level (≤ 2e-6 norm-wise here, tf32x3 within 2x of ieee);
    tf32 at TF32's (1e-4 to 2e-3): the orders, norm-wise."""
    reference, args = CASES[case]
    exact = reference(*_as64(args))
    errors = {}
    for mode in MATMUL_PRECISIONS:
        with fm.matmul_precision(mode):
            out = reference(*args)
        assert out.dtype == torch.float32 and out.shape == exact.shape
        errors[mode] = relative(out, exact)
    assert errors["ieee"] < 2e-6, errors
    assert errors["tf32x3"] < max(2e-6, 2 * errors["ieee"]), errors
    assert 1e-4 < errors["tf32"] < 2e-3, errors


@pytest.mark.parametrize("case", ["task_linear", "task_conv2d_weight_grad"])
def test_tf32_is_the_product_of_rounded_inputs(case):
    """tf32 = the op on TF32-rounded inputs, exactly; tf32x3 = the three-term sum, exactly."""
    reference, args = CASES[case]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)][:2]

    def with_inputs(a, b):
        new = list(args)
        new[tensors[0]], new[tensors[1]] = a, b
        return reference(*new)

    a, b = args[tensors[0]], args[tensors[1]]
    a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
    a_lo, b_lo = round_to_tf32(a - a_hi), round_to_tf32(b - b_hi)
    with fm.matmul_precision("tf32"):
        assert torch.equal(reference(*args), with_inputs(a_hi, b_hi))
    with fm.matmul_precision("tf32x3"):
        got = reference(*args)
    assert torch.equal(got, (with_inputs(a_hi, b_lo) + with_inputs(a_lo, b_hi)) + with_inputs(a_hi, b_hi))


def test_float64_is_never_rounded():
    reference, args = CASES["task_conv2d"]
    args64 = _as64(args)
    exact = reference(*args64)
    for mode in MATMUL_PRECISIONS:
        with fm.matmul_precision(mode):
            assert torch.equal(reference(*args64), exact)


def test_the_public_op_under_tf32_on_the_torch_backend():
    reference, args = CASES["task_linear"]
    with use_backend("torch"), fm.matmul_precision("tf32"):
        out = fm.ops.task_linear(*args)
    x, w = args[0], args[1]
    assert torch.equal(out, torch.bmm(round_to_tf32(x), round_to_tf32(w).transpose(1, 2)))


# -- backends: the modes they implement ---------------------------------------------------


def test_the_native_backends_implement_ieee_only_and_triton_and_torch_all():
    assert get_backend("cpu").matmul_precisions == ("ieee",)
    assert get_backend("cuda").matmul_precisions == ("ieee",)
    assert get_backend("triton").matmul_precisions == MATMUL_PRECISIONS
    assert get_backend("torch").matmul_precisions == MATMUL_PRECISIONS


@pytest.fixture
def ieee_only_backend():
    """A backend declaring "ieee" only (as cpu and cuda do), with a task_linear kernel and a
    task_loss kernel (a family the precision does not govern)."""
    calls = []
    backend = register_backend(Backend(
        name="test-ieee-only", description="test", availability=lambda: (True, ""),
        kernels={"task_linear": lambda *a: calls.append("task_linear") or NotImplemented,
                 "task_loss": lambda *a: calls.append("task_loss") or NotImplemented}))
    yield backend, calls
    _REGISTRY.pop(backend.name, None)


def test_an_ieee_only_backend_declines_gemm_kernels_under_other_modes(ieee_only_backend):
    backend, calls = ieee_only_backend
    with use_backend(backend.name):
        assert kernel_for("task_linear", "cpu")[0] == backend.name
        assert kernel_for("task_loss", "cpu")[0] == backend.name
        for mode in ("tf32x3", "tf32"):
            with fm.matmul_precision(mode):
                # Not asked for the GEMM: the reference (which emulates the mode) runs.
                assert kernel_for("task_linear", "cpu") == ("torch", None)
                assert kernel_for("task_conv2d_input_grad", "cpu") == ("torch", None)
                assert kernel_for("mlp_meta_step_with_task_gradients", "cpu") == ("torch", None)
                # Families without a matrix product are not subject to the mode.
                assert kernel_for("task_loss", "cpu")[0] == backend.name
        reference, args = CASES["task_linear"]
        with fm.matmul_precision("tf32"):
            out = fm.ops.task_linear(*args)
        assert calls == []  # never called for it
        x, w = args[0], args[1]
        assert torch.equal(out, torch.bmm(round_to_tf32(x), round_to_tf32(w).transpose(1, 2)))


def test_the_public_ops_cached_kernel_choice_follows_the_mode(ieee_only_backend):
    # The public op looks its kernel up in a cache (kernel_choice): the mode is part of the
    # key, so a mode set after the first call still reaches the next one.
    from fastmeta.backends import kernel_choice

    backend, calls = ieee_only_backend
    reference, args = CASES["task_linear"]
    with use_backend(backend.name):
        fm.ops.task_linear(*args)
        assert calls == ["task_linear"]
        assert kernel_choice("task_linear", "cpu", torch.float32)[0] == backend.name
        with fm.matmul_precision("tf32"):
            assert kernel_choice("task_linear", "cpu", torch.float32) == ("torch", None)
            fm.ops.task_linear(*args)
        assert calls == ["task_linear"]  # not called under tf32
        fm.ops.task_linear(*args)
        assert calls == ["task_linear", "task_linear"]


# -- Triton: the mode reaches tl.dot as a constexpr ------------------------------------------


class RecordingKernel:
    """Stands in for a @triton.jit kernel: records the constexprs of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)

        return launch


LAUNCHES = {
    "task_linear": ("task_linear", "task_matmul_kernel", "task_linear"),
    "task_linear_input_grad": ("task_linear", "task_matmul_kernel", "task_linear_input_grad"),
    "task_linear_weight_grad": ("task_linear", "task_matmul_kernel", "task_linear_weight_grad"),
    "task_conv2d": ("task_conv2d", "conv2d_forward_kernel", "task_conv2d"),
    "task_conv2d_input_grad": ("task_conv2d", "conv2d_input_grad_kernel", "task_conv2d_input_grad"),
    "task_conv2d_weight_grad": ("task_conv2d", "conv2d_weight_grad_kernel", "task_conv2d_weight_grad"),
}


@pytest.mark.parametrize("mode", MATMUL_PRECISIONS)
@pytest.mark.parametrize("case", sorted(LAUNCHES))
def test_the_triton_backend_launches_with_the_mode(case, mode, monkeypatch):
    pytest.importorskip("triton")
    if not get_backend("triton").available()[0]:
        pytest.skip("Triton unavailable: " + get_backend("triton").available()[1])
    family, kernel_name, kernel = LAUNCHES[case]
    module = importlib.import_module(f"fastmeta.kernels.{family}")
    recorder = RecordingKernel()
    monkeypatch.setattr(module, kernel_name, recorder)
    _, args = CASES[case]
    launcher = get_backend("triton").kernel(kernel)
    with fm.matmul_precision(mode):
        launcher(*args)
    assert recorder.launches and all(k["INPUT_PRECISION"] == mode for k in recorder.launches), recorder.launches
    # Called directly (no backend), a launcher computes in ieee.
    recorder.launches.clear()
    with fm.matmul_precision(mode):
        getattr(module, kernel)(*args)
    assert recorder.launches and all(k["INPUT_PRECISION"] == "ieee" for k in recorder.launches)
