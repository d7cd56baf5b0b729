"""Dispatches and host syncs per meta-iteration: deterministic counts, pinned by the tests.

**A dispatch** (:func:`is_dispatch`, the one definition; a launch recorder on a GPU shares
it) is one call the host issues that runs work of its own:

- every fastmeta op (``fastmeta::*``), whatever runs it (a native kernel, Triton, the
  reference), plus
- every aten op that is not nested in another counted aten op, *wherever it is called
  from*: the user's code, autograd's engine, a fastmeta op's Python code (its checks, its
  launcher's layout copies, its reference, its backward formula), or a native (C++/CUDA)
  kernel; on a GPU each of these is a launch;
- a native kernel (``fastmeta_ext::*``) called outside a fastmeta op's range. Inside a
  fastmeta op it is that op's dispatch: not a second one (an eager call of a public op is
  one profiler range named as its operator, so its kernel is inside it).

Views, reshapes and allocations are not dispatches (:data:`NOT_DISPATCHES`), and are
transparent: a copy they make (``contiguous`` → ``clone``) is one. So are the engine's
segment nodes (``fastmeta_ext::split_segments``, ``join_segments``: their ``cat`` is one;
``segment_inner_step``: its ``fastmeta::inner_step`` range is one). Nested aten calls inside
a counted aten op are part of it (``aten::linear`` calling ``aten::addmm`` is one). A host
read (``aten::_local_scalar_dense``) is a **host sync**, counted apart, not a dispatch;
those inside torch's own fused optimizer kernels are not counted (``aten::_fused_adam_`` on
the CPU reads each parameter's step counter on the host: host memory, no device to wait
for; on CUDA the step stays on the device). **The fused optimizer step counts as one
dispatch** (Adam with ``fused=True`` is ``aten::_foreach_add_`` on the step counters and
``aten::_fused_adam_``).

Until issue 23 the aten ops inside a fastmeta op's Python implementation were skipped: the
counts of that definition are in bench/RESULTS.md beside the new ones.

The counts come from ``torch.profiler``'s CPU events of one iteration (the profiler sees
nested calls, which a dispatch mode does not: its handler runs with the mode off).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# Views, reshapes and allocations: no kernel of their own.
NOT_DISPATCHES = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::expand_as", "aten::as_strided",
    "aten::slice", "aten::select", "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze",
    "aten::squeeze", "aten::alias", "aten::detach", "aten::detach_", "aten::split", "aten::split_with_sizes",
    "aten::narrow", "aten::unflatten", "aten::flatten", "aten::view_as", "aten::unbind", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::resize_", "aten::_reshape_alias",
    "aten::as_strided_",  # metadata only (ATen's oneDNN convolution sets its outputs' strides with it)
    "aten::chunk", "aten::movedim", "aten::diagonal", "aten::contiguous", "aten::set_", "aten::is_nonzero",
    "aten::item", "aten::numpy_T", "aten::_nested_tensor_from_mask", "aten::result_type",
    # The engine's flat-buffer segment nodes in C++ (csrc/engine/flat_segments.cpp): views, and
    # the aten ops they call (a cat), counted as those ops, as the Python nodes' are; the inner
    # step over segments (and its per-segment form, segment_steps) records its work as the op
    # it stands for (fastmeta::inner_step).
    "fastmeta_ext::split_segments", "fastmeta_ext::join_segments", "fastmeta_ext::segment_inner_step",
    "fastmeta_ext::segment_steps",
    "fastmeta_ext::expand_segments",  # views; its backward's sum over the tasks is fastmeta_ext::sum_segments
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


def is_dispatch(name: str, enclosing: Sequence[str] = ()) -> bool:
    """Whether a call of the op ``name`` is a dispatch (the module docstring's definition).

    enclosing: the names of what the call runs inside, innermost first (profiler ranges
    and other non-op names are ignored). A launch recorder decides with the same function.
    """
    if not name.startswith(OP_PREFIXES) or name in NOT_DISPATCHES or name == HOST_SYNC:
        return False
    ops = [n for n in enclosing if n.startswith(OP_PREFIXES) and n not in NOT_DISPATCHES]
    if name.startswith("fastmeta::"):
        return True
    if name.startswith("fastmeta_ext::"):
        return not any(n.startswith("fastmeta::") for n in ops)
    # An aten op: counted unless a counted aten op encloses it more closely than any
    # fastmeta op or native kernel does.
    return not ops or not ops[0].startswith("aten::")


def _enclosing(event) -> list[str]:
    names = []
    parent = event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def count_events(events) -> DispatchCount:
    """The count of profiler events (``prof.events()``) by the rules of the module docstring."""
    count = DispatchCount()
    for event in events:
        name = event.name
        enclosing = _enclosing(event)
        if name == HOST_SYNC and not any(n.startswith(FUSED_OPTIMIZERS) for n in enclosing):
            count.host_syncs += 1
        if not is_dispatch(name, enclosing):
            continue
        if name == "aten::_foreach_add_" and any(n.startswith(OPTIMIZER_RANGE) for n in enclosing) \
                and _fused_step_follows(event, events):
            continue  # the fused optimizer's step counters: part of its one dispatch
        count.dispatches += 1
        count.by_name[name] += 1
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
