"""The C++/CUDA extension in ``csrc/``: JIT build, availability, and the kernel launchers.

The extension is one shared library whose private ops live in the ``fastmeta_ext``
namespace. Their schemas are defined from Python, from the kernel table
(:func:`define_native_library`); the sources register implementations for the CPU
(``csrc/cpu/*.cpp``) and for CUDA (``csrc/cuda/*.cu`` and ``csrc/cuda/*_host.cpp``) with
``TORCH_LIBRARY_IMPL``, and ``csrc/cuda/mlp_meta_step_host.cpp`` defines the one op outside
the table (``mlp_meta_step_workspace_floats``, ``mlp_meta_step_max_layers``: queries of
:mod:`fastmeta.backends.cuda_limits`) with ``TORCH_LIBRARY_FRAGMENT``. The
dispatcher routes on the tensors' device. Their checks raise typed errors (TypeError,
ValueError, IndexError, NotImplementedError; ``csrc/common.h``). This module builds it on
first use (or ahead of time with ``fastmeta build``) with ``torch.utils.cpp_extension.load``
and ninja, under torch's extensions directory (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), so later processes only load it.

- **One cache folder per build input.** The folder's name is a digest of everything the
  build depends on (:func:`build_key`): the content of every file under ``csrc/``, torch's
  version, CUDA version, C++ ABI and install location, the compiler, the flags, the CUDA
  architectures and, for ``-march=native``, the CPU. The sources are compiled from a copy
  inside that folder (:func:`stage_sources`), so the build's command lines are the same
  whichever checkout asked for it: two checkouts or environments with the same inputs
  share one build, and any that differ get their own folder instead of rebuilding each
  other's in turn.
- **A first build says so.** It prints one line before (what it builds, where, how long
  it usually takes) and one after (how long it took); loading a finished build prints
  nothing, and torch's "No CUDA runtime is found" import warning is silenced.

- CUDA sources are compiled whenever torch is a CUDA build and nvcc is found, even with
  no GPU. Without a GPU, nvcc needs ``TORCH_CUDA_ARCH_LIST``; it defaults here to ``9.0``
  (H100/H200), with a log line saying so.
- Without a working compiler (or ninja) the ``cpu`` and ``cuda`` backends report
  themselves unavailable with the reason, after one warning line, and fastmeta runs the
  other backends.
- The launchers below are the backend kernels the op layer calls. Each takes exactly the
  arguments of the op's reference, normalises layouts (a task stride of 0 becomes a
  shared tensor, anything else non-contiguous is made contiguous) and returns
  ``NotImplemented`` for what the C++ does not handle (a dtype, a device mix, an MLP
  beyond the fused kernel's limits), so that the reference runs instead.

Environment: ``FASTMETA_BUILD_CUDA=0`` leaves the CUDA sources out; ``FASTMETA_NATIVE=0`` builds without ``-march=native`` (for a cache shared by
machines with different CPUs); ``FASTMETA_BUILD_VERBOSE=1`` shows the compiler commands.
"""

from __future__ import annotations

import hashlib

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastmeta.backends.build_lock import build_once
from fastmeta.backends.table import TABLE, KernelSpec

log = logging.getLogger("fastmeta.backends")

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "reason": "", "with_cuda": False, "path": None}

NATIVE_NAMESPACE = "fastmeta_ext"


def sources(src: Path, with_cuda: bool) -> list[str]:
    """Every source of the extension: one file per op family and device (csrc/cpu/<family>.cpp;
    csrc/cuda/<family>.cu for the kernels and csrc/cuda/<family>_host.cpp for their torch-side
    wrappers), compiled only for CUDA builds in the CUDA case; and the engine's autograd nodes
    (csrc/engine/*.cpp: ATen calls only)."""
    found = sorted((src / "cpu").glob("*.cpp")) + sorted((src / "engine").glob("*.cpp"))
    if with_cuda:
        found += sorted((src / "cuda").glob("*.cu")) + sorted((src / "cuda").glob("*.cpp"))
    return [str(f) for f in found]


# ---------------------------------------------------------------------------------------
# Finding the sources, the compilers and the CUDA toolkit
# ---------------------------------------------------------------------------------------


def csrc_dir() -> Path | None:
    """The directory holding the C++/CUDA sources (``common.h``, ``cpu/``, ``cuda/``).

    An installed wheel ships the sources as the data package ``fastmeta.csrc`` (a
    package-dir mapping of ``csrc/``); an editable install or a source checkout finds
    them at the repository root, two levels above this file.
    """
    candidates = []
    try:
        spec = importlib.util.find_spec("fastmeta.csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) for p in spec.submodule_search_locations)
    candidates.append(Path(__file__).resolve().parents[2] / "csrc")
    for c in candidates:
        if (c / "common.h").is_file() and (c / "cpu").is_dir():
            return c
    return None


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning.

    torch logs that line when the module is imported on a machine with a CUDA toolkit but no
    GPU, i.e. on every fastmeta command there; the first-build notice names the toolkit used.
    """
    if "torch.utils.cpp_extension" not in sys.modules:
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import torch.utils.cpp_extension  # noqa: F401
        finally:
            logger.setLevel(level)
    return sys.modules["torch.utils.cpp_extension"]


def _find_nvcc() -> str | None:
    cpp_extension = _cpp_extension()

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit nvcc belongs to, even when nvcc on PATH is a wrapper script.

    torch guesses CUDA_HOME as the parent of the nvcc on PATH; for a wrapper in
    /usr/local/bin that is /usr/local, whose include/ has no cuda_runtime.h. nvcc's dry
    run prints its real bin directory as ``_HERE_``.
    """
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
        m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        m = None
    root = Path(m.group(1)).parent if m else Path(nvcc).resolve().parent.parent
    return str(root) if (root / "include" / "cuda_runtime.h").is_file() else None


def _cuda_plan() -> tuple[bool, str]:
    """(compile CUDA sources?, why not). Sets CUDA_HOME for torch's builder when needed."""
    if torch.version.cuda is None:
        return False, "torch is not a CUDA build"
    if os.environ.get("FASTMETA_BUILD_CUDA") == "0":
        return False, "FASTMETA_BUILD_CUDA=0"
    nvcc = _find_nvcc()
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    root = _toolkit_root(nvcc)
    if root is None:
        return False, f"no CUDA headers beside {nvcc}"
    cpp_extension = _cpp_extension()

    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root  # read by the builder; computed at its import
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With no GPU to query, torch would otherwise compile for every known arch
        # (minutes per .cu file on 2 cores) or fail. 9.0 is the H100/H200 the project
        # targets; set TORCH_CUDA_ARCH_LIST to build for another GPU.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        log.info("fastmeta: no GPU visible; compiling CUDA sources for TORCH_CUDA_ARCH_LIST=9.0")
    return True, ""


def _compiler_problem() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"C++ compiler {cxx!r} not found"
    if shutil.which("ninja") is None:
        if not _cpp_extension().is_ninja_available():
            return "ninja not found (pip install ninja)"
    return None


def _cpu_fingerprint() -> str:
    """A short hash of the CPU's model and flags: -march=native builds are per CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keys = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
        return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:8]
    except OSError:
        return "generic"


# ---------------------------------------------------------------------------------------
# The build cache: one folder per set of build inputs
# ---------------------------------------------------------------------------------------

# What a first build takes on the project's 2-core CPU machine (docs/benchmarks.md,
# "Extension build"); the notice before a build quotes it.
FIRST_BUILD_MINUTES = {False: "1-2 minutes", True: "2-3 minutes"}


@dataclass(frozen=True)
class BuildPlan:
    """The inputs of one build besides torch and the compiler: sources, variant and flags."""

    sources: Path  # the csrc/ folder
    with_cuda: bool
    cflags: tuple[str, ...]
    cuda_flags: tuple[str, ...]
    ldflags: tuple[str, ...]
    native: bool  # -march=native: the build is for this CPU only


def build_plan(src: Path) -> BuildPlan:
    """The build this process would run for the sources in ``src`` (sets CUDA_HOME when needed)."""
    with_cuda, why_not = _cuda_plan()
    if not with_cuda:
        log.info("fastmeta: building the C++ extension without CUDA sources (%s)", why_not)
    native = os.environ.get("FASTMETA_NATIVE", "1") != "0"
    cflags = [
        "-O3",
        "-fopenmp",  # at::parallel_for is inline OpenMP: without it, it runs serially
        # ISO C++ modes default to -ffp-contract=off; FMA contraction is what the GEMM
        # micro-kernel is written for (and what the reference's BLAS does).
        "-ffp-contract=fast",
    ]
    if native:
        cflags.append("-march=native")
    cuda_flags = ("-O3", "-lineinfo")  # lineinfo: compute-sanitizer reports source lines
    return BuildPlan(src, with_cuda, tuple(cflags), cuda_flags, ("-fopenmp",), native)


def _source_files(src: Path) -> list[Path]:
    """Every file under ``src`` a compiler could read: the sources and the headers they include."""
    return sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _cuda_arch_flags() -> list[str]:
    """The -gencode flags torch will pass nvcc (from TORCH_CUDA_ARCH_LIST or the visible GPUs)."""
    try:
        return list(_cpp_extension()._get_cuda_arch_flags())
    except Exception:  # a private helper: fall back to what decides it
        return [os.environ.get("TORCH_CUDA_ARCH_LIST", "")]


def build_key(plan: BuildPlan) -> str:
    """A digest of everything a build depends on; equal keys mean interchangeable builds.

    Not the sources' location: they are compiled from a copy in the cache folder
    (:func:`stage_sources`), so the command lines do not depend on it. torch's location is
    in, because the command lines name its headers and libraries by path: ninja would
    rebuild if another install's paths replaced them.
    """
    digest = hashlib.sha256()

    def add(label: str, value) -> None:
        digest.update(f"{label}={value!r}\n".encode())

    for path in _source_files(plan.sources):
        add("source", path.relative_to(plan.sources).as_posix())
        digest.update(path.read_bytes())
    add("torch", (torch.__version__, torch.version.cuda, torch._C._GLIBCXX_USE_CXX11_ABI))
    add("torch_dir", str(Path(torch.__file__).resolve().parent))
    add("python", (sys.implementation.cache_tag, sysconfig.get_paths()["include"]))
    add("cxx", shutil.which(os.environ.get("CXX", "c++")))
    add("flags", (plan.with_cuda, plan.cflags, plan.cuda_flags, plan.ldflags))
    if plan.with_cuda:
        add("cuda", (os.environ.get("CUDA_HOME"), _cuda_arch_flags()))
    if plan.native:
        add("cpu", _cpu_fingerprint())
    return digest.hexdigest()[:16]


def build_name(plan: BuildPlan) -> str:
    """The extension's name and cache folder: ``fastmeta_ext_{cpu|cuda}_{build_key}``."""
    return f"fastmeta_ext_{'cuda' if plan.with_cuda else 'cpu'}_{build_key(plan)}"


def stage_sources(src: Path, build_dir: Path) -> Path:
    """Copy ``src`` to ``build_dir/csrc`` (once) and return the copy.

    A file is written only when missing or different, through a temporary file and a
    rename: a concurrent process never reads half a file, and an unchanged file keeps the
    modification time ninja compared its objects against.
    """
    staged = build_dir / "csrc"
    for path in _source_files(src):
        target = staged / path.relative_to(src)
        data = path.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
    return staged


def _announce(message: str) -> None:
    """One line on stderr, from one process per node (torchrun sets LOCAL_RANK)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"fastmeta: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Build and availability
# ---------------------------------------------------------------------------------------


def build(verbose: bool = False) -> tuple[bool, str]:
    """Build (or load from the cache) the extension. Returns (ok, reason or the .so path).

    Safe to call many times: the first call does the work, later ones return its result.
    """
    with _lock:
        if _state["tried"]:
            return _state["ok"], _state["reason"] if not _state["ok"] else str(_state["path"])
        _state["tried"] = True
        try:
            _build(verbose or os.environ.get("FASTMETA_BUILD_VERBOSE") == "1")
            _state["ok"] = True
        except Exception as exc:  # any failure means: fall back, with one line
            lines = str(exc).strip().splitlines()
            # The compiler's first error says more than ninja's command line above it.
            errors = [ln.strip() for ln in lines if "error" in ln.lower() and "Error building" not in ln]
            first = errors[0] if errors else (lines[0] if lines else "")
            reason = f"{type(exc).__name__}: {first}"[:300]
            _state["ok"], _state["reason"] = False, f"C++ extension build failed ({reason})"
            log.warning("fastmeta: %s; using the other backends", _state["reason"])
        return _state["ok"], _state["reason"] if not _state["ok"] else str(_state["path"])


def _build(verbose: bool) -> None:
    src = csrc_dir()
    if src is None:
        raise FileNotFoundError("the csrc/ sources are not installed with this fastmeta")
    problem = _compiler_problem()
    if problem is not None:
        raise RuntimeError(problem)
    cpp_extension = _cpp_extension()
    plan = build_plan(src)
    name = build_name(plan)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    library = build_dir / f"{name}.so"
    define_native_library()

    def build_and_load(first_build: bool) -> None:
        staged = stage_sources(src, build_dir)
        if first_build:
            kernels = "CPU and CUDA kernels" if plan.with_cuda else "CPU kernels"
            toolkit = f", CUDA from {os.environ.get('CUDA_HOME')}" if plan.with_cuda else ""
            _announce(
                f"building the C++ extension ({kernels}{toolkit}) once for this install, "
                f"{FIRST_BUILD_MINUTES[plan.with_cuda]} on 2 cores, into {build_dir}"
            )
        started = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=sources(staged, plan.with_cuda),
            extra_cflags=list(plan.cflags),
            extra_cuda_cflags=list(plan.cuda_flags),
            extra_ldflags=list(plan.ldflags),
            extra_include_paths=[str(staged)],
            build_directory=str(build_dir),
            with_cuda=plan.with_cuda,
            is_python_module=False,  # the library registers implementations of torch.ops.fastmeta_ext.*, no Python module
            verbose=verbose,
        )
        if first_build:
            _announce(f"built the C++ extension in {time.perf_counter() - started:.0f} s; later runs load it")

    # One process builds, the others wait and then load (backends/build_lock.py).
    build_once(build_dir, library, build_and_load,
               on_wait=lambda: _announce(f"waiting for another process building the C++ extension in {build_dir}"))
    _state["with_cuda"] = plan.with_cuda
    _state["path"] = library


def loaded_op(name: str) -> Callable | None:
    """``torch.ops.fastmeta_ext.<name>.default`` where the extension is already built and
    loaded in this process; None otherwise. Never builds: for callers that take a C++ path
    only where one is at hand (the engine's segment nodes, fastmeta/engine/task_weights.py)."""
    if not _state["ok"]:
        return None
    op = _loaded_ops.get(name)
    if op is None:
        op = _loaded_ops[name] = getattr(torch.ops.fastmeta_ext, name).default
    return op


_loaded_ops: dict[str, Callable] = {}


def availability(device_type: str) -> tuple[bool, str]:
    """(available, reason) of the ``cpu`` or ``cuda`` backend; builds on first call."""
    if device_type == "cuda":
        if torch.version.cuda is None:
            return False, "torch is not a CUDA build"
        if _find_nvcc() is None:
            return False, "nvcc not found: the CUDA kernels need the CUDA toolkit (set CUDA_HOME)"
    ok, reason = build()
    if not ok:
        return False, reason
    if device_type == "cuda":
        if not _state["with_cuda"]:
            return False, "the extension was built without CUDA sources"
        if not torch.cuda.is_available():
            return False, "built with CUDA kernels, but no CUDA GPU is visible"
    return True, ""


def build_info() -> dict:
    """For ``fastmeta info``: whether the extension is built, with CUDA, and where."""
    return {
        "tried": _state["tried"],
        "ok": _state["ok"],
        "with_cuda": _state["with_cuda"],
        "reason": _state["reason"],
        "path": str(_state["path"]) if _state["path"] else None,
        "csrc": str(csrc_dir()) if csrc_dir() else None,
    }


# ---------------------------------------------------------------------------------------
# The native library and its launchers, derived from the kernel table
# ---------------------------------------------------------------------------------------

_native_library: torch.library.Library | None = None


def define_native_library() -> None:
    """Define ``torch.ops.fastmeta_ext.<name>`` for every kernel of the table, from its
    schema (the sources register the implementations). Idempotent; kernels added to the
    table later are defined on the next call."""
    global _native_library
    if _native_library is None:
        _native_library = torch.library.Library(NATIVE_NAMESPACE, "FRAGMENT")
    for spec in TABLE.values():
        if spec.name not in _defined:
            # The C++ kernels take concrete sizes: int, not SymInt.
            _native_library.define(spec.name + spec.schema.replace("SymInt", "int"))
            _defined.add(spec.name)


_defined: set[str] = set()


# The float dtypes each device's kernels are compiled for: the CPU kernels for float32 and
# float64 (float64 for gradcheck), the CUDA kernels for float32 only (float64 there runs the
# reference, never a lower precision). The one table: ops ask it through kernel_dtypes.
KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,)}


def kernel_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    """The float dtypes the ``device_type`` kernels are compiled for (none: empty)."""
    return KERNEL_DTYPES.get(device_type, ())


def _devices_and_dtypes_ok(dtypes: tuple[torch.dtype, ...], args) -> bool:
    """The common rules of every native kernel: the tensor arguments on one device, the
    float ones of one dtype among ``dtypes`` (those the device's kernels are compiled for)."""
    device = dtype = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if device is None:
                device = a.device
            elif a.device != device:
                return False
            if a.is_floating_point():
                if dtype is None:
                    dtype = a.dtype
                elif a.dtype != dtype:
                    return False
    return dtype in dtypes


def _launcher(spec: KernelSpec, device_type: str, op: Callable | None = None) -> Callable:
    """The backend kernel: the common checks (one device; the float tensors of one dtype the
    device's kernels are compiled for), the op's own ``takes``, then the native op on the
    arguments its ``args`` prepares; ``NotImplemented`` (the reference runs) otherwise.

    op: what runs on the prepared arguments (default: the native op
    ``fastmeta_ext::<name>``); the launch recorder (``fastmeta.tools.launches``) passes
    its own, to take the CUDA backend's decisions on a machine without a GPU."""
    runs_extension_op = op is None
    if op is None:
        overload = getattr(getattr(torch.ops, NATIVE_NAMESPACE), spec.name).default
        op = getattr(overload, "_op", overload)  # the C++ callable under OpOverload.__call__: one frame less
    takes, prepare = spec.native.takes, spec.native.args
    dtypes = kernel_dtypes(device_type)

    def launch(*args):
        if not _devices_and_dtypes_ok(dtypes, args):
            return NotImplemented
        if takes is not None and not takes(device_type, *args):
            return NotImplemented
        return op(*(prepare(*args) if prepare is not None else args))

    def unchecked(*args):
        return op(*(prepare(*args) if prepare is not None else args))

    def after_uniform_scan(dtype, *args):
        # The public op's call (fastmeta.ops.registration) has found every tensor argument
        # on one device and every float one of ``dtype``: the common rules less that scan.
        if dtype not in dtypes or (takes is not None and not takes(device_type, *args)):
            return NotImplemented
        return op(*(prepare(*args) if prepare is not None else args))

    launch.__name__ = f"{device_type}_{spec.name}"
    launch.after_uniform_scan = after_uniform_scan
    # Whether this launcher runs the extension's own op (not a stand-in the launch recorder
    # passes): the ops' C++ autograd nodes, which call the kernels themselves, are taken
    # only where the chosen kernel is such a launcher (fastmeta/ops/task_conv2d.py).
    launch.runs_extension_op = runs_extension_op
    # For a caller that has checked the arguments and asked the op's rule already
    # (fastmeta.ops.registration.call_with_kernel): the same call without the checks.
    launch.unchecked = unchecked
    return launch


DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def native_launcher(spec: KernelSpec, device_type: str, op: Callable) -> Callable:
    """The ``device_type`` backend's kernel for ``spec`` with ``op`` in place of the native
    op: its checks, ``takes`` and layout preparation, then ``op(*prepared)``."""
    return _launcher(spec, device_type, op)


def kernels(device_type: str) -> dict[str, Callable]:
    """Kernel name → launcher for the ``cpu`` or ``cuda`` backend: every kernel of the table
    that the sources implement for that device (builds if needed)."""
    ok, reason = build()
    if not ok:
        raise RuntimeError(reason)
    define_native_library()
    key = DISPATCH_KEYS[device_type]
    return {
        spec.name: _launcher(spec, device_type)
        for spec in TABLE.values()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NATIVE_NAMESPACE}::{spec.name}", key)
    }
