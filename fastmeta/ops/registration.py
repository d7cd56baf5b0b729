"""How an op module defines its ops: from the typed reference, once.

    def reference_task_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor: ...
    task_loss = define_op(reference_task_loss, native=NativeCall(takes=..., args=...))
    task_loss.register_fake(...); task_loss.register_autograd(...)

:func:`define_op` records the kernel in the table (:mod:`fastmeta.backends.table`: name and
schema from the reference), defines the operator ``torch.ops.fastmeta.<name>`` with
``torch.library`` (its implementation, fake and autograd registered under their dispatch
keys) and returns the public op, a :class:`PublicOp`: calling it runs the kernel of the
backend chosen for the arguments' (device type, dtype), or the reference.

Two ways into one op, with the same implementation, checks and backward:

- **The eager path** (a plain call on plain tensors, what a training loop does): the
  :class:`PublicOp` itself. It checks the arguments, looks the kernel up in the backend
  registry's cache (:func:`fastmeta.backends.kernel_choice`: resolved once per op, device
  type, dtype and backend setting) and calls it; where autograd records, through a
  ``torch.autograd.Function`` built from the op's ``register_autograd`` (setup and
  backward). No ``custom_op`` wrapper, no second trip through the dispatcher.
- **The dispatcher path** (``torch.ops.fastmeta.<name>``): what ``torch.compile``, fake
  tensors, dispatch modes, functorch transforms and tensor subclasses see, and what
  ``opcheck`` tests. The public op takes it itself whenever one of those is active, and for
  the few cases the eager path leaves to it (autograd through an op that writes its
  arguments).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch import Tensor

from fastmeta.backends import kernel_choice, note_declined
from fastmeta.backends.extension import kernel_dtypes
from fastmeta.backends.table import ModuleOp, NativeCall, OpFamily, define_family, define_kernel, module_op, module_types

NAMESPACE = "fastmeta"
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
PUBLIC_OPS: dict[str, "PublicOp"] = {}

_Parameter = torch.nn.Parameter
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled
_profiler_enabled = torch._C._autograd._profiler_enabled


_functorch_interpreter = torch._C._functorch.peek_interpreter_stack  # not None inside vmap/grad/jvp
_is_compiling = torch.compiler.is_compiling


class _EagerNodes(threading.local):
    under_dispatch_modes = False


_eager_nodes = _EagerNodes()


@contextlib.contextmanager
def eager_nodes_under_dispatch_modes() -> Iterator[None]:
    """While active (in this thread), a public op call that autograd records takes the
    eager path's node even under a dispatch mode, and the node's forward runs the op
    through the dispatcher (``op.default``) for the mode to see: the autograd graph is the
    one a plain call builds (the alias outputs of ``register_autograd(aliased_inputs=)``,
    which the dispatcher path's autograd does not have). For the launch recorder."""
    before = _eager_nodes.under_dispatch_modes
    _eager_nodes.under_dispatch_modes = True
    try:
        yield
    finally:
        _eager_nodes.under_dispatch_modes = before


class PublicOp:
    """The public op ``fastmeta::<name>``: see the module docstring. ``op(*args)`` runs it;
    ``op.register_fake`` and ``op.register_autograd`` register its fake kernel and its
    backward (the same signatures as ``torch.library``'s); ``op.default`` is the
    dispatcher's ``OpOverload`` (for ``opcheck`` and ``torch.compile``)."""

    def __init__(self, spec, check: Callable[..., None] | None, mutates: tuple[str, ...]):
        self.name = spec.name
        self._qualname = f"{NAMESPACE}::{spec.name}"
        self.__name__ = self.__qualname__ = spec.name
        self.__doc__ = spec.reference.__doc__
        self._spec = spec
        self._check = check
        self._reference = spec.reference
        self._mutates = mutates
        _LIBRARY.define(spec.name + spec.schema)
        self.default = getattr(getattr(torch.ops, NAMESPACE), spec.name).default
        schema = self.default._schema
        # Positions of the arguments the op writes (their versions bump on the eager path)
        # and the positions of the Tensor[] arguments (the eager node takes them flattened).
        self._mutated_positions = tuple(i for i, a in enumerate(schema.arguments)
                                        if a.alias_info is not None and a.alias_info.is_write)
        self._tensor_list_positions = frozenset(
            i for i, a in enumerate(schema.arguments) if str(a.type).startswith(("List[Tensor]", "List[Optional[Tensor]]")))
        self._has_tensor_lists = bool(self._tensor_list_positions)
        self._returns_list = len(schema.returns) == 1 and str(schema.returns[0].type) == "List[Tensor]"
        # Trailing arguments with defaults: the eager path fills them in, so the kernels, the
        # setup and the backward see every argument, as the dispatcher gives them.
        self._arity = len(schema.arguments)
        self._required = sum(1 for a in schema.arguments if not a.has_default_value())
        self._defaults = tuple(a.default_value if a.has_default_value() else None for a in schema.arguments)
        self._function: type[torch.autograd.Function] | None = None
        self._aliased = False
        self._native_node: Callable | None = None
        torch.library.impl(self._qualname, "CompositeExplicitAutograd", self._dispatcher_impl, lib=_LIBRARY)

    # -- registration -------------------------------------------------------------------

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self._qualname, fn, lib=_LIBRARY)
        return fn

    def register_autograd(self, backward: Callable, setup_context: Callable | None = None,
                          aliased_inputs: tuple[int, ...] = ()) -> None:
        """aliased_inputs: positions of tensor inputs that the op's backward reads back (saved
        by ``setup_context``) and passes to a backward op. On the eager path the node returns
        each such input that needs a gradient as an extra output, an alias
        (``x.view_as(x)``), and setup saves the alias in its place: a backward op called on
        the saved alias then sends its gradient of that input to this node's alias output,
        not to the input's own producer. Without the alias the outer backward of second
        order MAML reached the input through two nodes (this one and the backward op's), and
        autograd's engine summed the two gradients with an ``aten::add_``: one dispatch per
        read tensor. With it, ``backward`` finds the alias outputs' gradients in
        ``ctx.alias_grads`` (input position → gradient, or None) and adds them where it
        computes the input's gradient (in the backward op's kernel, as an addend). The
        public op still returns only its own output; the dispatcher path
        (``torch.ops.fastmeta.<name>``) has no aliases (``ctx.alias_grads`` unset)."""
        torch.library.register_autograd(self._qualname, backward, setup_context=setup_context, lib=_LIBRARY)
        run = self._run
        self._aliased = bool(aliased_inputs)
        if aliased_inputs:
            if self._has_tensor_lists:
                raise ValueError(f"{self.name}: aliased inputs need an op with no Tensor[] argument")
            self._register_aliased(backward, setup_context, tuple(aliased_inputs))
            return

        # The eager path's node: the same setup and backward as the dispatcher's. Written in
        # the ctx-first style (setup called from forward): a separate setup_context makes
        # Function.apply bind the arguments with inspect.signature on every call.
        # A Tensor[] result travels through the node as a tuple (a list is not an output to
        # autograd); setup and backward see the list and a list of gradients, as the
        # dispatcher's autograd gives them.
        returns_list = self._returns_list
        through_dispatcher = self.default
        if self._has_tensor_lists:
            self._register_with_tensor_lists(backward, setup_context)
            return

        def forward(ctx, *args):
            # Under a dispatch mode only inside eager_nodes_under_dispatch_modes: the mode sees the op.
            output = through_dispatcher(*args) if _dispatch_modes() else run(args)
            if setup_context is not None:
                setup_context(ctx, args, output)
            return tuple(output) if returns_list else output

        def backward_of_list(ctx, *grads):
            return backward(ctx, list(grads))

        function = type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_of_list if returns_list else backward),
        })
        # Function.apply less its Python wrapper (the functorch check and argument binding,
        # which __call__ has done or does not need): the C++ apply.
        self._apply = super(torch.autograd.Function, function).apply
        self._function = function

    def register_native_node(self, node: Callable) -> None:
        """node(*args): the op's output, run by a node built in C++ (autograd's engine calls
        the kernels with no Python between), or NotImplemented where it does not take the
        arguments (then the Python node runs). Tried first on the eager path where autograd
        records, outside dispatch modes; it must build the same graph as the Python node
        (alias outputs and addends included) and take only arguments whose kernels it
        calls itself."""
        self._native_node = node

    def _register_with_tensor_lists(self, backward: Callable, setup_context: Callable | None) -> None:
        """The eager node of an op with ``Tensor[]`` arguments. Autograd tracks only the
        tensors a Function is called with, so the node is called with the lists' lengths and
        the arguments flattened (:meth:`_flatten_lists`); forward and backward put the lists
        back. Setup and backward see what the dispatcher's autograd gives them: the op's own
        arguments, a list input's ``ctx.needs_input_grad`` entry a list of flags (one per
        tensor), a list input's gradient a list. What this replaces: the dispatcher path's
        autograd (``torch.library``'s generated Function), which flattens and rebuilds every
        call's arguments with pytree and redispatches."""
        run = self._run
        returns_list = self._returns_list
        through_dispatcher = self.default
        unflatten = self._unflatten_lists
        list_positions = self._tensor_list_positions
        arity = self._arity

        def forward(ctx, lengths, *flat):
            args = unflatten(lengths, flat)
            output = through_dispatcher(*args) if _dispatch_modes() else run(args)
            ctx.lengths = lengths
            ctx.needs_input_grad = tuple(unflatten(lengths, ctx.needs_input_grad[1:]))  # [0]: the lengths'
            if setup_context is not None:
                setup_context(ctx, tuple(args), output)
            return tuple(output) if returns_list else output

        def backward_flat(ctx, *grads):
            result = backward(ctx, list(grads)) if returns_list else backward(ctx, *grads)
            if not isinstance(result, tuple):
                result = (result,)
            lengths = iter(ctx.lengths)
            flat: list = [None]
            for i in range(arity):
                g = result[i] if i < len(result) else None
                if i in list_positions:
                    n = next(lengths)
                    if g is None:
                        flat.extend([None] * n)
                    elif len(g) != n:
                        raise RuntimeError(f"{self.name}: the backward returned {len(g)} gradients for a list "
                                           f"of {n} tensors (argument {i})")
                    else:
                        flat.extend(g)
                else:
                    flat.append(g)
            return tuple(flat)

        function = type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_flat),
        })
        self._apply = super(torch.autograd.Function, function).apply
        self._function = function

    def _flatten_lists(self, args: tuple) -> tuple:
        """(the lengths of the ``Tensor[]`` arguments, *the arguments with each list's
        tensors in its place): what the eager node of an op with lists is called with."""
        lengths = []
        flat: list = []
        positions = self._tensor_list_positions
        for i, a in enumerate(args):
            if i in positions:
                lengths.append(len(a))
                flat.extend(a)
            else:
                flat.append(a)
        return (tuple(lengths), *flat)

    def _unflatten_lists(self, lengths: tuple, flat) -> list:
        """The inverse of :meth:`_flatten_lists` (less the lengths): the op's arguments."""
        args: list = []
        positions = self._tensor_list_positions
        k = j = 0
        for i in range(self._arity):
            if i in positions:
                n = lengths[j]
                j += 1
                args.append(list(flat[k:k + n]))
                k += n
            else:
                args.append(flat[k])
                k += 1
        return args

    def _register_aliased(self, backward: Callable, setup_context: Callable | None,
                          aliased_inputs: tuple[int, ...]) -> None:
        """The eager node of :meth:`register_autograd` with ``aliased_inputs``: forward
        returns ``(output, *aliases)`` (``(*outputs, *aliases)`` for a ``Tensor[]`` result),
        one alias per aliased input that needs a gradient (an input that needs none is
        saved as it is: an alias would make the backward op compute a gradient nobody
        wants)."""
        run = self._run
        through_dispatcher = self.default
        returns_list = self._returns_list
        self._alias_positions = aliased_inputs

        def forward(ctx, *args):
            # Under a dispatch mode only inside eager_nodes_under_dispatch_modes: the mode sees the op.
            output = through_dispatcher(*args) if _dispatch_modes() else run(args)
            # Unused outputs' gradients arrive as None: no zeros made for an alias nobody read.
            ctx.set_materialize_grads(False)
            positions = tuple(i for i in aliased_inputs if ctx.needs_input_grad[i])
            ctx.alias_positions = positions
            aliases = tuple(args[i].view_as(args[i]) for i in positions)
            saved_args = list(args)
            for i, alias in zip(positions, aliases):
                saved_args[i] = alias
            if setup_context is not None:
                setup_context(ctx, tuple(saved_args), output)
            outputs = tuple(output) if returns_list else (output,)
            ctx.output_count = len(outputs)
            return (*outputs, *aliases)

        def backward_aliased(ctx, *grads):
            # An output's gradient is None where only the aliases were read (gradients are
            # not materialised): the op's backward handles it.
            count = ctx.output_count
            ctx.alias_grads = dict(zip(ctx.alias_positions, grads[count:]))
            return backward(ctx, list(grads[:count]) if returns_list else grads[0])

        function = type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_aliased),
        })
        self._apply = super(torch.autograd.Function, function).apply
        self._function = function

    # -- calls --------------------------------------------------------------------------

    def _run(self, args: tuple):
        """The kernel on the backend chosen for these arguments, or the reference."""
        if _chosen.kernels:
            chosen = _chosen.kernels.pop(self.name, None)
            if chosen is not None:  # the caller checked the arguments and chose this kernel
                return chosen(*args)
        if self._check is not None:
            self._check(*args)
        # One scan: the device type and dtype that choose the kernel, and whether every tensor
        # argument is on one device and every float one of one dtype (the native launchers'
        # common rule, which then need not scan again: ``after_uniform_scan``).
        device = dtype = None
        uniform = True
        for a in args:
            if isinstance(a, Tensor):
                if device is None:
                    device = a.device
                elif uniform and a.device != device:
                    uniform = False
                if a.is_floating_point():
                    if dtype is None:
                        dtype = a.dtype
                    elif a.dtype != dtype:
                        uniform = False
        if device is None:
            raise ValueError(f"{self.name}: a kernel call needs at least one tensor argument")
        backend, fn = kernel_choice(self.name, device.type, dtype)
        if fn is not None:
            after_uniform_scan = getattr(fn, "after_uniform_scan", None)
            if after_uniform_scan is None:
                out = fn(*args)
            else:
                out = after_uniform_scan(dtype, *args) if uniform else NotImplemented
            if out is not NotImplemented:
                return out
            note_declined(backend, self.name, "unsupported input")
        return self._reference(*args)

    def _dispatcher_impl(self, *args):
        return self._run(args)

    def implementation(self, *args):
        """The op below autograd, as the dispatcher's kernel runs it: the check, then the
        chosen backend's kernel or the reference. For a dispatch mode that runs the op
        itself with the mode active (``fastmeta.tools.launches``), to see inside it."""
        return self._run(args)

    def __call__(self, *args):
        if _is_compiling():  # first: dynamo traces this function and folds the flag
            return self.default(*args)
        if len(args) != self._arity:
            args = self._complete(args)
        needs_grad = False
        plain = True
        grad_enabled = _grad_enabled()
        for a in args:
            if isinstance(a, Tensor):
                kind = type(a)
                if kind is not Tensor and kind is not _Parameter:
                    plain = False
                    break
                if grad_enabled and a.requires_grad:
                    needs_grad = True
            elif grad_enabled and isinstance(a, list) and a and isinstance(a[0], Tensor):
                if any(t.requires_grad for t in a):
                    needs_grad = True
        if not plain or _function_modes() or _functorch_interpreter() is not None or (
                _dispatch_modes() and not (needs_grad and _eager_nodes.under_dispatch_modes)):
            return self.default(*args)
        if _profiler_enabled():
            # Under torch.profiler the call is one range named as the dispatcher's op would
            # record it: the dispatch counter (fastmeta.tools.dispatches) and a reader of the
            # trace see the same op, with its kernel and glue inside it.
            with torch.profiler.record_function(self._qualname):
                return self._eager(args, needs_grad)
        return self._eager(args, needs_grad)

    def _complete(self, args: tuple) -> tuple:
        """The arguments with the schema's defaults filled in for the trailing ones left out."""
        if not self._required <= len(args) <= self._arity:
            raise TypeError(f"{self.name}() takes {self._required} to {self._arity} positional arguments "
                            f"but {len(args)} were given")
        return args + self._defaults[len(args):]

    def _eager(self, args: tuple, needs_grad: bool):
        if needs_grad:
            if self._native_node is not None and not _chosen.kernels and not _dispatch_modes():
                out = self._native_node(*args)
                if out is not NotImplemented:
                    return out
            if self._function is None or self._mutates:
                return self.default(*args)
            out = self._apply(*self._flatten_lists(args)) if self._has_tensor_lists else self._apply(*args)
            if self._aliased:
                if not self._returns_list:
                    return out[0]
                aliases = sum(1 for i in self._alias_positions if args[i] is not None and args[i].requires_grad)
                return list(out[:len(out) - aliases])
            return list(out) if self._returns_list else out
        out = self._run(args)
        if self._mutated_positions:
            _increment_versions(_flatten([args[i] for i in self._mutated_positions]))
        return out

    def __repr__(self):
        return f"<fastmeta public op {self._qualname}>"


_native_node_ops: dict[str, Callable] = {}


def cpu_native_node(node: str, kernels: tuple[str, ...], x: Tensor, *others: Tensor | None) -> Callable | None:
    """``torch.ops.fastmeta_ext.<node>`` (a C++ autograd node's entry, see
    :meth:`PublicOp.register_native_node`) where ``x`` and the ``others`` given are CPU
    tensors of one float dtype the kernels are compiled for, and the ``cpu`` backend runs
    every one of ``kernels`` for it with its own launchers (not a stand-in such as a test
    harness's counting wrapper: the node calls the kernels itself, past the launchers);
    None otherwise, and the Python node runs."""
    dtype = x.dtype
    if x.device.type != "cpu" or dtype not in kernel_dtypes("cpu"):
        return None
    for t in others:
        if t is not None and (t.device.type != "cpu" or t.dtype != dtype):
            return None
    for name in kernels:
        backend, kernel = kernel_choice(name, "cpu", dtype)
        if backend != "cpu" or not getattr(kernel, "runs_extension_op", False):
            return None
    op = _native_node_ops.get(node)
    if op is None:
        op = _native_node_ops[node] = getattr(torch.ops.fastmeta_ext, node).default
    return op


def _flatten(values) -> list[Tensor]:
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, Tensor))
    return out


def _increment_versions(tensors: list[Tensor]) -> None:
    """What the dispatcher's ADInplaceOrView kernel does for an op that writes its arguments:
    autograd then refuses a backward through a stale saved value."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.7 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


class _ChosenKernels(threading.local):
    def __init__(self):
        self.kernels: dict[str, Callable] = {}


_chosen = _ChosenKernels()


def call_with_kernel(op: PublicOp, kernel: Callable, *args):
    """``op(*args)`` running ``kernel``, a kernel its caller has already chosen for these
    arguments after checking them (the engine, at its public boundary): the op's own
    check and kernel choice are skipped, so each happens once per call. Autograd, the
    fake kernel and the op's schema are the public op's. The choice is per thread and
    consumed by the one call."""
    _chosen.kernels[op.name] = kernel
    try:
        return op(*args)
    finally:
        _chosen.kernels.pop(op.name, None)


def define_op(reference: Callable, native: NativeCall | None = None, check: Callable[..., None] | None = None,
              mutates: tuple[str, ...] = ()) -> PublicOp:
    """The public op ``fastmeta::<name>`` of the kernel ``reference_<name>``.

    check: validates the arguments (raising with a message that names them) before any
    backend sees them. mutates: the arguments the op writes in place.
    """
    spec = define_kernel(reference, native, mutates)
    op = PublicOp(spec, check, mutates)
    PUBLIC_OPS[spec.name] = op
    return op


__all__ = ["ModuleOp", "NativeCall", "OpFamily", "PUBLIC_OPS", "PublicOp", "call_with_kernel", "cpu_native_node",
           "define_family", "define_op", "module_op", "module_types"]
