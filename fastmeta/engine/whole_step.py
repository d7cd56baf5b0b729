"""Whole-step CUDA graphs: one meta-iteration captured once and replayed.

A meta-iteration at the paper's sizes is hundreds of small kernels; launched eagerly,
their launch cost dominates (5.85 µs per eager launch against 0.96 µs inside a graph on
an H200; docs/benchmarks.md). ``learner.capture(optimizer, sx, sy, qx, qy)`` records the
inner loop, the query loss, the meta-gradient and the optimizer step into one CUDA graph;
each call of the returned :class:`CapturedMetaStep` copies a new meta-batch into the
static input buffers and replays it.

- Shapes are static: every later meta-batch must have the captured shapes and dtypes.
- Validation (NaN/Inf, label range) runs once, on the meta-batch given at capture (the
  learner does it before building this); the graph itself runs unvalidated (a check that
  syncs cannot be captured).
- The optimizer must be capturable (``torch.optim.Adam(..., capturable=True)``): its
  step counter lives on the GPU.
- Capture runs a few warm-up iterations on a side stream (CUDA graphs need the allocator
  and lazy state settled first). Parameters and optimizer state are restored afterwards,
  in place, so capturing does not train.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fastmeta.engine.meta_iteration import MetaBatchOutput

MetaBatchFunction = Callable[[Tensor, Tensor, Tensor, Tensor], MetaBatchOutput]


class CapturedMetaStep:
    """A captured meta-iteration. ``step(sx, sy, qx, qy)`` runs one and returns its output.

    meta_batch: runs one meta-batch (unvalidated) and returns its output; parameters: the
    learner's parameters, which the optimizer must hold and nothing else.
    """

    def __init__(self, meta_batch: MetaBatchFunction, parameters: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, inputs: tuple[Tensor, ...], warmup: int = 3):
        if not all(t.is_cuda for t in inputs):
            raise ValueError("CUDA-graph capture needs the meta-batch on a CUDA device")
        if not optimizer.defaults.get("capturable", False):
            raise ValueError(
                "the optimizer must be capturable, e.g. torch.optim.Adam(params, lr, capturable=True)"
            )
        learner_params = {id(p) for p in parameters}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in learner_params:
                    raise ValueError("the optimizer holds tensors that are not learner parameters")
        self._meta_batch = meta_batch
        self.optimizer = optimizer
        self.static_inputs = tuple(t.clone() for t in inputs)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {
            id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
            for p in params
            if p in optimizer.state
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._iteration()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=False)
        with torch.cuda.graph(self.graph):
            self.static_output = self._iteration()
        # Undo the warm-up's training, in place: the graph holds these addresses.
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
                state = optimizer.state.get(p, {})
                before = saved_state.get(id(p))
                for k, v in state.items():
                    if isinstance(v, Tensor):
                        if before is not None and k in before:
                            v.copy_(before[k])
                        else:
                            v.zero_()  # a fresh optimizer's state: zeros, step 0
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()

    def _iteration(self) -> MetaBatchOutput:
        self.optimizer.zero_grad(set_to_none=False)
        out = self._meta_batch(*self.static_inputs)
        out.loss.backward()
        self.optimizer.step()
        return out

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaBatchOutput:
        for name, static, new in zip(
            ("support_x", "support_y", "query_x", "query_y"),
            self.static_inputs,
            (support_x, support_y, query_x, query_y),
        ):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(
                    f"{name} is {list(new.shape)} {new.dtype}, but the step was captured for "
                    f"{list(static.shape)} {static.dtype}"
                )
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        out = self.static_output
        return MetaBatchOutput(
            out.loss.detach().clone(),
            out.task_loss.detach().clone(),
            None if out.accuracy is None else out.accuracy.clone(),
        )
