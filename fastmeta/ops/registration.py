"""How an op module defines its ops: from the typed reference, once.

    def reference_task_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor: ...
    task_loss = define_op(reference_task_loss, native=NativeCall(takes=..., args=...))
    task_loss.register_fake(...); task_loss.register_autograd(...)

:func:`define_op` records the kernel in the table (:mod:`fastmeta.backends.table`: name and
schema from the reference) and returns the public custom op ``torch.ops.fastmeta.<name>``,
which runs the kernel on the chosen backend, or the reference.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from fastmeta.backends import run_kernel
from fastmeta.backends.table import ModuleOp, NativeCall, OpFamily, define_family, define_kernel, module_op, module_types


def define_op(reference: Callable, native: NativeCall | None = None, check: Callable[..., None] | None = None,
              mutates: tuple[str, ...] = ()):
    """The public op ``fastmeta::<name>`` of the kernel ``reference_<name>``.

    check: validates the arguments (raising with a message that names them) before any
    backend sees them. mutates: the arguments the op writes in place.
    """
    spec = define_kernel(reference, native, mutates)
    name = spec.name

    def run(*args):
        chosen = _chosen.kernels.pop(name, None)
        if chosen is not None:  # the caller checked the arguments and chose this kernel
            return chosen(*args)
        if check is not None:
            check(*args)
        return run_kernel(spec, *args)

    run.__name__, run.__qualname__, run.__doc__ = spec.name, spec.name, reference.__doc__
    return torch.library.custom_op(f"fastmeta::{spec.name}", run, mutates_args=mutates, schema=spec.schema)


class _ChosenKernels(threading.local):
    def __init__(self):
        self.kernels: dict[str, Callable] = {}


_chosen = _ChosenKernels()


def call_with_kernel(op, kernel: Callable, *args):
    """``op(*args)`` running ``kernel``, a kernel its caller has already chosen for these
    arguments after checking them (the engine, at its public boundary): the op's own
    check and kernel choice are skipped, so each happens once per call. Autograd, the
    fake kernel and the op's schema are the public op's. The choice is per thread and
    consumed by the one call."""
    name = op._name.rpartition("::")[2] if hasattr(op, "_name") else op.__name__
    _chosen.kernels[name] = kernel
    try:
        return op(*args)
    finally:
        _chosen.kernels.pop(name, None)


__all__ = ["ModuleOp", "NativeCall", "OpFamily", "call_with_kernel", "define_family", "define_op", "module_op",
           "module_types"]
