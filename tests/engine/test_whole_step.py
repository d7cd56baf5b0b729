"""Whole-step CUDA graphs: the same parameters as eager mode after 10 steps."""

from __future__ import annotations

import copy

import pytest
import torch

import fastmeta as fm
from helpers import classification_tasks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_capture_on_the_cpu_covers_plain_mlps_only():
    """On the CPU, capture is the fused MLP step; a conv net there says what to use instead."""
    learner = fm.MAML(fm.models.conv4(image_size=16, ways=3), 0.4)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    with pytest.raises(ValueError, match="plain MLP.*use meta_batch"):
        learner.capture(opt, *classification_tasks(image=16))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("learner_kind", ["maml", "model-aware"])
def test_captured_step_equals_eager_after_ten_steps(learner_kind):
    """The first replay equals eager exactly (same parameters, same kernels); over ten Adam
    steps the graph stays as close to eager as a second eager run does. Adam divides by
    sqrt(v): a gradient entry near zero turns fp32 reduction-order noise (cuDNN's
    backward algorithms, atomics) into a full-size update, so eager itself drifts."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = fm.models.conv4(image_size=28, ways=5).cuda()

    def make(m):
        if learner_kind == "maml":
            return fm.MAML(m, 0.4)
        return fm.ModelAwareMAML(m, 0.1, steps=2, gates=True)

    eager_learner = make(model)
    control_learner = make(copy.deepcopy(model))
    graph_learner = make(copy.deepcopy(model))
    control_learner.load_state_dict(eager_learner.state_dict())
    graph_learner.load_state_dict(eager_learner.state_dict())
    eager_opt = torch.optim.Adam(eager_learner.parameters(), 1e-3, capturable=True)
    control_opt = torch.optim.Adam(control_learner.parameters(), 1e-3, capturable=True)
    graph_opt = torch.optim.Adam(graph_learner.parameters(), 1e-3, capturable=True)
    batches = [
        [t.cuda() for t in classification_tasks(T=8, ways=5, shots=1, queries=1, image=28, seed=s)]
        for s in range(10)
    ]
    step = graph_learner.capture(graph_opt, *batches[0])
    for p_graph, p_eager in zip(graph_learner.parameters(), eager_learner.parameters()):
        assert torch.equal(p_graph, p_eager), "capturing changed the parameters"

    def eager_step(learner, opt, batch):
        opt.zero_grad()
        out = learner.meta_batch(*batch)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    graph_drift, eager_drift = [], []
    for i, batch in enumerate(batches):
        eager_loss = eager_step(eager_learner, eager_opt, batch)
        control_loss = eager_step(control_learner, control_opt, batch)
        graph_loss = step(*batch).loss
        if i == 0:  # the same parameters: only the kernels' own rounding may differ
            torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-5, atol=1e-6)
        graph_drift.append(abs(graph_loss - eager_loss).item())
        eager_drift.append(abs(control_loss - eager_loss).item())
    allowed = [max(1e-5, 10 * e) for e in eager_drift]
    assert all(g <= a for g, a in zip(graph_drift, allowed)), (
        f"graph-eager loss gap per step {graph_drift}; eager-eager {eager_drift}")
    param_gap = max((a - b).abs().max().item() for a, b in zip(eager_learner.parameters(), graph_learner.parameters()))
    control_gap = max((a - b).abs().max().item()
                      for a, b in zip(eager_learner.parameters(), control_learner.parameters()))
    assert param_gap <= max(1e-5, 10 * control_gap), (param_gap, control_gap)
