"""The flat task buffer: every parameter of every task in one ``[T, P]`` tensor.

The model's own ``nn.Parameter``s stay the autograd leaves and the source of truth. Once
per meta-iteration they are packed, in ``named_parameters()`` order, into θ ``[P]``
(``torch.cat``; its backward hands each parameter its slice). The fast weights of T tasks
are ``[T, P]``. Each parameter tensor is a :class:`Segment` (offset, shape) of the buffer,
read through per-segment views, so autograd returns the gradient of the whole buffer as
one ``[T, P]`` tensor and one inner step is one op over it.

Where autograd records, the views come from one node and the packing is one node
(:class:`_SplitSegments`, :class:`_JoinSegments`, each the other's backward). Where the
C++ extension is loaded, the same two nodes run in C++ (``fastmeta_ext::split_segments``,
``join_segments``; csrc/engine/flat_segments.cpp): the same views and the same ``cat``, so
every value and gradient is equal bit for bit, with no Python between autograd's engine
and the ATen calls. The Python nodes are the reference and run wherever the C++ ones are
not taken: no extension, a backend setting other than ``auto`` or ``cpu``, tensors off the
CPU (the C++ nodes' ATen calls would run on a GPU too, but nothing has verified them there,
CUDA graph capture included: the GPU issue can widen this), tensor subclasses, dispatch or
function modes, functorch transforms, ``torch.compile``.

Two more C++ nodes serve MAML's inner step on the CPU (the engine asks for them with
:func:`segment_inner_step_node` and :func:`expand_segments_node`): the step θ − c·g read
from the inner gradient's segments as autograd hands them, with no ``[T, P]`` join of them,
and θ's segments for the first step (the adapting ones expanded over the tasks) from one
node whose backward sums their gradients over the tasks itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from fastmeta.backends import current_backend
from fastmeta.backends.extension import loaded_op
from fastmeta.ops.inner_step import NODE_KERNELS as INNER_STEP_KERNELS
from fastmeta.ops.registration import cpu_native_node

_Parameter = nn.Parameter
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_interpreter = torch._C._functorch.peek_interpreter_stack  # not None inside vmap/grad/jvp
_is_compiling = torch.compiler.is_compiling


def native_segment_nodes(tensors: Iterable[Tensor]) -> tuple | None:
    """(``split_segments``, ``join_segments``): the C++ nodes, where the extension is loaded,
    the backend setting is ``auto`` or ``cpu`` (the ``torch`` backend runs plain PyTorch
    throughout) and ``tensors`` are plain CPU tensors (or parameters) outside dispatch and
    function modes, functorch transforms and compilation; None otherwise (the Python nodes
    run)."""
    if _dispatch_modes() or _function_modes() or _functorch_interpreter() is not None or _is_compiling():
        return None
    for t in tensors:
        kind = type(t)
        if (kind is not Tensor and kind is not _Parameter) or t.device.type != "cpu":
            return None
    if current_backend() not in ("auto", "cpu"):
        return None
    split = loaded_op("split_segments")
    return None if split is None else (split, loaded_op("join_segments"))


@dataclass(frozen=True)
class Segment:
    """One parameter tensor's place in the flat buffer."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]


class Layout:
    """The segments of a flat buffer, in ``named_parameters()`` order."""

    def __init__(self, named_shapes: Iterable[tuple[str, tuple[int, ...]]]):
        segments, offset = [], 0
        for name, shape in named_shapes:
            numel = 1
            for d in shape:
                numel *= d
            segments.append(Segment(name, offset, numel, tuple(shape)))
            offset += numel
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.numel = offset
        self.index = {s.name: k for k, s in enumerate(self.segments)}
        self._sizes = [s.numel for s in self.segments]
        self._segment_ids: dict[torch.device, Tensor] = {}
        self._view_geometry: dict[tuple, list[tuple]] = {}
        # The segments' shapes as the C++ nodes take them: rank, then sizes, per segment.
        self.encoded_shapes = [v for s in self.segments for v in (len(s.shape), *s.shape)]

    @classmethod
    def of_module(cls, module: nn.Module) -> "Layout":
        return cls((name, tuple(p.shape)) for name, p in module.named_parameters())

    def __len__(self) -> int:
        return len(self.segments)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.segments == other.segments

    def __repr__(self) -> str:
        return f"Layout({len(self.segments)} segments, {self.numel} parameters)"

    def pack(self, tensors: Iterable[Tensor]) -> Tensor:
        """θ ``[P]``: the tensors flattened and concatenated in layout order. Where autograd
        records, one node (:class:`_JoinSegments`), whose backward hands each tensor its
        segment of the gradient as a view (one :class:`_SplitSegments` node): no reshape
        node per tensor on either pass."""
        tensors = tuple(tensors)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            native = native_segment_nodes(tensors)
            if native is not None:
                return native[1](tensors, self.encoded_shapes, [])
            return _JoinSegments.apply((self, ()), *tensors)
        return torch.cat([t.reshape(-1) for t in tensors])

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per segment, a view of ``flat``: ``[P]`` → ``shape``; ``[T, P]`` → ``[T, *shape]``.

        Where autograd records, the views come from one node (:class:`_SplitSegments`), whose
        backward is one ``cat`` of the segments' gradients (:class:`_JoinSegments`), with a
        segment nothing read (a bias a BatchNorm cancels, an unused parameter) filled from a
        cached zero: no zeros tensor per such segment and pass, and no reshape node per
        segment (W2's structure had 94 ``ViewBackward0`` nodes per iteration)."""
        if torch.is_grad_enabled() and flat.requires_grad:
            native = native_segment_nodes((flat,))
            if native is not None:
                return native[0](flat, self.encoded_shapes)
            return list(_SplitSegments.apply(flat, self))
        return self._shaped_views(flat)

    def _shaped_views(self, flat: Tensor) -> list[Tensor]:
        """The segments' views of ``flat``, each one ``as_strided`` with its size, strides and
        offset worked out once per (lead shape, strides): what ``narrow`` + ``view`` give, in
        one dispatch instead of two (W2's 18 segments: 49 → 20 µs)."""
        key = (flat.shape[:-1], flat.stride())
        geometry = self._view_geometry.get(key)
        if geometry is None:
            if len(self._view_geometry) >= 64:
                self._view_geometry.clear()
            geometry = self._view_geometry[key] = self._geometry(tuple(flat.shape[:-1]), flat.stride())
        base = flat.storage_offset()
        return [flat.as_strided(size, stride, base + offset) for size, stride, offset in geometry]

    def _geometry(self, lead: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple]:
        step = strides[-1]
        geometry = []
        for s in self.segments:
            inner, running = [], step
            for d in reversed(s.shape):
                inner.append(running)
                running *= d
            geometry.append(((*lead, *s.shape), (*strides[:-1], *reversed(inner)), s.offset * step))
        return geometry

    def segment_ids(self, device: torch.device) -> Tensor:
        """int64 ``[P]``: the segment index of each parameter (for per-segment rates)."""
        device = torch.device(device)
        ids = self._segment_ids.get(device)
        if ids is None:
            ids = torch.repeat_interleave(
                torch.arange(len(self.segments)), torch.tensor(self._sizes)
            ).to(device)
            self._segment_ids[device] = ids
        return ids

    def expand_per_segment(self, values: Tensor) -> Tensor:
        """``[S]`` → ``[P]``: each segment's value repeated over its parameters."""
        return values[self.segment_ids(values.device)]


def segment_inner_step_node(current: Tensor, lr: Tensor, mask, precond, segments, set_values):
    """``fastmeta_ext::segment_inner_step`` (csrc/engine/flat_segments.cpp): the inner step
    θ' = θ − c · g from the inner gradient's segments as autograd hands them (one tensor per
    segment), without their ``[T, P]`` join; or None where it does not apply and the engine
    joins them and calls ``inner_step``: where the segment nodes are not taken
    (:func:`native_segment_nodes`), or the rule is more than one rate for every parameter
    that needs no gradient (a mask, a preconditioner, per-segment or per-parameter rates,
    set values, a learned rate), θ is not a contiguous float32/float64 tensor, or the
    ``cpu`` backend's own launchers do not run ``inner_step`` here."""
    if mask is not None or precond is not None or segments is not None or set_values is not None:
        return None
    if (not isinstance(lr, Tensor) or lr.dim() != 0 or lr.requires_grad or lr.dtype != current.dtype
            or lr.device.type != "cpu" or current.dtype not in (torch.float32, torch.float64)
            or not current.is_contiguous()):
        return None
    if native_segment_nodes((current, lr)) is None:
        return None
    # It stands in for inner_step's kernels: only where the cpu backend runs them with its
    # own launchers (not a test harness's counting wrappers), by the op's own rule.
    if cpu_native_node("inner_step_node", INNER_STEP_KERNELS, current, lr) is None:
        return None
    return loaded_op("segment_inner_step")


def segment_steps_node(current: Tensor, lr: Tensor, mask, precond, segments, set_values):
    """``fastmeta_ext::segment_steps`` (csrc/engine/flat_segments.cpp): the inner step of
    :func:`segment_inner_step_node` returning the new fast weights per segment, ``[T,
    *shape]`` each, which the query's layers read as they are, so that their gradients come
    back per segment with no ``[T, P]`` join; or None where segment_inner_step_node's rule
    says no. For the last inner step (the engine's choice: an earlier step's fast weights are
    read by the next step too, and per segment autograd would sum the two gradients segment
    by segment)."""
    if segment_inner_step_node(current, lr, mask, precond, segments, set_values) is None:
        return None
    return loaded_op("segment_steps")


def expand_segments_node(theta: Tensor):
    """``fastmeta_ext::expand_segments`` (csrc/engine/flat_segments.cpp): θ's segments for the
    first inner step in one node, an adapting segment expanded over the tasks, whose
    backward sums each segment's gradient over the tasks straight into d θ, with no
    ``[T, P]`` join of them and no second pass; or None where the segment nodes are not taken
    (:func:`native_segment_nodes`) or θ is not a contiguous float32/float64 ``[P]`` that
    needs a gradient (then θ.expand(T, P) and the split node run)."""
    if (theta.dim() != 1 or not theta.requires_grad or not theta.is_contiguous()
            or theta.dtype not in (torch.float32, torch.float64)):
        return None
    if native_segment_nodes((theta,)) is None:
        return None
    return loaded_op("expand_segments")


_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def _cached_constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (value, dtype, torch.device(device))
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = torch.full((), value, dtype=dtype, device=device)
    return constant


def cached_zero(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim zero, made once per dtype and device: ``.expand`` it to any shape for free."""
    return _cached_constant(0.0, dtype, device)


def cached_one(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim one, made once per dtype and device (``.expand`` it): the gradient of a sum,
    given to ``autograd.grad`` instead of the sum and the ``ones_like`` the engine would
    make (two dispatches per inner step)."""
    return _cached_constant(1.0, dtype, device)


class _SplitSegments(torch.autograd.Function):
    """``flat`` ``[*lead, P]`` → one view per segment, ``[*lead, *shape]``, as one autograd
    node. The backward joins the segments' gradients into the flat gradient with one ``cat``
    (:class:`_JoinSegments`, itself differentiable: second order runs through it), and
    fills a segment that got no gradient from one cached zero, expanded (a view). torch's
    ``split`` + ``view`` would record one reshape node per segment and allocate and fill a
    zeros tensor for each unread segment, one dispatch each, every backward pass."""

    @staticmethod
    def forward(ctx, flat: Tensor, layout: Layout):
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.lead = layout, tuple(flat.shape[:-1])
        return tuple(layout._shaped_views(flat))

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None
        return _JoinSegments.apply((ctx.layout, ctx.lead), *grads), None


class _JoinSegments(torch.autograd.Function):
    """The inverse of :class:`_SplitSegments`: per segment a ``[*lead, *shape]`` tensor (or
    None: zeros) → the flat ``[*lead, P]``, one ``cat``. Its backward hands each tensor its
    segment of the flat gradient as a view (:class:`_SplitSegments`). ``spec``: the layout
    and the lead shape."""

    @staticmethod
    def forward(ctx, spec: tuple, *tensors):
        ctx.set_materialize_grads(False)
        layout, lead = spec
        ctx.layout = layout
        ctx.given = tuple(t is not None for t in tensors)
        if not lead and all(t is not None for t in tensors):
            return torch._C._nn.flatten_dense_tensors(tensors)  # the cat of the flattened tensors, in one call
        like = next(t for t in tensors if t is not None)
        zero = cached_zero(like.dtype, like.device)
        return torch.cat([zero.expand(*lead, s.numel) if t is None else t.reshape(*lead, s.numel)
                          for t, s in zip(tensors, layout.segments)], dim=-1)

    @staticmethod
    def backward(ctx, grad_flat):
        if grad_flat is None:
            return (None,) * (1 + len(ctx.given))
        views = _SplitSegments.apply(grad_flat, ctx.layout)
        return (None, *(v if given else None for v, given in zip(views, ctx.given)))


class TaskWeights:
    """Fast weights of T tasks: the ``[T, P]`` buffer and its layout.

    ``weights["features.0.weight"]`` is that parameter for every task, ``[T, *shape]``.
    """

    def __init__(self, buffer: Tensor, layout: Layout):
        if buffer.dim() != 2 or buffer.size(1) != layout.numel:
            raise ValueError(
                f"TaskWeights buffer must be [T, {layout.numel}], got {list(buffer.shape)}"
            )
        self.buffer = buffer
        self.layout = layout

    @property
    def num_tasks(self) -> int:
        return self.buffer.size(0)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, name: str) -> Tensor:
        try:
            k = self.layout.index[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r}; known: {list(self.layout.index)}") from None
        return self.layout.views(self.buffer)[k]

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        for s, t in zip(self.layout.segments, self.layout.views(self.buffer)):
            yield s.name, t

    def task(self, t: int) -> dict[str, Tensor]:
        """The weights of task ``t`` as a ``{name: tensor}`` dict (for functional_call)."""
        return {s.name: v for s, v in zip(self.layout.segments, self.layout.views(self.buffer[t]))}

    def detach(self) -> "TaskWeights":
        return TaskWeights(self.buffer.detach(), self.layout)

    def __repr__(self) -> str:
        return f"TaskWeights(tasks={self.num_tasks}, {self.layout!r}, dtype={self.buffer.dtype})"
