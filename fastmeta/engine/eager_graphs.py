"""``meta_batch`` on a CUDA device, replayed from CUDA graphs without asking.

A user's own loop (``out = learner.meta_batch(...)``, ``out.loss.backward()``,
``opt.step()``) launches hundreds of small kernels per meta-iteration from Python; on a
GPU their launch cost, not their arithmetic, sets the pace. :class:`MetaBatchGraphs`
captures, per input shape, the meta-iteration's forward (inner loop, query loss) in one
CUDA graph and its meta-gradient in another, and runs each later call with those shapes as
two replays behind one autograd node (:class:`GraphedMetaBatch`): its forward copies the
meta-batch into the graph's static inputs and replays the forward graph; its backward
replays the meta-gradient graph and hands each parameter its gradient, as
``loss.backward()`` does eagerly. The loop is unchanged, and so is what it computes.

The cache's policy:

- Key: the four inputs' shapes, dtypes and device, and the call's options
  (``first_order``, ``step_weights``, ``task_chunk``, ``steps``). A key runs eagerly the
  first time it is seen (checking the shapes against the model, warming lazy state), and
  is captured at its second call. Options that change at every call (a multi-step loss's
  annealed weights) are thus never captured.
- Bounded: at most ``capacity`` graphs, the least recently used dropped first. More than
  ``max_shapes`` distinct input shapes, or more than ``capacity`` captures of keys dropped
  before, and the learner gives up: every later call runs eagerly, with one warning.
- The rule for captured state (:class:`fastmeta.engine.whole_step.WatchedState`): what
  the graphs read from the learner (rates, steps, train/eval mode, ``requires_grad``, the
  parameters' memory, the backend, ...) is checked at every call, and a change drops
  every graph; the next calls capture again (first eagerly, then captured).
- Eager, and why in :attr:`MetaBatchGraphs.eager_reason`, where a graph cannot stand in
  for the call: inputs off the capture's device (the CPU), no autograd recording
  (``torch.no_grad``), inputs that require grad, autocast, ``task_chunk`` (its
  recomputation runs in the backward), a capture already under way. A capture that fails
  (a sync in a user's loss or model, memory) turns the graphs off for the learner, with
  the reason in :attr:`MetaBatchGraphs.off_reason`.
- Validation stays outside the graphs: under ``validate`` the inputs' NaN/Inf and the
  labels' range are checked before the replay (one sync; a label out of range must not
  reach a kernel), and the query losses' finiteness after it (one sync). Either failing,
  the call runs eagerly, which raises the eager path's error (argument, task).
- The loss is differentiable once (its backward replays a graph); a second-order
  derivative of the meta-loss itself needs the eager path (``cuda_graphs=False``).
- A second forward of the same key before the first one's backward (two meta-batches
  summed into one loss) is handled: that backward replays its forward again first.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastmeta.engine.meta_iteration import MetaIteration
from fastmeta.engine.plan import AdaptationPlan
from fastmeta.engine.types import MetaBatchOutput
from fastmeta.engine.whole_step import WatchedState

INPUT_NAMES = ("support_x", "support_y", "query_x", "query_y")


class CapturedPair(NamedTuple):
    """A forward and a backward, captured: replaying one recomputes its static results in place."""

    replay_forward: Callable[[], None]
    replay_backward: Callable[[], None]
    output: MetaBatchOutput
    grads: tuple[Tensor | None, ...]
    keep: tuple = ()  # what must live as long as the replays (the graphs)


class CudaGraphCapture:
    """Captures ``forward`` then ``backward`` as two CUDA graphs sharing one memory pool,
    after ``warmup`` runs of both on a side stream (lazy state, the allocator, autotuning)."""

    device_type = "cuda"

    def __init__(self, warmup: int = 2):
        self.warmup = warmup

    def __call__(self, forward: Callable[[], MetaBatchOutput],
                 backward: Callable[[], tuple[Tensor | None, ...]]) -> CapturedPair:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
                backward()
        torch.cuda.current_stream().wait_stream(side)
        forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward_graph, pool=pool):
            output = forward()
        with torch.cuda.graph(backward_graph, pool=pool):
            grads = backward()
        return CapturedPair(forward_graph.replay, backward_graph.replay, output, tuple(grads),
                            (forward_graph, backward_graph))


class GraphEntry:
    """One key's captured pair and its static buffers.

    run: the meta-iteration on the plan (unvalidated) over the static inputs;
    parameters: the tensors the meta-gradient is for (the learner's, requiring grad);
    label_classes: per label argument (support_y, query_y), the class count its range is
    checked against under validation, or None (not cross-entropy).
    """

    def __init__(self, run: Callable[..., MetaBatchOutput], inputs: tuple[Tensor, ...],
                 parameters: Sequence[Tensor], capture: Callable, label_classes: tuple[int | None, int | None]):
        self.static_inputs = tuple(t.clone() for t in inputs)
        self.parameters = tuple(parameters)
        self.label_classes = label_classes
        self.grad_loss: Tensor | None = None  # the upstream gradients, static
        self.grad_task_loss: Tensor | None = None
        self._recorded: MetaBatchOutput | None = None  # the forward whose autograd graph the backward reads
        self.generation = 0  # forward replays so far: which forward the static state holds
        self._run = run
        self.pair = capture(self._forward, self._backward)

    def _forward(self) -> MetaBatchOutput:
        out = self._run(*self.static_inputs)
        if self.grad_loss is None:  # before the capture: allocated outside the graph
            self.grad_loss = torch.ones_like(out.loss)
            self.grad_task_loss = torch.zeros_like(out.task_loss)
        self._recorded = out
        return out

    def _backward(self) -> tuple[Tensor | None, ...]:
        out = self._recorded
        return torch.autograd.grad((out.loss, out.task_loss), self.parameters, (self.grad_loss, self.grad_task_loss),
                                   retain_graph=True, allow_unused=True)

    def forward(self, inputs: Sequence[Tensor]) -> None:
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new)
        self.pair.replay_forward()
        self.generation += 1

    def backward(self, grad_loss: Tensor, grad_task_loss: Tensor) -> list[Tensor | None]:
        self.grad_loss.copy_(grad_loss)
        self.grad_task_loss.copy_(grad_task_loss)
        self.pair.replay_backward()
        # Copies: the next replay overwrites the static gradients in place.
        return [None if g is None else g.clone() for g in self.pair.grads]


class GraphedMetaBatch(torch.autograd.Function):
    """The autograd node of a replayed meta-batch: (entry, the four inputs, the
    parameters) → (loss, task_loss[, accuracy]); its backward is the captured meta-gradient."""

    @staticmethod
    def forward(ctx, entry: GraphEntry, support_x, support_y, query_x, query_y, *parameters):
        inputs = (support_x, support_y, query_x, query_y)
        entry.forward(inputs)
        ctx.entry, ctx.generation = entry, entry.generation
        ctx.save_for_backward(*inputs)  # an in-place change before the backward is refused, as eagerly
        out = entry.pair.output
        outputs = (out.loss.clone(), out.task_loss.clone())
        if out.accuracy is not None:
            accuracy = out.accuracy.clone()
            ctx.mark_non_differentiable(accuracy)
            outputs += (accuracy,)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_task_loss, *unused):
        entry = ctx.entry
        inputs = ctx.saved_tensors
        if entry.generation != ctx.generation:  # another forward of this key ran since: redo this one
            entry.forward(inputs)
            ctx.generation = entry.generation
        return (None, None, None, None, None, *entry.backward(grad_loss, grad_task_loss))


class MetaBatchGraphs:
    """``meta_batch``'s graphs for one learner (see the module docstring for the policy).

    engine: the learner's :class:`MetaIteration`; watch: the learner's
    :class:`WatchedState` (what the graphs read from it); capture: how a pair is captured
    (:class:`CudaGraphCapture`; tests pass a stand-in with the same call and a
    ``device_type``).

    Inspect: :attr:`eager_reason` (why the last call ran eagerly; None when it replayed),
    :attr:`off_reason` (why the graphs are off for good), :attr:`captures`,
    :attr:`replays`, :attr:`drop_reason` (why the graphs were last dropped), ``len(self)``.
    """

    def __init__(self, engine: MetaIteration, watch: WatchedState, capture=None, capacity: int = 4,
                 max_shapes: int = 8):
        self.engine = engine
        self.watch = watch
        self.capture = CudaGraphCapture() if capture is None else capture
        self.capacity = capacity
        self.max_shapes = max_shapes
        self.entries: OrderedDict[tuple, GraphEntry] = OrderedDict()
        self.seen: set[tuple] = set()  # keys run once (eagerly) since the last drop
        self.shapes: set[tuple] = set()  # distinct input shapes ever
        self.evicted: set[tuple] = set()  # keys whose graphs the capacity dropped
        self.recaptures = 0
        self.captures = 0
        self.replays = 0
        self.eager_reason: str | None = None
        self.off_reason: str | None = None
        self.drop_reason: str | None = None
        self._trainable = self._parameters()

    def __len__(self) -> int:
        return len(self.entries)

    def _parameters(self) -> list[Tensor]:
        """The watched modules' parameters that require grad, once each, in
        ``Module.parameters()`` order: what the meta-gradient is for."""
        found, ids = [], set()
        for _, module in self.watch.modules:
            for p in module._parameters.values():
                if p is not None and p.requires_grad and id(p) not in ids:
                    ids.add(id(p))
                    found.append(p)
        return found

    # -- the call --------------------------------------------------------------------------

    def meta_batch(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   plan: AdaptationPlan) -> MetaBatchOutput:
        """The engine's ``meta_batch`` on ``plan``, from a replay where the policy allows."""
        inputs = (support_x, support_y, query_x, query_y)
        reason = self._why_eager(inputs, plan)
        if reason is not None:
            self.eager_reason = reason
            return self.engine.meta_batch(*inputs, plan)
        change = self.watch.change()
        if change is not None:
            self.drop(change)
        shape = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        key = (shape, plan.first_order, plan.step_weights, plan.task_chunk, plan.steps)
        entry = self.entries.get(key)
        if entry is None:
            if shape not in self.shapes:
                self.shapes.add(shape)
                if len(self.shapes) > self.max_shapes:
                    self.give_up(f"more than {self.max_shapes} distinct input shapes", warn=True)
                    return self.engine.meta_batch(*inputs, plan)
            if key not in self.seen:
                out = self.engine.meta_batch(*inputs, plan)  # checks the shapes against the model first
                self.seen.add(key)
                self.eager_reason = "the first call with these shapes and options: captured at the next one"
                return out
            entry = self._capture(key, inputs, plan)
            if entry is None:
                return self.engine.meta_batch(*inputs, plan)
        else:
            self.entries.move_to_end(key)
        if plan.validate and not self._inputs_pass(entry, inputs):
            self.eager_reason = "validation found a bad input: the eager path names it"
            return self.engine.meta_batch(*inputs, plan)
        outputs = GraphedMetaBatch.apply(entry, *inputs, *entry.parameters)
        self.replays += 1
        if plan.validate and not bool(torch.isfinite(outputs[1].detach()).all()):
            self.eager_reason = "a non-finite query loss: the eager path names its task"
            return self.engine.meta_batch(*inputs, plan)
        self.eager_reason = None
        return MetaBatchOutput(outputs[0], outputs[1], outputs[2] if len(outputs) > 2 else None)

    def _why_eager(self, inputs: tuple, plan: AdaptationPlan) -> str | None:
        if self.off_reason is not None:
            return f"graphs are off for this learner: {self.off_reason}"
        device_type = self.capture.device_type
        for t in inputs:
            if not isinstance(t, Tensor) or t.layout != torch.strided:
                return "an input is not a dense tensor (the eager path names it)"
            if t.device.type != device_type:
                return f"the meta-batch is on {t.device.type}, and graphs are captured on {device_type}"
            if t.requires_grad:
                return "an input requires grad (the graphs differentiate the parameters only)"
        if not torch.is_grad_enabled():
            return "autograd is not recording (torch.no_grad or inference mode)"
        if torch.is_autocast_enabled(device_type):
            return "autocast is on (its dtype choices would be baked into the graph)"
        if plan.task_chunk is not None and plan.task_chunk < inputs[0].size(0):
            return "task_chunk recomputes each chunk's graph in the backward"
        if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            return "a CUDA graph capture is under way"
        if not self._trainable:
            return "no parameter requires grad"
        return None

    # -- capture and drops -----------------------------------------------------------------

    def _capture(self, key: tuple, inputs: tuple[Tensor, ...], plan: AdaptationPlan) -> GraphEntry | None:
        if key in self.evicted:
            self.recaptures += 1
            if self.recaptures > self.capacity:
                self.give_up(f"the meta-batches cycle through more shapes and options than the {self.capacity} "
                             "graphs kept", warn=True)
                return None
        run = functools.partial(self.engine.meta_batch, plan=plan.with_call(validate=False))
        try:
            entry = GraphEntry(run, inputs, self._trainable, self.capture, self._label_classes(inputs, plan))
        except Exception as error:  # capture is impossible here (a sync, memory): eager from now on
            first_line = (str(error).strip().splitlines() or [""])[0]
            self.give_up(f"capture failed ({type(error).__name__}: {first_line})", warn=False)
            return None
        self.captures += 1
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            old, _ = self.entries.popitem(last=False)
            self.evicted.add(old)
        return entry

    def _label_classes(self, inputs: tuple[Tensor, ...], plan: AdaptationPlan) -> tuple[int | None, int | None]:
        """The class count each label argument's range is checked against (cross-entropy's)."""
        engine = self.engine
        kinds = [engine.loss_kind(plan.loss, y) for y in (inputs[1], inputs[3])]
        if "cross_entropy" not in kinds:
            return (None, None)
        with torch.no_grad():  # the model's outputs on one task: their last dim is the class count
            pred = engine.run(inputs[2][:1], engine.weights(engine.pack(), None, plan.adapting), "query_x")
        classes = pred.shape[-1]
        return tuple(classes if kind == "cross_entropy" else None for kind in kinds)

    @staticmethod
    def _inputs_pass(entry: GraphEntry, inputs: tuple[Tensor, ...]) -> bool:
        """No NaN/Inf in the floating inputs and every label in range: one sync."""
        bad = [torch.isfinite(t).all().logical_not() for t in inputs if t.is_floating_point()]
        for y, classes in zip((inputs[1], inputs[3]), entry.label_classes):
            if classes is not None:
                bad.append(((y < 0) | (y >= classes)).any())
        return not bad or not bool(torch.stack(bad).any())

    def drop(self, reason: str) -> None:
        """Drop every graph (the next calls capture again) and take the state as it is now."""
        self.entries.clear()
        self.seen.clear()
        self.evicted.clear()
        self.drop_reason = reason
        self.watch.rebase()
        self._trainable = self._parameters()

    def give_up(self, reason: str, warn: bool) -> None:
        """Eager for good for this learner, for ``reason`` (warned once when ``warn``)."""
        self.off_reason = reason
        self.eager_reason = f"graphs are off for this learner: {reason}"
        self.entries.clear()
        self.seen.clear()
        if warn:
            warnings.warn(f"fastmeta: meta_batch runs eagerly from now on for this learner: {reason} "
                          "(learner.meta_batch_graphs.off_reason)", RuntimeWarning, stacklevel=4)


__all__ = ["CapturedPair", "CudaGraphCapture", "GraphEntry", "GraphedMetaBatch", "MetaBatchGraphs"]
