"""The kernels of one captured meta-iteration, counted on the CPU: every launch the CUDA
path would make, with its grid and tiles (issue 24, "Count it").

:func:`record_captured_step` runs the whole step a ``learner.capture(optimizer, ...)`` on a
GPU records (:func:`fastmeta.engine.whole_step.whole_iteration`: the gradients zeroed in
place, ``meta_batch`` on the learner's captured program, the backward, the guarded Adam
step with ``capturable=True``) on CPU tensors, through the CUDA path's launchers:

- each kernel of the table runs on the backend ``auto`` picks **on CUDA**
  (:func:`fastmeta.backends.auto_backends` with the verification record's CUDA entries);
- a Triton kernel (``triton``): its real launcher runs, with the tiles a GPU gets
  (:class:`fastmeta.kernels.launch_checks.recording_on_cpu`), and every ``kernel[grid](...)``
  is logged instead of run (a hook on Triton's ``KernelInterface.__getitem__``, which
  every jitted and interpreted kernel launches through);
- a C++/CUDA kernel (``cuda``): the CUDA backend's own launcher runs (its checks, its
  ``takes``, its layout preparation: :func:`fastmeta.backends.extension.native_launcher`),
  and the host function's launches are those of :data:`HOST_LAUNCHES`, a model of
  ``csrc/cuda/*_host.cpp`` and the ``launch_*`` functions of the ``.cu`` files (grid,
  threads, and the aten calls the host code makes, e.g. ``at::zeros``);
- where the CUDA path has no kernel, or its launcher declines, the reference runs, and
  its aten ops are launches, as on the GPU.

Every value is the reference's (the launchers' outputs are discarded, and the references
run unlogged), so the flow, shapes and strides are exact.

**What is a launch.** An aten op is logged by a ``TorchDispatchMode``, which sees the ops
that reach a backend's kernel (composite ops arrive decomposed: ``isfinite`` is ``eq``,
``abs``, ``ne``, ``mul``, four kernels on a GPU too). The one definition of a dispatch
decides which of them could launch (:func:`fastmeta.tools.dispatches.is_dispatch`): views,
reshapes and allocations (``NOT_DISPATCHES``) launch nothing, and a host read
(``_local_scalar_dense``) is a host sync, counted apart (a captured graph has none). Of the
rest:

- an op whose tensor outputs are all empty launches nothing (CUDA's elementwise and
  reduction kernels return before launching);
- a multi-tensor op (``_foreach_*``, ``_fused_adam_``...) launches what ATen's
  ``multi_tensor_apply`` (``ATen/native/cuda/MultiTensorApply.cuh``) would: chunks of
  65 536 elements, at most 320 blocks and 110/64/48/36/30 tensors per launch for 1–5 tensor
  lists (96 for one list with a scalar list), or one launch per tensor where ATen's fast
  route does not take the lists (mixed dtypes or devices, or a tensor not dense);
- an op whose result is read on the host (``.item()``: a host sync) is a check that only
  the CPU makes: a captured CUDA graph cannot hold a host read, and ATen's CUDA kernels
  skip such checks (``one_hot``'s class range, for one). It is logged apart
  (``LaunchLog.host_checks``), not counted;
- any other op is one kernel. A library call (cuBLAS's ``bmm``, cuDNN's convolution) may
  launch more than one; the CUDA path here has none in W2/W4. The GPU cross-check
  (:func:`compare_with_graph`, ``bench/gpu_check.py``'s ``kernel-count`` step) compares
  the count with the kernel nodes of the captured graph.

The Triton hook and the ``capturable`` Adam on CPU tensors (:func:`capturable_adam_on_cpu`)
are process-wide while a recording runs: record in one thread, and launch nothing else
meanwhile.

The aten ops made inside a fastmeta op (its check, its launcher's layout copies and
split-K sums, its reference where the CUDA path runs one) are logged with that op's name.

**Issued MACs.** For a conv launch, :func:`fastmeta.kernels.task_conv2d.conv_launch_plan`'s
(the launcher's own plan, checked against the grid it launched); for a
``task_matmul_kernel`` launch, from its arguments (M, N, K, the split) and tiles; for the
CUDA backend's ``batched_gemm_kernel``, from its 32 × 32 tiles and K-slices of 8
(``csrc/cuda/task_linear.cu``). Issued MACs are what the grid's programs execute, tile
padding included; useful MACs are the product's own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmeta.tools.dispatches import HOST_SYNC, is_dispatch

SM_COUNT = 132  # H100 SXM: the "one wave" of the measure
RECORDER_BACKEND = "cuda-path-recorder"
CONV_KERNELS = ("conv2d_forward_kernel", "conv2d_input_grad_kernel", "conv2d_weight_grad_kernel", "conv2d_grads_kernel")
MATMUL_KERNEL = "task_matmul_kernel"


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the CUDA path.

    source: ``"triton"`` (a kernel of ``kernels/``), ``"native"`` (a CUDA kernel of the
    extension) or ``"aten"`` (a torch op's kernel). name: the kernel's (``conv2d_forward_kernel``,
    ``batched_gemm_kernel``) or the aten op's (``aten::add_``). op: the fastmeta op whose
    call made it (``fastmeta::task_conv2d``), or None (glue outside the ops). grid: the
    launch's grid, three dimensions (an aten launch's is not modelled: (1, 1, 1)).
    tiles: the tile constants it was launched with. gemm: ``"conv"`` or ``"linear"`` for
    the GEMM launches, whose issued and useful MACs are counted.
    """

    source: str
    name: str
    op: str | None = None
    grid: tuple[int, int, int] = (1, 1, 1)
    tiles: tuple[tuple[str, object], ...] = ()
    gemm: str | None = None
    issued_macs: int = 0
    useful_macs: int = 0
    phase: str | None = None  # of the whole step (PHASES), where the recorder knows it

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def label(self) -> str:
        """``triton conv2d_forward_kernel`` / ``aten::add_ in fastmeta::task_conv2d``."""
        if self.source == "aten":
            return f"{self.name} in {self.op}" if self.op else self.name
        return f"{self.source} {self.name}"


@dataclass
class LaunchLog:
    """The launches of one recorded iteration, in order, and what else it did."""

    launches: list[Launch] = field(default_factory=list)
    fastmeta_ops: Counter = field(default_factory=Counter)
    host_syncs: int = 0
    host_checks: list[Launch] = field(default_factory=list)  # aten ops whose result was read on the host

    @property
    def kernels(self) -> int:
        return len(self.launches)

    def by_source(self) -> Counter:
        return Counter(l.source for l in self.launches)

    def by_label(self) -> Counter:
        return Counter(l.label for l in self.launches)

    def by_phase(self) -> Counter:
        return Counter(l.phase for l in self.launches)

    def gemm_launches(self, kind: str | None = None) -> list[Launch]:
        return [l for l in self.launches if l.gemm is not None and (kind is None or l.gemm == kind)]

    def issued_over_useful(self, kind: str = "conv") -> float:
        launches = self.gemm_launches(kind)
        return sum(l.issued_macs for l in launches) / max(1, sum(l.useful_macs for l in launches))

    def under_one_wave_share(self, kind: str | None = "conv", sms: int = SM_COUNT) -> float:
        """The share of the ``kind`` GEMM launches' issued MACs (None: every GEMM's) in
        launches of fewer programs than ``sms``: one program per SM at most, most of the
        GPU idle."""
        launches = self.gemm_launches(kind)
        total = sum(l.issued_macs for l in launches)
        return sum(l.issued_macs for l in launches if l.programs < sms) / max(1, total)

    def describe(self, top: int = 50) -> str:
        sources = self.by_source()
        lines = [f"{self.kernels} kernels: {sources['triton']} Triton, {sources['native']} CUDA (extension), "
                 f"{sources['aten']} aten; {sum(self.fastmeta_ops.values())} fastmeta ops, {self.host_syncs} host syncs "
                 f"(reading {len(self.host_checks)} CPU-only checks: "
                 f"{', '.join(sorted(l.label for l in self.host_checks)) or 'none'})"]
        if self.gemm_launches("conv"):
            lines.append(f"conv issued ÷ useful MACs {self.issued_over_useful('conv'):.4f}; conv MACs in launches "
                         f"under one wave ({SM_COUNT} SMs) {self.under_one_wave_share():.1%} (every GEMM's: "
                         f"{self.under_one_wave_share(None):.1%})")
        phases = self.by_phase()
        if any(phases):
            lines.append("by phase: " + ", ".join(f"{p} {phases[p]}" for p in (*PHASES, None) if phases.get(p)))
        for label, n in self.by_label().most_common(top):
            lines.append(f"  {n:>4}  {label}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"kernels": self.kernels, "by_source": dict(self.by_source()),
                "host_syncs": self.host_syncs, "fastmeta_ops": sum(self.fastmeta_ops.values()),
                "conv_issued_over_useful": round(self.issued_over_useful("conv"), 4) if self.gemm_launches("conv") else None,
                "conv_under_one_wave_share": round(self.under_one_wave_share(), 4) if self.gemm_launches("conv") else None,
                "host_checks": sorted(l.label for l in self.host_checks),
                "by_phase": {str(p): n for p, n in self.by_phase().items()},
                "by_label": dict(self.by_label().most_common())}


# ---------------------------------------------------------------------------------------
# aten ops: how many kernels one launches on CUDA
# ---------------------------------------------------------------------------------------

CHUNK = 65536  # MultiTensorApply.cuh: kChunkSize
MAX_BLOCKS = 320  # depth_to_max_blocks
MAX_TENSORS = (110, 64, 48, 36, 30)  # depth_to_max_tensors, by the number of tensor lists
MAX_TENSORS_WITH_SCALAR_LIST = (96, 64, 48, 36, 30)  # depth_to_max_tensors_scalarlist
MULTI_TENSOR_PREFIXES = ("aten::_foreach_", "aten::_fused_adam", "aten::_fused_sgd", "aten::_amp_foreach")


def _tensor_lists(args) -> list[list[torch.Tensor]]:
    return [list(a) for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]


def _fast_route(lists: list[list[torch.Tensor]]) -> bool:
    """ATen's check_fast_path_restrictions: one dtype and device, every tensor dense and
    non-overlapping, the i-th tensors of every list of one shape and strides."""
    first = lists[0][0]
    for tensors in lists:
        if len(tensors) != len(lists[0]):
            return False
        for t, lead in zip(tensors, lists[0]):
            if t.dtype != first.dtype or t.device != first.device or t.shape != lead.shape or t.stride() != lead.stride():
                return False
            if not _non_overlapping_and_dense(t):
                return False
    return True


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Its elements fill one block of memory, each once, in some order of the dimensions."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# The fused optimizers' kernels (ATen/native/cuda/Fused*.cu): their tensor lists go to
# multi_tensor_apply_for_fused_optimizer whole, with no fast-route check (the optimizer
# groups them by device and dtype first), the step counts (Adam's last list) apart.
FUSED_OPTIMIZER_PREFIXES = ("aten::_fused_adam", "aten::_fused_sgd")


def fused_optimizer_launches(name: str, args) -> int:
    """Kernels of one fused optimizer op: multi_tensor_apply_for_fused_optimizer's chunking,
    at depth = its parameter-shaped lists (params, grads, moments; an empty amsgrad list
    dropped), its state steps apart."""
    lists = [list(a) for a in args if isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a)]
    if name.startswith("aten::_fused_adam"):
        lists = lists[:-1]  # state_steps: one address per tensor, not a list the kernel walks
    lists = [tensors for tensors in lists if tensors]
    return _chunked_launches(lists[0], MAX_TENSORS[min(5, len(lists)) - 1]) if lists else 0


def _chunked_launches(tensors: list[torch.Tensor], max_tensors: int) -> int:
    """multi_tensor_apply's launches over the first list's tensors: a launch when
    ``max_tensors`` tensors are done or MAX_BLOCKS chunks are queued; empty tensors skipped."""
    launches = blocks = held = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        held += 1
        chunks = -(-t.numel() // CHUNK)
        for chunk in range(chunks):
            blocks += 1
            if (held == max_tensors and chunk == chunks - 1) or blocks == MAX_BLOCKS:
                launches += 1
                blocks = 0
                held = 0 if chunk == chunks - 1 else 1
    return launches + (1 if blocks else 0)


def multi_tensor_launches(name: str, args) -> int:
    """Kernels of one multi-tensor op (``multi_tensor_apply``'s rule, module docstring)."""
    if name.startswith(FUSED_OPTIMIZER_PREFIXES):
        return fused_optimizer_launches(name, args)
    lists = _tensor_lists(args)
    if not lists:
        return 0
    in_place = name.split("::")[1].split(".")[0].endswith("_")
    depth = min(5, len(lists) + (0 if in_place else 1))
    scalar_list = any(isinstance(a, (list, tuple)) and a and not isinstance(a[0], torch.Tensor) for a in args)
    if not _fast_route(lists):
        return sum(1 for t in lists[0] if t.numel())
    return _chunked_launches(lists[0], (MAX_TENSORS_WITH_SCALAR_LIST if scalar_list else MAX_TENSORS)[depth - 1])


def aten_launches(name: str, args, out) -> int:
    """Kernels the aten op ``name`` launches on CUDA (it is a dispatch: module docstring)."""
    if name.startswith(MULTI_TENSOR_PREFIXES):
        return multi_tensor_launches(name, args)
    outputs = [t for t in (out if isinstance(out, (list, tuple)) else (out,)) if isinstance(t, torch.Tensor)]
    if outputs and all(t.numel() == 0 for t in outputs):
        return 0
    return 1


# ---------------------------------------------------------------------------------------
# The CUDA backend's host launchers (csrc/cuda/*_host.cpp), modelled
# ---------------------------------------------------------------------------------------

GEMM_TILE, GEMM_K_SLICE, THREADS = 32, 8, 256  # csrc/cuda/task_linear.cu: kTile, kSlice; 256 threads


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def blocks_for(n: int, threads: int = THREADS) -> int:
    """``blocks_for`` of csrc/cuda/common_cuda.cuh: a grid-stride loop's blocks, at most 8 per SM."""
    return max(1, min(_cdiv(n, threads), 132 * 8))


def _batched_gemm(batches: int, M: int, N: int, K: int, K2: int = 0) -> list[Launch]:
    """One launch of ``batched_gemm_kernel`` (csrc/cuda/task_linear.cu); K2: a second term's
    reduction in the same accumulator (the double backward's d grad_out)."""
    if batches * M * N == 0:
        return []
    grid = (_cdiv(N, GEMM_TILE), _cdiv(M, GEMM_TILE), batches)
    slices = _cdiv(K, GEMM_K_SLICE) + _cdiv(K2, GEMM_K_SLICE)
    issued = batches * grid[0] * grid[1] * GEMM_TILE * GEMM_TILE * slices * GEMM_K_SLICE
    return [Launch("native", "batched_gemm_kernel", grid=grid,
                   tiles=(("TILE", GEMM_TILE), ("K_SLICE", GEMM_K_SLICE), ("threads", THREADS)),
                   gemm="linear", issued_macs=issued, useful_macs=batches * M * N * (K + K2))]


def _elementwise(kernel: str, n: int) -> list[Launch]:
    return [Launch("native", kernel, grid=(blocks_for(n), 1, 1), tiles=(("threads", THREADS),))] if n else []


def _host_task_linear(x, w, b, act, negative_slope):
    T, N, I = x.shape
    return _batched_gemm(T, N, w.size(-2), I)


def _host_task_linear_input_grad(grad_out, w):
    T, N, O = grad_out.shape
    return _batched_gemm(T, N, w.size(-1), O)


def _host_task_linear_weight_grad(grad_out, x, shared):
    T, N, I = x.shape
    O = grad_out.size(2)
    return _batched_gemm(1, O, I, T * N) if shared else _batched_gemm(T, O, I, N)


GRID_Z = 65535  # CUDA's limit on grid z: the batches of one batched_gemm_kernel launch


def _gemm_group(*gemms: list[Launch]) -> list[Launch]:
    """The wanted batched GEMMs (each a list of none or one launch) in one launch
    (``launch_batched_gemms``, task_linear_host.cpp's ``run_wanted``): grid z their batches
    together, x and y the largest; the blocks past their own GEMM's tiles return at once,
    so the issued MACs are the GEMMs'. Where their batches together exceed grid z, one
    launch each."""
    launches = [launch for gemm in gemms for launch in gemm]
    if len(launches) < 2 or sum(l.grid[2] for l in launches) > GRID_Z:
        return launches
    grid = (max(l.grid[0] for l in launches), max(l.grid[1] for l in launches), sum(l.grid[2] for l in launches))
    return [Launch("native", "batched_gemm_kernel", grid=grid, tiles=launches[0].tiles, gemm="linear",
                   issued_macs=sum(l.issued_macs for l in launches), useful_macs=sum(l.useful_macs for l in launches))]


def _host_task_linear_bias_grad(grad_out, shared):
    """db = 1ᵀ·grad_out (task_linear_host.cpp's ``bias_grad_gemm``): one row per task, or
    the tasks in the reduction where shared; a fill (aten::zero_) where there are no rows."""
    T, N, O = grad_out.shape
    if (O if shared else T * O) and not T * N:
        return [Launch("aten", "aten::zero_")]
    return _batched_gemm(1, 1, O, T * N) if shared else _batched_gemm(T, 1, O, N)


def _host_task_linear_backward(grad_out, x, w, output_mask, dx_addend=None, dw_addend=None, bias_shared=False):
    """The wanted GEMMs (dx, dw, the bias's db) in one launch, each addend read in its
    epilogue (no launch of its own), with a copy (``aten::clone``) first for an addend that
    is not contiguous."""
    copies = [Launch("aten", "aten::clone") for wanted, addend in zip(output_mask, (dx_addend, dw_addend))
              if wanted and addend is not None and addend.numel() and not addend.is_contiguous()]
    d_x = _host_task_linear_input_grad(grad_out, w) if output_mask[0] else []
    d_w = _host_task_linear_weight_grad(grad_out, x, w.dim() == 2) if output_mask[1] else []
    d_b = _host_task_linear_bias_grad(grad_out, bias_shared) if len(output_mask) > 2 and output_mask[2] else []
    fills = [l for l in d_b if l.source == "aten"]
    return copies + fills + _gemm_group(d_x, d_w, [l for l in d_b if l.source != "aten"])


def _host_task_linear_double_backward(g_dx, g_dw, grad_out, x, w, output_mask, g_db=None):
    """d grad_out: one GEMM over both upstreams' terms with g_db as its bias (K = 0 where g_db
    is the only term; a fill, aten::zero_, where none is given); d x, d w: their GEMMs, or a
    fill (at::zeros) where an upstream is absent; the GEMMs in one launch."""
    launches, d_grad_out = [], []
    if output_mask[0]:
        T, N, I = x.shape
        terms = [I for g, v in ((g_dx, w), (x, g_dw)) if g is not None and v is not None]
        if terms or g_db is not None:
            terms = terms or [0]
            d_grad_out = _batched_gemm(T, N, w.size(-2), terms[0], terms[1] if len(terms) > 1 else 0)
        else:
            launches.append(Launch("aten", "aten::zero_"))
    d_x = d_w = []
    if output_mask[1]:
        if g_dw is not None:
            d_x = _host_task_linear_input_grad(grad_out, g_dw)
        else:
            launches.append(Launch("aten", "aten::zeros"))
    if output_mask[2]:
        if g_dx is not None:
            d_w = _host_task_linear_weight_grad(grad_out, g_dx, w.dim() == 2)
        else:
            launches.append(Launch("aten", "aten::zeros"))
    return launches + _gemm_group(d_grad_out, d_x, d_w)


def _block_per_task(kernel: str, pred) -> list[Launch]:
    """One block of THREADS per task (csrc/cuda/task_loss.cu's per-task kernels)."""
    return [Launch("native", kernel, grid=(pred.size(0), 1, 1), tiles=(("threads", THREADS),))]


def _host_task_loss(pred, target, kind):
    return _block_per_task("task_loss_kernel", pred)


def _host_task_loss_grad(pred, target, kind, scale=None):
    """One launch, the scale (task_loss's upstream) read inside it."""
    T, N = pred.shape[:2]
    work = T * N if kind == "cross_entropy" else pred.numel()
    return _elementwise("task_loss_grad_kernel", work) if pred.numel() else []


def _host_task_loss_grad_backward(upstream, pred, target, kind):
    T, N = pred.shape[:2]
    work = T * N if kind == "cross_entropy" else pred.numel()
    return _elementwise("task_loss_grad_backward_kernel", work) if pred.numel() else []


def _host_task_loss_and_grad(pred, target, kind):
    return _block_per_task("task_loss_and_grad_kernel", pred)


def _host_task_loss_and_accuracy(pred, target):
    """task_loss_kernel writing both (csrc/cuda/task_loss_host.cpp)."""
    return _host_task_loss(pred, target, "cross_entropy")


def _host_task_accuracy(pred, target):
    return _block_per_task("task_accuracy_kernel", pred) if pred.size(0) else []


def _host_inner_step(theta, grad, lr, mask, precond, segments):
    return _elementwise("inner_step_kernel", grad.numel())


def _host_inner_step_backward(grad_out, grad, lr, mask, precond, segments, theta_shared, needs):
    T, P = grad.shape
    nt, ng, nl = needs[0], needs[1], needs[2]
    nm, np_ = needs[3] and mask is not None, needs[4] and precond is not None
    launches = [Launch("aten", "aten::zeros")] if nl and lr.numel() else []  # d_lr = at::zeros(...)
    if P > 0 and (nt or ng or nl or nm or np_):
        launches += _elementwise("inner_step_backward_kernel", P)
    elif nt and theta_shared and P > 0:
        launches.append(Launch("aten", "aten::zero_"))  # d_theta.zero_()
    return launches


# Kernel name → (its prepared arguments) → the launches of the CUDA host function. A kernel
# the CUDA path runs on the extension without an entry here is refused by name.
HOST_LAUNCHES: dict[str, Callable[..., list[Launch]]] = {
    "task_linear": _host_task_linear,
    "task_linear_input_grad": _host_task_linear_input_grad,
    "task_linear_weight_grad": _host_task_linear_weight_grad,
    "task_linear_backward": _host_task_linear_backward,
    "task_linear_double_backward": _host_task_linear_double_backward,
    "task_loss": _host_task_loss,
    "task_loss_grad": _host_task_loss_grad,
    "task_loss_grad_backward": _host_task_loss_grad_backward,
    "task_accuracy": _host_task_accuracy,
    "task_loss_and_accuracy": _host_task_loss_and_accuracy,
    "task_loss_and_grad": _host_task_loss_and_grad,
    "inner_step": _host_inner_step,
    "inner_step_backward": _host_inner_step_backward,
}


def cuda_path_backend(kernel: str, triton_launchers: dict) -> str:
    """The backend ``auto`` runs ``kernel`` on for CUDA tensors, at the matmul precision in
    force: the first verified on CUDA that has it (``"torch"``: the reference)."""
    from fastmeta.backends import REFERENCE, auto_backends, get_backend, precision
    from fastmeta.backends.table import TABLE

    mode = precision.current_matmul_precision()
    for name in auto_backends(kernel, "cuda", assume_available=True):
        if precision.governs(TABLE[kernel].family) and mode not in get_backend(name).matmul_precisions:
            continue
        if name == "triton" and kernel in triton_launchers:
            return name
        if name == "cuda":
            return name
    return REFERENCE


# ---------------------------------------------------------------------------------------
# The recorder
# ---------------------------------------------------------------------------------------


class _LaunchRecorder(TorchDispatchMode):
    """Logs the aten ops that launch (module docstring) and runs the fastmeta ops with
    itself active, so that the launches inside them are logged too."""

    def __init__(self, log: LaunchLog):
        super().__init__()
        self.log = log
        self.ops: list[str] = []  # the fastmeta ops being run, innermost last
        self.call: tuple[str, tuple] | None = None  # the Triton launcher running: (kernel, args)
        self.call_launches = 0  # the conv launches it has made so far
        self.paused = 0
        self.made: dict[int, Launch] = {}  # storage address → the aten launch that wrote it last
        self.phase: str | None = None  # set by record_captured_step

    @contextlib.contextmanager
    def unlogged(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def add(self, launch: Launch) -> Launch:
        if (launch.op is None and self.ops) or launch.phase is None:
            launch = Launch(**{**launch.__dict__, "op": launch.op or (self.ops[-1] if self.ops else None),
                               "phase": self.phase})
        self.log.launches.append(launch)
        return launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if self.paused:
            return func(*args, **kwargs)
        if name.startswith("fastmeta::"):
            from fastmeta.ops.registration import PUBLIC_OPS

            if kwargs:
                raise NotImplementedError(f"the launch recorder passes {name}'s arguments by position, got {kwargs}")
            self.log.fastmeta_ops[name] += 1
            self.ops.append(name)
            try:
                with self:
                    return PUBLIC_OPS[name.split("::", 1)[1]].implementation(*args)
            finally:
                self.ops.pop()
        if name.startswith("fastmeta_ext::"):
            raise NotImplementedError(f"{name} ran a native kernel of this machine inside the launch recorder")
        out = func(*args, **kwargs)
        if name == HOST_SYNC:
            self.log.host_syncs += 1
            checked = self.made.pop(_storage(args[0]), None)
            if checked is not None and any(l is checked for l in self.log.launches):
                self.log.launches = [l for l in self.log.launches if l is not checked]
                self.log.host_checks.append(checked)
        elif is_dispatch(name):
            launches = [self.add(Launch("aten", name)) for _ in range(aten_launches(name, args, out))]
            if len(launches) == 1:
                for t in (out if isinstance(out, (list, tuple)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        self.made[_storage(t)] = launches[0]
        return out

    # -- the CUDA path's kernels ---------------------------------------------------------

    def triton_kernel(self, spec, launcher):
        def run(*args):
            if self.paused:
                return spec.reference(*args)
            self.call, self.call_launches = (spec.name, args), 0
            try:
                out = launcher(*args)
            finally:
                self.call = None
            if out is NotImplemented:
                return NotImplemented
            with self.unlogged():
                return spec.reference(*args)

        return run

    def native_op(self, spec):
        host = HOST_LAUNCHES.get(spec.name)

        def run(*prepared):
            if host is None:
                raise NotImplementedError(
                    f"the CUDA path runs {spec.name} on the extension's CUDA kernel, and the launch recorder has no "
                    f"model of its host launcher (fastmeta.tools.launches.HOST_LAUNCHES)")
            for launch in host(*prepared):
                self.add(launch)
            with self.unlogged():
                return spec.reference(*prepared)

        def launch(*args):
            if self.paused:
                return spec.reference(*args)
            return checked(*args)

        from fastmeta.backends.extension import native_launcher

        checked = native_launcher(spec, "cuda", run)
        return launch

    def triton_launch(self, kernel, grid, args, kwargs) -> None:
        """One ``kernel[grid](*args, **kwargs)``, logged (not run)."""
        if self.paused:
            raise RuntimeError("a Triton kernel launched while the launch recorder computes a reference")
        if callable(grid):
            grid = grid(kwargs)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        name = getattr(getattr(kernel, "fn", None), "__name__", None) or getattr(kernel, "__name__", repr(kernel))
        tiles = tuple(sorted((k, v) for k, v in kwargs.items()
                             if (k.isupper() or k in ("num_warps", "num_stages")) and isinstance(v, (int, str))))
        gemm, issued, useful = None, 0, 0
        if name in CONV_KERNELS:
            gemm, issued, useful = "conv", *self._conv_macs(grid, kwargs)
        elif name == MATMUL_KERNEL:
            gemm, issued, useful = "linear", *matmul_launch_macs(kernel, grid, args, kwargs)
        self.add(Launch("triton", name, grid=grid, tiles=tiles, gemm=gemm, issued_macs=issued, useful_macs=useful))

    def _conv_macs(self, grid, kwargs) -> tuple[int, int]:
        from fastmeta.kernels.task_conv2d import conv_launch_plans

        # A launcher may make several conv launches (task_conv2d_backward and its double
        # backward compose the three): this one is the call's next.
        kernel, args = self.call
        plans = conv_launch_plans(kernel, *args)
        index, self.call_launches = self.call_launches, self.call_launches + 1
        plan = plans[index] if plans is not None and index < len(plans) else None
        tiles = {k: v for k, v in kwargs.items() if "BLOCK_" in k}
        if plan is None or plan.grid != grid or plan.launch_tiles() != tiles:
            raise RuntimeError(f"{kernel} launched grid {grid} with {tiles}, its plan says "
                               f"{None if plan is None else (plan.grid, plan.config)}")
        return plan.issued_macs, plan.useful_macs


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def matmul_launch_macs(kernel, grid, args, kwargs) -> tuple[int, int]:
    """:func:`matmul_macs` of one ``task_matmul_kernel[grid](*args, **kwargs)``, its
    problem read from the arguments by name."""
    named = dict(zip(inspect.signature(kernel.fn).parameters, args))
    return matmul_macs(grid, named["M"], named["N"], named["K"], named["k_per_split"], kwargs)


def matmul_macs(grid, M: int, N: int, K: int, k_per_split: int, tiles: dict) -> tuple[int, int]:
    """(issued, useful) MACs of a ``task_matmul_kernel`` launch: every program of grid row
    0 × batch runs split s's K-steps of BLOCK_K, BLOCK_M × BLOCK_N × BLOCK_K each."""
    bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    steps = sum(_cdiv(max(0, min(K, s * k_per_split + k_per_split) - s * k_per_split), bk) for s in range(grid[2]))
    return grid[0] * grid[1] * steps * bm * bn * bk, grid[1] * M * N * K


@contextlib.contextmanager
def _triton_launches_to(recorder: _LaunchRecorder) -> Iterator[None]:
    """Every ``kernel[grid](...)`` of any Triton kernel goes to ``recorder.triton_launch``."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def logged(kernel, grid):
        return functools.partial(_log_triton_launch, recorder, kernel, grid)

    KernelInterface.__getitem__ = logged
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def _log_triton_launch(recorder, kernel, grid, *args, **kwargs):
    recorder.triton_launch(kernel, grid, args, kwargs)


def unverified_cuda_kernels() -> dict[str, list[str]]:
    """Backend → the kernels written for the CUDA path (a Triton launcher; a CUDA-extension
    kernel this module models) that the verification record does not hold for CUDA yet:
    what the GPU check's next run verifies, and what ``auto`` does not take until then."""
    from fastmeta.backends import verification
    from fastmeta.backends.optional_backends import triton_launchers
    from fastmeta.kernels.verified_protocols import PROTOCOLS

    # The Triton launchers, and the launch protocols recorded as kernels of their own
    # (split-K in one pass, a conv backward's launches in one: kernels/verified_protocols.py).
    written = {"triton": sorted([*triton_launchers(), *PROTOCOLS]), "cuda": sorted(HOST_LAUNCHES)}
    return {backend: [k for k in kernels if not verification.is_verified(backend, k, "cuda")]
            for backend, kernels in written.items()}


@contextlib.contextmanager
def as_if_verified() -> Iterator[dict[str, list[str]]]:
    """While active, the verification record in force is the repository's plus every
    kernel of :func:`unverified_cuda_kernels` (yielded): the CUDA path as it will be once
    the GPU check has verified them, for a count of what they change. A temporary record
    through ``FASTMETA_VERIFIED_RECORD``; the record in force before is restored after."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from fastmeta.backends import verification

    pending = unverified_cuda_kernels()
    before = os.environ.get(verification.RECORD_PATH_VARIABLE)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "verified.json"
        path.write_text(json.dumps(verification._record()))  # the record in force, then the pending kernels
        for backend, kernels in pending.items():
            verification.record(backend, "cuda", kernels, "pending (fastmeta.tools.launches.as_if_verified)",
                                path=path)
        os.environ[verification.RECORD_PATH_VARIABLE] = str(path)
        verification.reload()
        try:
            yield pending
        finally:
            if before is None:
                os.environ.pop(verification.RECORD_PATH_VARIABLE, None)
            else:
                os.environ[verification.RECORD_PATH_VARIABLE] = before
            verification.reload()


@contextlib.contextmanager
def recording(log: LaunchLog) -> Iterator[_LaunchRecorder]:
    """While active, the fastmeta ops run the CUDA path's kernels on CPU tensors and every
    launch goes to ``log`` (module docstring)."""
    import fastmeta as fm
    from fastmeta.backends import Backend, invalidate_kernel_choices, precision, register_backend, unregister_backend
    from fastmeta.backends.optional_backends import triton_launchers
    from fastmeta.backends.table import TABLE
    from fastmeta.kernels import split_k
    from fastmeta.kernels.launch_checks import recording_on_cpu
    from fastmeta.ops.registration import eager_nodes_under_dispatch_modes

    recorder = _LaunchRecorder(log)
    # As a capture on its warm-up's stream (CapturedMetaStep): the split launches' tile
    # counters (kernels/split_k.py) were made, and zeroed, by the warm-up's first split
    # launch, outside the graph; made here before the log starts.
    split_k.forget_counters()
    split_k.tile_counters(torch.device("cpu"), 1)
    with recording_on_cpu():
        launchers = triton_launchers()
        kernels = {}
        for spec in TABLE.values():
            backend = cuda_path_backend(spec.name, launchers)
            if backend == "triton":
                kernels[spec.name] = recorder.triton_kernel(spec, launchers[spec.name])
            elif backend == "cuda":
                kernels[spec.name] = recorder.native_op(spec)
        register_backend(Backend(name=RECORDER_BACKEND, description="the CUDA path, logged (fastmeta.tools.launches)",
                                 availability=lambda: (True, ""), device_types=lambda: ("cpu",), kernels=kernels,
                                 matmul_precisions=precision.MATMUL_PRECISIONS))
        try:
            # The autograd graph of a plain call (the eager nodes, their alias outputs), as a
            # captured step runs it, with every fastmeta op still seen whole by the recorder.
            with (fm.use_backend(RECORDER_BACKEND), _triton_launches_to(recorder), eager_nodes_under_dispatch_modes(),
                  recorder):
                yield recorder
        finally:
            unregister_backend(RECORDER_BACKEND)
            invalidate_kernel_choices()


@contextlib.contextmanager
def capturable_adam_on_cpu() -> Iterator[None]:
    """torch's Adam with ``capturable=True`` refuses CPU tensors by a device check alone
    (``_get_capturable_supported_devices``); lifted here so that the CUDA step's update (its
    ``_foreach`` ops on device-side step counters) runs, and is logged, on the CPU."""
    from torch.optim import adam

    original = getattr(adam, "_get_capturable_supported_devices", None)
    if original is None:
        raise NotImplementedError(f"torch {torch.__version__}'s Adam has no _get_capturable_supported_devices to widen")

    def with_cpu(*args, **kwargs):
        return [*original(*args, **kwargs), "cpu"]

    adam._get_capturable_supported_devices = with_cpu
    try:
        yield
    finally:
        adam._get_capturable_supported_devices = original


ADAM_KINDS = ("fused", "foreach")  # how the captured step's Adam runs; fused is what fastmeta train runs


def cuda_step_adam(parameters, lr: float, kind: str = "fused") -> torch.optim.Adam:
    """The captured step's ``torch.optim.Adam(parameters, lr, capturable=True)`` as on CUDA
    tensors: ``fused=True`` for ``kind="fused"`` (what ``fastmeta train`` runs,
    :func:`fastmeta.engine.whole_step_policy.make_capturable`: its kernel skips a
    non-finite update itself), or the multi-tensor (``foreach``) update that torch picks
    by default for CUDA tensors (the guard then copies and selects every tensor back).
    whole_iteration sets the gradients to None itself (no kernel)."""
    if kind not in ADAM_KINDS:
        raise ValueError(f"adam must be one of {ADAM_KINDS}, got {kind!r}")
    if kind == "fused":
        return torch.optim.Adam(parameters, lr=lr, capturable=True, fused=True)
    optimizer = torch.optim.Adam(parameters, lr=lr, capturable=True)
    for group in optimizer.param_groups:
        group["foreach"] = True
    return optimizer


# The whole step's phases, in order: meta_batch (the inner loop and the query forward), the
# loss's backward, guarded_step's checks (and, for an optimizer that does not skip its own
# update, its copies) around the optimizer's step. (whole_iteration sets the gradients to
# None first: no kernel.)
PHASES = ("meta_batch", "backward", "guard", "adam")


def _marking_backward(recorder: _LaunchRecorder, program):
    """``program`` (the meta-batch function), whose output's ``loss.backward()`` (or
    ``task_loss.backward()``: whole_iteration starts there where the loss is their mean)
    marks the recorder's phase: ``backward`` while it runs, ``guard`` after. On the loss
    tensors themselves (instance attributes shadowing ``Tensor.backward``): a
    torch-function mode would send every public op to the dispatcher path, whose autograd
    graph is not a plain call's (fastmeta.ops.registration)."""

    def marking(backward):
        def marked_backward(*args, **kwargs):
            recorder.phase = "backward"
            try:
                return backward(*args, **kwargs)
            finally:
                recorder.phase = "guard"

        return marked_backward

    @functools.wraps(program)
    def marked(*inputs):
        recorder.phase = "meta_batch"
        out = program(*inputs)
        for tensor in {id(t): t for t in (out.loss, out.task_loss) if isinstance(t, torch.Tensor)}.values():
            tensor.backward = marking(tensor.backward)
        return out

    return marked


def _in_phase(recorder: _LaunchRecorder, phase: str, then: str | None, function):
    @functools.wraps(function)
    def marked(*args, **kwargs):
        recorder.phase = phase
        try:
            return function(*args, **kwargs)
        finally:
            if then is not None:
                recorder.phase = then

    return marked


def record_captured_step(workload, *, first_order: bool = False, learner: str = "maml", seed: int = 0,
                         adam: str = "fused", pending_verified: bool = False) -> LaunchLog:
    """The launches of one captured meta-iteration of ``workload`` on the CUDA path (module
    docstring), after one unlogged iteration on the references (the optimizer's state
    made, the gradients allocated: a capture warms up the same way). adam: the step's
    Adam, ``"fused"`` or ``"foreach"`` (:func:`cuda_step_adam`). pending_verified: count
    the CUDA path as it will be once the GPU check has verified the kernels written for it
    (:func:`as_if_verified`)."""
    if pending_verified:
        with as_if_verified():
            return record_captured_step(workload, first_order=first_order, learner=learner, seed=seed, adam=adam)
    import fastmeta as fm
    from fastmeta.engine.whole_step import whole_iteration
    from fastmeta.tools.bench import full_fp32
    from fastmeta.tools.bench_peers import ADAM_LR

    learners = {"maml": fm.MAML, "model-aware": fm.ModelAwareMAML}
    if learner not in learners:
        raise ValueError(f"learner must be 'maml' or 'model-aware', got {learner!r}")
    with full_fp32():
        torch.manual_seed(seed)
        meta = learners[learner](workload.build_model(), lr=workload.inner_lr, first_order=first_order,
                                 steps=workload.steps, loss=workload.loss)
        batch = tuple(workload.make_batch("cpu", seed))
        optimizer = cuda_step_adam(meta.parameters(), ADAM_LR, adam)
        program = meta.captured_program(first_order)
        nonfinite = torch.zeros((), dtype=torch.bool)
        seed: list[torch.Tensor] = []  # the backward's seed, made by the warm-up (as a capture's)
        log = LaunchLog()
        with capturable_adam_on_cpu():
            with fm.use_backend("torch"):  # the references: no extension to build for a warm-up
                whole_iteration(program, batch, optimizer, seed=seed)
            with recording(log) as recorder:
                # The phases (PHASES), marked on the learner's program and the optimizer's
                # methods (instance attributes, for this iteration only) and at the backward.
                recorder.phase = "meta_batch"
                optimizer.step = _in_phase(recorder, "adam", "guard", optimizer.step)
                whole_iteration(_marking_backward(recorder, program), batch, optimizer, nonfinite, seed)
                del optimizer.step
    return log


# ---------------------------------------------------------------------------------------
# The cross-check on a GPU: the kernel nodes of the captured graph
# ---------------------------------------------------------------------------------------

GRAPH_NODE_TYPES = ("KERNEL", "MEMSET", "MEMCPY", "HOST", "EVENT_RECORD", "WAIT_EVENT", "EMPTY", "GRAPH",
                    "MEM_ALLOC", "MEM_FREE", "CONDITIONAL")


def count_dot_nodes(text: str) -> Counter:
    """Node types of a CUDA graph's DOT (``cudaGraphDebugDotPrint``, as
    ``torch.cuda.CUDAGraph.debug_dump`` writes it). A node statement is a quoted id at a
    line's start followed by ``[`` (an edge has ``->`` there); its type is the first type
    name in its attributes (``label="{KERNEL | {ID | 0 (topoId: 3) | name<<<...>>>} ..."``,
    ``label="{\\nMEMCPY | ..."``), or, in the terse form without types, a kernel where the
    node is drawn as an octagon."""
    import re

    starts = [(m.start(), m.end(), m.group(1) is not None)
              for m in re.finditer(r'^[ \t]*"[^"\n]+"[ \t]*(?:(\[)|->)', text, flags=re.M)]
    types = Counter()
    for i, (begin, end, is_node) in enumerate(starts):
        if not is_node:
            continue
        block = text[end: starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        found = re.search(r"\b(" + "|".join(GRAPH_NODE_TYPES) + r")\b", block)
        types[found.group(1) if found else "KERNEL" if 'shape="octagon"' in block else "unknown"] += 1
    return types


def dot_kernel_names(text: str) -> Counter:
    """The kernel nodes' function names in a verbose DOT (``{ID | 0 (topoId: 3) |
    name\\<\\<\\<grid,block,smem\\>\\>\\>}``), mangled as the runtime prints them."""
    import re

    return Counter(m.group(1).strip() for m in re.finditer(r"\{ID \| \d+ \(topoId: \d+\) \| ([^\\<}|]+)", text))


def captured_graph_kernels(workload, *, first_order: bool = False, seed: int = 0, dot_path=None,
                           adam: str = "fused") -> dict:
    """The kernel launches of ``workload``'s whole step captured on this GPU
    (``learner.capture`` with the Adam of :func:`cuda_step_adam`): the kernel nodes of the graph
    (``debug_dump``'s DOT; debug mode on before the capture, so that the graph is kept),
    or, where that is unavailable, torch.profiler's kernel events of one replay."""
    import tempfile
    from pathlib import Path

    import fastmeta as fm
    from fastmeta.tools.bench import full_fp32
    from fastmeta.tools.bench_peers import ADAM_LR

    if not torch.cuda.is_available():
        return {"source": "unavailable", "why": "no CUDA GPU"}
    with full_fp32():
        torch.manual_seed(seed)
        notes = []
        try:
            torch.cuda.CUDAGraph().enable_debug_mode()  # process-wide: graphs keep their nodes for debug_dump
        except (AttributeError, RuntimeError) as error:
            notes.append(f"enable_debug_mode: {error!r}"[:200])
        meta = fm.MAML(workload.build_model().cuda(), lr=workload.inner_lr, first_order=first_order,
                       steps=workload.steps, loss=workload.loss)
        batch = workload.make_batch("cuda", seed)
        step = meta.capture(cuda_step_adam(meta.parameters(), ADAM_LR, adam), *batch)
        dot = Path(dot_path) if dot_path else Path(tempfile.mkdtemp()) / "captured_step.dot"
        try:
            step.graph.debug_dump(str(dot))
            text = dot.read_text() if dot.exists() else ""
        except (AttributeError, RuntimeError, OSError) as error:
            notes.append(f"debug_dump: {error!r}"[:200])
            text = ""
        types = count_dot_nodes(text) if text else Counter()
        if types.get("KERNEL"):
            return {"source": "debug_dump", "kernels": types["KERNEL"], "node_types": dict(types),
                    "by_name": dict(dot_kernel_names(text).most_common(40)), "dot_head": text[:600], "notes": notes}
        cuda = torch.autograd.DeviceType.CUDA
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            step.graph.replay()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if getattr(e, "device_type", None) == cuda
                 and not e.name.lower().startswith(("memcpy", "memset"))]
        if names:
            return {"source": "profiler (one replay)", "kernels": len(names),
                    "by_name": dict(Counter(names).most_common(40)), "notes": notes}
        return {"source": "unavailable", "why": "no DOT from debug_dump and no kernel events in the replay's profile",
                "notes": notes}


def compare_with_graph(workload_name: str, *, first_order: bool = False, adam: str = "fused") -> dict:
    """The recorder's count of ``workload_name``'s captured iteration and the captured
    graph's on this machine's GPU (``unavailable`` without one), for ``bench/gpu_check.py``'s
    ``kernel-count`` step."""
    from fastmeta.tools.workloads import find_workload

    workload = find_workload(workload_name)
    log = record_captured_step(workload, first_order=first_order, adam=adam)
    graph = captured_graph_kernels(workload, first_order=first_order, adam=adam)
    recorded = {**log.to_json(), "by_label": dict(log.by_label().most_common(40))}
    result = {"workload": workload.name, "order": "first" if first_order else "second", "adam": adam, "recorder": recorded,
              "graph": graph}
    if graph.get("kernels") is not None:
        result["difference"] = graph["kernels"] - log.kernels
        result["match"] = graph["kernels"] == log.kernels
    return result


def main(argv=None) -> int:
    """``python -m fastmeta.tools.launches W2 [W4 ...]``: each workload's counts and breakdown."""
    import argparse
    import json

    from fastmeta.tools.workloads import find_workload

    parser = argparse.ArgumentParser(prog="python -m fastmeta.tools.launches", description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=["W2"])
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--adam", choices=ADAM_KINDS, default="fused",
                        help="the captured step's Adam: fused=True (fastmeta train's) or foreach (torch's default)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--as-verified", action="store_true",
                        help="count the CUDA path as it will be once the GPU check has verified every kernel written "
                             "for it (today's record leaves them to the references)")
    parser.add_argument("--compare-graph", default=None, metavar="FILE",
                        help="also count the kernel nodes of the workload's captured CUDA graph on this GPU, and "
                             "write both counts to FILE (JSON)")
    args = parser.parse_args(argv)
    if args.compare_graph:
        from pathlib import Path

        results = [compare_with_graph(name, first_order=args.first_order, adam=args.adam) for name in args.workloads]
        Path(args.compare_graph).write_text(json.dumps(results, indent=1) + "\n")
        for r in results:
            graph = r["graph"]
            print(f"{r['workload']}: recorder {r['recorder']['kernels']} kernels; captured graph "
                  f"{graph.get('kernels', 'unavailable')} ({graph['source']})")
        return 0
    for name in args.workloads:
        log = record_captured_step(find_workload(name), first_order=args.first_order, adam=args.adam,
                                   pending_verified=args.as_verified)
        if args.json:
            print(json.dumps({"workload": name, "adam": args.adam, "as_verified": args.as_verified, **log.to_json()}))
        else:
            print(f"{name} ({'first' if args.first_order else 'second'} order, {args.adam} Adam), one captured "
                  f"iteration on the CUDA path{' once the written kernels are verified' if args.as_verified else ''}:")
            print(log.describe(args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
