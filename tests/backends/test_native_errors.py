"""Native errors reach Python as the exception type the C++ side chose (TORCH_CHECK_TYPE,
TORCH_CHECK_VALUE, TORCH_CHECK_INDEX, TORCH_CHECK_NOT_IMPLEMENTED), never by matching the
message; and a non-finite value comes back from the fused meta-step's kernel as a code, from
which the op raises FloatingPointError with the same message on every backend.

The kernels are called directly (``torch.ops.fastmeta_ext.<name>``): what these tests pin is
the type the native side raises, with no Python layer in between to translate it.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastmeta as fm
from helpers import build_or_skip

# The module (fastmeta.ops re-exports a function of the same name).
module = importlib.import_module("fastmeta.ops.mlp_meta_step")
native = torch.ops.fastmeta_ext
SIZES = [2, 5, 3]


@pytest.fixture(scope="module", autouse=True)
def extension():
    build_or_skip()


def problem(loss="cross_entropy", T=3, K=4, Q=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(module.num_parameters(SIZES), generator=g, dtype=dtype)
    sx = torch.randn(T, K, SIZES[0], generator=g, dtype=dtype)
    qx = torch.randn(T, Q, SIZES[0], generator=g, dtype=dtype)
    if loss == "mse":
        sy = torch.randn(T, K, SIZES[-1], generator=g, dtype=dtype)
        qy = torch.randn(T, Q, SIZES[-1], generator=g, dtype=dtype)
    else:
        sy = torch.randint(0, SIZES[-1], (T, K), generator=g)
        qy = torch.randint(0, SIZES[-1], (T, Q), generator=g)
    lr = torch.full((1,), 0.1, dtype=dtype)
    return theta, sx, sy, qx, qy, lr


def meta_step(theta, sx, sy, qx, qy, lr, loss="cross_entropy", act="tanh", validate=True):
    return native.mlp_meta_step_with_task_gradients([theta], SIZES, act, 0.0, sx, sy, qx, qy, loss, lr, 1, False,
                                                   False, validate)


# ---------------------------------------------------------------------------------------
# The exception type is the native side's
# ---------------------------------------------------------------------------------------


def test_a_label_out_of_range_is_a_value_error_from_the_kernel():
    theta, sx, sy, qx, qy, lr = problem()
    sy = sy.clone()
    sy[1, 0] = SIZES[-1]
    with pytest.raises(ValueError,
                       match=r"support labels out of range for the model's 3 outputs \(task 1 has label 3\)"):
        meta_step(theta, sx, sy, qx, qy, lr)
    with pytest.raises(ValueError, match=r"target label -1 is not in \[0, 3\)"):
        native.task_loss(torch.randn(2, 3, 3), torch.full((2, 3), -1), "cross_entropy")


def test_a_wrong_dtype_is_a_type_error_from_the_kernel():
    theta, sx, sy, qx, qy, lr = problem()
    with pytest.raises(TypeError, match="support_x and theta must share a dtype"):
        meta_step(theta, sx.float(), sy, qx, qy, lr)
    with pytest.raises(TypeError, match="cross-entropy labels must be int64"):
        meta_step(theta, sx, sy.int(), qx, qy, lr)
    with pytest.raises(TypeError, match="pred must be float32 or float64"):
        native.task_loss(torch.ones(2, 3, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int64), "cross_entropy")
    with pytest.raises(TypeError, match="segments must be int64"):
        native.inner_step(torch.randn(2), torch.randn(3, 2), torch.randn(2), None, None, torch.tensor([0, 1.0]))


def test_a_wrong_shape_or_value_is_a_value_error_from_the_kernel():
    theta, sx, sy, qx, qy, lr = problem()
    with pytest.raises(ValueError, match="theta must hold 33 parameters"):
        meta_step(theta[:-1], sx, sy, qx, qy, lr)
    with pytest.raises(ValueError, match="act must be one of"):
        meta_step(theta, sx, sy, qx, qy, lr, act="gelu")
    with pytest.raises(ValueError, match="mask/precond must be"):
        native.inner_step(torch.randn(2), torch.randn(3, 2), torch.randn(2), torch.randn(3), None, None)


def test_a_segment_index_out_of_range_is_an_index_error_from_the_kernel():
    with pytest.raises(IndexError, match=r"segments\[1\] = 5 is not in \[0, 2\)"):
        native.inner_step(torch.randn(2), torch.randn(3, 2), torch.randn(2), None, None, torch.tensor([0, 5]))


def test_an_argument_beyond_the_kernel_is_not_implemented_error():
    theta, sx, sy, qx, qy, lr = problem()
    with pytest.raises(NotImplementedError, match="act must be relu, leaky_relu, tanh or none"):
        meta_step(theta, sx, sy, qx, qy, lr, act="sigmoid")


# ---------------------------------------------------------------------------------------
# Non-finite values: a code from the kernel, FloatingPointError from the op
# ---------------------------------------------------------------------------------------


def test_the_kernel_reports_a_non_finite_input_as_a_code_without_raising():
    theta, sx, sy, qx, qy, lr = problem("mse")
    qx = qx.clone()
    qx[2, 1, 0] = float("inf")
    out = meta_step(theta, sx, sy, qx, qy, lr, loss="mse")
    assert out[5].dtype == torch.int64 and out[5].device.type == "cpu"
    assert out[5].tolist() == [module.NONFINITE_INPUT, 2, module.NONFINITE_ARGUMENTS.index("query_x")]
    sy = sy.clone()
    sy[1, 0, 0] = float("nan")
    # The first finding wins, in the kernel's order: support_x, query_x, support_y, query_y.
    assert meta_step(theta, sx, sy, qx, qy, lr, loss="mse")[5].tolist()[:2] == [module.NONFINITE_INPUT, 2]
    clean_qx = problem("mse")[3]
    assert meta_step(theta, sx, sy, clean_qx, qy, lr, loss="mse")[5].tolist() == [
        module.NONFINITE_INPUT, 1, module.NONFINITE_ARGUMENTS.index("support_y")]
    # Without validate it does not look.
    assert meta_step(theta, sx, sy, qx, qy, lr, loss="mse", validate=False)[5].tolist() == [0, 0, 0]


def test_the_kernel_reports_a_non_finite_loss_as_a_code():
    theta, sx, sy, qx, qy, lr = problem("mse")
    sx = sx.clone()
    sx[1] *= 1e300  # finite inputs whose squared error overflows (no tanh to bound it)
    out = meta_step(theta, sx, sy, qx, qy, lr, loss="mse", act="none")
    assert out[5].tolist() == [module.NONFINITE_QUERY_LOSS, 1, -1]
    clean = meta_step(*problem("mse"), loss="mse")
    assert clean[5].tolist() == [module.NONFINITE_NONE, 0, 0]


@pytest.mark.parametrize("case", ["support_x", "query_y", "loss"])
def test_the_op_raises_floating_point_error_alike_on_the_kernel_and_the_reference(case):
    theta, sx, sy, qx, qy, lr = problem("mse")
    sx, qy = sx.clone(), qy.clone()
    if case == "support_x":
        sx[2, 0, 1] = float("nan")
        message = "support_x has NaN or Inf in task 2"
    elif case == "query_y":
        qy[0, 1, 0] = float("-inf")
        message = "query_y has NaN or Inf in task 0"
    else:
        sx[1] *= 1e300
        message = "the query loss of task 1 is "
    act = "none" if case == "loss" else "tanh"
    errors = {}
    for backend in ("cpu", "torch"):
        with fm.use_backend(backend), pytest.raises(FloatingPointError) as info:
            module.mlp_meta_step_mean(theta, SIZES, act, 0.0, sx, sy, qx, qy, "mse", lr, 1, False, validate=True)
        errors[backend] = str(info.value)
    assert errors["cpu"] == errors["torch"] and errors["cpu"].startswith(message), errors


def test_the_op_no_longer_matches_message_prefixes():
    # A native error whose text happens to start like the old prefix stays what it is.
    source = open(module.__file__).read()
    assert '"FloatingPointError: "' not in source
    theta, sx, sy, qx, qy, lr = problem()
    with fm.use_backend("cpu"), pytest.raises(ValueError, match="labels out of range"):
        sy = sy.clone()
        sy[0, 0] = 7
        module.mlp_meta_step_mean(theta, SIZES, "tanh", 0.0, sx, sy, qx, qy, "cross_entropy", lr, 1, False,
                                  validate=True)
