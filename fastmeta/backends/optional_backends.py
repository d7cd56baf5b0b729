"""Registration of the optional backends: ``triton``, ``cpu`` and ``cuda``.

Each is described here and loaded lazily, on first use: importing fastmeta never imports
Triton, never builds the C++/CUDA extension and never queries the GPU.

- ``triton``: kernels in ``kernels/`` (shipped as ``fastmeta.kernels``): the function
  named after each kernel of the table, in the module named after its op family. Runs on CUDA GPUs, and on the CPU only under
  ``TRITON_INTERPRET=1`` (for tests). A launcher with an ``input_precision`` parameter (the
  ``tl.dot`` kernels) is called with the matmul precision in force at each call
  (:mod:`fastmeta.backends.precision`), which it launches as a constexpr: Triton compiles
  one kernel per mode, and nothing replays an earlier mode.
- ``cpu`` and ``cuda``: the C++/CUDA extension in ``csrc/``, JIT-built with ninja by
  ``fastmeta.backends.extension``: the kernels the dispatcher holds for the device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os

from fastmeta.backends import Backend, precision, register_backend
from fastmeta.backends.table import TABLE

# TRITON_INTERPRET=1, read at import and by fastmeta.backends.refresh_environment (never per call).
_triton_interpreted = os.environ.get("TRITON_INTERPRET") == "1"


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _triton_availability() -> tuple[bool, str]:
    if not _module_exists("triton"):
        return False, "triton is not installed"
    if not _module_exists("fastmeta.kernels"):
        return False, "this build of fastmeta has no Triton kernels"
    if _triton_interpreted:
        return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, for tests"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU for tests)"
    return True, ""


def _load_triton(backend: Backend) -> None:
    backend.kernels.update(triton_launchers())


def triton_launchers() -> dict:
    """The triton backend's kernels, by name: the table's kernel ``<name>`` of family
    ``<family>`` is the function ``<name>`` in ``fastmeta.kernels.<family>``, when that
    module defines one (called at the matmul precision in force). A launch protocol of
    fastmeta.kernels.verified_protocols (split-K in one pass, a conv backward's grouped
    launch) runs on CUDA once the record holds it as verified."""
    importlib.import_module("fastmeta.kernels.verified_protocols").set_verified_check(_verified_on_cuda)
    launchers = {}
    for spec in TABLE.values():
        if not _module_exists(f"fastmeta.kernels.{spec.family}"):
            continue
        launcher = getattr(importlib.import_module(f"fastmeta.kernels.{spec.family}"), spec.name, None)
        if launcher is not None:
            launchers[spec.name] = at_current_precision(launcher)
    return launchers


def _verified_on_cuda(kernel: str) -> bool:
    from fastmeta.backends import verification

    return verification.is_verified("triton", kernel, "cuda")


def at_current_precision(launcher):
    """The launcher called with ``input_precision=`` the matmul precision in force at each
    call, when it takes one (the launchers of ``tl.dot`` kernels); else the launcher."""
    if "input_precision" not in inspect.signature(launcher).parameters:
        return launcher

    @functools.wraps(launcher)
    def launch(*args):
        return launcher(*args, input_precision=precision.current_matmul_precision())

    return launch


def _triton_device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if _triton_interpreted else ("cuda",)


def _triton_environment(backend: Backend) -> None:
    global _triton_interpreted
    _triton_interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    backend._available = None  # asked again


def _extension_availability(device_type: str) -> tuple[bool, str]:
    if not _module_exists("fastmeta.backends.extension"):
        return False, "this build of fastmeta has no C++/CUDA extension"
    extension = importlib.import_module("fastmeta.backends.extension")
    return extension.availability(device_type)


def _load_extension(device_type: str):
    def load(backend: Backend) -> None:
        extension = importlib.import_module("fastmeta.backends.extension")
        backend.kernels.update(extension.kernels(device_type))

    return load


register_backend(
    Backend(
        name="triton",
        description="Triton kernels (kernels/); CUDA GPUs, or the CPU under TRITON_INTERPRET=1",
        availability=_triton_availability,
        device_types=_triton_device_types,
        loader=_load_triton,
        environment=_triton_environment,
        matmul_precisions=precision.MATMUL_PRECISIONS,
    )
)
register_backend(
    Backend(
        name="cpu",
        description="C++/OpenMP kernels of the extension in csrc/cpu",
        availability=lambda: _extension_availability("cpu"),
        device_types=lambda: ("cpu",),
        loader=_load_extension("cpu"),
        matmul_precisions=("ieee",),  # scalar fp32 FMA: other modes decline (fastmeta.backends.precision)
    )
)
register_backend(
    Backend(
        name="cuda",
        description="CUDA kernels of the extension in csrc/cuda (needs nvcc)",
        availability=lambda: _extension_availability("cuda"),
        device_types=lambda: ("cuda",),
        loader=_load_extension("cuda"),
        matmul_precisions=("ieee",),  # scalar fp32 FMA: other modes decline (fastmeta.backends.precision)
    )
)
