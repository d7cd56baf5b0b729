"""Dispatches and host syncs per meta-iteration: deterministic counts, pinned by the tests.

A **dispatch** is a fastmeta op (``fastmeta::*``), or an aten op outside one; an aten op
that a native (C++/CUDA) kernel calls counts too, since on a GPU each is a launch. Views
and allocations are not dispatches; nested aten calls inside an aten op are part of it
(``aten::linear`` calling ``aten::addmm`` is one). A **host sync** is an
``aten::_local_scalar_dense`` (a tensor read on the host: ``.item()``, ``bool(t)``), except
those inside torch's own fused optimizer kernels (``aten::_fused_adam_`` on the CPU reads each
parameter's step counter on the host: host memory, no device to wait for; on CUDA the step
stays on the device). **The fused optimizer step counts as one dispatch** (Adam with
``fused=True`` is ``aten::_foreach_add_`` on the step counters and ``aten::_fused_adam_``). On a
GPU every dispatch is at least one kernel launch, eager or captured.

The counts come from ``torch.profiler``'s CPU events of one iteration (the profiler sees
nested calls, which a dispatch mode does not: its handler runs with the mode off).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

# Views, reshapes and allocations: no kernel of their own.
NOT_DISPATCHES = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::expand_as", "aten::as_strided",
    "aten::slice", "aten::select", "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze",
    "aten::squeeze", "aten::alias", "aten::detach", "aten::detach_", "aten::split", "aten::split_with_sizes",
    "aten::narrow", "aten::unflatten", "aten::flatten", "aten::view_as", "aten::unbind", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::_reshape_alias",
    "aten::chunk", "aten::movedim", "aten::diagonal", "aten::contiguous", "aten::set_", "aten::is_nonzero",
    "aten::item", "aten::numpy_T", "aten::_nested_tensor_from_mask", "aten::result_type",
})
HOST_SYNC = "aten::_local_scalar_dense"
FUSED_OPTIMIZERS = ("aten::_fused_adam_", "aten::_fused_adamw_", "aten::_fused_sgd_")
OPTIMIZER_RANGE = "Optimizer.step#"
OP_PREFIXES = ("aten::", "fastmeta::", "fastmeta_ext::")


@dataclass
class DispatchCount:
    dispatches: int = 0
    host_syncs: int = 0
    fastmeta_ops: int = 0
    by_name: Counter = field(default_factory=Counter)

    def describe(self, top: int = 12) -> str:
        common = ", ".join(f"{name} {n}" for name, n in self.by_name.most_common(top))
        return (f"{self.dispatches} dispatches ({self.fastmeta_ops} fastmeta ops), {self.host_syncs} host syncs; "
                f"most: {common}")


def _op_parent(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(OP_PREFIXES):
        parent = parent.cpu_parent  # record_function ranges are not ops
    return parent


def _inside(event, names) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(names):
            return True
        parent = parent.cpu_parent
    return False


def count_events(events) -> DispatchCount:
    """The count of profiler events (``prof.events()``) by the rules of the module docstring."""
    count = DispatchCount()
    for event in events:
        name = event.name
        if name == HOST_SYNC and not _inside(event, FUSED_OPTIMIZERS):
            count.host_syncs += 1
        if not name.startswith(OP_PREFIXES) or name in NOT_DISPATCHES:
            continue
        if name == "aten::_foreach_add_" and _inside(event, OPTIMIZER_RANGE) and _fused_step_follows(event, events):
            continue  # the fused optimizer's step counters: part of its one dispatch
        parent = _op_parent(event)
        if name.startswith("fastmeta_ext::") and _inside(event, ("fastmeta::",)):
            continue  # the native kernel of the fastmeta op around it: that op is the dispatch
        if parent is not None and not parent.name.startswith("fastmeta_ext::"):
            continue  # inside an aten op, or inside a fastmeta op's Python implementation
        count.dispatches += 1
        count.by_name[name] += 1
        # A native kernel called outside a fastmeta op's range is the op's dispatch.
        if name.startswith(("fastmeta::", "fastmeta_ext::")):
            count.fastmeta_ops += 1
    return count


def _fused_step_follows(event, events) -> bool:
    """Whether the optimizer range holding ``event`` runs a fused optimizer kernel."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(OPTIMIZER_RANGE):
        parent = parent.cpu_parent
    return parent is not None and any(child.name in FUSED_OPTIMIZERS for child in parent.cpu_children)


def count_dispatches(step: Callable[[], None], warmup: int = 2) -> DispatchCount:
    """The dispatches and host syncs of one call of ``step`` (after ``warmup`` calls, so that
    lazy initialisation is not counted). CPU tensors: the autograd engine runs the backward
    on the calling thread, where the profiler sees it."""
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return count_events(prof.events())


def plain_user_path(learner, optimizer: torch.optim.Optimizer, batch) -> Callable[[], None]:
    """The plain user path: ``meta_batch``, ``loss.backward()``, ``optimizer.step()``."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = learner.meta_batch(*batch)
        out.loss.backward()
        optimizer.step()

    return step
