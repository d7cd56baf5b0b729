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

from dataclasses import dataclass
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
