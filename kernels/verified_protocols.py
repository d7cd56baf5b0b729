"""Launch protocols that run on CUDA only once the GPU check has verified them.

Some of the Triton kernels' launch routes depend on what the interpreter cannot exercise:
the GPU's memory model across programs, or a compiled kernel whose programs take two
different code paths. Each such route is named here (:data:`PROTOCOLS`) and recorded as a
kernel of its own in the verification record (backend ``triton``, device ``cuda``), by its
own step of ``bench/gpu_check.py``. Until the record holds it, launches on CUDA take the
route that is verified; under the interpreter (the tests, where programs run one after
another on the CPU) the protocol always runs, unless a test chooses with :func:`forced`.

The backend layer hands :func:`set_verified_check` the record's answer as a function, asked
at each launch, so a record written or reloaded later counts. The launch recorder
(fastmeta.tools.launches) counts the CUDA path, so while it records, the record decides as
it does on CUDA.

``FASTMETA_DISABLE_PROTOCOLS`` (a comma-separated list of protocol names, or ``all``; read
once per process, an unknown name refused naming the variable) turns protocols off on
every device, verified or not: the route taken before them, for an A/B timing on a GPU or
to step around one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

import torch

from fastmeta.kernels.launch_checks import recording

PROTOCOLS = {
    "split_k_one_pass": "a split-K launch sums its partial tiles in its own epilogue: tile counters taken by "
                        "acquire-release atomics at GPU scope (kernels/split_k.py)",
    "conv2d_grads_in_one_launch": "the launches of one conv backward (its input and weight gradients; the double "
                                  "backward's three) as one: one grid whose programs run different GEMMs, each "
                                  "with its own tiles (kernels/task_conv2d.py, conv2d_grads_kernel)",
}

DISABLE_VARIABLE = "FASTMETA_DISABLE_PROTOCOLS"

_verified_on_cuda: Callable[[str], bool] = lambda name: False
_forced: dict[str, list[bool]] = {}


def disabled_by_environment(value: str | None = None) -> frozenset[str]:
    """The protocols ``FASTMETA_DISABLE_PROTOCOLS`` turns off (``value``: the variable's value;
    default, the environment's): names separated by commas, or ``all``; ValueError naming the
    variable for an unknown name."""
    value = os.environ.get(DISABLE_VARIABLE, "") if value is None else value
    names = {name.strip() for name in value.split(",") if name.strip()}
    if names == {"all"}:
        return frozenset(PROTOCOLS)
    unknown = sorted(names - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"{DISABLE_VARIABLE}={value!r} names unknown launch protocols {unknown}; the protocols "
                         f"are {sorted(PROTOCOLS)}, or 'all'")
    return frozenset(names)


_disabled = disabled_by_environment()


def set_verified_check(verified_on_cuda: Callable[[str], bool]) -> None:
    """``verified_on_cuda(name)``: whether the record holds protocol ``name`` as verified on
    CUDA now (the backend layer's switch)."""
    global _verified_on_cuda
    _verified_on_cuda = verified_on_cuda


def _known(name: str) -> str:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown launch protocol {name!r}; the protocols are {sorted(PROTOCOLS)}")
    return name


@contextmanager
def forced(name: str, enabled: bool):
    """Within: protocol ``name`` runs (True) or not (False) on any device. For tests of both
    routes."""
    stack = _forced.setdefault(_known(name), [])
    stack.append(bool(enabled))
    try:
        yield
    finally:
        stack.pop()


def in_force(name: str, device: torch.device) -> bool:
    """Whether protocol ``name`` runs for a launch on ``device``."""
    stack = _forced.get(_known(name))
    if stack:
        return stack[-1]
    if name in _disabled:
        return False
    if device.type == "cuda" or recording():
        return bool(_verified_on_cuda(name))
    return True  # the interpreter
