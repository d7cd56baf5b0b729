"""Each matmul precision ("ieee", "tf32x3", "tf32") on W2–W4: the float64 meta-gradient
check and the speed, in one run, and the default it picks.

    python bench/precision_check.py [--workloads W2,W3,W4] [--backend auto] [--device cuda|cpu]
                                    [--tasks T] [--iterations N] [--warmup N] [--json FILE]

For each workload, the check of ``fastmeta bench`` (:func:`fastmeta.tools.bench.checked_reference`:
the per-task autograd loop in float64, the tolerance 1e-4 raised to 4× the fp32 loop's own
error where that is larger) is computed once; then fastmeta on ``--backend`` runs one
meta-iteration under each mode (``fm.matmul_precision(mode)``), its meta-gradient is held
to that reference norm-wise at that tolerance, and it is timed as ``fastmeta bench`` times
a contender (on CUDA also its step captured in a CUDA graph, the figure the targets use).

The choice (``"decision"`` in the JSON, the last line printed): the fastest mode whose
meta-gradient passes the check (status ``ok``) on every workload run, "fastest" being the
smallest geometric mean over the workloads of its median time over ieee's (the captured
step's where there is one). ``ieee`` passes or nothing does; a mode that fails or breaks
anywhere is out. On the CPU the modes are the reference's exact emulation of each mode's
rounding (the Triton interpreter ignores ``input_precision``): the accuracy is the
modes', the times are not (the emulation costs extra GEMMs). ``bench/gpu_check.py``
runs it on the GPU as its ``precision`` step; docs/benchmarks.md says how its decision
becomes the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

import fastmeta as fm
from fastmeta.backends.precision import MATMUL_PRECISIONS
from fastmeta.tools.bench import (
    BenchmarkSettings,
    build_problem,
    checked_reference,
    device_description,
    full_fp32,
    run_contender,
)
from fastmeta.tools.bench_peers import FastmetaContender, FastmetaGraphContender
from fastmeta.tools.workloads import find_workload

SCHEMA = "fastmeta-precision-check-1"
PASSING = ("ok",)


def contenders(backend: str, device: torch.device):
    """(name, factory) of the rows timed per mode: the eager step, and on CUDA the step
    captured in a CUDA graph."""
    rows = [(f"fastmeta[{backend}]", lambda problem: FastmetaContender(problem, backend))]
    if device.type == "cuda":
        rows.append((f"fastmeta[{backend}]+graph", lambda problem: FastmetaGraphContender(problem, backend)))
    return rows


def measure(settings: BenchmarkSettings, backend: str, progress=print) -> list[dict]:
    """One record per (workload, mode, contender): status, relative error, tolerance, times."""
    device = settings.resolved_device()
    records = []
    for name in settings.workloads:
        workload = find_workload(name)
        if settings.tasks is not None:
            workload = workload.replace(tasks=settings.tasks)
        problem = build_problem(workload, settings, device)
        reference, tolerance = checked_reference(problem, settings, progress)
        for mode in MATMUL_PRECISIONS:
            for label, factory in contenders(backend, device):
                with fm.matmul_precision(mode):
                    result = run_contender(label, factory, problem, reference, settings, tolerance)
                record = {"workload": workload.name, "tasks": workload.tasks, "mode": mode, "tolerance": tolerance,
                          "contender": dataclasses.asdict(result)}
                records.append(record)
                error = "-" if result.relative_error is None else f"{result.relative_error:.2e}"
                median = "-" if result.median_ms is None else f"{result.median_ms:.3f} ms"
                progress(f"{workload.name} {mode:<6} {label:<24} {result.status:<11} error {error} "
                         f"(tolerance {tolerance:.1e}) median {median} {result.note}".rstrip())
    return records


def decide(records: list[dict]) -> dict:
    """The fastest mode that passes the check everywhere (see the module docstring)."""
    workloads = sorted({r["workload"] for r in records})
    passing = {mode: all(r["contender"]["status"] in PASSING for r in records if r["mode"] == mode)
               for mode in MATMUL_PRECISIONS}

    def time_of(mode: str, workload: str) -> float | None:
        rows = [r["contender"] for r in records if r["mode"] == mode and r["workload"] == workload
                and r["contender"]["median_ms"] is not None]
        graph = [c for c in rows if c["name"].endswith("+graph")]
        chosen = graph or rows
        return chosen[0]["median_ms"] if chosen else None

    speed = {}
    for mode in MATMUL_PRECISIONS:
        ratios = [time_of(mode, w) / time_of("ieee", w) for w in workloads
                  if time_of(mode, w) is not None and time_of("ieee", w)]
        speed[mode] = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if len(ratios) == len(workloads) else None
    candidates = [m for m in MATMUL_PRECISIONS if passing[m] and speed[m] is not None]
    # MATMUL_PRECISIONS runs from the most accurate: on a tie, the more accurate mode wins.
    choice = min(candidates, key=lambda m: speed[m]) if candidates else None
    return {"choice": choice, "passing": passing, "time_over_ieee": speed, "workloads": workloads,
            "rule": "fastest mode (geometric mean of median time over ieee's) passing the float64 check everywhere"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/precision_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W2,W3,W4", metavar="W2,...")
    parser.add_argument("--backend", default="auto", help="the fastmeta backend that runs (default auto)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    parser.add_argument("--tasks", type=int, default=None, metavar="T", help="override the tasks per meta-batch")
    parser.add_argument("--iterations", type=int, default=20, metavar="N", help="timed samples per row (default 20)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the records and the decision as JSON")
    args = parser.parse_args(argv)
    settings = BenchmarkSettings(workloads=[w for w in args.workloads.split(",") if w], device=args.device,
                                 iterations=args.iterations, warmup=args.warmup, tasks=args.tasks)
    device = settings.resolved_device()
    with full_fp32():
        records = measure(settings, args.backend, progress=lambda line: print(line, flush=True))
    decision = decide(records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"schema": SCHEMA, "device": device_description(device),
                                               "backend": args.backend, "records": records,
                                               "decision": decision}, indent=2) + "\n")
    speeds = ", ".join(f"{m} {'-' if s is None else f'{s:.2f}'}" for m, s in decision["time_over_ieee"].items())
    print(f"time over ieee: {speeds}; passing: {', '.join(m for m, ok in decision['passing'].items() if ok) or 'none'}")
    print(f"PRECISION_DECISION {json.dumps(decision['choice'])}", flush=True)
    return 0 if decision["passing"]["ieee"] else 1


if __name__ == "__main__":
    sys.exit(main())
