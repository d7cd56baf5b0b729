"""The kernel table: every kernel's name and schema, written once, by the op that owns it.

An op module (``fastmeta/ops/<family>.py``) defines each of its kernels by its typed
reference function, ``reference_<name>``; :func:`define_kernel` derives the kernel's name
and schema from it and records a :class:`KernelSpec` here. Everything else is derived:

- the public op ``torch.ops.fastmeta.<name>`` (:func:`fastmeta.ops.registration.define_op`);
- the schema of the C++/CUDA kernel ``torch.ops.fastmeta_ext.<name>``, defined from Python
  (:func:`fastmeta.backends.extension.define_native_library`); the sources in
  ``csrc/cpu/<family>.cpp`` and ``csrc/cuda/<family>_host.cpp`` register implementations
  (the CUDA sources also define ``mlp_meta_step_workspace_floats`` and
  ``mlp_meta_step_max_layers``, queries of :mod:`fastmeta.backends.cuda_limits`, no kernels);
- each backend's kernels: the Triton function ``<name>`` in ``kernels/<family>.py``, and
  the C++/CUDA implementations the dispatcher holds for the device;
- the verification record and the GPU check, which list kernels by family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class NativeCall:
    """How the C++/CUDA backends call a kernel: ``takes(device_type, *args)`` says whether
    their kernel handles these arguments (else the reference runs), ``args(*args)`` turns
    the reference's arguments into the ``fastmeta_ext`` op's (layouts normalised). The
    common rules (one float dtype the device's kernels are compiled for, one device) are
    checked for every kernel before ``takes``."""

    takes: Callable[..., bool] | None = None
    args: Callable[..., tuple] | None = None


@dataclass(frozen=True)
class KernelSpec:
    name: str  # "task_linear_weight_grad"
    family: str  # the op module that owns it: "task_linear"
    schema: str  # "(Tensor grad_out, Tensor x, bool shared) -> Tensor"
    reference: Callable
    native: NativeCall


TABLE: dict[str, KernelSpec] = {}
REFERENCE_PREFIX = "reference_"


def define_kernel(reference: Callable, native: NativeCall | None = None, mutates: tuple[str, ...] = ()) -> KernelSpec:
    """Record the kernel whose reference is ``reference_<name>`` in ``fastmeta.ops.<family>``.

    mutates: the arguments the kernel writes in place (the schema marks them).
    """
    if not reference.__name__.startswith(REFERENCE_PREFIX):
        raise ValueError(f"a kernel's reference is named {REFERENCE_PREFIX}<kernel>, got {reference.__name__!r}")
    name = reference.__name__[len(REFERENCE_PREFIX):]
    family = reference.__module__.rpartition(".")[2]
    spec = KernelSpec(name, family, str(torch.library.infer_schema(reference, mutates_args=mutates)), reference,
                      native or NativeCall())
    if name in TABLE and TABLE[name].reference is not reference:
        raise ValueError(f"kernel {name!r} is defined twice ({TABLE[name].family} and {family})")
    TABLE[name] = spec
    return spec


def families() -> dict[str, list[str]]:
    """Op family → its kernels, in definition order (the verification record's groups)."""
    out: dict[str, list[str]] = {}
    for spec in TABLE.values():
        out.setdefault(spec.family, []).append(spec.name)
    return out


def shared_or_contiguous(t: torch.Tensor | None, task_dim: bool) -> torch.Tensor | None:
    """For native kernels: a task stride of 0 (``θ.expand``) → the shared tensor ``t[0]``;
    anything else contiguous."""
    if t is None:
        return None
    if task_dim and t.dim() >= 2 and t.size(0) > 1 and t.stride(0) == 0:
        t = t[0]
    return t.contiguous()


# ---------------------------------------------------------------------------------------
# Op families: what an op module declares about itself, once
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleOp:
    """How the traced program runs an ``nn.Module`` type through a family's op.

    params: the module's parameter attributes, handed to ``run`` by name (each a per-task
    ``[T, *shape]`` tensor, a shared one, or None where the module has none).
    run(module, x, params, act, negative_slope): the output for x ``[T, N, ...]``, or None
    where the op does not take this module or input (the program then runs the module
    under vmap, unless ``required`` says the op must run: then it is an error).
    ``fuses_activation``: a following ReLU/LeakyReLU/Tanh/Sigmoid is fused
    into the op (``act``, ``negative_slope``); else they are "none", 0.0.
    """

    params: tuple[str, ...]
    run: Callable
    fuses_activation: bool = False
    accepts: Callable[..., bool] | None = None  # (module) -> whether the op takes its configuration
    subclasses: bool = False  # also runs subclasses of the declared types
    required: str | None = None  # the input the op requires, e.g. "[T, N, C, ...]": a declined one is an error


@dataclass(frozen=True)
class OpFamily:
    """An op module's declaration: the tests, the GPU check, the verification record, the
    workload shape lists and the traced program derive theirs from it.

    sample_args: kernel name → a function returning one fp32 CPU argument tuple for it
    (every kernel of the family has one; the table test fails a kernel without).
    layer_shapes(module, input_shape): the op's shape dict for a layer of a workload
    model seeing ``input_shape`` (``[T, N, ...]``), or None for a family no layer maps to.
    modules: the ``nn.Module`` types the traced program runs through this family's op.
    check_seconds: the GPU check's estimate for the family's tests: seconds on an H100 (the
    runs of 2026-11-26, bench/results/gpu-h100-2026-11-26/) where the family was run there.
    dry_run_case: the ``-k`` expression of the one Triton case the GPU check's dry run runs.
    """

    name: str
    sample_args: dict[str, Callable[[], tuple]]
    layer_shapes: Callable[..., dict | None] | None = None
    modules: dict[type, ModuleOp] = field(default_factory=dict)
    check_seconds: int = 30
    dry_run_case: str | None = None


FAMILIES: dict[str, OpFamily] = {}


def define_family(family: OpFamily) -> OpFamily:
    """Record an op module's family; its kernels must already be in the table."""
    kernels = families().get(family.name, [])
    if not kernels:
        raise ValueError(f"family {family.name!r} declares no kernels: define its ops before the family")
    FAMILIES[family.name] = family
    return family


def module_op(module) -> ModuleOp | None:
    """The family op that runs this module type, if any family declares it."""
    for family in FAMILIES.values():
        op = family.modules.get(type(module))
        if op is None:
            op = next((o for t, o in family.modules.items() if o.subclasses and isinstance(module, t)), None)
        if op is not None:
            return op if op.accepts is None or op.accepts(module) else None
    return None


def module_types() -> tuple[type, ...]:
    """Every nn.Module type some family runs: the traced program's recognised leaves."""
    return tuple(t for family in FAMILIES.values() for t in family.modules)
