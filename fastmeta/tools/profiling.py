"""``fastmeta profile``: a torch.profiler Chrome trace of a few meta-iterations.

    fastmeta profile W2 --out trace.json
    fastmeta profile omniglot-5w1s --device cuda --backend triton --iterations 5

The argument is a workload id (W1–W4, :data:`fastmeta.tools.workloads.WORKLOADS`) or a
training preset (``fastmeta train``'s, e.g. ``sinusoid``, ``omniglot-20w1s``); the data
are random tasks of that shape. After ``--warmup`` untimed iterations, ``--iterations``
meta-iterations run under ``torch.profiler`` (CPU activity, plus CUDA kernels on a GPU),
and the trace is written for chrome://tracing or https://ui.perfetto.dev.

Ranges in the trace (``torch.profiler.record_function``), per meta-iteration:

- ``fastmeta.meta_iteration``: the whole step (this module);
- ``fastmeta.inner_step{s}``: inner step s of every task (the learner);
- ``fastmeta.query``: the query forward and loss (the learner);
- ``fastmeta.meta_backward``: ``loss.backward()``, the meta-gradient (this module);
- ``fastmeta.optimizer_step``: Adam (this module).

It prints the time spent in each range and the top kernels by self time (device time on a
GPU, CPU time on the CPU), with each one's share.

``--captured`` profiles the whole step instead (``learner.capture(optimizer, ...)``: a CUDA
graph on a GPU, the fused step of a plain MLP on the CPU), one range
``fastmeta.captured_step`` per replay. On a GPU the kernels come from torch.profiler's CUDA
activity around the graph replays; where it records none (a CUPTI that does not trace
graph kernels), from one eager run of the same program (``meta_batch`` with its graphs
off, the update included), and ``source`` says which. ``--json FILE`` writes the ranges
and the kernel table (name, calls and µs per iteration, share of the total) for
``bench/gpu_check.py``'s profile step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from fastmeta.tools.bench_peers import ADAM_LR
from fastmeta.tools.command import Subcommand
from fastmeta.tools.dispatches import DispatchCount, count_dispatches, plain_user_path
from fastmeta.tools.bench import full_fp32
from fastmeta.tools.workloads import WORKLOADS, Workload, find_workload

RANGE_PREFIX = "fastmeta."


def resolve_workload(name: str) -> tuple[Workload, bool]:
    """(workload, first_order) for a workload id or a ``fastmeta train`` preset name."""
    try:
        return find_workload(name), False
    except ValueError:
        pass
    from fastmeta.tools.training import PRESETS

    if name not in PRESETS:
        known = sorted({*WORKLOADS, *PRESETS})
        raise ValueError(f"unknown workload or preset {name!r}; known: {', '.join(known)}")
    config = PRESETS[name]
    # The same networks as fastmeta.tools.training.build_model builds for the preset.
    if config.data == "sinusoid":
        model, args, shape, loss = "mlp", {"sizes": (1, 40, 40, 1)}, (1,), "mse"
        support, query = config.shots, config.queries
    else:
        variant = "strided" if config.data == "omniglot" else "pool"
        model = "conv4"
        args = {"in_channels": config.channels, "ways": config.ways, "variant": variant, "image_size": config.image_size}
        shape, loss = (config.channels, config.image_size, config.image_size), "cross_entropy"
        support, query = config.ways * config.shots, config.ways * config.queries
    workload = Workload(
        name=name, title=config.summary, preset=name, model=model, model_args=args, input_shape=shape,
        tasks=config.meta_batch, support=support, query=query, steps=config.inner_steps,
        inner_lr=config.inner_lr, loss=loss, ways=config.ways,
    )
    return workload, config.first_order


@dataclass
class KernelShare:
    """One kernel (a CUDA kernel on a GPU, an op's self CPU time on the CPU), per iteration."""

    name: str
    calls: float
    us: float
    share: float  # of the total kernel time of the profile


@dataclass
class ProfileResult:
    trace: Path | None
    ranges: list[tuple[str, int, float, float]]  # name, calls, CPU ms per iteration, device ms per iteration
    top_kernels: str
    kernels: list[KernelShare] = field(default_factory=list)  # every kernel, most time first
    source: str = "eager"  # "eager", "graph replays" or "eager run of the captured program"

    def to_json(self) -> dict:
        return {"source": self.source, "ranges": [{"name": n, "calls": c, "cpu_ms": cpu, "device_ms": dev}
                                                  for n, c, cpu, dev in self.ranges],
                "total_us": sum(k.us for k in self.kernels),
                "kernels": [dataclasses.asdict(k) for k in self.kernels]}


def kernel_shares(averages, device_type: str, iterations: int) -> list[KernelShare]:
    """Per kernel: calls and self time per iteration and the share of the total, most time
    first. On a GPU the CUDA kernels' device time (what the device spent); on the CPU every
    op's self CPU time (the profiler's ranges left out: they are the host code around ops)."""
    if device_type == "cuda":
        cuda = torch.autograd.DeviceType.CUDA
        rows = [(e.key, e.count, _device_time(e)) for e in averages
                if getattr(e, "device_type", None) == cuda and _device_time(e) > 0]
    else:
        rows = [(e.key, e.count, float(e.self_cpu_time_total)) for e in averages
                if e.self_cpu_time_total > 0 and not e.key.startswith(RANGE_PREFIX)]
    total = sum(t for _, _, t in rows) or 1.0
    return sorted((KernelShare(name, count / iterations, t / iterations, t / total) for name, count, t in rows),
                  key=lambda k: -k.us)


def format_kernel_shares(kernels: list[KernelShare], top: int) -> str:
    lines = [f"{'kernel':<72} {'calls':>7} {'µs/iter':>10} {'share':>7}"]
    for k in kernels[:top]:
        lines.append(f"{k.name[:72]:<72} {k.calls:>7.1f} {k.us:>10.1f} {k.share:>7.1%}")
    lines.append(f"{'total':<72} {sum(k.calls for k in kernels):>7.1f} {sum(k.us for k in kernels):>10.1f}")
    return "\n".join(lines)


def _device_time(event) -> float:
    """Self device time (µs) of a profiler event, across torch's renames of the field."""
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return 0.0


def _total_device_time(event) -> float:
    for attribute in ("device_time_total", "cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return 0.0


@contextlib.contextmanager
def _quiet_profiler_log(device: torch.device):
    """Silence Kineto, torch.profiler's C++ half, for a CPU profile.

    Even with CPU activity only, a CUDA build of torch probes for GPUs when the profiler
    starts and prints "ERROR: ... gpuGetDeviceCount failed with code 35" and two USDT
    lines to stderr on a machine without one. Kineto reads ``KINETO_LOG_LEVEL`` when it
    starts; 6 is above all its levels. A level the user set is kept; GPU profiles keep
    Kineto's messages, which can matter there.
    """
    if device.type != "cpu" or "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        yield
    finally:
        os.environ.pop("KINETO_LOG_LEVEL", None)


def profile_meta_iterations(
    workload: Workload,
    *,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    first_order: bool = False,
    learner: str = "maml",
    iterations: int = 3,
    warmup: int = 2,
    out: str | Path | None = "trace.json",
    top: int = 15,
    seed: int = 0,
    captured: bool = False,
    cuda_graphs: bool = True,
) -> ProfileResult:
    """Profile ``iterations`` meta-iterations of ``workload``; write the Chrome trace to ``out``.

    captured: profile ``learner.capture``'s whole step instead of the user's loop (ValueError
    with the learner's reason where this model has none on this device). cuda_graphs: the
    learner's flag (False: the user loop's kernels launched one by one on a GPU)."""
    import fastmeta as fm

    device = torch.device(device)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with full_fp32(), fm.use_backend(backend or fm.current_backend()), _quiet_profiler_log(torch.device("cpu")):
        torch.manual_seed(seed)
        model = workload.build_model().to(device)
        if learner == "maml":
            meta = fm.MAML(model, lr=workload.inner_lr, first_order=first_order, steps=workload.steps,
                           loss=workload.loss, validate=False, cuda_graphs=cuda_graphs)
        elif learner == "model-aware":
            meta = fm.ModelAwareMAML(model, lr=workload.inner_lr, first_order=first_order, steps=workload.steps,
                                     loss=workload.loss, validate=False, cuda_graphs=cuda_graphs)
        else:
            raise ValueError(f"learner must be 'maml' or 'model-aware', got {learner!r}")
        batch = workload.make_batch(device, seed)
        record = torch.profiler.record_function
        if captured:
            # The whole step as a user captures it: Adam capturable on a GPU (the graph
            # updates in place), plain Adam for the CPU's fused step.
            optimizer = torch.optim.Adam(meta.parameters(), lr=ADAM_LR, capturable=device.type == "cuda")
            step = meta.capture(optimizer, *batch)

            def meta_iteration():
                with record("fastmeta.captured_step"):
                    step(*batch)
        else:
            optimizer = torch.optim.Adam(meta.parameters(), lr=ADAM_LR, fused=True if device.type == "cuda" else None)

            def meta_iteration():
                with record("fastmeta.meta_iteration"):
                    optimizer.zero_grad(set_to_none=True)
                    loss = meta.meta_batch(*batch).loss  # the learner records inner steps and the query
                    with record("fastmeta.meta_backward"):
                        loss.backward()
                    with record("fastmeta.optimizer_step"):
                        optimizer.step()

        def synchronize():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def profiled(run):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with _quiet_profiler_log(device), torch.profiler.profile(activities=activities) as prof:
                for _ in range(iterations):
                    run()
                synchronize()
            return prof

        for _ in range(warmup):
            meta_iteration()
        synchronize()
        prof = profiled(meta_iteration)
        source = ("graph replays" if captured else "eager") if device.type == "cuda" else "CPU self time"
        averages = prof.key_averages()
        kernels = kernel_shares(averages, device.type, iterations)
        if captured and device.type == "cuda" and not kernels:
            # No kernel records inside the graph replays: the same program run eagerly (the
            # kernels the graph holds), its update with the same capturable Adam.
            meta.cuda_graphs = False

            def eager_run():
                with record("fastmeta.eager_run_of_the_captured_program"):
                    optimizer.zero_grad(set_to_none=True)
                    meta.meta_batch(*batch).loss.backward()
                    optimizer.step()

            eager_run()
            synchronize()
            prof = profiled(eager_run)
            source = "eager run of the captured program"
            averages = prof.key_averages()
            kernels = kernel_shares(averages, device.type, iterations)
    trace = None
    if out is not None:
        trace = Path(out)
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    ranges = sorted(
        (
            (e.key, e.count, e.cpu_time_total / 1e3 / iterations, _total_device_time(e) / 1e3 / iterations)
            for e in averages
            if e.key.startswith(RANGE_PREFIX)
        ),
        key=lambda r: (r[0] not in ("fastmeta.meta_iteration", "fastmeta.captured_step"), r[0]),
    )
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=top)
    return ProfileResult(trace=trace, ranges=ranges, top_kernels=table, kernels=kernels, source=source)


def count_paths(workload: Workload, *, backend: str | None = None, first_order: bool = False,
                learner: str = "maml", seed: int = 0) -> dict[str, DispatchCount]:
    """Dispatches and host syncs of one second-order (or first-order) meta-iteration of
    ``workload`` on the CPU, per path (:mod:`fastmeta.tools.dispatches`): ``plain``, the
    user's loop with the learner's defaults (``meta_batch``, ``loss.backward()``, Adam with
    ``fused=True``); and ``whole-step``, where the CPU has one (a plain MLP with fixed
    inner rates), ``learner.capture(optimizer, ...)``'s :class:`FusedMLPStep` per call."""
    import fastmeta as fm

    with full_fp32(), fm.use_backend(backend or fm.current_backend()), _quiet_profiler_log(torch.device("cpu")):
        torch.manual_seed(seed)
        model = workload.build_model()
        if learner == "maml":
            meta = fm.MAML(model, lr=workload.inner_lr, first_order=first_order, steps=workload.steps,
                           loss=workload.loss)
        elif learner == "model-aware":
            meta = fm.ModelAwareMAML(model, lr=workload.inner_lr, first_order=first_order, steps=workload.steps,
                                     loss=workload.loss)
        else:
            raise ValueError(f"learner must be 'maml' or 'model-aware', got {learner!r}")
        optimizer = torch.optim.Adam(meta.parameters(), lr=ADAM_LR, fused=True)
        batch = workload.make_batch("cpu", seed)
        counts = {"plain": count_dispatches(plain_user_path(meta, optimizer, batch))}
        try:
            whole = meta.capture(torch.optim.Adam(meta.parameters(), lr=ADAM_LR), *batch)
        except ValueError:  # not a plain MLP with fixed rates: the CPU has no whole step for it
            return counts
        counts["whole-step"] = count_dispatches(lambda: whole(*batch))
        return counts


def format_ranges(result: ProfileResult, device_type: str) -> str:
    lines = [f"{'range':<28} {'calls':>6} {'CPU ms/iter':>12}" + (f" {'GPU ms/iter':>12}" if device_type == "cuda" else "")]
    for name, calls, cpu_ms, device_ms in result.ranges:
        line = f"{name:<28} {calls:>6} {cpu_ms:>12.3f}"
        if device_type == "cuda":
            line += f" {device_ms:>12.3f}"
        lines.append(line)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", metavar="PRESET_OR_WORKLOAD", help="W1..W4 or a `fastmeta train` preset")
    parser.add_argument("--out", default="trace.json", metavar="FILE", help="Chrome trace to write (default: trace.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    parser.add_argument("--backend", default=None, metavar="NAME", help="fastmeta backend (default: FASTMETA_BACKEND or auto)")
    parser.add_argument("--learner", choices=("maml", "model-aware"), default="maml")
    parser.add_argument("--first-order", action="store_true", default=None, help="first order (default: the preset's)")
    parser.add_argument("--iterations", type=int, default=3, metavar="N", help="profiled meta-iterations (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="untraced iterations first (default: 2)")
    parser.add_argument("--tasks", type=int, default=None, metavar="T", help="override the tasks per meta-batch")
    parser.add_argument("--top", type=int, default=15, metavar="K", help="rows of the top-kernels table (default: 15)")
    parser.add_argument("--captured", action="store_true",
                        help="profile learner.capture's whole step (a CUDA graph; the fused step of a plain MLP on the CPU)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="the user loop with meta_batch's CUDA graphs off (every kernel launched eagerly)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the ranges and the kernel table (µs per iteration, shares) as JSON")
    parser.add_argument("--count", action="store_true",
                        help="count dispatches and host syncs per meta-iteration (CPU, synthetic inputs) instead")


def run(args: argparse.Namespace) -> int:
    workload, preset_first_order = resolve_workload(args.workload)
    if args.tasks is not None:
        workload = workload.replace(tasks=args.tasks)
    if args.count:
        first_order = preset_first_order if args.first_order is None else args.first_order
        order = "first" if first_order else "second"
        print(f"fastmeta profile --count · {workload.name} · {order} order · T={workload.tasks} · cpu · "
              f"backend {args.backend or 'default'} · per meta-iteration")
        for path, count in count_paths(workload, backend=args.backend, first_order=first_order,
                                       learner=args.learner).items():
            print(f"  {path:<11} {count.describe(args.top)}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    first_order = preset_first_order if args.first_order is None else args.first_order
    result = profile_meta_iterations(
        workload, device=device, backend=args.backend, first_order=first_order, learner=args.learner,
        iterations=args.iterations, warmup=args.warmup, out=args.out, top=args.top, captured=args.captured,
        cuda_graphs=args.cuda_graphs,
    )
    order = "first" if first_order else "second"
    what = "captured whole step" if args.captured else "user loop"
    print(f"fastmeta profile · {workload.name} · {order} order · {what} · T={workload.tasks} · {device} · "
          f"{args.iterations} iterations · kernels from {result.source}")
    print(format_ranges(result, torch.device(device).type))
    print()
    print(f"top {args.top} by self {'GPU' if device == 'cuda' else 'CPU'} time:")
    print(format_kernel_shares(result.kernels, args.top))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"workload": workload.name, "order": order, "captured": bool(args.captured),
                                    "cuda_graphs": bool(args.cuda_graphs),
                                    "tasks": workload.tasks, "device": str(device), "iterations": args.iterations,
                                    **result.to_json()}, indent=1) + "\n")
        print(f"wrote {path}")
    if result.trace is not None:
        print(f"wrote {result.trace} (open in chrome://tracing or ui.perfetto.dev)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastmeta.tools.profiling ...``: the same as ``fastmeta profile``."""
    parser = argparse.ArgumentParser(prog="fastmeta profile", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


COMMAND = Subcommand(help="profile a preset's meta-iteration with torch.profiler",
                     add_arguments=add_arguments, run=run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
