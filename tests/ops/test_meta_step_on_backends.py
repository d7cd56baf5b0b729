"""One second-order MAML meta-step on each backend against the reference backend: the ops
composed by the engine, end to end (the per-op tests are in tests/ops/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta as fm

from harness import HAS_CUDA, INTERPRETED, assert_as_close_as_reference, assert_close, backend_params, kernel_log, require

gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA GPU")]


def _meta_gradient(backend, model_fn, tasks, lr, device, dtype=torch.float32):
    model = model_fn().to(device=device, dtype=dtype)
    tasks = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tasks]
    with fm.use_backend(backend):
        learner = fm.MAML(model, lr=lr, first_order=False, steps=1)
        out = learner.meta_batch(*tasks)
        out.loss.backward()
    return out.loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _conv_bn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 2))


def _regression_tasks(T=2, K=2):
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(T, K, 1, generator=g) * 10 - 5, torch.rand(T, K, 1, generator=g) * 10 - 5
    return [sx, torch.sin(sx), qx, torch.sin(qx)]


def _classification_tasks(T=2, K=1, ways=2):
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(T, ways * K, 1, 5, 5, generator=g), torch.randn(T, ways * K, 1, 5, 5, generator=g)
    y = torch.arange(ways).repeat_interleave(K).expand(T, -1).contiguous()
    return [sx, y, qx, y.clone()]


def _w1_mlp():
    torch.manual_seed(3)
    return fm.models.mlp((1, 40, 40, 1))


def _conv4(variant):
    def make():
        torch.manual_seed(3)
        return fm.models.conv4(in_channels=1 if variant == "strided" else 3, ways=5, variant=variant)

    return make


def _image_tasks(T, ways, shots, queries, channels, size):
    def make():
        g = torch.Generator().manual_seed(0)
        sx = torch.randn(T, ways * shots, channels, size, size, generator=g)
        qx = torch.randn(T, ways * queries, channels, size, size, generator=g)
        sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
        qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
        return [sx, sy, qx, qy]

    return make


MLP_KERNELS = ["task_linear", "task_linear_backward", "task_loss", "inner_step"]
CONV_BN_KERNELS = ["task_conv2d", "task_conv2d_backward", "task_batch_norm", "task_batch_norm_backward", "inner_step"]
# The kernels each backend implements of those (the cuda backend has no convolution or
# BatchNorm: Triton's run there).
IMPLEMENTS = {"triton": set(MLP_KERNELS + CONV_BN_KERNELS),
              "cpu": set(MLP_KERNELS + CONV_BN_KERNELS),
              "cuda": set(MLP_KERNELS)}


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu", "cuda"))
@pytest.mark.parametrize("model_fn,tasks_fn,lr,kernels", [
    pytest.param(_mlp, _regression_tasks, 0.1, MLP_KERNELS, id="mlp"),
    pytest.param(_conv_bn, _classification_tasks, 0.4, CONV_BN_KERNELS, id="conv_bn"),
    # GPU tier: the full meta-gradient at the workloads' sizes (docs/benchmarks.md).
    pytest.param(_w1_mlp, lambda: _regression_tasks(T=25, K=10), 0.01, MLP_KERNELS, id="W1", marks=gpu_only),
    pytest.param(_conv4("strided"), _image_tasks(32, 5, 1, 1, 1, 28), 0.4, CONV_BN_KERNELS, id="W2", marks=gpu_only),
    pytest.param(_conv4("pool"), _image_tasks(4, 5, 1, 15, 3, 84), 0.01, CONV_BN_KERNELS, id="W4", marks=gpu_only),
])
def test_maml_second_order_step(backend, device, model_fn, tasks_fn, lr, kernels):
    require(backend)
    tasks = tasks_fn()
    kernels = [k for k in kernels if k in IMPLEMENTS[backend]]
    expected_loss, expected = _meta_gradient("torch", model_fn, tasks, lr, device)
    with kernel_log(backend) as (ran, declined):
        actual_loss, actual = _meta_gradient(backend, model_fn, tasks, lr, device)
    if backend != "triton" and model_fn is _w1_mlp:
        kernels = ["mlp_meta_step_with_task_gradients"]  # a plain MLP: the fused meta-step
    assert not [k for k in kernels if not ran[k]], f"kernels that did not run: {kernels} vs {dict(ran)}"
    assert not declined, dict(declined)
    assert_close(actual_loss, expected_loss, "query loss", 1e-5)
    # Second order through up to four conv+BN blocks: fp32 rounding grows with the reduction
    # sizes (and MaxPool ties flip), so at full size both fp32 backends are judged against
    # the float64 meta-gradient: the backend must be as close to it as the fp32 reference is.
    if device == "cpu":
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"meta-gradient of parameter {i}", 1e-4)
        return
    _, truth = _meta_gradient("torch", model_fn, tasks, lr, device, torch.float64)
    for i, (a, e, t) in enumerate(zip(actual, expected, truth)):
        assert_as_close_as_reference(a, e, t, f"meta-gradient of parameter {i}", 1e-3)
