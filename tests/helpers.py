"""The helpers that tests in more than one module share: the one module tests import
helpers from (besides conftest's fixtures and tests/ops/harness.py, the op-check harness).
A test module never imports another test module (tests/test_layers.py checks it).
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib

import pytest
import torch
from torch import nn

import fastmeta as fm
from fastmeta.ops.mlp_meta_step import num_parameters
from fastmeta.testing.reference_loop import flat_grad, learner_coefficient, per_task_query_losses, relative_error


# ---------------------------------------------------------------------------------------
# Models, tasks and meta-gradients (from the learner tests)
# ---------------------------------------------------------------------------------------


def conv_bn_pool_net(ways: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, ways),
    )


def classification_tasks(T=3, ways=3, shots=2, queries=2, image=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, ways * shots, 1, image, image, generator=g, dtype=dtype)
    qx = torch.randn(T, ways * queries, 1, image, image, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


def regression_tasks(T=4, shots=5, queries=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(T, shots, 1, generator=g, dtype=dtype) * 10 - 5
    qx = torch.rand(T, queries, 1, generator=g, dtype=dtype) * 10 - 5
    amp = torch.rand(T, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=g, dtype=dtype) * torch.pi
    return sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "mlp":
        return fm.models.mlp((1, 16, 16, 1))
    return conv_bn_pool_net()


def make_tasks(kind: str):
    return regression_tasks() if kind == "mlp" else classification_tasks()


def per_step_bn_reference(learner):
    """MAML++'s per-step BatchNorm values as the reference loop sets them: after inner step
    s, every BatchNorm weight and bias takes row min(s, steps - 1) of ``bn_per_step``
    (its columns: those parameters in ``named_parameters()`` order). None when off."""
    if not getattr(learner, "per_step_bn", False):
        return None
    norms = {n for n, m in learner.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    named = [(n, p.shape) for n, p in learner.module.named_parameters() if n.rpartition(".")[0] in norms]

    def values(step):
        row = learner.bn_per_step[min(step, learner.steps - 1)]
        parts = row.split([shape.numel() for _, shape in named])
        return {n: part.view(shape) for (n, shape), part in zip(named, parts)}

    return values


def loop_meta_gradient(learner, tasks, steps, first_order, adapting=lambda n: True, step_weights=None):
    params = [p for p in learner.parameters() if p.requires_grad]
    losses = per_task_query_losses(
        learner.module, *tasks, steps, first_order, learner_coefficient(learner), adapting,
        per_step_bn_reference(learner), step_weights,
    )
    return flat_grad(losses.mean(), params), losses


def fastmeta_meta_gradient(learner, tasks):
    out = learner.meta_batch(*tasks)
    return flat_grad(out.loss, [p for p in learner.parameters() if p.requires_grad]), out


# ---------------------------------------------------------------------------------------
# Central finite differences (from the finite-difference tests)
# ---------------------------------------------------------------------------------------


def smooth_conv_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )


def central_difference_gradient(meta_loss, theta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.empty_like(theta)
    for i in range(theta.numel()):
        step = torch.zeros_like(theta)
        step[i] = eps
        grad[i] = (meta_loss(theta + step) - meta_loss(theta - step)) / (2 * eps)
    return grad


def check_against_finite_differences(learner, tasks):
    params = list(learner.parameters())
    layout = fm.Layout([(str(i), tuple(p.shape)) for i, p in enumerate(params)])
    theta0 = layout.pack([p.detach() for p in params])

    def meta_loss(theta):
        with torch.no_grad():
            for p, v in zip(params, layout.views(theta)):
                p.copy_(v)
        with torch.enable_grad():
            return learner.meta_batch(*tasks).loss.detach()

    analytic = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(learner.meta_batch(*tasks).loss, params)]
    )
    numeric = central_difference_gradient(meta_loss, theta0)
    meta_loss(theta0)  # restore
    return relative_error(analytic, numeric)


# ---------------------------------------------------------------------------------------
# The C++ extension (from the extension build tests)
# ---------------------------------------------------------------------------------------


def build_or_skip():
    """Build (or load) the extension: skip without a C++ compiler, fail if a build breaks."""
    from fastmeta.backends import extension

    ok, reason = extension.build()
    if not ok:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {reason}")
        pytest.fail(f"the C++ extension failed to build: {reason}")
    return extension


# ---------------------------------------------------------------------------------------
# Image files (from the Omniglot tests)
# ---------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR chunk declaring width x height pixels (no pixel data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + end


# ---------------------------------------------------------------------------------------
# The fused small-MLP meta-step's problems (from tests/ops/test_mlp_meta_step.py)
# ---------------------------------------------------------------------------------------


# (layer_sizes, act, loss, lr kind, steps, K, first_order). W1 first; the rest cover odd
# widths (tails of the 16-wide tiles), K = 1 … 50, 1–5 steps, every fused activation.
CASES = [
    ([1, 40, 40, 1], "relu", "mse", "step", 1, 10, False),
    ([1, 40, 40, 1], "relu", "mse", "step", 1, 10, True),
    ([3, 17, 9, 4], "tanh", "cross_entropy", "tensor", 2, 5, False),
    ([2, 33, 5], "leaky_relu", "cross_entropy", "param", 3, 1, False),
    ([5, 23, 19, 3], "tanh", "mse", "param", 5, 50, False),
    ([4, 7, 2], "relu", "cross_entropy", "tensor", 4, 50, True),
    ([1, 40, 40, 1], "leaky_relu", "mse", "tensor", 5, 25, False),
    ([3, 65, 3], "tanh", "cross_entropy", "step", 1, 17, True),
    ([6, 31, 31, 31, 2], "relu", "mse", "step", 2, 13, False),
    ([2, 33, 5], "none", "mse", "param", 2, 3, False),
]


IDS = ["-".join(map(str, [".".join(map(str, c[0])), *c[1:]])) for c in CASES]


def make_problem(layer_sizes, act, loss, lr_kind, steps, K, Q=None, T=6, dtype=torch.float32, device="cpu",
                 seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = Q or max(K - 2, 1)
    P = num_parameters(layer_sizes)
    # Glorot-like scale per layer so that activations stay O(1) through deep stacks.
    parts = []
    for i, o in zip(layer_sizes[:-1], layer_sizes[1:]):
        parts += [torch.randn(o * i, generator=g) * (2.0 / (i + o)) ** 0.5, torch.randn(o, generator=g) * 0.1]
    theta = torch.cat(parts)
    sx = torch.randn(T, K, layer_sizes[0], generator=g)
    qx = torch.randn(T, Q, layer_sizes[0], generator=g)
    if loss == "mse":
        sy = torch.randn(T, K, layer_sizes[-1], generator=g)
        qy = torch.randn(T, Q, layer_sizes[-1], generator=g)
    else:
        sy = torch.randint(0, layer_sizes[-1], (T, K), generator=g)
        qy = torch.randint(0, layer_sizes[-1], (T, Q), generator=g)
    S = 2 * (len(layer_sizes) - 1)
    shape = {"step": (steps,), "tensor": (steps, S), "param": (steps, P)}[lr_kind]
    lr = torch.rand(shape, generator=g) * 0.08 + 0.02
    w = torch.rand(T, generator=g) + 0.5

    def cast(t):
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return [cast(t) for t in (theta, sx, sy, qx, qy, lr, w)]


def load_script(path, module_name: str):
    """A script of bench/ (not a package) imported as ``module_name``; registered in
    sys.modules first, where dataclasses look their module up."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class GridLog:
    """A jitted Triton kernel that logs the grid of each launch (``log[grid](...)`` runs
    ``kernel[grid](...)``): what a launcher actually launched, for the plan tests."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]
