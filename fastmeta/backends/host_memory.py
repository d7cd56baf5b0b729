"""Host memory: glibc's malloc set to keep freed memory for reuse (``FASTMETA_HOST_MALLOC``).

Why. A meta-batch on the CPU holds every task's fast weights and gradients in ``[T, P]``
buffers (``engine/task_weights.py``): 31 MB each for OmniglotFC at 32 tasks, 800 MB for
ResNet-12 at 16. glibc serves a request above its mmap threshold (at most 32 MB, adjusted
as it goes) with a fresh ``mmap`` and gives it back with ``munmap`` when freed, and it
returns the free top of its heap to the system past its trim threshold. Every such buffer
then costs a page fault per 4 KiB page, and the kernel zeroes each page, on every
iteration. Measured on a 2-core Xeon, one thread, OmniglotFC's second-order user loop:
34 474 minor page faults and 40 ms of system time per iteration, against 50 ms of user
time; with freed memory kept, 1 fault and 0 ms (docs/benchmarks.md, "Host memory").

What. At ``import fastmeta``, on Linux with glibc, :func:`configure` calls glibc's own
``mallopt``: ``M_MMAP_MAX = 0`` (every block from the heap, so a freed buffer is reused by
the next request of its size) and ``M_TRIM_THRESHOLD = 2 GiB - 1`` (the largest mallopt
takes: up to that much free memory stays at the top of the heap). This is process-wide,
as the CUDA caching allocator's policy is on the GPU: the process keeps up to its peak
memory instead of handing it back between iterations; the peak of live memory is the same.

``FASTMETA_HOST_MALLOC=system`` (read at import) leaves glibc's defaults alone; ``retain``
is the default. Elsewhere (macOS, musl, Windows) nothing is changed and :func:`setting`
says why.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENVIRONMENT_VARIABLE = "FASTMETA_HOST_MALLOC"
SETTINGS = ("retain", "system")

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int

_state = {"setting": None, "applied": False, "reason": "not configured yet"}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None, f"not Linux ({sys.platform})"
    # confstr asks the C library itself (platform.libc_ver reads the Python binary: work at
    # every import).
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        version = ""
    if not version.startswith("glibc"):
        return None, "the C library is not glibc"
    try:
        return ctypes.CDLL(None), ""
    except OSError as exc:
        return None, f"cannot open the C library ({exc})"


def configure() -> dict:
    """Apply ``FASTMETA_HOST_MALLOC`` (once per process; later calls return the state)."""
    if _state["setting"] is not None:
        return dict(_state)
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "retain").strip().lower() or "retain"
    if setting not in SETTINGS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={setting!r}: expected one of {', '.join(SETTINGS)}")
    _state["setting"] = setting
    if setting == "system":
        _state["reason"] = f"{ENVIRONMENT_VARIABLE}=system: glibc's defaults"
        return dict(_state)
    libc, reason = _glibc()
    if libc is None:
        _state["reason"] = reason
        return dict(_state)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success.
    if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1:
        _state["applied"], _state["reason"] = True, "glibc keeps freed memory for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    else:
        _state["reason"] = "glibc's mallopt refused the settings"
    return dict(_state)


def setting() -> dict:
    """The state for ``fastmeta info``: the setting, whether it was applied, and why."""
    return dict(_state)
