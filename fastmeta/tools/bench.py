"""``fastmeta bench``: fastmeta against its peers on the standard workloads W1–W4.

    fastmeta bench [--workloads W1,W2,...,W2S,OFC,R12] [--first-order] [--json FILE] [--iterations N]
                   [--backends torch,cpu,...] [--peers loop,vmap,...] [--device cpu|cuda]
    python bench/e2e.py ...            (the same command, from a checkout)

For each workload, in one process and one run: fastmeta on every available backend and
on ``auto``, then the peers of docs/benchmarks.md (:mod:`fastmeta.tools.bench_peers`).
Every contender gets the same initial parameters and the same (random) tasks.

**fastmeta's rows are what a user runs**: ``fastmeta[<backend>]`` is the learner and
``torch.optim.Adam`` with their defaults (validation on), ``out = learner.meta_batch(...)``,
``out.loss.backward()``, ``opt.step()``, fed new tensors of the same shapes every iteration
(a pool of distinct batches drawn before timing, cycled). The captured rows,
``fastmeta[auto]+graph`` (CUDA) and ``fastmeta[auto]+whole-step`` (CPU), are labelled as
such: ``validate=False`` and one reused batch, as a capture needs. The peers reuse one
batch, as docs/benchmarks.md defines them.

For each contender, in this order:

1. **Check.** One meta-iteration from the initial parameters; its meta-gradient is
   compared with the reference, the per-task autograd loop in float64, norm-wise:
   ‖g − g_ref‖ / ‖g_ref‖ ≤ ``tolerance``. A torch.func contender (vmap, compile, graph)
   that misses on a model with BatchNorm in second order is marked ``known-wrong``
   (torch.func's second order through BatchNorm is 1.4% off, docs/benchmarks.md) and still
   timed, as a speed peer only. Any other miss is ``WRONG``: it is timed but never counts
   as the best peer, and the command exits with status 1 if a fastmeta contender is wrong.
2. **Warm-up**, then **timing**: each sample is R back-to-back meta-iterations between two
   device synchronizations, R chosen so that a sample lasts at least ``min_sample_ms``
   (R = 1 for anything slower). A sample's time divided by R is one per-iteration figure;
   the median and the min are over ``iterations`` (≥ 20 by default) samples. Every
   iteration does the whole step: inner loop, query loss, meta-gradient, Adam update.
   The synchronization lets no device work escape the sample; batching R steps only keeps
   the synchronization's own cost (microseconds) out of figures that are themselves tens
   of microseconds.
3. **Peak memory**, on CUDA: ``torch.cuda.max_memory_allocated`` from a reset before the
   contender is built to the end of its timing (the shared batch included). On the CPU,
   and for JAX (its own allocator), "n/a".

Ratios are speed-ups: peer's median / contender's median (> 1: the contender is faster).
The best peer is the fastest peer that passed its check or is known-wrong.

fp32, TF32 off (cuBLAS, cuDNN and JAX alike), second order unless ``--first-order``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from fastmeta.testing.reference_loop import relative_error
from fastmeta.tools.command import Subcommand
from fastmeta.tools.workloads import Workload, find_workload
from fastmeta.tools.bench_peers import (
    PEERS,
    Contender,
    ContenderSkipped,
    FastmetaContender,
    FastmetaGraphContender,
    FastmetaWholeStepContender,
    Problem,
    reference_meta_gradient,
)

SCHEMA = "fastmeta-bench-1"

# ---------------------------------------------------------------------------------------
# Settings and results
# ---------------------------------------------------------------------------------------

DEFAULT_PEERS = {"cpu": ("loop", "vmap", "jax"), "cuda": ("loop", "vmap", "compile", "graph", "jax")}


@dataclass
class BenchmarkSettings:
    """What one ``fastmeta bench`` run does; the CLI flags map onto these fields.

    backends: fastmeta backends to time (None: every available one, then "auto").
    peers: peer names (None: DEFAULT_PEERS of the device). tasks: override T (quick looks
    and tests; the row then says so). fastmeta_graph: also time fastmeta's whole step
    (on CUDA its eager step captured in a CUDA graph; on the CPU ``learner.capture``'s fused
    step, for the models it covers).
    """

    workloads: Sequence[str] = ("W1", "W2", "W3", "W4")
    first_order: bool = False
    iterations: int = 20
    warmup: int = 3
    device: str | None = None
    backends: Sequence[str] | None = None
    peers: Sequence[str] | None = None
    # Against the float64 reference, fp32 contenders land near 1e-6 (W1, W2 on the CPU) and
    # torch.func through BatchNorm between 8e-4 and 1e-2: 1e-4 separates the two.
    tolerance: float = 1e-4
    min_sample_ms: float = 2.0
    seed: int = 0
    tasks: int | None = None
    check: bool = True
    fastmeta_graph: bool = True
    skip: frozenset[str] = frozenset()
    # Distinct batches of the same shapes, cycled by fastmeta's user-loop row: a user's loop
    # feeds new tensors every iteration, so nothing may key on a tensor's identity.
    distinct_batches: int = 4
    # Take the timed samples in turn, one of each row per round (A B C, B C A, ...), instead
    # of each row's samples after the previous row's: a shared machine whose speed drifts
    # during the run then slows every row alike, and the ratios hold (run_interleaved).
    interleave: bool = False

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch")
        return device


@dataclass
class ContenderResult:
    name: str
    family: str
    status: str  # ok | known-wrong | WRONG | not checked | skipped | error
    note: str = ""
    relative_error: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    mean_ms: float | None = None
    samples: int = 0
    iterations_per_sample: int = 0
    tasks_per_second: float | None = None
    peak_mib: float | None = None
    speedup_vs: dict[str, float] = field(default_factory=dict)
    best_peer: str | None = None
    speedup_vs_best_peer: float | None = None
    details: dict = field(default_factory=dict)

    @property
    def timed(self) -> bool:
        return self.median_ms is not None

    @property
    def counts_as_peer(self) -> bool:
        return self.family == "peer" and self.timed and self.status in ("ok", "unsettled", "known-wrong", "not checked")


@dataclass
class WorkloadResult:
    workload: Workload
    first_order: bool
    device: str
    contenders: list[ContenderResult]

    @property
    def order(self) -> str:
        return "first order" if self.first_order else "second order"


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_fp32():
    """TF32 off in cuBLAS and cuDNN for the duration (docs/benchmarks.md); restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


ContenderFactory = Callable[[Problem], Contender]
FP32_ERROR_FACTOR = 4.0
FP32_SAMPLES = 3


def perturbed(problem: Problem, seed: int) -> Problem:
    """The problem with every initial parameter moved by one fp32 rounding step at random
    (relative 2^-24 times a standard normal), the same on every device for a given seed."""
    g = torch.Generator().manual_seed(10_000 + seed)
    state = {
        k: v * (1 + 2.0**-24 * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.device, v.dtype))
        if v.is_floating_point() else v
        for k, v in problem.initial_state.items()
    }
    return dataclasses.replace(problem, initial_state=state)


def fastmeta_contenders(settings: BenchmarkSettings, device: torch.device) -> list[tuple[str, ContenderFactory | str]]:
    """(name, factory) per fastmeta backend, or (name, reason) for one that cannot run here."""
    import fastmeta as fm
    from fastmeta.backends import get_backend

    if settings.backends is None:
        names = [row["name"] for row in fm.backends()] + ["auto"]
    else:
        names = list(settings.backends)
    rows: list[tuple[str, ContenderFactory | str]] = []
    for name in names:
        label = f"fastmeta[{name}]"
        if name != "auto":
            backend = get_backend(name)  # an unknown name is the user's error: raise
            ok, reason = backend.available()
            if not ok:
                rows.append((label, f"unavailable: {reason}"))
                continue
            if device.type not in backend.device_types():
                rows.append((label, f"runs on {', '.join(backend.device_types())} only"))
                continue
            if name == "triton" and device.type == "cpu":
                rows.append((label, "the Triton interpreter (TRITON_INTERPRET=1) is for tests, not timing"))
                continue
        rows.append((label, lambda problem, name=name: FastmetaContender(problem, name)))
        if name == "auto" and device.type == "cuda":
            # The same loop with meta_batch's CUDA graphs off: each kernel launched eagerly.
            rows.append((f"fastmeta[{name},cuda_graphs=False]",
                         lambda problem, name=name: FastmetaContender(problem, name, cuda_graphs=False)))
    return rows


def fastmeta_graph_contenders(settings: BenchmarkSettings, device: torch.device) -> list[tuple[str, ContenderFactory]]:
    """fastmeta[auto]'s whole step: captured in a CUDA graph on CUDA, the fused
    ``learner.capture`` step on the CPU (skipped there with the reason for models it does
    not cover). On CUDA it runs last in its row: a capture that fails midway is the one thing
    here that could leave the CUDA context unusable."""
    if not settings.fastmeta_graph:
        return []
    if settings.backends is not None and "auto" not in settings.backends:
        return []
    if device.type != "cuda":
        return [("fastmeta[auto]+whole-step", lambda problem: FastmetaWholeStepContender(problem, "auto"))]
    return [("fastmeta[auto]+graph", lambda problem: FastmetaGraphContender(problem, "auto"))]


def peer_contenders(settings: BenchmarkSettings, device: torch.device) -> list[tuple[str, ContenderFactory | str]]:
    names = settings.peers if settings.peers is not None else DEFAULT_PEERS[device.type]
    rows: list[tuple[str, ContenderFactory | str]] = []
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")
        rows.append((name, PEERS[name]))
    if settings.peers is None and device.type == "cpu":
        rows.insert(2, ("compile", "GPU only by default (name it in --peers to run it on the CPU)"))
        rows.insert(3, ("graph", "CUDA graphs need a CUDA device"))
    return rows


def check_status(contender: Contender, problem: Problem, error: float, tolerance: float,
                 strict_tolerance: float | None = None) -> tuple[str, str]:
    """ok | unsettled | known-wrong | WRONG.

    torch.func's second order through BatchNorm is known to be wrong: it is held to the
    strict tolerance, never to the fp32 loop's error floor. ``unsettled``: beyond the floor
    on a workload whose fp32 answer is itself unstable (the fp32 loop's samples are beyond
    the strict tolerance): on W3 a single ReLU after BatchNorm that rounds to the other
    side of its kink moves one task's meta-gradient by 2e-3 to 2e-2 (measured on the CPU,
    task by task: the loop, the torch backend and auto each jump on a different task). The
    kernels' correctness there is the tests' job (kinks masked, or smooth nets)."""
    known_wrong = contender.torch_func and problem.workload.has_batch_norm and not problem.first_order
    if known_wrong and strict_tolerance is not None:
        tolerance = min(tolerance, strict_tolerance)
    if error <= tolerance:  # False for NaN
        return "ok", ""
    if known_wrong:
        return "known-wrong", "torch.func second order through BatchNorm is wrong (docs/benchmarks.md); speed peer only"
    if strict_tolerance is not None and tolerance > strict_tolerance:
        return "unsettled", (f"{error:.1e} off float64, beyond {tolerance:.0e}; the fp32 answer on this kinked net "
                             "is unstable (ReLU flips), so this is not a verdict")
    return "WRONG", f"meta-gradient off the reference by {error:.2e} (tolerance {tolerance:.0e})"


def calibrate(contender: Contender, warmup: int, min_sample_ms: float) -> int:
    """The warm-up steps, then one timed step: R, the iterations per sample, so that a sample
    lasts at least ``min_sample_ms`` (at most 1 000 iterations)."""
    for _ in range(warmup):
        contender.step()
    contender.synchronize()
    start = time.perf_counter()
    contender.step()
    contender.synchronize()
    one = time.perf_counter() - start
    return max(1, min(1000, math.ceil(min_sample_ms * 1e-3 / max(one, 1e-9))))


def one_sample(contender: Contender, per_sample: int) -> float:
    """Seconds per iteration of ``per_sample`` whole steps between synchronizations."""
    start = time.perf_counter()
    for _ in range(per_sample):
        contender.step()
    contender.synchronize()
    return (time.perf_counter() - start) / per_sample


def time_steps(contender: Contender, iterations: int, warmup: int, min_sample_ms: float) -> tuple[list[float], int]:
    """Per-iteration seconds, one per sample, and R (iterations per sample)."""
    per_sample = calibrate(contender, warmup, min_sample_ms)
    return [one_sample(contender, per_sample) for _ in range(iterations)], per_sample


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _family(name: str) -> str:
    return "fastmeta" if name.startswith("fastmeta") else "peer"


def _fresh_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_and_check(result: ContenderResult, factory: ContenderFactory, problem: Problem, reference: Tensor | None,
                    settings: BenchmarkSettings, tolerance: float | None) -> Contender:
    """The contender, prepared, with its meta-gradient checked against ``reference`` into
    ``result`` (untimed). Raises what the contender raises (ContenderSkipped among them)."""
    contender = factory(problem)
    result.family = contender.family
    with contender.active():
        contender.prepare()
        if reference is not None:
            contender.reset_parameters()
            contender.step()
            contender.synchronize()
            error = relative_error(contender.meta_gradient(), reference)
            result.relative_error = error
            result.status, result.note = check_status(
                contender, problem, error, settings.tolerance if tolerance is None else tolerance, settings.tolerance)
    return contender


def record_samples(result: ContenderResult, contender: Contender, problem: Problem, reference: Tensor | None,
                   settings: BenchmarkSettings, tolerance: float | None, samples: list[float], per_sample: int) -> None:
    """The timing figures of ``samples`` (seconds per iteration) into ``result``."""
    result.details = contender.details()
    if reference is not None:
        result.details["tolerance"] = settings.tolerance if tolerance is None else tolerance
    result.samples, result.iterations_per_sample = len(samples), per_sample
    result.median_ms = statistics.median(samples) * 1e3
    result.min_ms = min(samples) * 1e3
    result.mean_ms = statistics.fmean(samples) * 1e3
    result.tasks_per_second = problem.batch.support_x.size(0) / (result.median_ms * 1e-3)


def run_contender(
    name: str,
    factory: ContenderFactory,
    problem: Problem,
    reference: Tensor | None,
    settings: BenchmarkSettings,
    tolerance: float | None = None,
) -> ContenderResult:
    device = problem.device
    result = ContenderResult(name=name, family=_family(name), status="not checked")
    _fresh_device(device)
    contender = None
    torch_allocator = False
    try:
        contender = build_and_check(result, factory, problem, reference, settings, tolerance)
        torch_allocator = contender.uses_torch_allocator
        with contender.active():
            samples, per_sample = time_steps(contender, settings.iterations, settings.warmup, settings.min_sample_ms)
        record_samples(result, contender, problem, reference, settings, tolerance, samples, per_sample)
    except ContenderSkipped as exc:
        result.status, result.note = "skipped", str(exc)
        return result
    except Exception as exc:  # a broken contender must not end the whole benchmark
        result.status, result.note = "error", _first_line(exc)
        return result
    finally:
        del contender
    if device.type == "cuda" and torch_allocator:
        result.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def run_interleaved(
    rows: Sequence[tuple[str, ContenderFactory]],
    problem: Problem,
    reference: Tensor | None,
    settings: BenchmarkSettings,
    tolerance: float | None = None,
) -> list[ContenderResult]:
    """``rows`` built, checked and warmed up one after another, then timed in turns: round r
    takes one sample of each live contender, starting from the (r mod k)-th, so that a drift
    in the machine's speed during the run (another job, a clock change) reaches every row
    alike and the ratios between them hold. Each keeps its own iterations per sample
    (:func:`calibrate`). A contender that fails while timed is an error row; the others go
    on. Every contender stays alive until the last round: on CUDA their memory adds up, so
    no row reports a peak (``peak_mib`` None)."""
    results: list[ContenderResult] = []
    live: list[tuple[ContenderResult, Contender, int, list[float]]] = []
    for name, factory in rows:
        result = ContenderResult(name=name, family=_family(name), status="not checked")
        results.append(result)
        _fresh_device(problem.device)
        try:
            contender = build_and_check(result, factory, problem, reference, settings, tolerance)
            with contender.active():
                per_sample = calibrate(contender, settings.warmup, settings.min_sample_ms)
        except ContenderSkipped as exc:
            result.status, result.note = "skipped", str(exc)
            continue
        except Exception as exc:  # a broken contender must not end the whole benchmark
            result.status, result.note = "error", _first_line(exc)
            continue
        live.append((result, contender, per_sample, []))
    failed: set[int] = set()
    for round_ in range(settings.iterations):
        for j in range(len(live)):
            k = (round_ + j) % len(live)
            if k in failed:
                continue
            result, contender, per_sample, samples = live[k]
            try:
                with contender.active():
                    samples.append(one_sample(contender, per_sample))
            except Exception as exc:
                result.status, result.note = "error", _first_line(exc)
                failed.add(k)
    for k, (result, contender, per_sample, samples) in enumerate(live):
        if k not in failed:
            record_samples(result, contender, problem, reference, settings, tolerance, samples, per_sample)
            result.details["interleaved"] = True
    live.clear()
    return results


def compare(results: list[ContenderResult]) -> None:
    """Fill in each timed contender's speed-ups against each peer and the best peer."""
    peers = [r for r in results if r.counts_as_peer]
    best = min(peers, key=lambda r: r.median_ms, default=None)
    for r in results:
        if not r.timed:
            continue
        r.speedup_vs = {p.name: p.median_ms / r.median_ms for p in peers if p is not r}
        if best is not None and best is not r:
            r.best_peer, r.speedup_vs_best_peer = best.name, best.median_ms / r.median_ms


def build_problem(workload: Workload, settings: BenchmarkSettings, device: torch.device) -> Problem:
    """The initial parameters and the pool of batches that every contender of the row shares
    (drawn here, before any timing)."""
    torch.manual_seed(settings.seed)
    model = workload.build_model()
    return Problem(
        workload=workload,
        device=device,
        first_order=settings.first_order,
        initial_state={k: v.detach().to(device) for k, v in model.state_dict().items()},
        batches=tuple(workload.make_batch(device, settings.seed + i) for i in range(settings.distinct_batches)),
    )


def _quiet(*args, **kwargs) -> None:
    pass


def checked_reference(problem: Problem, settings: BenchmarkSettings,
                      progress: Callable[[str], None] = _quiet) -> tuple[Tensor | None, float]:
    """The check's float64 meta-gradient (None without ``settings.check``) and the tolerance
    a contender's norm-wise relative error is held to on this problem."""
    if not settings.check:
        return None, settings.tolerance
    reference = reference_meta_gradient(problem, torch.float64)
    # The reference loop in fp32 is the honest fp32 answer, but on deep ReLU nets after
    # BatchNorm (W3, W4) its error is itself a random draw: rounding flips pre-activations
    # that sit at the kink (measured on an H100: 1.1e-4 to 2.1e-3 on W3 in three
    # processes). So it is sampled FP32_SAMPLES times, from parameters perturbed by one
    # fp32 rounding step (relative 2^-24), and a contender is judged against
    # FP32_ERROR_FACTOR times the largest sample where that exceeds the tolerance.
    fp32_error = max(
        relative_error(reference_meta_gradient(perturbed(problem, seed), torch.float32), reference)
        for seed in range(FP32_SAMPLES)
    )
    tolerance = max(settings.tolerance, FP32_ERROR_FACTOR * fp32_error)
    progress(f"{problem.workload.name}: the fp32 reference loop is up to {fp32_error:.1e} off float64 "
             f"({FP32_SAMPLES} samples); tolerance {tolerance:.1e}")
    return reference, tolerance


def run_workload(
    workload: Workload,
    settings: BenchmarkSettings,
    device: torch.device,
    extra_contenders: Sequence[tuple[str, ContenderFactory]] = (),
    progress: Callable[[str], None] = _quiet,
    on_result: Callable[[Workload, ContenderResult], None] | None = None,
) -> WorkloadResult:
    """One row group: every fastmeta backend, every peer, then ``extra_contenders``.

    on_result: called with each contender's result as soon as it is known (a run cut short
    by a time limit keeps what finished). Contenders named in ``settings.skip`` are left out.
    """
    if settings.tasks is not None:
        workload = workload.replace(tasks=settings.tasks)
    problem = build_problem(workload, settings, device)
    reference, tolerance = checked_reference(problem, settings, progress)
    # On the CPU the whole step runs beside fastmeta's other rows, before the peers: JAX's
    # XLA threads keep spinning after its step and slowed a torch row timed after it by
    # 1.6x (W1, 2-core Xeon: 0.413 ms alone, 0.661 ms after JAX). On CUDA the capture runs
    # last (a capture that fails midway could leave the CUDA context unusable).
    whole_step = fastmeta_graph_contenders(settings, device)
    rows = (
        fastmeta_contenders(settings, device)
        + (whole_step if device.type == "cpu" else [])
        + peer_contenders(settings, device)
        + list(extra_contenders)
        + (whole_step if device.type != "cpu" else [])
    )
    rows = [(name, factory) for name, factory in rows if name not in settings.skip]
    order = "1st" if settings.first_order else "2nd"

    def finished(r: ContenderResult) -> None:
        timing = f"{_fmt_ms(r.median_ms)} ms median, {_fmt_ms(r.min_ms)} min" if r.timed else ""
        check = f"{r.status}" + (f" {r.relative_error:.1e}" if r.relative_error is not None else "")
        progress(f"{workload.name} {order} order: {r.name}: {check}{', ' + timing if timing else ''}"
                 f"{' (' + r.note + ')' if r.note else ''}")
        if on_result is not None:
            on_result(workload, r)

    # Interleaved, the rows that may share the machine take their samples in turns; JAX's
    # (its XLA threads spin after each step, see above) and, on CUDA, the captured whole
    # step (last, as above) are timed alone after them.
    apart = {"jax"} | ({name for name, _ in whole_step} if device.type != "cpu" else set())
    together = [(name, factory) for name, factory in rows
                if settings.interleave and not isinstance(factory, str) and name not in apart]
    by_name: dict[str, ContenderResult] = {}
    if together:
        progress(f"{workload.name} {order} order: {', '.join(name for name, _ in together)}, samples in turns")
        for r in run_interleaved(together, problem, reference, settings, tolerance):
            by_name[r.name] = r
            finished(r)
    results = []
    for name, factory in rows:
        if name in by_name:
            results.append(by_name[name])
            continue
        if isinstance(factory, str):
            results.append(ContenderResult(name=name, family=_family(name), status="skipped", note=factory))
            if on_result is not None:
                on_result(workload, results[-1])
            continue
        progress(f"{workload.name} {order} order: {name}")
        results.append(run_contender(name, factory, problem, reference, settings, tolerance))
        finished(results[-1])
    compare(results)
    return WorkloadResult(workload, settings.first_order, str(device), results)


def run_benchmark(
    settings: BenchmarkSettings,
    extra_contenders: Sequence[tuple[str, ContenderFactory]] = (),
    progress: Callable[[str], None] = _quiet,
) -> list[WorkloadResult]:
    """Run every workload of ``settings``.

    extra_contenders: (name, factory) rows timed after the peers, for tests and
    experiments; a name starting with "fastmeta" counts as fastmeta, any other as a peer.
    """
    if settings.iterations < 1 or settings.warmup < 0:
        raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {settings.iterations} and {settings.warmup}")
    device = settings.resolved_device()
    workloads = [find_workload(w) for w in settings.workloads]
    with full_fp32():
        return [run_workload(w, settings, device, extra_contenders, progress) for w in workloads]


# ---------------------------------------------------------------------------------------
# Report: the device, the table, the JSON
# ---------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_description(device: torch.device) -> dict:
    """What produced the figures: an absolute time holds only for this device."""
    import fastmeta

    info = {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "jax": _package_version("jax"),
        "python": platform.python_version(),
        "fastmeta": fastmeta.__version__,
        "git_commit": _git_commit(),
        "tf32": False,
        # Other processes' load skews CPU figures: a 2-core machine with a load of 8 gives
        # medians several times the quiet ones (the mins suffer less).
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}x" if value < 100 else f"{value:.0f}x"


def _check_cell(r: ContenderResult) -> str:
    if r.relative_error is None:
        return r.status
    return f"{r.status} {r.relative_error:.1e}"


def format_table(result: WorkloadResult, device_name: str = "") -> str:
    """The table of one workload: one row per contender, ratios as speed-ups."""
    w = result.workload
    peer_names = [r.name for r in result.contenders if r.counts_as_peer]
    header = ["contender", "check (rel. err)", "median ms", "min ms", "tasks/s", "peak MiB", "vs best peer"]
    header += [f"vs {p}" for p in peer_names]
    rows = []
    notes = []
    for r in result.contenders:
        if not r.timed:
            rows.append([r.name, f"{r.status}: {r.note}"] + [""] * (len(header) - 2))
            continue
        best = f"{_fmt_ratio(r.speedup_vs_best_peer)} ({r.best_peer})" if r.best_peer else "-"
        row = [
            r.name, _check_cell(r), _fmt_ms(r.median_ms), _fmt_ms(r.min_ms),
            f"{r.tasks_per_second:.0f}", "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}", best,
        ]
        row += [_fmt_ratio(r.speedup_vs.get(p)) if p != r.name else "1x" for p in peer_names]
        rows.append(row)
        if r.note:
            notes.append(f"  {r.name}: {r.note}")
        if r.details.get("compile_seconds") is not None:
            notes.append(f"  {r.name}: compiled in {r.details['compile_seconds']} s (not timed)")
    widths = [max(len(h), *(len(row[i]) for row in rows if row[i] or i == 0)) for i, h in enumerate(header)]
    # A skipped row's long reason spans the columns after the first: it sets no width.
    widths[1] = max(len(header[1]), *(len(row[1]) for row in rows if row[2] != ""), 8)
    title = (
        f"{w.name} {w.title} · {result.order} · T={w.tasks} · {w.support} support / {w.query} query · "
        f"{w.steps} step{'s' if w.steps > 1 else ''} · {result.device}{f' ({device_name})' if device_name else ''}"
    )
    lines = [title, "  ".join(h.ljust(widths[i]) for i, h in enumerate(header))]
    for row in rows:
        if row[2] == "" and row[1]:
            lines.append(row[0].ljust(widths[0]) + "  " + row[1])
        else:
            lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    samples = {(r.samples, r.iterations_per_sample) for r in result.contenders if r.timed}
    if samples:
        lines.append(
            "  per meta-iteration; median/min over "
            + ", ".join(sorted({f'{n} samples' for n, _ in samples}))
            + "; ratios = peer median / row median (> 1: the row is faster)"
        )
    interleaved = [r.name for r in result.contenders if r.details.get("interleaved")]
    if interleaved:
        lines.append(f"  samples taken in turns: {', '.join(interleaved)} (--interleave; no peak memory)")
    lines += notes
    return "\n".join(lines)


def to_json(results: list[WorkloadResult], settings: BenchmarkSettings, device: torch.device) -> dict:
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(device),
        "settings": {
            "first_order": settings.first_order, "iterations": settings.iterations, "warmup": settings.warmup,
            "min_sample_ms": settings.min_sample_ms, "tolerance": settings.tolerance, "seed": settings.seed,
            "interleave": settings.interleave,
            "reference": "per-task autograd loop, float64", "precision": "fp32, TF32 off",
            "optimizer": "Adam lr 1e-3",
            "fastmeta_row": "user loop: learner and torch.optim.Adam defaults (validation on), "
                            f"{settings.distinct_batches} distinct batches cycled; +graph and +whole-step rows: "
                            "captured, validate=False, one batch",
        },
        "workloads": [
            {
                "workload": r.workload.describe(),
                "order": "first" if r.first_order else "second",
                "contenders": [dataclasses.asdict(c) for c in r.contenders],
            }
            for r in results
        ],
    }


def stream_record(workload: Workload, settings: BenchmarkSettings, device: dict, result: ContenderResult) -> dict:
    """One contender's result as a self-contained record (``--stream``): enough to rebuild
    the workload's table from records of several runs, and to tell which run made it."""
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device["name"],
        "device_type": device["type"],
        "torch": device["torch"],
        "triton": device["triton"],
        "workload": workload.name,
        "tasks": workload.tasks,
        "order": "first" if settings.first_order else "second",
        "iterations": settings.iterations,
        # docs/benchmarks.md's target for fastmeta's best row over the best peer, where one is set.
        "target_speedup": GPU_TARGETS.get(workload.name) if device["type"] == "cuda" and not settings.first_order
        else None,
        "contender": dataclasses.asdict(result),
    }


def failures(results: list[WorkloadResult]) -> list[str]:
    """fastmeta contenders that computed a wrong meta-gradient or broke."""
    return [
        f"{r.workload.name} {c.name}: {c.status} ({c.note})"
        for r in results
        for c in r.contenders
        if c.family == "fastmeta" and c.status in ("WRONG", "error")
    ]


# The targets of docs/benchmarks.md, as speed-ups of fastmeta over a peer measured in the same
# run. On a GPU: fastmeta's best row against the best peer, second order. On the CPU (issue
# 23), fastmeta's best user-loop row (no "+graph", "+whole-step"): W1 at least 1.5x JAX, W2
# at least 1.5x vmap, the host-bound W2 structure at least 3x vmap, OmniglotFC and ResNet-12
# at least 2x the per-task loop.
GPU_TARGETS = {"W1": 10.0, "W2": 12.0, "W3": 10.0, "W4": 7.5}
CPU_TARGETS = {"W1": ("jax", 1.5), "W2": ("vmap", 1.5), "W2S": ("vmap", 3.0), "OFC": ("loop", 2.0),
               "R12": ("loop", 2.0)}


def is_user_loop(name: str) -> bool:
    """A fastmeta row that times the user's loop, not a captured step."""
    return name.startswith("fastmeta[") and "+" not in name


def _target_rows(report: dict) -> list[list[str]]:
    rows = []
    device = report["device"]
    for entry in report["workloads"]:
        w, order = entry["workload"], entry["order"]
        contenders = entry["contenders"]
        fm_rows = [c for c in contenders if c["family"] == "fastmeta" and c["status"] in ("ok", "unsettled")
                   and c["median_ms"]]
        peers = [c for c in contenders if c["family"] == "peer" and c["median_ms"]
                 and c["status"] in ("ok", "unsettled", "known-wrong", "not checked")]
        best_peer = min(peers, key=lambda c: c["median_ms"], default=None)
        target, against = None, best_peer
        if order == "second":
            if device["type"] == "cuda":
                target = GPU_TARGETS.get(w["name"])
            elif w["name"] in CPU_TARGETS:
                peer_name, target = CPU_TARGETS[w["name"]]
                against = next((c for c in peers if c["name"] == peer_name), None)
                fm_rows = [c for c in fm_rows if is_user_loop(c["name"])]
        best_fm = min(fm_rows, key=lambda c: c["median_ms"], default=None)
        ratio = against["median_ms"] / best_fm["median_ms"] if best_fm and against else None
        if target is None:
            verdict = "-"
        elif ratio is None:
            verdict = "not measured"
        else:
            verdict = "met" if ratio >= target and (target > 1.0 or ratio > 1.0) else "not met"
        vmap = next((c for c in contenders if c["name"] == "vmap"), None)
        memory = "-"
        if best_fm and best_fm.get("peak_mib") is not None and vmap and vmap.get("peak_mib") is not None:
            within = "ok" if best_fm["peak_mib"] <= vmap["peak_mib"] else "over"
            memory = f"{best_fm['peak_mib']:.0f} / {vmap['peak_mib']:.0f} ({within})"
        rows.append([
            f"{w['name']} {w['title']}", order, f"{device['name']}",
            f"{best_fm['name']} {_fmt_ms(best_fm['median_ms'])}" if best_fm else "none passed",
            f"{against['name']} {_fmt_ms(against['median_ms'])}" if against else "-",
            _fmt_ratio(ratio), f">= {target:g}x" if target is not None else "-", verdict, memory,
        ])
    return rows


def summary_table(reports: Sequence[dict]) -> str:
    """A markdown table of fastmeta's best row against the targets, for bench/RESULTS.md."""
    header = ["workload", "order", "device", "fastmeta best (ms)", "against (ms)", "speed-up", "target",
              "verdict", "peak MiB fastmeta / vmap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dates = sorted({r["date"] for r in reports})
    for report in reports:
        lines += ["| " + " | ".join(row) + " |" for row in _target_rows(report)]
    if dates:
        lines.append(f"\nmeasured {dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''}; "
                     "ms per meta-iteration, medians; speed-up = the other's median / fastmeta's")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", type=_names, default=["W1", "W2", "W3", "W4"], metavar="W1,W2,...",
                        help="workload ids or presets (default: W1,W2,W3,W4; the host-cost workloads W2S, OFC, R12 on request)")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML (default: second order)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--iterations", type=int, default=20, metavar="N", help="timed samples per contender (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed iterations first (default: 3)")
    parser.add_argument("--backends", type=_names, default=None, metavar="NAME,...",
                        help="fastmeta backends to time, 'auto' included (default: every available one and auto)")
    parser.add_argument("--peers", type=_names, default=None, metavar="NAME,...",
                        help=f"peers among {','.join(PEERS)} (default: cpu {','.join(DEFAULT_PEERS['cpu'])}; "
                             f"cuda {','.join(DEFAULT_PEERS['cuda'])})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    parser.add_argument("--tasks", type=int, default=None, metavar="T", help="override the tasks per meta-batch")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative meta-gradient error against the float64 reference (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the meta-gradient check")
    parser.add_argument("--no-fastmeta-graph", action="store_true", help="do not time fastmeta's whole step (CUDA: captured in a CUDA graph; CPU: learner.capture's fused step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's); on a shared machine 1 keeps OpenMP's "
                             "spinning threads from measuring the other jobs' load")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="run nothing: print earlier runs' JSON against the targets of docs/benchmarks.md")
    parser.add_argument("--stream", default=None, metavar="FILE",
                        help="append each contender's result to FILE as one JSON line, as soon as it finishes")
    parser.add_argument("--skip", type=_names, default=[], metavar="NAME,...",
                        help="contenders to leave out (as named in the table: fastmeta[auto], vmap, ...)")
    parser.add_argument("--interleave", action="store_true",
                        help="take the timed samples in turns, one of each row per round, so that a drift "
                             "in the machine's speed reaches every row alike (JAX and the CUDA whole step "
                             "are still timed alone); every row stays in memory meanwhile: no peak memory")


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(
        workloads=args.workloads, first_order=args.first_order, iterations=args.iterations, warmup=args.warmup,
        device=args.device, backends=args.backends, peers=args.peers, tolerance=args.tolerance, seed=args.seed,
        tasks=args.tasks, check=not args.no_check, fastmeta_graph=not args.no_fastmeta_graph,
        skip=frozenset(args.skip), interleave=args.interleave,
    )


def run(args: argparse.Namespace) -> int:
    """The command: each workload's table is printed (and the JSON rewritten) as soon as
    that workload is done, so a run cut short by a time limit still leaves its results."""
    if args.summarize:
        missing = [p for p in args.summarize if not Path(p).is_file()]
        if missing:
            print(f"fastmeta bench --summarize: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
        print(summary_table([json.loads(Path(p).read_text()) for p in args.summarize]))
        return 0
    settings = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = settings.resolved_device()
    if settings.iterations < 20:
        print(f"note: {settings.iterations} timed samples; docs/benchmarks.md figures use at least 20", file=sys.stderr)
    workloads = [find_workload(w) for w in settings.workloads]
    described = device_description(device)
    print(f"fastmeta bench · {described['name']} · torch {described['torch']} · triton {described['triton']} · "
          f"jax {described['jax']} · TF32 off · load average {described['load_average_1min']}", flush=True)
    progress = lambda line: print(f"  running {line}", file=sys.stderr, flush=True)  # noqa: E731
    on_result = None
    if args.stream:
        stream_path = Path(args.stream)
        stream_path.parent.mkdir(parents=True, exist_ok=True)

        def on_result(workload: Workload, result: ContenderResult) -> None:
            line = stream_record(workload, settings, described, result)
            with stream_path.open("a") as f:  # one line per write: a kill leaves whole lines
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())

    results: list[WorkloadResult] = []
    with full_fp32():
        for workload in workloads:
            results.append(run_workload(workload, settings, device, progress=progress, on_result=on_result))
            print()
            print(format_table(results[-1], described["name"]), flush=True)
            if args.json:
                path = Path(args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(to_json(results, settings, device), indent=2) + "\n")
    if args.json:
        print(f"\nwrote {args.json}")
    bad = failures(results)
    for line in bad:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/e2e.py`` and ``python -m fastmeta.tools.bench``: the same as ``fastmeta bench``."""
    parser = argparse.ArgumentParser(prog="fastmeta bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


COMMAND = Subcommand(help="benchmark fastmeta against its peers on the standard workloads",
                     add_arguments=add_arguments, run=run)

if __name__ == "__main__":
    raise SystemExit(main())
