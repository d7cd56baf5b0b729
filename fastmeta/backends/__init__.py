"""Backend registry: which implementation runs each op.

Every public op in :mod:`fastmeta.ops` runs one of the kernels of the table
(:mod:`fastmeta.backends.table`) through :func:`run_kernel`, which asks :func:`kernel_for`
for the implementation. A backend is a named set of such kernels plus an availability
check; it registers its implementations against the table by name. The ``torch`` backend is the op's own
plain-PyTorch reference and is always available; it is also the fallback whenever the
chosen backend has no kernel for the op or declines the inputs (a dtype, a layout, a size
beyond its limits). A decline is logged once at debug level; it is never a silently wrong
result, because the reference then computes the answer.

Choosing a backend:

- ``FASTMETA_BACKEND`` (environment, read at import) or :func:`use_backend` sets it.
- ``auto`` (the default) picks, per op and device type, the first backend in
  :data:`AUTO_PREFERENCE` that is available *and* recorded as verified for that op on that
  device type in ``verified.json`` (see :mod:`fastmeta.backends.verification`). A kernel
  that has never passed its tests on a GPU is never chosen there by ``auto``.

The choice is resolved once and cached (:func:`kernel_choice`): per op, device type, dtype,
backend setting (``auto`` or a name) and matmul precision. Nothing on an op call's path reads the
environment or the verification record. The cache is dropped when what it was resolved
from changes through the project's own API: the verification record is written or
reloaded (:func:`fastmeta.backends.verification.record`, :func:`~fastmeta.backends.verification.reload`),
a backend's kernel table is replaced (:func:`invalidate_kernel_choices`), or the
environment is read again (:func:`refresh_environment`: ``FASTMETA_BACKEND``,
``TRITON_INTERPRET`` and ``FASTMETA_VERIFIED_RECORD`` are read at import, and again only
there). Changing ``os.environ`` after import without calling it changes nothing.
- The matmul precision (:mod:`fastmeta.backends.precision`): for the kernels it governs, a
  backend that does not implement the mode in force (``Backend.matmul_precisions``) is
  passed over, as a decline: ``auto`` tries the next one, an explicit choice runs the
  reference, which emulates the mode.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from fastmeta.backends import host_memory, precision, verification
from fastmeta.backends.table import TABLE, KernelSpec

log = logging.getLogger("fastmeta.backends")

# glibc keeps freed host memory for the next [T, P] buffer (FASTMETA_HOST_MALLOC; host_memory.py).
host_memory.configure()

# Per op, the order in which ``auto`` tries backends: the fastest first, as measured in
# bench/ (bench/RESULTS.md). Backends not listed for an op are never picked by auto.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    # The CPU's linear layer is the C++ kernel again since its GEMMs above the tiny-matrix
    # size call BLAS directly (csrc/cpu/blas.h): as fast as the reference's bmm at W2's,
    # W4's and OFC's layers, faster at the tiny ones, and one dispatch instead of the
    # reference's aten ops (docs/benchmarks.md, "Measurements behind code decisions").
    "default": ("cuda", "triton", "cpu", "torch"),
}

REFERENCE = "torch"


@dataclass
class Backend:
    """A named table of kernels.

    kernels maps a kernel name to a callable with the same signature as the reference
    implementation in the op module. A kernel may return ``NotImplemented`` to decline an
    input it does not support; the reference then runs instead. matmul_precisions: the
    modes of :mod:`fastmeta.backends.precision` its GEMM-like kernels implement; under any
    other it is not asked for them.
    """

    name: str
    description: str
    availability: Callable[[], tuple[bool, str]]
    device_types: Callable[[], tuple[str, ...]] = lambda: ("cpu", "cuda")
    kernels: dict[str, Callable] = field(default_factory=dict)
    loader: Callable[["Backend"], None] | None = None
    # Re-reads the environment variables the backend depends on (refresh_environment).
    environment: Callable[["Backend"], None] | None = None
    matmul_precisions: tuple[str, ...] = ("ieee",)
    _loaded: bool = False
    _available: tuple[bool, str] | None = None

    def available(self) -> tuple[bool, str]:
        if self._available is None:
            try:
                self._available = self.availability()
            except Exception as exc:  # an optional backend must never break import
                self._available = (False, f"{type(exc).__name__}: {exc}")
        return self._available

    def kernel(self, name: str) -> Callable | None:
        if not self._loaded and self.loader is not None:
            self._loaded = True
            try:
                self.loader(self)
            except Exception as exc:
                self._available = (False, f"failed to load: {type(exc).__name__}: {exc}")
                log.warning("fastmeta: backend %r failed to load (%s); using others", self.name, exc)
        return self.kernels.get(name)


_REGISTRY: dict[str, Backend] = {}
_choice = os.environ.get("FASTMETA_BACKEND", "auto").strip() or "auto"
_declined_once: set[tuple[str, str, str]] = set()
# (op, device type, dtype, backend setting) -> (backend name, kernel or None): kernel_choice's cache.
_CHOICES: dict[tuple, tuple[str, Callable | None]] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    _CHOICES.clear()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered for a while (the launch recorder's); a built-in one stays."""
    if name in (REFERENCE, "triton", "cpu", "cuda"):
        raise ValueError(f"backend {name!r} is built in; it cannot be unregistered")
    _REGISTRY.pop(name, None)
    _CHOICES.clear()


def invalidate_kernel_choices() -> None:
    """Drop the cached kernel choices (:func:`kernel_choice`): the next call of each op
    resolves its backend again. For whoever changes what a choice is resolved from other
    than through :func:`use_backend`, the verification record's writer or
    :func:`refresh_environment` (which call it themselves): e.g. a test that replaces a
    backend's kernels."""
    _CHOICES.clear()


def refresh_environment() -> None:
    """Read the environment again: ``FASTMETA_BACKEND`` (the backend setting),
    ``TRITON_INTERPRET`` (where the triton backend runs) and ``FASTMETA_VERIFIED_RECORD``
    (the verification record, reloaded). Imports read them once; nothing else does."""
    global _choice
    _choice = _validate_choice(os.environ.get("FASTMETA_BACKEND", "auto").strip() or "auto")
    for backend in _REGISTRY.values():
        if backend.environment is not None:
            backend.environment(backend)
    verification.reload()  # clears the choices too (listener below)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {sorted(_REGISTRY)} or 'auto'"
        ) from None


def backends() -> list[dict]:
    """Each registered backend with its availability and, when unavailable, the reason."""
    rows = []
    for backend in _REGISTRY.values():
        ok, reason = backend.available()
        rows.append(
            {
                "name": backend.name,
                "available": ok,
                "reason": reason,
                "description": backend.description,
                "verified": verification.verified_ops(backend.name),
            }
        )
    return rows


def current_backend() -> str:
    """The backend chosen now: a registered name or ``"auto"``."""
    return _choice


def _validate_choice(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    if name != "auto":
        backend = get_backend(name)
        ok, reason = backend.available()
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return name


class use_backend:
    """Select the backend for fastmeta's ops: a registered name or ``"auto"``.

    ``fm.use_backend("triton")`` switches for the whole process.
    ``with fm.use_backend("cpu"): ...`` switches and restores the previous choice on exit.
    """

    def __init__(self, name: str):
        global _choice
        self.name = _validate_choice(name)
        self._previous = _choice
        _choice = self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _choice
        _choice = self._previous
        return False


def measured_preference(op: str) -> str | None:
    """The backend that the tile table's sweep measured fastest on CUDA for ``op``'s family
    (kernels/tile_table.json's ``preferences``: bench/tune_tiles.py times the CUDA
    extension's GEMMs against the tuned Triton kernels), or None."""
    spec = TABLE.get(op)
    if spec is None or importlib.util.find_spec("fastmeta.kernels") is None:
        return None
    from fastmeta.kernels import tiles

    return tiles.preferred_backend(spec.family)


def preference_order(op: str, device_type: str) -> tuple[str, ...]:
    """:data:`AUTO_PREFERENCE`'s order for ``op``; on CUDA, the backend the tile table's
    sweep measured fastest for its family first (:func:`measured_preference`)."""
    order = AUTO_PREFERENCE.get(op, AUTO_PREFERENCE["default"])
    preferred = measured_preference(op) if device_type == "cuda" else None
    if preferred is None or preferred not in order:
        return order
    return (preferred, *(name for name in order if name != preferred))


def auto_backends(op: str, device_type: str, *, assume_available: bool = False) -> Iterator[str]:
    """The backends ``auto`` tries for ``op`` on ``device_type``, in order: those of
    :func:`preference_order` recorded as verified there and available.

    assume_available: leave the availability (and the backend's device types of this
    machine) out: the order a machine with that device would take, e.g. the CUDA path
    asked on a CPU machine (``fastmeta.tools.launches``)."""
    for name in preference_order(op, device_type):
        if name == REFERENCE:
            continue
        # The record first: it is cheap, and availability may mean building an extension.
        if not verification.is_verified(name, op, device_type):
            continue
        backend = _REGISTRY.get(name)
        if backend is None:
            continue
        if assume_available:
            yield name
            continue
        if device_type not in backend.device_types():
            continue
        if backend.available()[0]:
            yield name


def kernel_choice(op: str, device_type: str, dtype: torch.dtype | None) -> tuple[str, Callable | None]:
    """:func:`kernel_for`, resolved once per (op, device type, dtype, backend setting,
    matmul precision) and cached: what every public op asks on every call. ``dtype``: that
    of the call's first float tensor (None: it has none)."""
    key = (op, device_type, dtype, _choice, precision.current_matmul_precision())
    found = _CHOICES.get(key)
    if found is None:
        found = _CHOICES[key] = kernel_for(op, device_type)
    return found


def kernel_for(op: str, device_type: str) -> tuple[str, Callable | None]:
    """The backend name and kernel to try for ``op`` on ``device_type``, resolved now
    (:func:`kernel_choice` is its cache).

    Returns (``"torch"``, None) when the reference should run.
    """
    choice = current_backend()
    names = auto_backends(op, device_type) if choice == "auto" else (choice,)
    spec = TABLE.get(op)
    mode = precision.current_matmul_precision()
    for name in names:
        if name == REFERENCE:
            break
        backend = _REGISTRY.get(name)
        if backend is None:
            raise ValueError(
                f"unknown backend {name!r} (from FASTMETA_BACKEND or use_backend); "
                f"known backends: {sorted(_REGISTRY)} or 'auto'"
            )
        if device_type not in backend.device_types():
            continue
        if spec is not None and precision.governs(spec.family) and mode not in backend.matmul_precisions:
            note_declined(name, op, f"matmul precision {mode!r} not implemented")
            continue
        fn = backend.kernel(op)
        if fn is not None:
            return name, fn
    return REFERENCE, None


def note_declined(backend: str, op: str, why: str) -> None:
    key = (backend, op, why)
    if key not in _declined_once:
        _declined_once.add(key)
        log.debug("fastmeta: backend %r declined %s (%s); running the reference", backend, op, why)


def device_type_of(args) -> str:
    """The device type a kernel call runs on: that of its first tensor argument."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    raise ValueError("a kernel call needs at least one tensor argument")


def run_kernel(spec: KernelSpec, *args):
    """Run a kernel of the table on the chosen backend, or its reference when that backend
    has none or declines the arguments."""
    name, fn = kernel_choice(spec.name, device_type_of(args), next(
        (a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None))
    if fn is not None:
        out = fn(*args)
        if out is not NotImplemented:
            return out
        note_declined(name, spec.name, "unsupported input")
    return spec.reference(*args)


register_backend(
    Backend(
        name=REFERENCE,
        description="plain PyTorch reference; always available",
        availability=lambda: (True, ""),
        matmul_precisions=precision.MATMUL_PRECISIONS,  # emulated (fastmeta.backends.precision)
    )
)

verification.on_reload(invalidate_kernel_choices)

from fastmeta.backends import optional_backends  # noqa: E402,F401  (registers triton/cpu/cuda)
