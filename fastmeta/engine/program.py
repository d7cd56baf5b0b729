"""The model program: ``nn.Module`` → a batched functional program over the flat buffer.

``trace(model)`` traces ``model.forward`` with ``torch.fx`` and compiles the graph into
a list of steps that run every task at once. Activations carry a leading task dim:
``[T, N, ...]``. Parameters come from a per-segment list of weights, each either per
task (``[T, *shape]``, a view of the fast-weight buffer) or shared (``shape``, a view of θ).

- Recognised leaf modules become fastmeta ops, as each op module declares in its family
  (:class:`fastmeta.ops.registration.OpFamily`, ``modules``): Linear → ``task_linear``,
  Conv2d → ``task_conv2d``, LayerNorm over the last dim → ``task_layer_norm``,
  BatchNorm1d/2d → ``task_batch_norm`` (per-task batch statistics,
  always, in training and evaluation alike; running statistics are never touched),
  MaxPool2d → ``max_pool2d`` (tasks folded into the batch; a dilation or ceil mode it
  lacks runs the module itself, as below).
  A ReLU, LeakyReLU, Tanh or Sigmoid whose only input is a Linear or BatchNorm that
  feeds nothing else is fused into it.
- A BatchNorm2d (with no activation, or a fused ReLU or LeakyReLU) whose output feeds
  nothing but a MaxPool2d of square windows, stride equal to the window and no padding
  runs, with that pool, as ``task_batch_norm_max_pool2d`` wherever a backend has that op's
  kernels for the input's device and dtype (:func:`_pooled_batch_norm_runs`: the C++
  kernels on the CPU, the Triton kernels on a GPU once verified): the pooling rides in the
  BatchNorm's passes and the full-size activations are never written. Elsewhere (a GPU
  before the GPU check has verified the Triton kernels) the two ops run.
- A Conv2d or Linear whose only user is a recognised BatchNorm runs without its bias
  (:func:`_bias_cancelled_by_batch_norm`): the BatchNorm's per-task batch statistics
  subtract the per-channel mean, and a per-channel bias with it, so the bias changes
  nothing downstream and its gradient is exactly zero. The bias stays a parameter the
  program reads: its meta-gradient comes back as zeros (not None), so optimizers and users
  see the same parameters as with the bias computed.
- AvgPool2d, Flatten, Dropout, the standalone activations and a MaxPool2d the op does not
  take run with the task dim folded into the batch: they treat examples independently.
- Every other node (functional calls, ``+``, ``cat``, methods, unrecognised leaf modules
  without BatchNorm) runs under ``torch.vmap`` over tasks, or task by task where vmap
  cannot run it (size queries, data-dependent code).
- A model that fx cannot trace, or one that normalises with batch statistics outside a
  recognised BatchNorm (an unrecognised module holding BatchNorm, a functional
  ``batch_norm`` call), runs through :class:`PerTaskLoopProgram` after one warning:
  correct, slower. Never under vmap: torch.func's second order through BatchNorm is wrong.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import fastmeta.ops  # noqa: F401 (every op module declares the modules it runs)
from fastmeta.backends import kernel_choice
from fastmeta.engine.task_weights import Layout
from fastmeta.ops.max_pool2d import window_pair
from fastmeta.ops.registration import module_op, module_types
from fastmeta.ops.task_batch_norm_max_pool2d import POOLED_ACTIVATIONS, task_batch_norm_max_pool2d

# The input-shape checks' error messages describe these layers' inputs (describe_layer).
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_FUSABLE_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
# Modules that treat every example on its own: the task dim can be folded into the batch.
_PER_EXAMPLE_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid,
)
_BATCH_STATISTIC_FUNCTIONS = {F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm}
# Layers whose bias a following batch-statistics BatchNorm cancels, and the rank of their
# output [T, N, channels, ...] at which the bias runs along the BatchNorm's channel dim (2).
_BIAS_CHANNEL_RANK = {nn.Conv2d: 5, nn.Linear: 3}


def recognised_modules() -> tuple[type, ...]:
    """The traced program's leaf modules: the op families' (each op module declares those it
    runs; asked each time, so an op module imported later extends them) and the per-example ones."""
    return (*module_types(), *_PER_EXAMPLE_MODULES)


class TraceError(Exception):
    """The model cannot run as a batched program; the per-task loop takes over."""


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, recognised_modules()) or super().is_leaf_module(m, qualname)


def _fusable_activation(m: nn.Module) -> tuple[str, float] | None:
    for cls, name in _FUSABLE_ACTIVATIONS.items():
        if type(m) is cls:
            if name == "leaky_relu":
                if m.negative_slope < 0:
                    return None
                return name, float(m.negative_slope)
            return name, 0.0
    return None


class _Value:
    """A value in the program: a tensor with a leading task dim (``batched``) or not."""

    __slots__ = ("value", "batched")

    def __init__(self, value: Any, batched: bool):
        self.value, self.batched = value, batched


class TracedProgram:
    """The batched program of a traced model. Call it as ``program(x, weights)``.

    x: ``[T, N, ...]``; weights: per segment, ``[T, *shape]`` or ``shape``.
    Returns the model's output with the task dim in front.
    """

    batched = True

    def __init__(self, model: nn.Module, layout: Layout):
        self.layout = layout
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
        self.graph = graph
        self._segment_of = _segment_index_by_identity(model, layout)
        self.reads: set[int] = set()  # segments the program reads
        self._steps: list[tuple[torch.fx.Node, Callable]] = []
        self._generic_strategy: dict[str, str] = {}
        self._input_name: str | None = None
        self._layers = {n.target: model.get_submodule(n.target) for n in graph.nodes if n.op == "call_module"}
        self._compile(model, graph)
        self.input_layers = self._input_layers(graph)
        self.example_shape = declared_example_shape(model)
        self.failed_at: str | None = None  # the layer the last failed run stopped at

    # -- compilation ------------------------------------------------------------------

    def _compile(self, model: nn.Module, graph: torch.fx.Graph) -> None:
        nodes = list(graph.nodes)
        fused_into: dict[str, tuple[str, float]] = {}  # op node -> activation fused into it
        skipped: dict[str, str] = {}  # activation node -> the op node it was fused into
        for node in nodes:
            if node.op != "call_module":
                continue
            m = model.get_submodule(node.target)
            act = _fusable_activation(m)
            if act is None or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
                continue
            src = node.args[0]
            if src.op != "call_module" or len(src.users) != 1 or src.name in fused_into:
                continue
            src_op = module_op(model.get_submodule(src.target))
            if src_op is not None and src_op.fuses_activation:
                fused_into[src.name] = act
                skipped[node.name] = src.name
        self.bias_cancelled = {
            node.target for node in nodes if node.op == "call_module" and _bias_cancelled_by_batch_norm(model, node)
        }
        # BatchNorm node → the MaxPool2d node that alone reads it (past a fused activation).
        self.pooled_batch_norms = _pooled_batch_norms(model, nodes, fused_into, skipped)
        pools = {pool.name for pool in self.pooled_batch_norms.values()}

        placeholders = 0
        for node in nodes:
            if node.op == "placeholder":
                placeholders += 1
                if placeholders == 1:
                    self._input_name = node.name
                elif not node.args:  # an extra input without a default
                    raise TraceError(
                        f"forward takes more than one input ({node.target!r}); the learner "
                        "passes one input tensor"
                    )
                else:
                    self._steps.append((node, self._constant_step(node.name, node.args[0])))
            elif node.op == "get_attr":
                self._steps.append((node, self._get_attr_step(model, node)))
            elif node.op == "call_module":
                if node.name in skipped:
                    self._steps.append((node, self._alias_step(node.name, skipped[node.name])))
                    continue
                step = self._module_step(model, node, fused_into.get(node.name), node.target in self.bias_cancelled)
                if node.name in self.pooled_batch_norms:
                    pool = model.get_submodule(self.pooled_batch_norms[node.name].target)
                    step = self._batch_norm_before_pool_step(model, node, fused_into.get(node.name), pool, step)
                elif node.name in pools:
                    step = self._pool_after_batch_norm_step(node, step)
                self._steps.append((node, step))
            elif node.op in ("call_function", "call_method"):
                if node.op == "call_function" and node.target in _BATCH_STATISTIC_FUNCTIONS:
                    raise TraceError(
                        f"{node.target.__name__} is called directly: batch statistics outside "
                        "a recognised BatchNorm module"
                    )
                self._steps.append((node, self._generic_step(node)))
            elif node.op == "output":
                self._output_arg = node.args[0]

    def _constant_step(self, name: str, value: Any):
        def step(env, weights):
            env[name] = _Value(value, False)

        return step

    def _alias_step(self, name: str, source: str):
        def step(env, weights):
            env[name] = env[source]

        return step

    def _get_attr_step(self, model: nn.Module, node: torch.fx.Node):
        obj = _get_attr(model, node.target)
        k = self._segment_of.get(id(obj)) if isinstance(obj, nn.Parameter) else None
        name = node.name
        if k is None:
            # A buffer or constant: the same for every task.
            def step(env, weights):
                env[name] = _Value(obj, False)
        else:
            self.reads.add(k)

            def step(env, weights):
                w = weights[k]
                env[name] = _Value(w, w.dim() > len(self.layout.segments[k].shape))

        return step

    def _param_segment(self, m: nn.Module, attr: str) -> int | None:
        p = getattr(m, attr, None)
        if p is None:
            return None
        k = self._segment_of.get(id(p))
        if k is None:
            raise TraceError(f"parameter {attr!r} of {type(m).__name__} is not a model parameter")
        self.reads.add(k)
        return k

    def _module_step(self, model: nn.Module, node: torch.fx.Node, act: tuple[str, float] | None,
                     bias_cancelled: bool = False):
        """The step of a call_module node. bias_cancelled: the next op is a batch-statistics
        BatchNorm that cancels this layer's bias (:func:`_bias_cancelled_by_batch_norm`); the
        op then runs without it when its output has the rank where the bias is per channel."""
        m = model.get_submodule(node.target)
        name = node.name
        arg = node.args[0] if node.args else None
        simple_input = len(node.args) == 1 and not node.kwargs and isinstance(arg, torch.fx.Node)
        act_name, slope = act if act is not None else ("none", 0.0)

        op = module_op(m) if simple_input else None
        if op is not None:
            segments = {attr: self._param_segment(m, attr) for attr in op.params}
            channel_rank = _BIAS_CHANNEL_RANK.get(type(m))  # Conv2d and Linear keep their input's rank

            def step(env, weights):
                x = env[arg.name]
                if not x.batched and not segments:  # no task dim and no weights: one plain call
                    env[name] = _Value(m(x.value), False)
                    return
                y = None
                if x.batched:
                    params = {attr: None if k is None else weights[k] for attr, k in segments.items()}
                    if bias_cancelled and x.value.dim() == channel_rank:
                        params["bias"] = None  # the BatchNorm after it subtracts it again
                    y = op.run(m, x.value, params, act_name, slope)
                if y is None and op.required is not None:
                    raise RuntimeError(
                        f"{type(m).__name__} {node.target!r} needs a {op.required} input, got "
                        f"{list(getattr(x.value, 'shape', []))}"
                    )
                if y is None:  # a configuration the op does not take: the module under vmap
                    y = self._run_generic_module(name, node.target, m, [x], weights)
                env[name] = _Value(y, True)

            return step

        if simple_input and isinstance(m, _PER_EXAMPLE_MODULES):

            def step(env, weights):
                x = env[arg.name]
                if not x.batched:
                    env[name] = _Value(m(x.value), False)
                    return
                xv = x.value
                y = m(xv.flatten(0, 1))
                env[name] = _Value(y.unflatten(0, xv.shape[:2]), True)

            return step

        # An unrecognised module (or a recognised one in a configuration the ops lack).
        if any(isinstance(sub, nn.modules.batchnorm._NormBase) for sub in m.modules()):
            raise TraceError(
                f"module {node.target!r} ({type(m).__name__}) holds a normalisation layer "
                "that fastmeta does not recognise"
            )
        own = [(n, self._segment_of.get(id(p))) for n, p in m.named_parameters()]
        for n, k in own:
            if k is None:
                raise TraceError(f"parameter {node.target}.{n} is not a model parameter")
            self.reads.add(k)
        args, kwargs = node.args, node.kwargs

        def step(env, weights):
            values = self._resolve((args, kwargs), env)
            env[name] = _Value(*self._run_module(name, node.target, m, own, values, weights))

        return step

    def _batch_norm_before_pool_step(self, model: nn.Module, node: torch.fx.Node, act: tuple[str, float] | None,
                                     pool: nn.MaxPool2d, step: Callable):
        """The step of a BatchNorm whose output only a MaxPool2d reads
        (:func:`_pooled_batch_norms`): where the fused op runs on the input
        (:func:`_pooled_batch_norm_runs`), it leaves a :class:`_PendingBatchNorm` for the
        pool's step (:meth:`_pool_after_batch_norm_step`); elsewhere ``step``, the
        BatchNorm's own."""
        m = model.get_submodule(node.target)
        name, arg = node.name, node.args[0]
        segments = {attr: self._param_segment(m, attr) for attr in ("weight", "bias")}
        act_name, slope = act if act is not None else ("none", 0.0)
        kernel = window_pair(pool.kernel_size)[0]

        def fused(env, weights):
            x = env[arg.name]
            if x.batched and _pooled_batch_norm_runs(x.value, kernel):
                gamma, beta = (None if k is None else weights[k] for k in (segments["weight"], segments["bias"]))
                env[name] = _Value(_PendingBatchNorm(x.value, gamma, beta, float(m.eps), act_name, slope, kernel), True)
                return
            step(env, weights)

        return fused

    def _pool_after_batch_norm_step(self, node: torch.fx.Node, step: Callable):
        """The step of the MaxPool2d after a pooled BatchNorm: the fused op where the
        BatchNorm's step left it pending, else ``step``, the pool's own."""
        name, arg = node.name, node.args[0]

        def fused(env, weights):
            pending = env[arg.name].value
            if isinstance(pending, _PendingBatchNorm):
                pooled, _ = task_batch_norm_max_pool2d(*pending.arguments)
                env[name] = _Value(pooled, True)
                return
            step(env, weights)

        return fused

    def _generic_step(self, node: torch.fx.Node):
        name, args, kwargs = node.name, node.args, node.kwargs
        if node.op == "call_function":
            fn = node.target
        else:
            method = node.target

            def fn(obj, *a, **k):
                return getattr(obj, method)(*a, **k)

        def step(env, weights):
            values = self._resolve((args, kwargs), env)
            env[name] = _Value(*self._run_generic(name, fn, values))

        return step

    # -- running ----------------------------------------------------------------------

    def _resolve(self, structure, env):
        """Replace fx nodes by their _Value in a nested (args, kwargs) structure."""
        return pytree.tree_map(
            lambda a: env[a.name] if isinstance(a, torch.fx.Node) else _Value(a, False),
            structure,
            is_leaf=lambda a: isinstance(a, torch.fx.Node),
        )

    def _run_generic(self, name: str, fn: Callable, values) -> tuple[Any, bool]:
        flat, spec = pytree.tree_flatten(values, is_leaf=lambda v: isinstance(v, _Value))
        raw = [v.value for v in flat]
        in_dims = tuple(0 if v.batched else None for v in flat)
        if all(d is None for d in in_dims):
            a, k = pytree.tree_unflatten(raw, spec)
            return fn(*a, **k), False

        def call(*xs):
            a, k = pytree.tree_unflatten(list(xs), spec)
            return fn(*a, **k)

        return self._vmap_or_per_task(name, call, raw, in_dims)

    def _run_module(self, name: str, target: str, m: nn.Module, own, values, weights) -> tuple[Any, bool]:
        """An unrecognised module with the tasks' weights: under vmap, or task by task (LSTM, GRU...)."""
        flat, spec = pytree.tree_flatten(values, is_leaf=lambda v: isinstance(v, _Value))
        names = [n for n, _ in own]
        params = [weights[k] for _, k in own]
        param_dims = [0 if w.dim() > len(self.layout.segments[k].shape) else None for w, (_, k) in zip(params, own)]
        raw = params + [v.value for v in flat]
        in_dims = tuple(param_dims + [0 if v.batched else None for v in flat])

        def call(*xs):
            a, kw = pytree.tree_unflatten(list(xs[len(names) :]), spec)
            return torch.func.functional_call(m, dict(zip(names, xs[: len(names)])), a, kw)

        if all(d is None for d in in_dims):
            return call(*raw), False
        with _double_backward_safe(m, raw):
            return self._vmap_or_per_task(name, call, raw, in_dims, f"module {target!r} ({type(m).__name__})")

    def _run_generic_module(self, name: str, target: str, m: nn.Module, xs, weights):
        own = [(n, self._segment_of[id(p)]) for n, p in m.named_parameters()]
        out, _ = self._run_module(name, target, m, own, (tuple(xs), {}), weights)
        return out

    def _vmap_or_per_task(self, name: str, call: Callable, raw: list, in_dims: tuple, module: str | None = None):
        """``call`` over the tasks: under ``torch.vmap``, or task by task where vmap cannot run it.

        The first run that succeeds decides for the node. If vmap raises and the task-by-task
        run works (no batching rule, as for ``aten::lstm``; a size query; data-dependent
        code), the node runs task by task from then on; a module says so once, since its
        cost grows with T. If both fail, the task-by-task error is raised (the inputs are
        wrong) and nothing is decided. If vmap ran once, a later failure is raised.
        """
        strategy = self._generic_strategy.get(name)
        if strategy == "loop":
            return _per_task(call, raw, in_dims)
        try:
            out = torch.vmap(call, in_dims=in_dims, randomness="different")(*raw)
        except Exception as vmap_error:
            if strategy == "vmap":
                raise
            out = _per_task(call, raw, in_dims)
            self._generic_strategy[name] = "loop"
            if module is not None:
                reason = (str(vmap_error).strip().splitlines() or [type(vmap_error).__name__])[0]
                warnings.warn(f"fastmeta: {module} runs task by task: torch.vmap cannot batch it ({reason})",
                              stacklevel=2)
            return out
        self._generic_strategy[name] = "vmap"
        return out, True

    # -- the input's shape -------------------------------------------------------------

    def _input_layers(self, graph: torch.fx.Graph) -> list[tuple[str, bool]]:
        """The recognised layers that read the input first, (target, through a Flatten),
        past activations and Dropout; empty when anything else reads it."""
        found: list[tuple[str, bool]] = []
        frontier = [(n, False) for n in graph.nodes if n.name == self._input_name]
        while frontier:
            node, flattened = frontier.pop()
            for user in node.users:
                m = self._layers.get(user.target) if user.op == "call_module" else None
                if m is None or len(user.args) != 1:
                    return []
                if type(m) in (nn.Linear, nn.Conv2d) or isinstance(m, _BATCH_NORMS):
                    if flattened and not isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                        return []
                    found.append((user.target, flattened))
                elif isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Dropout)):
                    frontier.append((user, flattened))
                elif type(m) is nn.Flatten and (m.start_dim, m.end_dim) == (1, -1) and not flattened:
                    frontier.append((user, True))
                else:
                    return []
        return found

    def check_example_shape(self, argument: str, x: Tensor) -> None:
        """Raise ValueError, naming ``argument`` and the shape expected, when the layers that
        read the input first cannot take its examples (``x.shape[2:]``)."""
        example = list(x.shape[2:])
        for target, flattened in self.input_layers:
            m = self._layers[target]
            fits, takes = _layer_takes(m, example, flattened)
            if not fits:
                built = (
                    f" (the model was built for examples of shape {list(self.example_shape)})"
                    if self.example_shape is not None else ""
                )
                raise ValueError(
                    f"{argument} has shape {list(x.shape)}, but the model's first {describe_layer(target, m)} "
                    f"takes {takes}{built}"
                )

    def _describe_node(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return describe_layer(node.target, self._layers[node.target])
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name} (node {node.name!r})"

    def __call__(self, x: Tensor, weights: list[Tensor]) -> Any:
        env: dict[str, _Value] = {self._input_name: _Value(x, True)}
        for node, step in self._steps:
            try:
                step(env, weights)
            except Exception:
                self.failed_at = self._describe_node(node)
                raise
        out = self._resolve(self._output_arg, env)
        return pytree.tree_map(lambda v: v.value, out, is_leaf=lambda v: isinstance(v, _Value))


class _PendingBatchNorm:
    """A BatchNorm's arguments, left for the MaxPool2d after it to run both as
    ``task_batch_norm_max_pool2d`` (nothing else reads the BatchNorm's output)."""

    __slots__ = ("arguments",)

    def __init__(self, *arguments):
        self.arguments = arguments


def _pooled_batch_norm_runs(x: Tensor, kernel: int) -> bool:
    """Whether the fused BatchNorm and max pooling has a kernel for ``x`` (a backend that
    runs ``task_batch_norm_max_pool2d`` on its device type and dtype, as ``auto`` chooses:
    the C++ kernels on the CPU, fp32 and float64; the Triton kernels on a GPU once
    verified, fp32) and x is a shape it takes (``[T, N, C, H, W]``, maps at least a window
    wide). Elsewhere the two ops run (the reference of the fused op would be slower than
    theirs)."""
    if x.dim() != 5 or x.size(3) < kernel or x.size(4) < kernel:
        return False
    return kernel_choice("task_batch_norm_max_pool2d", x.device.type, x.dtype)[1] is not None


def _pooled_batch_norms(model: nn.Module, nodes, fused_into: dict, skipped: dict) -> dict:
    """BatchNorm2d node name → the MaxPool2d node that is the only reader of its output
    (directly, or through the ReLU/LeakyReLU fused into it), for the pools of square
    windows, stride equal to the window, no padding, dilation or ceil mode, and the
    activations whose gradient the fused backward reads from the pooled values."""
    found = {}
    by_name = {n.name: n for n in nodes}
    for node in nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        pool = model.get_submodule(node.target)
        if (type(pool) is not nn.MaxPool2d or pool.ceil_mode or pool.return_indices
                or window_pair(pool.dilation) != [1, 1]):
            continue
        kernel = window_pair(pool.kernel_size)
        if kernel[0] != kernel[1] or window_pair(pool.stride if pool.stride is not None else pool.kernel_size) != kernel or (
                window_pair(pool.padding) != [0, 0]):
            continue
        src = node.args[0]
        if len(src.users) != 1:
            continue
        norm_name = skipped.get(src.name, src.name)
        norm = by_name.get(norm_name)
        if norm is None or norm.op != "call_module" or len(norm.users) != 1 or len(norm.args) != 1:
            continue
        if not isinstance(model.get_submodule(norm.target), nn.BatchNorm2d) or module_op(
                model.get_submodule(norm.target)) is None:
            continue
        if fused_into.get(norm_name, ("none", 0.0))[0] not in POOLED_ACTIVATIONS:
            continue
        found[norm_name] = node
    return found


def _bias_cancelled_by_batch_norm(model: nn.Module, node: torch.fx.Node) -> bool:
    """Whether ``node`` is a Conv2d or Linear with a bias whose output feeds nothing but a
    recognised BatchNorm (which always normalises with per-task batch statistics).

    Then the bias is never computed, and its gradient is zero without computing it: the
    BatchNorm subtracts each task's per-channel mean over the examples (and the pixels),
    and a bias b[t, c] added to every example of channel c moves that mean by exactly
    b[t, c], so (x + b) − mean(x + b) = x − mean(x). Its output, and everything after it,
    does not depend on b: ∂loss/∂b = 0 at every order, inner steps included. Only the
    op's output rank decides at run time that the bias lies along the BatchNorm's channel
    dim (a Linear on ``[T, N, L, I]`` adds it along the BatchNorm's spatial dim: kept).
    """
    if node.op != "call_module" or len(node.users) != 1:
        return False
    m = model.get_submodule(node.target)
    if type(m) not in _BIAS_CHANNEL_RANK or getattr(m, "bias", None) is None or module_op(m) is None:
        return False
    (user,) = node.users
    if user.op != "call_module" or len(user.args) != 1 or user.kwargs or user.args[0] is not node:
        return False
    norm = model.get_submodule(user.target)
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and module_op(norm) is not None


def _per_task(call: Callable, raw: list, in_dims: tuple) -> tuple[Any, bool]:
    """Run ``call`` task by task and stack the tasks' tensors (in nested outputs too, as
    an LSTM's ``(output, (h, c))``); a non-tensor result must be the same for every task."""

    def task_slice(value, t):
        return pytree.tree_map(lambda leaf: leaf[t] if isinstance(leaf, Tensor) else leaf, value)

    T = next(
        leaf.size(0)
        for r, d in zip(raw, in_dims)
        if d == 0
        for leaf in pytree.tree_leaves(r)
        if isinstance(leaf, Tensor)
    )
    outs = [call(*[task_slice(r, t) if d == 0 else r for r, d in zip(raw, in_dims)]) for t in range(T)]
    leaves, spec = zip(*(pytree.tree_flatten(o) for o in outs))
    if any(s != spec[0] for s in spec[1:]):
        raise TraceError(f"a node returns differently structured values per task: {spec[0]} and others")
    stacked = []
    for per_task in zip(*leaves):
        if isinstance(per_task[0], Tensor):
            stacked.append(torch.stack(per_task))
        elif all(v == per_task[0] for v in per_task[1:]):
            stacked.append(per_task[0])
        else:
            raise TraceError(f"a node returns a different non-tensor value per task: {list(per_task)}")
    if not any(isinstance(v, Tensor) for v in leaves[0]):
        return pytree.tree_unflatten(stacked, spec[0]), False
    return pytree.tree_unflatten(stacked, spec[0]), True


def _double_backward_safe(m: nn.Module, raw: list):
    """cuDNN's RNN kernels have no double backward, which second-order MAML needs: an RNN
    module on CUDA runs with cuDNN off while autograd records (the native kernels have it)."""
    on_cuda = any(isinstance(leaf, Tensor) and leaf.is_cuda for leaf in pytree.tree_leaves(raw))
    if isinstance(m, nn.RNNBase) and on_cuda and torch.is_grad_enabled():
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def declared_example_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The shape of one input example a model declares as ``model.example_shape`` (the
    fastmeta.models networks do), for error messages; None when it declares none."""
    shape = getattr(model, "example_shape", None)
    return tuple(int(n) for n in shape) if shape is not None else None


def describe_layer(target: str, m: nn.Module) -> str:
    """``layer '0' (Conv2d, 1 input channel)``: a layer and the size of what it reads."""
    if isinstance(m, nn.Linear):
        return f"layer {target!r} (Linear, {m.in_features} input features)"
    if isinstance(m, nn.Conv2d):
        return f"layer {target!r} (Conv2d, {m.in_channels} input channel{'s' if m.in_channels != 1 else ''})"
    if isinstance(m, _BATCH_NORMS):
        return f"layer {target!r} ({type(m).__name__}, {m.num_features} channels)"
    return f"layer {target!r} ({type(m).__name__})"


def _layer_takes(m: nn.Module, example: list[int], flattened: bool) -> tuple[bool, str]:
    """(whether ``m`` takes examples of this shape, the input shape it takes)."""
    if flattened:
        features = m.in_features if isinstance(m, nn.Linear) else m.num_features
        values = 1
        for n in example:
            values *= n
        return values == features, f"[T, N, ...] with {features} values per example (it reads them flattened)"
    if isinstance(m, nn.Linear):
        return bool(example) and example[-1] == m.in_features, f"[T, N, ..., {m.in_features}]"
    if isinstance(m, nn.Conv2d):
        return len(example) == 3 and example[0] == m.in_channels, f"[T, N, {m.in_channels}, H, W]"
    if isinstance(m, nn.BatchNorm2d):
        return len(example) == 3 and example[0] == m.num_features, f"[T, N, {m.num_features}, H, W]"
    return (
        len(example) in (1, 2) and example[0] == m.num_features,
        f"[T, N, {m.num_features}] or [T, N, {m.num_features}, L]",
    )


def _get_attr(model: nn.Module, target: str):
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _segment_index_by_identity(model: nn.Module, layout: Layout) -> dict[int, int]:
    """id(parameter) → segment, so shared modules and tied weights read one segment."""
    return {id(p): layout.index[name] for name, p in model.named_parameters()}


class PerTaskLoopProgram:
    """The fallback, the per-task loop: the model run task by task with
    ``torch.func.functional_call``. (The test oracle is the reference loop,
    :mod:`fastmeta.testing.reference_loop`, not this.)

    BatchNorm layers are switched to batch statistics for the call, and buffers are
    passed as copies, so running statistics are never touched.
    """

    batched = False

    def __init__(self, model: nn.Module, layout: Layout, reason: str, pending_warning: str | None = None):
        self.model = model
        self.layout = layout
        self.reason = reason
        self.pending_warning = pending_warning  # given on the first call (trace's defer_warning)
        self.reads = set(range(len(layout)))
        self.example_shape = declared_example_shape(model)
        self.failed_at = None  # an untraced model has no layers to name

    def check_example_shape(self, argument: str, x: Tensor) -> None:
        """Nothing to check ahead of a run: the model's forward is opaque here."""

    def __call__(self, x: Tensor, weights: list[Tensor]) -> Any:
        if self.pending_warning is not None:
            message, self.pending_warning = self.pending_warning, None
            warnings.warn(message, stacklevel=2)
        names = [s.name for s in self.layout.segments]
        per_task = [w.dim() > len(s.shape) for w, s in zip(weights, self.layout.segments)]
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        was_training = [m.training for m in norms]
        outs = []
        try:
            for m in norms:
                m.train()
            for t in range(x.size(0)):
                params = {n: (w[t] if pt else w) for n, w, pt in zip(names, weights, per_task)}
                buffers = {n: b.clone() for n, b in self.model.named_buffers()}
                outs.append(torch.func.functional_call(self.model, (params, buffers), (x[t],)))
        finally:
            for m, tr in zip(norms, was_training):
                m.train(tr)
        return pytree.tree_map(lambda *ts: torch.stack(ts), outs[0], *outs[1:])


def plain_mlp_structure(model: nn.Module) -> tuple[list[int], str, float] | None:
    """(layer_sizes, act, negative_slope) when ``model`` is a plain MLP, else None.

    Plain means an ``nn.Sequential`` of Linear layers with biases and one kind of
    activation (ReLU, LeakyReLU, Tanh, Sigmoid) between them and none after the last:
    the shape ``fastmeta.ops.mlp_meta_step`` runs as one fused call.
    """
    if type(model) is not nn.Sequential:
        return None
    layers = list(model)
    linears, acts = layers[0::2], layers[1::2]
    if len(linears) != len(acts) + 1:
        return None
    if any(type(m) is not nn.Linear or m.bias is None for m in linears):
        return None
    kinds = {_fusable_activation(a) for a in acts}
    if None in kinds or len(kinds) > 1:
        return None
    act, slope = kinds.pop() if kinds else ("none", 0.0)
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    if any(a.in_features != b.out_features for a, b in zip(linears[1:], linears[:-1])):
        return None
    return sizes, act, slope


def trace(model: nn.Module, layout: Layout | None = None, *, defer_warning: bool = False):
    """The batched program of ``model``; the per-task loop (after a warning) if it has none.

    defer_warning: warn when the per-task loop first runs instead of now. The learners
    trace at construction, and a script that only uses ``clone()``/``adapt()`` never runs
    the program, so it should not hear about it.
    """
    layout = layout or Layout.of_module(model)
    try:
        return TracedProgram(model, layout)
    except TraceError as exc:
        message = f"fastmeta: {type(model).__name__} runs through the per-task loop (correct, slower): {exc}"
        if defer_warning:
            return PerTaskLoopProgram(model, layout, str(exc), pending_warning=message)
        warnings.warn(message, stacklevel=2)
        return PerTaskLoopProgram(model, layout, str(exc))
