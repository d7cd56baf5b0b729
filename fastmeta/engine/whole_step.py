"""Whole-step CUDA graphs: one meta-iteration captured once and replayed.

A meta-iteration at the paper's sizes is hundreds of small kernels; launched eagerly,
their launch cost dominates (docs/benchmarks.md, "Measurements behind code decisions"). ``learner.capture(optimizer, sx, sy, qx, qy)`` records the
inner loop, the query loss, the meta-gradient and the optimizer step into one CUDA graph;
each call of the returned :class:`CapturedMetaStep` copies a new meta-batch into the
static input buffers and replays it.

- Shapes are static: every later meta-batch must have the captured shapes and dtypes.
- Validation (NaN/Inf, label range) runs once, on the meta-batch given at capture (the
  learner does it before building this); the graph itself runs unvalidated (a check that
  syncs cannot be captured).
- The optimizer must be capturable (``torch.optim.Adam(..., capturable=True)``): its
  step counter lives on the GPU. With ``fused=True`` as well, its kernel skips the update
  of a non-finite iteration itself (:func:`guarded_step`): W2's guard and update take 6
  kernels (13 before the guard's flag came from torch's own non-finite check) instead of
  134.
- Capture runs a few warm-up iterations on a side stream (CUDA graphs need the allocator
  and lazy state settled first). Parameters and optimizer state are restored afterwards,
  in place, so capturing does not train.

The rule for captured state (here, in the CPU's :class:`FusedMLPStep` and in
``meta_batch``'s own graphs, :mod:`fastmeta.engine.eager_graphs`): anything a captured step
reads from the learner or the optimizer is either read on every call (tensors at the
addresses the graph reads: the parameters' values, a capturable Adam's rate tensor; the
fused CPU step's Adam hyperparameters) or watched by :class:`WatchedState`, whose change
drops the captured graph (``meta_batch`` captures again) or refuses the step
(``capture()``'s, which the user holds: capture again).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fastmeta.backends import current_backend
from fastmeta.backends.precision import current_matmul_precision
from fastmeta.engine.types import MetaBatchOutput

MetaBatchFunction = Callable[[Tensor, Tensor, Tensor, Tensor], MetaBatchOutput]


class WatchedState:
    """What a captured step reads once, at capture, from the learner and the optimizer:
    the one implementation of the rule for captured state (module docstring).

    Watched, as data (no call into the learner), read again by :meth:`change`:

    - ``attributes`` of ``owner``: the plain values its plan is built from (``lr``,
      ``steps``, ``first_order``, ``loss``, ...), reported as ``learner.<name>``;
    - every module of ``modules`` (name, module): its train/eval mode, and each of its
      parameters and buffers: which tensor it is (replaced?), the memory it lives in
      (``.data`` swapped, moved, cast?) and its ``requires_grad``;
    - the backend choice (``fastmeta.use_backend`` / ``FASTMETA_BACKEND``) and the matmul
      precision (``fastmeta.set_matmul_precision``: a graph bakes its kernels' mode in);
    - ``optimizer``: which tensors each group holds and every hyperparameter that is not
      a tensor (betas, eps, weight_decay, amsgrad, ...: a CUDA graph bakes numbers into
      its kernels). Tensor hyperparameters (a capturable Adam's ``lr``) are read on
      every replay, so they are not watched.

    A read is a tuple of plain values compared with ``==``; the tensors themselves are
    kept (``held``) so that their ids stay theirs while watched.
    """

    def __init__(self, owner: object, attributes: Iterable[str], modules: Iterable[tuple[str, nn.Module]],
                 optimizer: torch.optim.Optimizer | None = None, owner_name: str = "learner"):
        self.owner = owner
        self.attributes = tuple(sorted(attributes))
        self.modules = tuple(modules)
        self.optimizer = optimizer
        # Laid out once: the modules whose mode is read, and (table, key) of every tensor.
        self._module_list = [module for _, module in self.modules]
        self._tables = [table for _, module in self.modules for table in (module._parameters, module._buffers)]
        self._slots = [(table, key) for table in self._tables for key in table]
        self.labels = self._labels(owner_name)
        self.baseline = self.read()
        self.held = self._tensors()

    def _labels(self, owner_name: str) -> tuple[str, ...]:
        labels = [f"{owner_name}.{name}" for name in self.attributes]
        labels += [f"the train/eval mode of module {name!r}" if name else f"the train/eval mode of the {owner_name}"
                   for name, _ in self.modules]
        for name, module in self.modules:
            for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
                for key in table:
                    full = f"{name}.{key}" if name else key
                    labels += [f"{kind} {full!r} (the tensor)", f"{kind} {full!r} (its memory: .data, device or dtype)",
                               f"{kind} {full!r}.requires_grad"]
        labels += ["the backend (fastmeta.use_backend)", "the matmul precision (fastmeta.set_matmul_precision)",
                   "the number of parameters and buffers"]
        if self.optimizer is not None:
            labels.append("the optimizer's parameter groups")
            for k, group in enumerate(self.optimizer.param_groups):
                labels.append(f"the tensors of optimizer.param_groups[{k}]")
                labels += [f"optimizer.param_groups[{k}][{key!r}]" for key in group if key != "params"]
        return tuple(labels)

    def _tensors(self) -> list:
        held = [table.get(key) for table, key in self._slots]
        if self.optimizer is not None:
            held += [p for group in self.optimizer.param_groups for p in group["params"]]
        return held

    def read(self) -> tuple:
        """The watched values now (see the class docstring), in :attr:`labels`' order."""
        state = self.owner.__dict__
        values = [state.get(name) for name in self.attributes]
        values += [module.training for module in self._module_list]
        for table, key in self._slots:
            t = table.get(key)
            values += (None, None, None) if t is None else (id(t), t.data_ptr(), t.requires_grad)
        values.append(current_backend())
        values.append(current_matmul_precision())
        values.append(sum(map(len, self._tables)))  # parameters or buffers added or removed
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            values.append(len(groups))
            for group in groups:
                values.append(tuple(id(p) for p in group["params"]))
                values += [None if _holds_tensor(v) else v for key, v in group.items() if key != "params"]
        return tuple(values)

    def change(self) -> str | None:
        """None while every watched value is as at capture; else the first change, named
        (``learner.lr changed from 0.01 to 0.05``)."""
        now = self.read()
        if now == self.baseline:
            return None
        if len(now) != len(self.baseline):  # an optimizer group or one of its options came or went
            return "the optimizer's parameter groups changed"
        for label, old, new in zip(self.labels, self.baseline, now):
            if old is not new and (type(old) is not type(new) or old != new):
                if "(the tensor)" in label or "(its memory" in label or "tensors of" in label:
                    return f"{label} changed"
                return f"{label} changed from {old!r} to {new!r}"
        return None  # equal values of unequal identity (e.g. 0.1 and a fresh 0.1)

    def rebase(self) -> None:
        """Take the current values as the captured ones (after a new capture)."""
        self.baseline = self.read()
        self.held = self._tensors()


def _holds_tensor(value) -> bool:
    if isinstance(value, Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value)


def invalidate(step, reason: str) -> None:
    if step.stale is None:  # the first change is the one to report
        step.stale = reason


def check_not_stale(step) -> None:
    """A step runs the plan of its build; after a change of what the plan was built from
    it refuses (the rule for captured state: read it on every call, or refuse after a change)."""
    watch = step.watch
    if step.stale is None and watch is not None:
        change = watch.change()
        if change is not None:
            invalidate(step, change)
    if step.stale is not None:
        raise RuntimeError(f"{step.stale} after this {type(step).__name__} was built; it runs the plan from "
                           "that time: call learner.capture(...) again")


def skips_its_own_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips its update on the device when it is handed a
    ``found_inf`` of 1: torch's contract with ``GradScaler`` (``_step_supports_amp_scaling``),
    which its fused optimizers (``Adam``/``AdamW``/``SGD`` with ``fused=True``) keep in
    their kernels: parameters and moments untouched, the step counts incremented and
    decremented back."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


def guarded_step(optimizer: torch.optim.Optimizer, loss: Tensor, nonfinite: Tensor) -> None:
    """``optimizer.step()``, undone on the device when ``loss`` or a gradient is not finite
    (``nonfinite`` is then set): no host sync, so it can be captured in a CUDA graph.

    The flag is one multi-tensor check, torch's own for ``GradScaler``
    (``_amp_foreach_non_finite_check_and_unscale_`` over the loss and every gradient, at a
    scale of 1: the values are multiplied by 1.0, which changes no bit, NaN and -0.0
    included), which sets ``found_inf`` to 1 where any element is not finite; the flag and
    the scale of 1 are one ``arange`` (three launches in all, with the ``logical_or_`` into
    ``nonfinite``; a norm, ``isfinite``, ``all`` and the conversions took ten). Then:

    - a fused optimizer (:func:`skips_its_own_update`, e.g. ``Adam(..., fused=True)``)
      gets the flag as GradScaler hands it over, ``optimizer.found_inf``: its kernel skips
      the update itself, in the step's own launches (W2's guard and update: 134 kernels ->
      13, then 6, tests/tools/test_launches.py);
    - any other optimizer: the parameters and every tensor of its state (moments, step
      count) are copied before the step (one ``_foreach_copy_``) and selected back with
      ``torch.where`` on the flag, one per tensor written in place: a graph cannot
      branch, so the update is computed and discarded (a NaN update never mixes into the
      kept values, as arithmetic blending would).

    The launch recorder counts both (tests/tools/test_launches.py)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    checked = [loss.detach().reshape(1)] + [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        flags = torch.arange(2, dtype=torch.float32, device=loss.device)  # [found_inf, scale] = [0, 1]
        found_inf, unit_scale = flags[0], flags[1]  # 0-dim views, as GradScaler's
        torch._amp_foreach_non_finite_check_and_unscale_(checked, found_inf, unit_scale)
    if skips_its_own_update(optimizer):
        for name in ("grad_scale", "found_inf"):
            if getattr(optimizer, name, None) is not None:
                raise ValueError(f"the optimizer already carries a {name} (a GradScaler's?): a whole step does not "
                                 "take gradient scaling")
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    else:
        kept = [p for p in params] + [v for p in params for v in optimizer.state.get(p, {}).values()
                                      if isinstance(v, Tensor)]
        with torch.no_grad():
            before = [torch.empty_like(t) for t in kept]
            torch._foreach_copy_(before, kept)
        optimizer.step()
        with torch.no_grad():
            finite = found_inf.eq(0)
            for t, old in zip(kept, before):
                torch.where(finite, t, old, out=t)
    with torch.no_grad():
        nonfinite.logical_or_(found_inf)


def _loss_is_mean_of_task_losses(out: MetaBatchOutput) -> bool:
    """Whether ``out.loss`` is, in the autograd graph, ``out.task_loss.mean()``: its node a
    mean (no dim, no dtype) whose one input is the task losses' node."""
    loss_node, task_node = out.loss.grad_fn, getattr(out.task_loss, "grad_fn", None)
    if loss_node is None or task_node is None or loss_node.name() != "MeanBackward0":
        return False
    inputs = loss_node.next_functions
    return len(inputs) == 1 and inputs[0][0] is task_node


def whole_iteration(meta_batch: MetaBatchFunction, inputs: Sequence[Tensor], optimizer: torch.optim.Optimizer,
                    nonfinite: Tensor | None = None, seed: list[Tensor] | None = None) -> MetaBatchOutput:
    """One whole meta-iteration as :class:`CapturedMetaStep` records it: the gradients set
    to None, ``meta_batch``, its loss's backward, the optimizer's step (guarded by
    :func:`guarded_step` when ``nonfinite`` is given: the captured one). The launch
    recorder (``fastmeta.tools.launches``) runs the same function.

    Gradients set to None (torch's whole-network capture recipe), not zeroed: the backward
    then writes each parameter's gradient as a new tensor (allocated, in a capture, from
    the graph's pool, at the address every replay writes again) instead of zeroing the old
    one and accumulating into it: no zeroing kernel and no ``add_`` per parameter (W2: 19
    kernels fewer, tests/tools/test_launches.py).

    seed: a list holding the backward's seed, made by the first call that passes the list
    and kept there: a captured step's warm-up makes it, so the graph reads it instead of
    filling a new one on every replay (one kernel fewer). Where the loss is the mean of the
    task losses in the graph itself (``loss.grad_fn`` a mean whose input is
    ``task_loss``'s node), the seed is the mean's gradient, 1/T per task, and the backward
    starts at the task losses: the same gradients (MeanBackward's ones / T is the same
    correctly rounded 1/T), without the mean's backward kernel (one more fewer)."""
    optimizer.zero_grad(set_to_none=True)
    out = meta_batch(*inputs)
    if seed is None:
        out.loss.backward()
    else:
        start = out.task_loss if _loss_is_mean_of_task_losses(out) else out.loss
        if not seed:
            seed.append(torch.ones_like(out.loss) if start is out.loss
                        else torch.full_like(start, 1.0 / start.numel()))
        if seed[0].shape != start.shape:
            raise RuntimeError("whole_iteration: the meta-batch's loss changed form since the seed was made "
                               f"(seed {tuple(seed[0].shape)}, backward from {tuple(start.shape)})")
        start.backward(seed[0])
    if nonfinite is not None:
        guarded_step(optimizer, out.loss, nonfinite)
    else:
        optimizer.step()
    return out


class CapturedMetaStep:
    """A captured meta-iteration. ``step(sx, sy, qx, qy)`` runs one and returns its output.

    meta_batch: runs one meta-batch (unvalidated) and returns its output; parameters: the
    learner's parameters, which the optimizer must hold and nothing else; watch: the
    :class:`WatchedState` of the learner and the optimizer (set it after the capture: the
    capture itself makes the optimizer's state), whose change refuses every later call.
    """

    def __init__(self, meta_batch: MetaBatchFunction, parameters: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, inputs: tuple[Tensor, ...], warmup: int = 3,
                 watch: WatchedState | None = None):
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
        self.stale: str | None = None  # set by invalidate(): why replaying would be wrong
        self.watch = watch  # what the graph read at capture; a change refuses the step
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=inputs[0].device)
        self._seed: list[Tensor] = []  # the backward's seed, made by the first warm-up iteration
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
        self.iteration = 0
        # Captured on the warm-up's stream: what the warm-up made per stream (the split-K
        # launches' tile counters, kernels/split_k.py, zeroed once when made) is the
        # capture's too, so the graph holds no zeroing of its own (one kernel per replay).
        with torch.cuda.graph(self.graph, stream=side):
            # A non-finite loss or gradient skips the update inside the graph and sets the
            # flag, on the device (no sync per replay): as the CPU's FusedMLPStep does.
            self.static_output = self._iteration(guarded=True)
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

    def _iteration(self, guarded: bool = False) -> MetaBatchOutput:
        return whole_iteration(self._meta_batch, self.static_inputs, self.optimizer,
                               self.nonfinite if guarded else None, self._seed)

    def invalidate(self, reason: str) -> None:
        """Refuse every later call with ``reason``: the state the step was built from changed."""
        invalidate(self, reason)

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaBatchOutput:
        check_not_stale(self)
        for name, static, new in zip(
            ("support_x", "support_y", "query_x", "query_y"),
            self.static_inputs,
            (support_x, support_y, query_x, query_y),
        ):
            if new.shape != static.shape or new.dtype != static.dtype or new.device != static.device:
                raise ValueError(
                    f"{name} is {list(new.shape)} {new.dtype} on {new.device}, but the step was captured for "
                    f"{list(static.shape)} {static.dtype} on {static.device}"
                )
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        self.iteration += 1
        out = self.static_output
        return MetaBatchOutput(
            out.loss.detach().clone(),
            out.task_loss.detach().clone(),
            None if out.accuracy is None else out.accuracy.clone(),
        )


    def check_finite(self) -> None:
        """Raise FloatingPointError if a replay since capture had a non-finite query loss or
        meta-gradient. Reads one flag (a sync): call it every N iterations, and before
        keeping the parameters (a checkpoint). The graph skipped that replay's update (the
        parameters and the optimizer's state are those of the replay before)."""
        if bool(self.nonfinite):
            raise FloatingPointError(
                f"a non-finite query loss or meta-gradient in the {self.iteration} replays of the captured step so "
                "far; its update was skipped, and the parameters are those of the replay before")


def check_adam_options(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, by name, every option of ``torch.optim.Adam``/``AdamW`` that the fused CPU
    update does not implement; it implements Adam's update with coupled (L2) weight decay.

    - ``amsgrad``, ``maximize``, ``differentiable``: other updates (or a graph through one).
    - AdamW's decoupled decay (``torch.optim.AdamW``, or ``decoupled_weight_decay=True``
      on newer torch's Adam) with a nonzero ``weight_decay``: a different update, that
      applying the coupled one would approximate (0.059 away after 3 steps at wd 0.1).
      With ``weight_decay=0`` the two are the same update and are accepted.
    - ``capturable``: CUDA graphs' option; torch's own Adam refuses it for CPU parameters.
    - ``foreach``, ``fused``: how torch would run the same update; the fused op computes
      that update itself, so they are accepted.
    - ``lr``, ``betas``, ``eps``, ``weight_decay`` as Tensors: torch then computes in the
      tensor's dtype, which the fused update does not; refused.
    """
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        # capturable=True: torch's own Adam refuses it for CPU parameters at its step.
        for option in ("amsgrad", "maximize", "differentiable", "capturable"):
            if group.get(option):
                raise ValueError(f"whole-step execution on the CPU does not implement {name}'s {option}=True; "
                                 "train through meta_batch, loss.backward() and the optimizer")
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        decay = group.get("weight_decay", 0)
        for option in ("lr", "eps", "weight_decay", "betas"):
            values = group.get(option)
            if any(isinstance(v, Tensor) for v in (values if option == "betas" else (values,))):
                # torch then computes the step size in the tensor's dtype (float32 for
                # torch.tensor(1e-2)): 7e-10 away in float64 after 3 steps, not equal.
                raise ValueError(f"whole-step execution on the CPU takes {name}'s {option} as a number, not a "
                                 "Tensor; pass float(...)")
        if decoupled and float(decay) != 0.0:
            raise ValueError(
                f"whole-step execution on the CPU implements Adam's coupled weight decay, not {name}'s "
                f"decoupled_weight_decay (weight_decay={float(decay)}); use torch.optim.Adam, weight_decay=0, "
                "or train through meta_batch, loss.backward() and the optimizer")


class FusedMLPStep:
    """A whole meta-iteration on the CPU for a plain MLP: ``step(sx, sy, qx, qy)`` runs the
    inner loop of every task, the query loss, the meta-gradient and Adam's update in one
    fused op (``mlp_meta_step_update``: one C++ call with torch's fused Adam inside), with no
    autograd graph: one dispatch and no host sync per iteration. The output's ``accuracy``
    is None (the fused op returns the losses only).

    The optimizer is the user's ``torch.optim.Adam`` over exactly the model's parameters
    (one group, no amsgrad/maximize): its hyperparameters and its state (``exp_avg``,
    ``exp_avg_sq``, ``step``, created as Adam creates them) are used in place, so
    ``optimizer.state_dict()`` and ``load_state_dict`` round-trip exactly. Read them
    from the optimizer at every call: a ``load_state_dict`` between calls takes effect.

    A non-finite loss or meta-gradient skips that iteration's update and sets
    :attr:`nonfinite` (flag, iteration) without a sync; :meth:`check_finite` reads it
    (the caller decides how often) and raises with the iteration it came from.
    """

    def __init__(self, run: Callable[..., tuple[Tensor, Tensor]], parameters: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, inputs: tuple[Tensor, ...], watch: WatchedState | None = None):
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError("whole-step execution on the CPU takes torch.optim.Adam (its fused update is used), "
                             f"got {type(optimizer).__name__}")
        if len(optimizer.param_groups) != 1:
            raise ValueError("the optimizer must have one parameter group")
        group = optimizer.param_groups[0]
        check_adam_options(optimizer)
        held = {id(p) for p in group["params"]}
        if held != {id(p) for p in parameters} or len(group["params"]) != len(parameters):
            raise ValueError("the optimizer must hold exactly the learner's parameters")
        self._run = run
        self.params = list(parameters)
        self.optimizer = optimizer
        self.shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        self.iteration = 0
        self.stale: str | None = None  # set by invalidate(): why running would be wrong
        # What the plan read when the step was built (a WatchedState: the learner's, not the
        # optimizer's, whose hyperparameters are read at every call); a change refuses it.
        self.watch = watch
        self.nonfinite = torch.zeros(2, dtype=torch.int64)

    def invalidate(self, reason: str) -> None:
        """Refuse every later call with ``reason``: the state the step was built from changed."""
        invalidate(self, reason)

    def _state(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in self.params:
            state = self.optimizer.state[p]
            if not state:  # as torch.optim.Adam initialises it (fused layout: the step on the device)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> MetaBatchOutput:
        check_not_stale(self)
        for name, (shape, dtype, device), new in zip(("support_x", "support_y", "query_x", "query_y"), self.shapes,
                                                     (support_x, support_y, query_x, query_y)):
            if tuple(new.shape) != shape or new.dtype != dtype or new.device != device:
                raise ValueError(f"{name} is {list(new.shape)} {new.dtype} on {new.device}, but the step was built "
                                 f"for {list(shape)} {dtype} on {device}")
        check_adam_options(self.optimizer)  # read at every call, like the hyperparameters
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        exp_avgs, exp_avg_sqs, steps = self._state()
        with torch.no_grad():
            mean, losses = self._run(self.params, exp_avgs, exp_avg_sqs, steps, self.nonfinite, self.iteration,
                                     support_x, support_y, query_x, query_y,
                                     float(lr), float(beta1), float(beta2), float(group["weight_decay"]),
                                     float(group["eps"]))
        self.iteration += 1
        return MetaBatchOutput(mean, losses, None)

    def check_finite(self) -> None:
        """Raise FloatingPointError if an iteration since the start had a non-finite loss or
        meta-gradient (its update was skipped). Reads one flag: call it every N iterations."""
        if self.nonfinite[0] != 0:
            raise FloatingPointError(
                f"a non-finite query loss or meta-gradient at iteration {int(self.nonfinite[1])} (of this step "
                "object); its update was skipped, and the parameters are those of the iteration before")
