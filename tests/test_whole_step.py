"""Whole-step CUDA graphs: the same parameters as eager mode after 10 steps."""

from __future__ import annotations

import copy

import pytest
import torch

import fastmeta as fm
from test_learners import classification_tasks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_capture_needs_cuda_tensors():
    learner = fm.MAML(fm.models.conv4(image_size=16, ways=3), 0.4)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    with pytest.raises(ValueError, match="CUDA device"):
        learner.capture(opt, *classification_tasks(image=16))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("learner_kind", ["maml", "model-aware"])
def test_captured_step_equals_eager_after_ten_steps(learner_kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = fm.models.conv4(image_size=28, ways=5).cuda()

    def make(m):
        if learner_kind == "maml":
            return fm.MAML(m, 0.4)
        return fm.ModelAwareMAML(m, 0.1, steps=2, gates=True)

    eager_learner = make(model)
    graph_learner = make(copy.deepcopy(model))
    graph_learner.load_state_dict(eager_learner.state_dict())
    eager_opt = torch.optim.Adam(eager_learner.parameters(), 1e-3, capturable=True)
    graph_opt = torch.optim.Adam(graph_learner.parameters(), 1e-3, capturable=True)
    batches = [
        [t.cuda() for t in classification_tasks(T=8, ways=5, shots=1, queries=1, image=28, seed=s)]
        for s in range(10)
    ]
    step = graph_learner.capture(graph_opt, *batches[0])
    for batch in batches:
        eager_opt.zero_grad()
        eager_out = eager_learner.meta_batch(*batch)
        eager_out.loss.backward()
        eager_opt.step()
        graph_out = step(*batch)
        assert torch.allclose(graph_out.loss, eager_out.loss.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_learner.parameters(), graph_learner.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
