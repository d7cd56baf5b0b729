#!/usr/bin/env python3
"""The GPU check: one prepared, resumable command for a lent GPU machine.

    python3 bench/gpu_check.py [--out DIR] [--resume DIR] [--budget S] [--only STEP,...]
    python3 bench/gpu_check.py --dry-run --out DIR      (a CPU machine; CI runs it)

What it does, in priority order, each step in its own time box, ≤ 6 minutes in all:

1. **install** the checkout (``pip install --no-deps --no-build-isolation -e .``: the GPU
   machine has no network) and **build** the C++/CUDA extension. The build runs beside
   the Triton families, which do not need it.
2. **correctness per kernel family**, in parallel: the families come from the op table
   (each family's tests are ``tests/ops/test_<family>.py``, run with ``-k triton`` or
   ``-k cuda``): the Triton families and their shared tier, then, once the build is done,
   the CUDA families. A family that passes is recorded at once in
   ``verified.json``; one that fails is recorded as failed in ``results.json``, and the
   run goes on.
3. **the whole-step CUDA graph test** (captured equals eager over 10 steps).
4. **the profile** (issue 27), before anything is tuned: ``fastmeta profile --captured`` of
   one W2 and one W4 iteration (device time per kernel, from the graph replays) and
   ``fastmeta profile --no-cuda-graphs`` of W2's user loop; the top kernels and their
   shares go under ``profile`` (traces stay on the machine). The dry run profiles W1's CPU
   whole step and user loop.
   Then **kernel-count** (issues 24 and 27): the launch recorder's count of one captured W2
   iteration (``python -m fastmeta.tools.launches W2 --compare-graph``: on the CPU,
   through the CUDA path's launchers) against the kernel nodes of W2's whole step
   captured on the GPU (``CUDAGraph.debug_dump``'s DOT, or torch.profiler's kernels of one
   replay); both under ``kernel_count``, status ``differs`` where they do not agree. The
   dry run records the recorder's count and the graph as unavailable.
5. **eager against captured** (issue 23): W2's user loop (``fastmeta[auto]``: the learner
   and Adam with their defaults, new batches every iteration) against fastmeta's captured
   whole step (``fastmeta[auto]+graph``), in one process; the ratio eager / captured is
   recorded under ``eager_vs_captured`` (target ≤ 1.3). The dry run measures W1's user
   loop against the CPU's whole step (``fastmeta[auto]+whole-step``) instead.
6. **matmul precision** (issue 24): ``bench/precision_check.py`` on W2–W4, each mode's
   meta-gradient against float64 and its time; the mode it picks (the fastest passing
   everywhere) is recorded under ``precision`` and is the default to set. The dry run
   checks the modes' emulation on W1 on the CPU.
7. **the tile sweep** (issue 24, ``tune``): ``bench/tune_tiles.py`` times a few
   configurations (tiles, warps, stages, split-K) of each shape class of W2–W4's GEMM-like
   Triton launches with CUDA events, ≤ 3 minutes; the fastest of each class goes under
   ``tune.table`` in the tile table's format (commit it as ``kernels/tile_table.json``).
   The dry run sweeps W1's and W2S's classes at one task under the interpreter, two
   candidates each.
8. **the end-to-end bench** (``fastmeta bench``): fastmeta's rows first, then the peers,
   W1, W2, W3, W4 in that order, the slow ``compile`` peer last; every contender's result
   is appended to the results as it finishes (``--stream``).
9. **the vision models** (issue 25, ``vision``): ``bench/bench_l2l_vision.py --device
   cuda``: learn2learn's OmniglotCNN, CNN4, ResNet-12, OmniglotFC and WRN-28 at 16 tasks,
   ``meta_batch`` with the learner's defaults against the plain per-task loop, each
   meta-gradient checked against the float64 loop; per shape the two medians and their
   ratio (target >= 2x) under ``vision``. The dry run runs OmniglotFC at 2 tasks on the CPU.
10. **train** (issue 27, step 5): ``fastmeta train omniglot-5w1s`` in its own time box
   (150 s), its ``--iterations`` sized from the box at the measured 175 iterations/s, then
   the test accuracy of what it reached on the 600 fixed test tasks (the run's own final
   test; where the box stopped the run, ``fastmeta eval`` of the checkpoint it wrote);
   iterations reached, iterations/s and accuracy ± 95 % CI under ``train``. The official
   archives are not in the repository: copy ``images_background.zip`` and
   ``images_evaluation.zip`` to ``.device-data/omniglot/`` (git-ignored) and name
   ``.device-data`` in the device tool's ``carry``; without them the step is ``skipped``,
   saying so. It runs after the bench, so with the default budget it usually needs its own
   run: ``--only train`` (or ``--resume``). The dry run trains 2 iterations on the CPU on
   the tests' synthetic Omniglot (``tests/conftest.py``) and tests 8 tasks.
11. **memcheck, last**: compute-sanitizer over fastmeta's own kernels (the CUDA extension
   and the Triton kernels); recorded as ``unavailable`` where the sanitizer is missing or
   refuses the device (the H200 machines).

**What comes back.** Exactly four files under ``--out`` (``$OUT`` by default), rewritten
after every step, so they hold the latest state even if the run is killed (a SIGTERM is
trapped: the running steps are stopped and recorded as interrupted):

- ``verified.json``: the repository's record plus what this run verified (commit it as
  ``fastmeta/backends/verified.json``);
- ``results.json``: every step's status, time and note, every bench figure, the device
  and the versions (schema ``fastmeta-gpu-check-1``);
- ``summary.txt``: the same, readable, ≤ 200 lines;
- ``logs.tar.gz``: each step's full output.

**Resumable.** ``--resume DIR`` reads an earlier run's ``results.json`` and
``verified.json``: steps that passed there are carried over and not run again, and bench
contenders already measured on the same GPU model are not timed again. A second run spends
its time on what failed or did not fit.

**Dry run** (``--dry-run``): the same plumbing on a CPU machine, on tiny shapes: Triton
under ``TRITON_INTERPRET=1``, the CUDA kernels' logic through the CPU stand-in
(``tests/ops/test_cuda_emulated.py``), the bench on W1 for 2 iterations on the CPU.
It records under the device type ``dry-run``, which nothing ever reads as verified.
``tests/bench/test_gpu_check.py`` runs it and asserts the contract (files, schema, records
family by family, resumption, the trap).

**Time budget on an H100** (measured in the runs of 2026-11-26, 16 cores; the
``estimate`` of each step below): probe and install ~11 s; the build (24 s) beside the
Triton families, of which the shared tier is the longest (59 s); the CUDA families and the
whole-step test (12–17 s) after the build: correctness ends ~90 s in. The bench, second
order: W1 26 s, W2 52 s, W3 93 s, W4 66 s (fastmeta's rows and the peers' together);
memcheck 18 s. So W1–W4 second order and memcheck fit the default budget of 345 s; the
``compile`` rows (64 s) and first order (65 s) go to a resumed run. The steps added since
(profile, eager-vs-captured, precision, tune: up to 2, 1, 3 and 3 minutes, not yet run on
a GPU) take their share first; what does not fit is left to ``--resume`` (``--only install,tune``
runs the sweep alone).

This script imports neither torch nor fastmeta: everything that can crash runs in a child
process, so the driver always lives to write the four files.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def _load_verification():
    """fastmeta.backends.verification, the record's one writer, loaded from its file: this
    process runs no kernels and must not import torch or the fastmeta package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastmeta_verification",
                                                  REPO / "fastmeta" / "backends" / "verification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verification = _load_verification()
SCHEMA = "fastmeta-gpu-check-1"
OUT_FILES = ("verified.json", "results.json", "summary.txt", "logs.tar.gz")
DEFAULT_BUDGET_S = 345  # the command's limit is 6 minutes: leave ~15 s for start-up and the copy back
SUMMARY_MAX_LINES = 200
# Bench contender statuses that count as measured (a resumed run does not time them again).
MEASURED = ("ok", "unsettled", "known-wrong", "WRONG", "not checked")


# ---------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------


@dataclass
class Step:
    """One unit of the check. ``box`` is its time box (seconds); ``estimate`` the time it
    took on an H100 (NVIDIA H100 80GB HBM3, 16 cores, torch 2.11, the runs of 2026-11-26 in
    bench/results/gpu-h100-2026-11-26/). The summary prints both."""

    name: str
    box: int
    estimate: int
    command: Callable[["Check"], list[str]] | None = None
    # (backend, kernels) recorded on pass; kernels may be a family name, resolved from the build
    records: tuple[str, tuple[str, ...] | str] | None = None
    needs: tuple[str, ...] = ()  # steps that must pass before this one records
    allow_skips: bool = False  # pytest steps: a skipped GPU test verifies nothing
    judge: str = "pytest"  # "pytest": its summary line decides; "exit": the exit code alone
    env: dict = field(default_factory=dict)


def pytest_command(*args: str) -> Callable[["Check"], list[str]]:
    def command(check: "Check") -> list[str]:
        return [check.python, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", "-p", "no:cacheprovider",
                "-o", "addopts=", *args]

    return command


# The kernel families come from the op table (fastmeta/backends/table.py), asked of a child
# process after the install: each op family's tests are tests/ops/test_<family>.py, run
# with "-k triton" or "-k cuda", and a pass records that family's kernels for the backend.
# On the GPU the whole family runs (its tiny cases on CUDA and the W1–W4 shapes); in the dry
# run one case of it, under the interpreter (Triton) or through the CPU stand-in (CUDA).
CATALOG = r"""
import json
import fastmeta
from fastmeta.backends import get_backend
from fastmeta.backends.table import FAMILIES, families
triton = {}
if get_backend("triton").available()[0]:
    get_backend("triton").kernel("inner_step")
    loaded = get_backend("triton").kernels
    triton = {f: [k for k in ks if k in loaded] for f, ks in families().items()}
    triton = {f: ks for f, ks in triton.items() if ks}
# Each family's seconds on an H100 and its dry-run case, as its op module declares them.
seconds = {f: d.check_seconds for f, d in FAMILIES.items()}
dry = {f: d.dry_run_case for f, d in FAMILIES.items() if d.dry_run_case}
print("CATALOG " + json.dumps({"families": families(), "triton": triton, "seconds": seconds, "dry_triton": dry}))
"""
DRY_CUDA = {"inner_step": "inner_step", "task_linear": "linear", "task_loss": "loss",
            "mlp_meta_step": "meta_step and 1.40.40.1-relu-mse-step-1-10-False"}


def cuda_families() -> list[str]:
    """The families with CUDA kernels: csrc/cuda/<family>.cu, by the sources' naming rule."""
    return sorted(p.stem for p in (REPO / "csrc" / "cuda").glob("*.cu"))


def correctness_steps(dry_run: bool, catalog: dict) -> list[Step]:
    shared = ["tests/ops/test_table.py", "tests/ops/test_meta_step_on_backends.py"]
    steps = [Step("triton:common", 150, 59, pytest_command(*shared, "-k", "triton"), allow_skips=dry_run)]
    for family, kernels in catalog.get("triton", {}).items():
        expr = f"triton and ({catalog.get('dry_triton', {}).get(family, family)})" if dry_run else "triton"
        steps.append(Step(f"triton:{family}", 150, catalog.get("seconds", {}).get(family, 30),
                          pytest_command(f"tests/ops/test_{family}.py", "-k", expr),
                          records=("triton", tuple(kernels)), needs=("triton:common",), allow_skips=dry_run))
    if catalog.get("triton"):
        # Split-K in one pass (kernels/split_k.py): the conv and linear kernels' shared
        # epilogue protocol (tile counters, acquire-release atomics), recorded as a kernel of
        # its own; until it is, split launches on CUDA keep their second pass.
        families = tuple(f"triton:{f}" for f in ("task_conv2d", "task_linear") if f in catalog["triton"])
        steps.append(Step("triton:split_k", 90, 12, pytest_command("tests/kernels/test_split_k.py"),
                          records=("triton", ("split_k_one_pass",)), needs=("triton:common", *families),
                          allow_skips=dry_run))
        # The conv backward's launches in one (one grid, two or three GEMMs:
        # kernels/task_conv2d.py), recorded as a kernel of its own; until it is, they launch
        # apart on CUDA. The dry run (the interpreter, slow) takes one case of each test.
        if "task_conv2d" in catalog["triton"]:
            selection = ("-k", "(s2-per-task and addends and one-pass) or (double_backward and dx-split and both) "
                               "or disjoint or plan_is or first or distinct or alone or record or environment") if dry_run else ()
            # Its estimate is not measured: 46 cases whose kernels compile on first use.
            steps.append(Step("triton:conv2d_grads_in_one_launch", 150, 40,
                              pytest_command("tests/kernels/test_conv_grads_in_one_launch.py", *selection),
                              records=("triton", ("conv2d_grads_in_one_launch",)),
                              needs=("triton:common", "triton:task_conv2d"), allow_skips=dry_run))
    for family in cuda_families():
        if dry_run:  # the CUDA sources' logic, compiled by the host compiler against the CPU stand-in
            command = pytest_command("tests/ops/test_cuda_emulated.py", "-k", DRY_CUDA.get(family, family))
        else:
            command = pytest_command("-m", "gpu", f"tests/ops/test_{family}.py", "-k", "cuda")
        steps.append(Step(f"cuda:{family}", 120, catalog.get("seconds", {}).get(family, 20), command,
                          records=("cuda", family), needs=("build",), allow_skips=dry_run))
    steps.append(Step("whole_step", 120, 14, pytest_command("tests/engine/test_whole_step.py", *(() if dry_run else ("-m", "gpu"))),
                      needs=("build",), allow_skips=dry_run))
    return steps


# The bench: (step name, fastmeta bench arguments). fastmeta's rows and the peers run in
# separate processes: a failed whole-step capture cannot take the peers' CUDA context down.
GPU_FASTMETA_BACKENDS = "auto,triton,cuda,torch"
GPU_PEERS = "graph,jax,vmap,loop"


def bench_plan(dry_run: bool) -> list[tuple[str, int, int, list[str]]]:
    """(step, box, estimate, arguments) in priority order."""
    if dry_run:
        common = ["--device", "cpu", "--iterations", "2", "--warmup", "1"]
        return [
            ("bench:W1-second:fastmeta", 120, 10, ["--workloads", "W1", "--backends", "auto,cpu,torch", "--peers", "",
                                                    *common]),
            ("bench:W1-second:peers", 120, 10, ["--workloads", "W1", "--backends", "", "--peers", "loop,vmap",
                                                 *common]),
        ]
    plan = []
    # (workload, box and H100 seconds of fastmeta's rows, box and H100 seconds of the peers)
    for workload, fm_box, fm_s, peers_box, peers_s in (("W1", 60, 10, 60, 16), ("W2", 60, 16, 90, 36),
                                                       ("W3", 60, 30, 120, 63), ("W4", 60, 26, 90, 40)):
        plan.append((f"bench:{workload}-second:fastmeta", fm_box, fm_s,
                     ["--workloads", workload, "--backends", GPU_FASTMETA_BACKENDS, "--peers", ""]))
        plan.append((f"bench:{workload}-second:peers", peers_box, peers_s,
                     ["--workloads", workload, "--backends", "", "--peers", GPU_PEERS]))
    # torch.compile takes ~30 s to compile a step (docs/benchmarks.md): after every other row.
    for workload, seconds in (("W1", 23), ("W2", 41)):
        plan.append((f"bench:{workload}-second:compile", 90, seconds,
                     ["--workloads", workload, "--backends", "", "--peers", "compile"]))
    for workload, fm_s, peers_s in (("W1", 10, 14), ("W4", 18, 23)):
        plan.append((f"bench:{workload}-first:fastmeta", 60, fm_s,
                     ["--workloads", workload, "--first-order", "--backends", GPU_FASTMETA_BACKENDS, "--peers", ""]))
        plan.append((f"bench:{workload}-first:peers", 60, peers_s,
                     ["--workloads", workload, "--first-order", "--backends", "", "--peers", GPU_PEERS]))
    return plan


def start_step(check: "Check", name: str, box: float, estimate: float) -> float | None:
    """A step run as one or more commands: None (recorded why) where it is carried over, not
    selected or does not fit; else marked running, and its time box in seconds."""
    if check.carried(name):
        return None
    if not check.selected(name):
        check.set_step(name, status="not-run", note="not selected (--only)", box_s=box, estimate_s=estimate)
        return None
    step_box = min(box, check.left())
    if step_box < 15:
        check.set_step(name, status="did-not-fit", note=f"{max(check.left(), 0):.0f} s left", box_s=box,
                       estimate_s=estimate)
        check.publish()
        return None
    check.set_step(name, status="running", started_at_s=round(check.elapsed(), 1), box_s=box, estimate_s=estimate)
    check.publish()
    return step_box


# Issue 27: the profile, before anything is tuned: device time per kernel of one captured
# W2 and W4 iteration, and of W2's user loop with its kernels launched one by one.
PROFILE_STEP = "profile"
PROFILE_TOP = 20  # kernels kept per profile in results.json (the whole table is in the logs)


def profile_plan(dry_run: bool) -> tuple[int, int, list[tuple[str, list[str]]]]:
    """(box, estimate, [(label, fastmeta profile arguments)])."""
    if dry_run:  # the CPU's fused whole step and user loop of W1
        common = ["--tasks", "2", "--iterations", "1", "--warmup", "1", "--device", "cpu"]
        return 60, 10, [("W1-captured", ["W1", "--captured", *common]), ("W1-eager", ["W1", *common])]
    # Not yet run on a GPU: each is a fresh process (import, extension load, warm-up,
    # capture) and a few iterations; W4's capture takes the longest.
    return 120, 60, [("W2-captured", ["W2", "--captured", "--iterations", "5", "--warmup", "3"]),
                     ("W4-captured", ["W4", "--captured", "--iterations", "3", "--warmup", "3"]),
                     ("W2-eager", ["W2", "--no-cuda-graphs", "--iterations", "3", "--warmup", "2"])]


def profile(check: "Check") -> None:
    name = PROFILE_STEP
    box, estimate, runs = profile_plan(check.dry_run)
    step_box = start_step(check, name, box, estimate)
    if step_box is None:
        return
    began = time.monotonic()
    profiles, failed = check.results.setdefault("profile", {}), []
    for label, arguments in runs:
        if label in profiles:  # measured by an earlier, interrupted run
            continue
        left = step_box - (time.monotonic() - began)
        if left < 10:
            failed.append(f"{label}: did not fit")
            continue
        report = check.work / f"profile_{label}.json"
        command = [check.python, "-m", "fastmeta.tools.profiling", *arguments, "--top", str(PROFILE_TOP),
                   "--out", str(check.work / f"trace_{label}.json"), "--json", str(report)]
        rc, text = check.run_command(f"{name}:{label}", command, left)
        if rc == 0 and report.exists():
            profiles[label] = profile_summary(json.loads(report.read_text()), PROFILE_TOP)
            check.publish()
        else:
            tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
            failed.append(f"{label}: {'killed at the box' if rc is None else f'exit {rc}'}: {tail[0][:100]}")
    seconds = round(time.monotonic() - began, 1)
    done = [label for label, _ in runs if label in profiles]
    status = "passed" if not failed else ("failed" if not done else "partial")
    note = "; ".join([f"profiled {', '.join(done)}" if done else "nothing profiled", *failed])
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


def profile_summary(report: dict, top: int) -> dict:
    """A profile's kernel table cut to ``top`` rows (the rest summed), from ``fastmeta profile --json``."""
    kernels = report["kernels"]
    rest = kernels[top:]
    return {"workload": report["workload"], "captured": report["captured"], "source": report["source"],
            "device": report["device"], "iterations": report["iterations"], "total_us": report["total_us"],
            "kernel_launches": sum(k["calls"] for k in kernels), "ranges": report["ranges"],
            "kernels": kernels[:top],
            "rest": {"kernels": len(rest), "us": sum(k["us"] for k in rest), "share": sum(k["share"] for k in rest)}}


# Issue 24/27: the launch recorder's kernel count of a captured W2 iteration (on the CPU,
# through the CUDA path's launchers: fastmeta/tools/launches.py) against the kernel nodes of
# W2's whole step captured on this GPU (its CUDA graph's DOT, or the profiler's kernels of
# one replay). The dry run records the recorder's count and the graph as unavailable.
KERNEL_COUNT_STEP = "kernel-count"
KERNEL_COUNT_WORKLOAD = "W2"


def kernel_count(check: "Check") -> None:
    name = KERNEL_COUNT_STEP
    step_box = start_step(check, name, 60 if check.dry_run else 90, 20)
    if step_box is None:
        return
    report = check.work / "kernel_count.json"
    command = [check.python, "-m", "fastmeta.tools.launches", KERNEL_COUNT_WORKLOAD, "--compare-graph", str(report)]
    began = time.monotonic()
    rc, text = check.run_command(name, command, step_box)
    seconds = round(time.monotonic() - began, 1)
    counted = json.loads(report.read_text())[0] if rc == 0 and report.exists() else None
    if counted is None:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        status = "timeout" if rc is None else "failed"
        note = f"{'killed at its time box' if rc is None else f'exit {rc}'}: {tail[0][:140]}"
    else:
        recorder, graph = counted["recorder"], counted["graph"]
        check.results["kernel_count"] = {
            "workload": counted["workload"], "recorder": recorder["kernels"], "recorder_by_source": recorder["by_source"],
            "recorder_top": dict(list(recorder["by_label"].items())[:25]),
            "graph": graph.get("kernels", "unavailable"), "graph_source": graph["source"],
            "graph_detail": {k: v for k, v in graph.items() if k not in ("kernels", "source")},
            "difference": counted.get("difference"), "device": check.results["device"].get("name"),
            "run_id": check.run_id}
        if graph.get("kernels") is None:
            status = "passed" if check.dry_run else "unavailable"
            note = f"recorder {recorder['kernels']} kernels; captured graph unavailable: {graph.get('why', '')[:100]}"
        else:
            status = "passed" if counted["match"] else "differs"
            agreement = "equal" if counted["match"] else f"the graph has {counted['difference']:+d}"
            note = f"recorder {recorder['kernels']}, captured graph {graph['kernels']} ({graph['source']}): {agreement}"
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


# Issue 23: eager W2 (the user loop) against the captured whole step, in one process.
EAGER_VS_CAPTURED_STEP = "eager-vs-captured"
EAGER_VS_CAPTURED_TARGET = 1.3  # eager at most 1.3x the captured step


def eager_vs_captured_plan(dry_run: bool) -> tuple[int, int, list[str], str, str]:
    """(box, estimate, fastmeta bench arguments, eager row, captured row)."""
    if dry_run:
        return 120, 10, ["--workloads", "W1", "--device", "cpu", "--backends", "auto", "--peers", "", "--no-check",
                         "--iterations", "2", "--warmup", "1"], "fastmeta[auto]", "fastmeta[auto]+whole-step"
    # W2's fastmeta rows took 16 s on the H100 with the check; without it, about as long.
    return 60, 16, ["--workloads", "W2", "--backends", "auto", "--peers", "", "--no-check", "--iterations", "20"], \
        "fastmeta[auto]", "fastmeta[auto]+graph"


def eager_vs_captured(check: "Check") -> None:
    name = EAGER_VS_CAPTURED_STEP
    box, estimate, arguments, eager_row, captured_row = eager_vs_captured_plan(check.dry_run)
    step_box = start_step(check, name, box, estimate)
    if step_box is None:
        return
    report = check.work / "eager_vs_captured.json"
    command = [check.python, "-m", "fastmeta.tools.bench", *arguments, "--json", str(report)]
    began = time.monotonic()
    rc, text = check.run_command(name, command, step_box)
    seconds = round(time.monotonic() - began, 1)
    measured = None
    if report.exists():
        measured = eager_over_captured(json.loads(report.read_text()), eager_row, captured_row)
    if rc is None:
        status, note = "timeout", f"killed at its time box ({step_box:.0f} s)"
    elif measured is None:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        status, note = "failed", f"exit {rc}: both rows not timed; {tail[0][:140]}"
    else:
        check.results["eager_vs_captured"] = {**measured, "target": EAGER_VS_CAPTURED_TARGET,
                                              "met": measured["ratio"] <= EAGER_VS_CAPTURED_TARGET,
                                              "device": check.results["device"].get("name"), "run_id": check.run_id}
        status = "passed"
        note = (f"{measured['workload']}: eager {measured['eager_ms']:.3f} ms / captured {measured['captured_ms']:.3f} "
                f"ms = {measured['ratio']:.2f}x (target <= {EAGER_VS_CAPTURED_TARGET:g}x: "
                f"{'met' if measured['ratio'] <= EAGER_VS_CAPTURED_TARGET else 'NOT MET'})")
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


def eager_over_captured(report: dict, eager_row: str, captured_row: str) -> dict | None:
    """The two rows' medians from a ``fastmeta bench --json`` report, and their ratio."""
    for entry in report.get("workloads", []):
        rows = {c["name"]: c for c in entry["contenders"]}
        eager, captured = rows.get(eager_row, {}), rows.get(captured_row, {})
        if eager.get("median_ms") and captured.get("median_ms"):
            measured = {"workload": entry["workload"]["name"], "eager": eager_row, "captured": captured_row,
                        "eager_ms": eager["median_ms"], "captured_ms": captured["median_ms"],
                        "ratio": eager["median_ms"] / captured["median_ms"]}
            # On CUDA the user loop replays meta_batch's graphs; the same loop with them off
            # (every kernel launched eagerly) is recorded beside it when the report has it.
            without = rows.get(eager_row[:-1] + ",cuda_graphs=False]", {})
            if without.get("median_ms"):
                measured["eager_without_graphs_ms"] = without["median_ms"]
                measured["ratio_without_graphs"] = without["median_ms"] / captured["median_ms"]
            return measured
    return None


# Issue 24/27: each matmul precision's W2-W4 meta-gradient against float64, and the mode
# bench/precision_check.py would make the default (the fastest that passes everywhere).
PRECISION_STEP = "precision"


def run_reporting_script(check: "Check", name: str, script: str, arguments: list[str], step_box: float,
                         summarize) -> tuple[int | None, str, float, dict | None]:
    """Run ``bench/<script> ARGUMENTS --json REPORT`` in the step's box: (exit code or None
    when the box killed it, its output, seconds, ``summarize(report)`` or None without a
    report)."""
    report = check.work / f"{name}.json"
    command = [check.python, str(REPO / "bench" / script), *arguments, "--json", str(report)]
    began = time.monotonic()
    rc, text = check.run_command(name, command, step_box)
    seconds = round(time.monotonic() - began, 1)
    summary = summarize(json.loads(report.read_text())) if report.exists() else None
    return rc, text, seconds, summary


def precision_plan(dry_run: bool) -> tuple[int, int, list[str]]:
    """(box, estimate, bench/precision_check.py arguments)."""
    if dry_run:  # the reference's emulation of each mode on W1, two tasks: ~3 s on the CPU
        return 60, 5, ["--workloads", "W1", "--backend", "torch", "--device", "cpu", "--tasks", "2",
                       "--iterations", "1", "--warmup", "0"]
    # Not yet run on a GPU: three modes x (eager, graph) x W2-W4, 10 samples each, plus one
    # float64 reference per workload; estimated from the bench's W2-W4 rows (~2 min).
    return 180, 120, ["--workloads", "W2,W3,W4", "--backend", "auto", "--iterations", "10", "--warmup", "2"]


def precision(check: "Check") -> None:
    name = PRECISION_STEP
    box, estimate, arguments = precision_plan(check.dry_run)
    step_box = start_step(check, name, box, estimate)
    if step_box is None:
        return
    rc, text, seconds, summary = run_reporting_script(check, name, "precision_check.py", arguments, step_box,
                                                      precision_summary)
    if rc is None:
        status, note = "timeout", f"killed at its time box ({step_box:.0f} s)"
    elif summary is None:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        status, note = "failed", f"exit {rc}: no report; {tail[0][:140]}"
    else:
        check.results["precision"] = {**summary, "device": check.results["device"].get("name"),
                                      "run_id": check.run_id}
        # ieee failing its own float64 check is a failure of the kernels, not of a mode.
        status = "passed" if summary["passing"].get("ieee") else "failed"
        note = (f"default to set: {summary['choice']}; passing: "
                f"{', '.join(m for m, ok in summary['passing'].items() if ok) or 'none'}")
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


def precision_summary(report: dict) -> dict:
    """The decision and each (workload, mode, row)'s error and median, from precision_check's JSON."""
    decision = report["decision"]
    rows = [{"workload": r["workload"], "mode": r["mode"], "row": r["contender"]["name"],
             "status": r["contender"]["status"], "relative_error": r["contender"]["relative_error"],
             "tolerance": r["tolerance"], "median_ms": r["contender"]["median_ms"]} for r in report["records"]]
    return {"choice": decision["choice"], "passing": decision["passing"],
            "time_over_ieee": decision["time_over_ieee"], "rows": rows}


# Issue 24/27: the tuning sweep of the GEMM-like Triton launches (bench/tune_tiles.py): a
# few configurations of each shape class of W2-W4 timed, the fastest written in the tile
# table's format under results.json's tune.table (commit it as kernels/tile_table.json).
TUNE_STEP = "tune"


def tune_plan(dry_run: bool) -> tuple[int, int, list[str]]:
    """(box, estimate, bench/tune_tiles.py arguments). The sweep's own budget leaves the box
    ~30 s for the start-up, the meta-iterations that find the classes, and the JSON."""
    if dry_run:  # under the interpreter: W1's and W2S's classes at 1 task, planned for 2 SMs
        return 60, 20, ["--workloads", "W1,W2S", "--tasks", "1", "--device", "cpu", "--sm-count", "2",
                        "--candidates", "2", "--repeats", "1", "--budget", "15"]
    # Not yet run on a GPU: ~30 classes x 6 candidates, each a compile (~0.5 s, shared
    # between classes with the same tiles) and 20 timed calls.
    return 180, 150, ["--workloads", "W2,W3,W4", "--candidates", "6", "--repeats", "20", "--budget", "140"]


def tune(check: "Check") -> None:
    name = TUNE_STEP
    box, estimate, arguments = tune_plan(check.dry_run)
    step_box = start_step(check, name, box, estimate)
    if step_box is None:
        return
    rc, text, seconds, summary = run_reporting_script(check, name, "tune_tiles.py", arguments, step_box, tune_summary)
    if rc is None:
        status, note = "timeout", f"killed at its time box ({step_box:.0f} s)"
    elif summary is None or not summary["table"]["entries"]:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        status, note = "failed", f"exit {rc}: no class tuned; {tail[0][:140]}"
    else:
        check.results["tune"] = {**summary, "device": check.results["device"].get("name"), "run_id": check.run_id}
        status = "passed"
        note = (f"{len(summary['table']['entries'])} of {len(summary['classes']) + len(summary['left'])} shape "
                f"classes tuned ({len(summary['left'])} left to the rule); commit tune.table as "
                f"kernels/tile_table.json")
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


# Issue 25 on a GPU: learn2learn's vision models, 16 tasks, `meta_batch` (the learner's
# defaults: validation on, graphs replayed) against the plain per-task loop, each
# contender's meta-gradient checked against the float64 loop (bench/bench_l2l_vision.py).
# On the 2-core CPU the convolutions run near one core's GEMM peak and the ratio stops at
# 1.4-1.7x (bench/RESULTS.md); the GPU is where batching the tasks pays.
VISION_STEP = "vision"
VISION_TARGET = 2.0  # meta_batch at least 2x the per-task loop (issue 25, with issue 23's ratio)
VISION_SHAPES = "OmniglotCNN,CNN4,ResNet12,OmniglotFC,WRN28"  # the models, most telling first


def vision_plan(dry_run: bool) -> tuple[int, int, list[str]]:
    """(box, estimate, bench/bench_l2l_vision.py arguments)."""
    if dry_run:  # OmniglotFC at 2 tasks on the CPU: ~3 s
        return 60, 5, ["--shapes", "OmniglotFC", "--tasks", "2", "--samples", "1", "--device", "cpu"]
    # Not yet run on a GPU: per shape a float64 loop, three contenders' warm-up (meta_batch's
    # capture at its second call) and 5 rounds; the JSON is rewritten after every shape, so
    # a box that stops it keeps the shapes it finished.
    return 150, 90, ["--shapes", VISION_SHAPES, "--tasks", "16", "--samples", "5", "--device", "cuda"]


def vision(check: "Check") -> None:
    name = VISION_STEP
    box, estimate, arguments = vision_plan(check.dry_run)
    step_box = start_step(check, name, box, estimate)
    if step_box is None:
        return
    rc, text, seconds, summary = run_reporting_script(check, name, "bench_l2l_vision.py", arguments, step_box,
                                                      vision_summary)
    if summary:
        check.results["vision"] = {"shapes": summary, "target": VISION_TARGET,
                                   "device": check.results["device"].get("name"), "run_id": check.run_id}
    wrong = [s for s, r in (summary or {}).items() if not r["matches"]]
    if wrong:
        status, note = "failed", f"meta-gradient off the float64 loop: {', '.join(wrong)}"
    elif rc is None:
        status, note = "timeout", (f"killed at its time box ({step_box:.0f} s); shapes finished: "
                                   f"{', '.join(summary or {}) or 'none'}")
    elif rc != 0 or not summary:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        status, note = "failed", f"exit {rc}: no shape measured; {tail[0][:140]}"
    else:
        status = "passed"
        note = "; ".join(f"{s} {r['speedup']:.2f}x" if r["speedup"] is not None else f"{s} -"
                         for s, r in summary.items()) + f" (target >= {VISION_TARGET:g}x the loop)"
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


def vision_summary(report: dict) -> dict:
    """Per shape: the loop's and meta_batch's medians, their ratio against the target, and
    whether every contender's meta-gradient matched the float64 loop."""
    out = {}
    for r in report.get("results", []):
        rows = {row["contender"]: row for row in r["rows"]}
        loop, batched = rows.get("loop"), rows.get("meta_batch")
        speedup = batched["speedup_vs_loop"] if loop and batched else None
        out[r["shape"]] = {"image": r["image"], "tasks": r["tasks"], "gflop": r["gflop_per_iteration"],
                           "loop_ms": loop["median_ms"] if loop else None,
                           "meta_batch_ms": batched["median_ms"] if batched else None, "speedup": speedup,
                           "met": speedup is not None and speedup >= VISION_TARGET,
                           "matches": all(row["matches"] for row in r["rows"])}
    return out


# Issue 27, step 5: `fastmeta train omniglot-5w1s`, time-boxed, then the test accuracy of
# what it reached on the 600 fixed test tasks. The official archives are not in the
# repository: the step reads them from TRAIN_DATA (git-ignored), which the session copies
# there and names in the device tool's carry (module docstring).
TRAIN_STEP = "train"
TRAIN_PRESET = "omniglot-5w1s"
TRAIN_DATA = REPO / ".device-data" / "omniglot"
TRAIN_ARCHIVES = ("images_background.zip", "images_evaluation.zip")
TRAIN_BOX = 150
TRAIN_RATE_GUESS = 175.0  # iterations/s of `fastmeta train omniglot-5w1s` on an H100 (issue 27)
TRAIN_STARTUP_S = 35  # imports, decoding the archives (cached after the first run), the capture
TRAIN_TEST_S = 25  # the 600-task test at 3 and 10 steps, and a `fastmeta eval` process if it must run
TRAIN_TEST_TASKS = 600


def train_plan(dry_run: bool, box: float) -> dict:
    """What the train step runs in ``box`` seconds: the iterations (sized from the box at
    TRAIN_RATE_GUESS, at most the paper's 60 000), the test tasks and the extra arguments.
    The dry run: 2 iterations and 8 test tasks on the CPU, on the tests' synthetic Omniglot."""
    if dry_run:
        return {"iterations": 2, "test_tasks": 8, "arguments": ["--device", "cpu", "--log-every", "1"]}
    seconds = max(box - TRAIN_STARTUP_S - TRAIN_TEST_S, 5)
    return {"iterations": int(min(60_000, max(100, seconds * TRAIN_RATE_GUESS))), "test_tasks": TRAIN_TEST_TASKS,
            "arguments": []}


# The dry run's data: the synthetic Omniglot of the tests (tests/conftest.py), written by a child.
SYNTHETIC_OMNIGLOT = r"""
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_synthetic_omniglot
write_synthetic_omniglot(Path(sys.argv[1]))
print("wrote", sys.argv[1])
"""


def train(check: "Check") -> None:
    name = TRAIN_STEP
    if check.carried(name):
        return
    data = check.work / "synthetic-omniglot" if check.dry_run else TRAIN_DATA
    if not check.dry_run and not all((data / a).is_file() for a in TRAIN_ARCHIVES):
        if check.selected(name):
            check.set_step(name, status="skipped", box_s=TRAIN_BOX, estimate_s=TRAIN_BOX,
                           note=f"no Omniglot: {', '.join(TRAIN_ARCHIVES)} not in {data.relative_to(REPO)}/ "
                                "(copy them there and carry the folder)")
            check.publish()
        else:
            check.set_step(name, status="not-run", note="not selected (--only)", box_s=TRAIN_BOX)
        return
    step_box = start_step(check, name, 60 if check.dry_run else TRAIN_BOX, 20 if check.dry_run else TRAIN_BOX)
    if step_box is None:
        return
    began = time.monotonic()
    env = {"FASTMETA_CACHE_DIR": str(check.work / "dataset-cache")} if check.dry_run else {}
    if check.dry_run:
        check.run_command(f"{name}:data", [check.python, "-c", SYNTHETIC_OMNIGLOT, str(data)], 60)
    plan = train_plan(check.dry_run, step_box)
    run = check.work / "train-run"
    iterations = plan["iterations"]
    command = [check.python, "-m", "fastmeta", "train", TRAIN_PRESET, "--data", str(data), "--out", str(run),
               "--iterations", str(iterations), "--validate-every", str(iterations),
               "--checkpoint-every", str(iterations), "--test-tasks", str(plan["test_tasks"]), "--no-progress",
               *plan["arguments"]]
    # The run gets the box less the eval's reserve: stopped there (SIGTERM), it checkpoints
    # the iteration it reached, which `fastmeta eval` then tests.
    train_box = max(step_box - (0 if check.dry_run else TRAIN_TEST_S), 10)
    rc, text = check.run_command(name, command, train_box, env)
    measured = train_metrics(run / "metrics.jsonl")
    source = "the run's final test"
    if not measured["test"] and (run / "checkpoint.pt").exists():
        left = step_box - (time.monotonic() - began)
        if left >= 10:
            report = check.work / "train-eval.json"
            eval_command = [check.python, "-m", "fastmeta", "eval", str(run), "--data", str(data),
                            "--tasks", str(plan["test_tasks"]), "--json", str(report), *plan["arguments"][:2]]
            check.run_command(f"{name}:eval", eval_command, left, env)
            if report.exists():
                records = json.loads(report.read_text())["results"]
                measured["test"] = [{k: r[k] for k in ("steps", "accuracy", "ci95", "tasks")} for r in records]
                # The checkpoint's iteration: past the last metrics line when the box stopped it.
                measured["iterations_reached"] = max([measured["iterations_reached"],
                                                      *(r.get("iteration", 0) for r in records)])
                source = "fastmeta eval of the checkpoint the box stopped"
    seconds = round(time.monotonic() - began, 1)
    if measured["test"]:
        check.results["train"] = {"preset": TRAIN_PRESET, "iterations_asked": iterations, **measured,
                                  "test_source": source, "device": check.results["device"].get("name"),
                                  "run_id": check.run_id}
        status = "passed"
        tests = ", ".join(f"{100 * t['accuracy']:.2f} ± {100 * t['ci95']:.2f} % at {t['steps']} steps"
                          for t in measured["test"])
        note = (f"{measured['iterations_reached']} of {iterations} iterations at "
                f"{measured['iterations_per_second'] or 0:.0f} it/s; test ({measured['test'][0]['tasks']} tasks): {tests}")
    else:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        status = "timeout" if rc is None else "failed"
        note = (f"{'killed at its box' if rc is None else f'exit {rc}'}, no test result "
                f"({measured['iterations_reached']} iterations reached): {tail[0][:120]}")
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


def tune_summary(report: dict) -> dict:
    """The table to commit, and per tuned class the plan's median and the best's, from
    bench/tune_tiles.py's JSON (every candidate's timing stays in the step's log)."""
    classes = {}
    for key, tuned in report["classes"].items():
        timed = [c for c in tuned["candidates"] if c["ms"] is not None]
        classes[key] = {"kernel": tuned["kernel"], "calls": tuned["calls"], "timed": len(timed),
                        "plan_ms": timed[0]["ms"] if timed else None,
                        "best_ms": tuned["best"]["ms"] if tuned["best"] else None}
    backends = report.get("backends") or {}
    return {"table": report["table"], "sm_count": report["sm_count"], "classes": classes, "left": report["left"],
            # issue 24, item 4: the CUDA extension's linear GEMMs against the tuned Triton ones
            "preferences": report["table"].get("preferences", {}), "preference_why_none": backends.get("why")}


def train_metrics(path: Path) -> dict:
    """From a run's metrics.jsonl: the iterations reached, the training rate (iterations
    over the run's training seconds) and the test records."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    trained = [r for r in records if r.get("kind") == "train"]
    last = trained[-1] if trained else {}
    seconds = last.get("seconds")
    return {"iterations_reached": last.get("iteration", 0), "train_seconds": seconds,
            "iterations_per_second": last["iteration"] / seconds if seconds else None,
            "test": [{k: r[k] for k in ("steps", "accuracy", "ci95", "tasks")} for r in records
                     if r.get("kind") == "test"]}


MEMCHECK_BOX = 60
PER_MACHINE_STEPS = ("probe", "install", "build", "catalog")  # never carried over by --resume
MEMCHECK_RESERVE = 45  # seconds the bench leaves for memcheck


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Interrupted(Exception):
    pass


class Check:
    """One run of the check: its state, the four output files, and the child processes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry_run = args.dry_run
        self.python = args.python
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        others = sorted(p.name for p in self.out.iterdir() if p.name not in OUT_FILES)
        if others:  # exactly the four files come back: the folder must hold nothing else
            raise SystemExit(f"--out {self.out}: holds other files ({', '.join(others[:5])}); give an empty folder")
        self.work = Path(tempfile.mkdtemp(prefix="fastmeta-gpu-check-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.stream = self.work / "bench.jsonl"
        self.verified_path = self.work / "verified.json"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.lock = threading.RLock()
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.device_type = "dry-run" if self.dry_run else "cuda"
        self.catalog: dict = {}
        self.only = [p for p in (args.only or "").split(",") if p]
        self.run_id = f"{now_iso()}-{os.getpid()}"
        self.results: dict = {
            "schema": SCHEMA,
            "dry_run": self.dry_run,
            "run_id": self.run_id,
            "started": now_iso(),
            "updated": now_iso(),
            "finished": False,
            "interrupted": False,
            "budget_s": args.budget,
            "device": {},
            "runs": [],
            "steps": {},
            "events": [],
            "bench": [],
        }
        self._load_resume(args.resume)
        self.results["runs"].append({"run_id": self.run_id, "started": self.results["started"],
                                     "budget_s": args.budget, "dry_run": self.dry_run})

    # -- resumption --------------------------------------------------------------------

    def _load_resume(self, resume: str | None) -> None:
        repo_record = REPO / "fastmeta" / "backends" / "verified.json"
        record = json.loads(repo_record.read_text()) if repo_record.exists() else {}
        if resume:
            folder = Path(resume)
            earlier = json.loads((folder / "results.json").read_text())
            if earlier.get("schema") != SCHEMA:
                raise SystemExit(f"--resume {resume}: results.json is not a {SCHEMA} file")
            if earlier.get("dry_run") != self.dry_run:
                raise SystemExit(f"--resume {resume}: a {'dry' if earlier.get('dry_run') else 'GPU'} run's results "
                                 f"cannot resume a {'dry' if self.dry_run else 'GPU'} run")
            if (folder / "verified.json").exists():
                earlier_record = json.loads((folder / "verified.json").read_text())
            self.results["runs"] = earlier.get("runs", [])
            self.results["events"] = earlier.get("events", [])
            self.results["bench"] = earlier.get("bench", [])
            if "eager_vs_captured" in earlier:
                self.results["eager_vs_captured"] = earlier["eager_vs_captured"]
            if "precision" in earlier:
                self.results["precision"] = earlier["precision"]
            for key in ("profile", "tune", "train", "kernel_count", "vision"):
                if key in earlier:
                    self.results[key] = earlier[key]
            for name, step in earlier.get("steps", {}).items():
                if name in PER_MACHINE_STEPS:  # a fresh machine needs them again
                    continue
                if step.get("status") in ("passed", "carried", "clean"):
                    self.results["steps"][name] = {**step, "status": "carried",
                                                   "from_run": step.get("from_run", step.get("run_id"))}
        # The working copy starts as the repository's record; what an earlier run verified
        # is added through the record's writer, with that run's date, device and torch.
        write_atomic(self.verified_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        if resume and (Path(resume) / "verified.json").exists():
            for backend, devices in earlier_record.items():
                for dev, kernels in devices.items():
                    for kernel, entry in kernels.items():
                        verification.record(backend, dev, [kernel], entry.get("device", "?"),
                                            torch_version=entry.get("torch", "?"), date=entry.get("date"),
                                            path=self.verified_path)

    def carried(self, name: str) -> bool:
        return self.results["steps"].get(name, {}).get("status") == "carried"

    def selected(self, name: str) -> bool:
        return not self.only or any(fnmatch.fnmatch(name, p) for p in self.only)

    # -- time --------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- output ------------------------------------------------------------------------

    def event(self, kind: str, **fields) -> None:
        with self.lock:
            self.results["events"].append({"t": round(self.elapsed(), 1), "run_id": self.run_id, "event": kind,
                                           **fields})

    def set_step(self, name: str, **fields) -> None:
        with self.lock:
            entry = self.results["steps"].setdefault(name, {})
            entry.update(fields, run_id=self.run_id)

    def publish(self) -> None:
        """Rewrite the four files under --out from the current state (each atomically)."""
        with self.lock:
            self.results["updated"] = now_iso()
            self._merge_stream()
            write_atomic(self.out / "verified.json", self.verified_path.read_bytes())
            write_atomic(self.out / "results.json", (json.dumps(self.results, indent=2) + "\n").encode())
            write_atomic(self.out / "summary.txt", summary(self.results, self.verified_record()).encode())
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(self.logs, arcname="logs")
                if self.stream.exists():
                    tar.add(self.stream, arcname="logs/bench.jsonl")
            write_atomic(self.out / "logs.tar.gz", buffer.getvalue())

    def _merge_stream(self) -> None:
        if not self.stream.exists():
            return
        seen = {(b["run_id"], b["workload"], b["order"], b["contender"]["name"]) for b in self.results["bench"]}
        for line in self.stream.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            record["run_id"] = self.run_id
            key = (self.run_id, record["workload"], record["order"], record["contender"]["name"])
            if key not in seen:
                seen.add(key)
                self.results["bench"].append(record)

    def verified_record(self) -> dict:
        return json.loads(self.verified_path.read_text())

    def record_verified(self, step: str, backend: str, kernels: tuple[str, ...]) -> None:
        with self.lock:
            verification.record(backend, self.device_type, list(kernels), self.results["device"].get("name", "?"),
                                torch_version=self.results["device"].get("torch", "?"), path=self.verified_path)
            self.publish()
            # Read back what was published: the event says how many kernels the file under
            # --out held right after this family was recorded.
            published = json.loads((self.out / "verified.json").read_text())
            count = len(published.get(backend, {}).get(self.device_type, {}))
            self.event("recorded", step=step, backend=backend, kernels=list(kernels), published_kernels=count)

    # -- children ----------------------------------------------------------------------

    def child_env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["FASTMETA_VERIFIED_RECORD"] = str(self.verified_path)
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not take the GPU from torch
        env.update(extra or {})
        return env

    def run_command(self, name: str, command: list[str], box: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run a child in its own process group, its output into logs/<name>.log; kill it
        (the whole group) at its time box. Returns (exit code or None if killed, log text)."""
        log_path = self.logs / (name.replace(":", "_") + ".log")
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n# time box {box:.0f} s, started at {self.elapsed():.1f} s\n".encode())
            log.flush()
            with self.lock:
                if self.stopping:
                    raise Interrupted
                child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.child_env(env), start_new_session=True)
                self.children[name] = child
            try:
                rc = child.wait(timeout=max(box, 1))
            except subprocess.TimeoutExpired:
                kill_group(child)
                rc = None
            finally:
                with self.lock:
                    self.children.pop(name, None)
        if self.stopping:
            raise Interrupted
        return rc, log_path.read_text(errors="replace")

    def stop_children(self) -> None:
        with self.lock:
            self.stopping = True
            children = list(self.children.items())
        for _, child in children:
            kill_group(child)

    # -- steps -------------------------------------------------------------------------

    def run_step(self, step: Step, wait_for: Callable[[str], str] | None = None) -> str:
        """Run one step, record it, publish. Returns its status."""
        name = step.name
        if self.carried(name):
            return "carried"
        if not self.selected(name):
            self.set_step(name, status="not-run", note="not selected (--only)", box_s=step.box, estimate_s=step.estimate)
            return "not-run"
        box = min(step.box, self.left())
        if box < 10:
            self.set_step(name, status="did-not-fit", note=f"{max(self.left(), 0):.0f} s left", box_s=step.box,
                          estimate_s=step.estimate)
            self.publish()
            return "did-not-fit"
        self.set_step(name, status="running", started_at_s=round(self.elapsed(), 1), box_s=step.box,
                      estimate_s=step.estimate)
        self.publish()
        began = time.monotonic()
        rc, text = self.run_command(name, step.command(self), box, step.env)
        seconds = round(time.monotonic() - began, 1)
        if step.judge == "exit":
            status, note = judge_exit(rc, text, box)
        else:
            status, note = judge_pytest(rc, text, step.allow_skips, box)
        if status == "passed" and step.records:
            for need in step.needs:
                need_status = wait_for(need) if wait_for else self.results["steps"].get(need, {}).get("status")
                if need_status not in ("passed", "carried"):
                    status, note = "failed", f"passed, not recorded: {need} {need_status}"
                    break
        records = None
        if status == "passed" and step.records:
            backend, kernels = step.records
            if isinstance(kernels, str):  # a family whose kernels the build reported
                kernels = tuple(self.catalog.get("cuda", {}).get(kernels, ()))
                if not kernels:
                    status, note = "failed", f"passed, but the build registered no {backend} kernel of {step.records[1]}"
            records = (backend, kernels)
        self.set_step(name, status=status, seconds=seconds, note=note)
        if status == "passed" and records:
            self.record_verified(name, *records)
        else:
            self.publish()
        return status


def kill_group(child: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            child.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            continue


def judge_exit(rc: int | None, text: str, box: float) -> tuple[str, str]:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    if rc is None:
        return "timeout", f"killed at its time box ({box:.0f} s); last line: {last[:160]}"
    return ("passed", last[:160]) if rc == 0 else ("failed", f"exit {rc}: {last[:160]}")


def judge_pytest(rc: int | None, text: str, allow_skips: bool, box: float) -> tuple[str, str]:
    """passed | failed | timeout, and a one-line note from pytest's last line."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1].strip("= ") if lines else ""
    if rc is None:
        return "timeout", f"killed at its time box ({box:.0f} s); last line: {last[:160]}"
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", last))
    if rc != 0:
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:3]
        return "failed", f"exit {rc}: {last[:160]}" + ("; " + " | ".join(f[:120] for f in failed) if failed else "")
    if counts.get("passed", 0) == 0:
        return "failed", f"nothing passed: {last[:160]}"
    if counts.get("skipped", 0) and not allow_skips:
        return "failed", f"skipped tests verify nothing: {last[:160]}"
    return "passed", last[:160]


# ---------------------------------------------------------------------------------------
# The phases
# ---------------------------------------------------------------------------------------


PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version()}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda_runtime"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["name"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
except Exception as exc:
    info["torch_error"] = repr(exc)
for module in ("triton", "jax"):
    try:
        info[module] = __import__(module).__version__
    except Exception as exc:
        info[module] = None
print(json.dumps(info))
"""


def probe(check: Check) -> None:
    rc, text = check.run_command("probe", [check.python, "-c", PROBE], 60)
    info = {}
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            info = json.loads(line)
            break
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = out.stdout.strip()
    info["cpu_cores"] = os.cpu_count()
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
        info["nvcc"] = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else None
    info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True).stdout.strip() or None
    with check.lock:
        check.results["device"] = info
        check.results["runs"][-1]["device"] = info.get("name")
    if not check.dry_run and not info.get("cuda_available"):
        check.set_step("probe", status="failed", note="torch sees no CUDA GPU: nothing to check (use --dry-run)")
        check.publish()
        raise SystemExit(2)
    check.publish()


def install(check: Check) -> None:
    """The checkout, installed as the README says (no network there: no dependencies)."""
    if check.dry_run:
        command = [check.python, "-c", "import fastmeta, sys; print('fastmeta', fastmeta.__version__, 'importable')"]
    else:
        command = [check.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]
    if check.run_step(Step("install", 90, 3, lambda c: command, judge="exit")) not in ("passed", "carried"):
        raise SystemExit("gpu_check: the install failed; see logs/install.log")


def parse_tagged_json(text: str, tag: str):
    """The JSON after the last line starting with ``tag`` in a child's output, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(tag + " "):
            try:
                return json.loads(line[len(tag) + 1:])
            except json.JSONDecodeError:
                return None
    return None


def read_catalog(check: Check) -> None:
    """The kernel families and the Triton kernels, from the op table (a child process)."""
    rc, text = check.run_command("catalog", [check.python, "-c", CATALOG], 120)
    catalog = parse_tagged_json(text, "CATALOG") if rc == 0 else None
    if catalog is None:
        check.set_step("catalog", status="failed", note="could not list the op table; see logs/catalog.log")
        check.publish()
        raise SystemExit("gpu_check: the op table could not be listed; see logs/catalog.log")
    check.catalog.update(catalog)
    check.event("catalog", families=sorted(catalog["families"]), triton=sorted(catalog["triton"]))


BUILD = r"""
import json
import torch
from fastmeta.backends import extension as e
from fastmeta.backends.table import TABLE
ok, info = e.build(verbose=True)
assert ok, info
print(e.build_info())
e.define_native_library()
cuda = {{}}
for spec in TABLE.values():
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastmeta_ext::" + spec.name, "CUDA"):
        cuda.setdefault(spec.family, []).append(spec.name)
print("CUDA_KERNELS " + json.dumps(cuda))
if {need_cuda}:
    assert e.build_info()["with_cuda"], "built without CUDA sources: is nvcc on PATH / CUDA_HOME set?"
    ok, why = e.availability("cuda")
    assert ok, why
"""


def build_step(dry_run: bool) -> Step:
    return Step("build", 240, 24, lambda c: [c.python, "-c", BUILD.format(need_cuda=not dry_run)], judge="exit")


def correctness(check: Check) -> None:
    """The build and every family in parallel; a family that needs the build starts when
    it is done. Each records as it passes."""
    steps = correctness_steps(check.dry_run, check.catalog)
    done: dict[str, threading.Event] = {s.name: threading.Event() for s in steps}
    done["build"] = threading.Event()
    build_status: dict[str, str] = {}

    def wait_for(name: str) -> str:
        done[name].wait()
        return check.results["steps"].get(name, {}).get("status", "not-run")

    def run(step: Step) -> None:
        try:
            if "build" in step.needs and step.name != "build":
                if wait_for("build") not in ("passed", "carried"):
                    check.set_step(step.name, status="not-run", note=f"the build {build_status.get('build')}")
                    check.publish()
                    return
            status = check.run_step(step, wait_for)
            if step.name == "build":
                build_status["build"] = status
                log = (check.logs / "build.log").read_text(errors="replace") if (check.logs / "build.log").exists() else ""
                check.catalog["cuda"] = parse_tagged_json(log, "CUDA_KERNELS") or {}
        except Interrupted:
            pass
        except Exception as exc:  # a bug here must not stop the other families
            check.set_step(step.name, status="failed", note=f"driver error: {exc!r}"[:200])
            check.publish()
        finally:
            done[step.name].set()

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in [build_step(check.dry_run), *steps]]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
            if check.stopping:
                return


def bench(check: Check) -> None:
    for name, box, estimate, arguments in bench_plan(check.dry_run):
        if check.carried(name):
            continue
        if not check.selected(name):
            check.set_step(name, status="not-run", note="not selected (--only)", box_s=box, estimate_s=estimate)
            continue
        workload = arguments[arguments.index("--workloads") + 1]
        order = "first" if "--first-order" in arguments else "second"
        skip = sorted(measured(check, workload, order))
        if expected_contenders(arguments, check.dry_run) <= set(skip):
            check.set_step(name, status="carried", note="every row measured by an earlier run on this GPU model")
            continue
        command = [check.python, "-m", "fastmeta.tools.bench", *arguments, "--stream", str(check.stream)]
        if skip:
            command += ["--skip", ",".join(skip)]
        memcheck_pending = check.selected("memcheck") and not check.carried("memcheck")
        room = check.left() - (MEMCHECK_RESERVE if memcheck_pending else 0)
        step_box = min(box, room)
        if step_box < 15:
            check.set_step(name, status="did-not-fit", note=f"{max(room, 0):.0f} s left before memcheck's reserve",
                           box_s=box, estimate_s=estimate)
            check.publish()
            continue
        check.set_step(name, status="running", started_at_s=round(check.elapsed(), 1), box_s=box, estimate_s=estimate)
        check.publish()
        began = time.monotonic()
        rc, text = check.run_command(name, command, step_box)
        seconds = round(time.monotonic() - began, 1)
        check.publish()  # merges the streamed rows
        rows = [b for b in check.results["bench"] if b["run_id"] == check.run_id and b["workload"] == workload
                and b["order"] == order]
        wrong = [b["contender"]["name"] for b in rows
                 if b["contender"]["family"] == "fastmeta" and b["contender"]["status"] in ("WRONG", "error")]
        if rc is None:
            status, note = "timeout", f"killed at its time box ({step_box:.0f} s); rows so far are kept"
        elif wrong:
            status, note = "failed", f"wrong or broken: {', '.join(wrong)}"
        elif rc != 0:
            tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
            status, note = "failed", f"exit {rc}: {tail[0][:160]}"
        else:
            status, note = "passed", f"{len(rows)} rows"
        check.set_step(name, status=status, seconds=seconds, note=note)
        check.publish()


def expected_contenders(arguments: list[str], dry_run: bool) -> set[str]:
    """The rows a bench step's arguments ask for, as the bench names them."""
    backends = [b for b in arguments[arguments.index("--backends") + 1].split(",") if b]
    peers = [p for p in arguments[arguments.index("--peers") + 1].split(",") if p]
    names = {f"fastmeta[{b}]" for b in backends} | set(peers)
    if "auto" in backends and not dry_run:
        names.add("fastmeta[auto]+graph")
    return names


def measured(check: Check, workload: str, order: str) -> set[str]:
    """Contenders of this row already timed on this GPU model (a resumed run skips them)."""
    device = check.results["device"].get("name")
    return {b["contender"]["name"] for b in check.results["bench"]
            if b["workload"] == workload and b["order"] == order and b["device"] == device
            and b["contender"]["status"] in MEASURED and b["contender"].get("median_ms") is not None}


def our_kernel_names() -> set[str]:
    """fastmeta's own kernel names: the Triton @triton.jit functions and the CUDA __global__s."""
    names = set()
    for path in (REPO / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)", path.read_text()))
    for path in (REPO / "csrc" / "cuda").glob("*.cu"):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", path.read_text()))
    return names


def memcheck(check: Check) -> None:
    name = "memcheck"
    if check.carried(name) or not check.selected(name):
        if not check.carried(name):
            check.set_step(name, status="not-run", note="not selected (--only)")
        return
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer",)
         if p.exists()), None)
    if check.dry_run or sanitizer is None:
        why = "dry run: no GPU" if check.dry_run else "compute-sanitizer not found"
        check.set_step(name, status="unavailable", note=why, box_s=MEMCHECK_BOX)
        check.publish()
        return
    box = min(MEMCHECK_BOX, check.left())
    if box < 15:
        check.set_step(name, status="did-not-fit", note=f"{max(check.left(), 0):.0f} s left", box_s=MEMCHECK_BOX)
        check.publish()
        return
    check.set_step(name, status="running", started_at_s=round(check.elapsed(), 1), box_s=MEMCHECK_BOX,
                   estimate_s=18)
    check.publish()
    began = time.monotonic()
    # PyTorch's caching allocator hides out-of-bounds accesses inside its own blocks: the
    # sanitizer sees every buffer exactly only with caching off.
    command = [sanitizer, "--tool", "memcheck", "--leak-check", "no", "--print-limit", "50",
               check.python, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-o", "addopts=",
               "-m", "gpu", *[f"tests/ops/test_{family}.py" for family in sorted(check.catalog.get("families", {}))],
               "-k", "not workload and not gradcheck and not small_tiles"]
    rc, text = check.run_command(name, command, box, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    seconds = round(time.monotonic() - began, 1)
    status, note = judge_memcheck(rc, text, our_kernel_names(), box)
    check.set_step(name, status=status, seconds=seconds, note=note)
    check.publish()


def judge_memcheck(rc: int | None, text: str, ours: set[str], box: float) -> tuple[str, str]:
    """clean | errors | unavailable | timeout. Errors in kernels that are not fastmeta's
    (cuDNN, cuBLAS, ATen) are counted and named, but do not fail fastmeta's check."""
    if "Device not supported" in text or "Unable to find injection library" in text:
        return "unavailable", "compute-sanitizer refused this device or setup"
    summary_match = re.search(r"ERROR SUMMARY: (\d+) error", text)
    # "=========     at [0x... in ]fastmeta::cuda::(anonymous namespace)::inner_step_kernel(...)+0x1a0"
    in_ours, foreign = set(), set()
    for where in re.findall(r"^=+\s+at (.+)$", text, flags=re.M):
        names = set(re.findall(r"\w+", where)) & ours
        if names:
            in_ours |= names
        else:
            foreign.add(re.sub(r"^0x[0-9a-f]+ in ", "", where).split("(")[0].strip()[:60])
    in_ours, foreign = sorted(in_ours), sorted(foreign)
    if in_ours:
        return "errors", f"errors in fastmeta kernels: {', '.join(in_ours)[:200]}"
    if rc is None:
        partial = f"; {summary_match.group(0)} so far" if summary_match else ""
        return "timeout", f"killed at its time box ({box:.0f} s), no error in a fastmeta kernel so far{partial}"
    if summary_match is None:
        return "failed", "no ERROR SUMMARY: the sanitizer did not run the tests"
    note = summary_match.group(0)
    if foreign:
        note += f"; none in fastmeta's kernels (outside them: {', '.join(foreign)[:120]})"
    tests = re.findall(r"(\d+) (passed|failed)", text)
    if tests:
        note += "; tests: " + ", ".join(f"{n} {k}" for n, k in tests[-2:])
    return "clean", note


# ---------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------


def bench_tables(results: dict) -> list[str]:
    lines = []
    rows: dict[tuple, list[dict]] = {}
    for b in results["bench"]:
        rows.setdefault((b["workload"], b["order"], b["device"]), []).append(b)
    for (workload, order, device), records in rows.items():
        lines.append(f"{workload} {order} order on {device} (ms per meta-iteration, median; peak MiB)")
        timed = [r for r in records if r["contender"].get("median_ms") is not None]
        peers = [r for r in timed if r["contender"]["family"] == "peer" and r["contender"]["status"] in MEASURED
                 and r["contender"]["status"] != "WRONG"]
        best_peer = min(peers, key=lambda r: r["contender"]["median_ms"], default=None)
        for r in records:
            c = r["contender"]
            if c.get("median_ms") is None:
                lines.append(f"  {c['name']:<22} {c['status']}: {c.get('note', '')[:100]}")
                continue
            err = f" {c['relative_error']:.1e}" if c.get("relative_error") is not None else ""
            peak = f"{c['peak_mib']:.0f}" if c.get("peak_mib") is not None else "n/a"
            ratio = ""
            if best_peer is not None and c["family"] == "fastmeta":
                p = best_peer["contender"]
                same_run = best_peer["run_id"] == r["run_id"]
                ratio = (f"  {p['median_ms'] / c['median_ms']:.2f}x vs {p['name']}"
                         + ("" if same_run else " (peer from another run)"))
            lines.append(f"  {c['name']:<22} {c['median_ms']:>9.3f}  {c['status']}{err:<9} {peak:>6}{ratio}")
        fm = [r for r in timed if r["contender"]["family"] == "fastmeta" and r["contender"]["status"] in ("ok", "unsettled")]
        best_fm = min(fm, key=lambda r: r["contender"]["median_ms"], default=None)
        target = next((r.get("target_speedup") for r in records if r.get("target_speedup")), None)
        if target is not None:
            if best_fm is None or best_peer is None:
                lines.append(f"  target >= {target:g}x: not measured")
            else:
                ratio = best_peer["contender"]["median_ms"] / best_fm["contender"]["median_ms"]
                lines.append(f"  target >= {target:g}x: {ratio:.2f}x ({best_fm['contender']['name']} against "
                             f"{best_peer['contender']['name']}): {'met' if ratio >= target else 'NOT MET'}")
    return lines


def summary(results: dict, verified: dict) -> str:
    d = results["device"]
    lines = [
        f"fastmeta GPU check{' (DRY RUN on the CPU)' if results['dry_run'] else ''} · run {results['run_id']}",
        f"device: {d.get('name', '?')} · torch {d.get('torch')} · triton {d.get('triton')} · jax {d.get('jax')} · "
        f"CUDA {d.get('cuda_runtime')} · {d.get('nvcc') or 'no nvcc'} · commit {d.get('git_commit')}",
        f"updated {results['updated']} · budget {results['budget_s']} s"
        + (" · INTERRUPTED" if results["interrupted"] else "") + (" · finished" if results["finished"] else ""),
        "",
        "steps (status, seconds / box / H100 estimate, note):",
    ]
    for name, s in results["steps"].items():
        secs = f"{s['seconds']:.0f}" if s.get("seconds") is not None else "-"
        lines.append(f"  {name:<28} {s.get('status', '?'):<12} {secs:>4} / {s.get('box_s', '-')} / "
                     f"{s.get('estimate_s', '-')}  {str(s.get('note', ''))[:110]}")
    lines += ["", "verified kernels (backend on device type):"]
    for backend, devices in sorted(verified.items()):
        for dev, kernels in sorted(devices.items()):
            lines.append(f"  {backend} on {dev}: {', '.join(sorted(kernels))}")
    ratio = results.get("eager_vs_captured")
    if ratio:
        lines += ["", f"eager against captured: {ratio['workload']} {ratio['eager']} {ratio['eager_ms']:.3f} ms / "
                      f"{ratio['captured']} {ratio['captured_ms']:.3f} ms = {ratio['ratio']:.2f}x "
                      f"(target <= {ratio['target']:g}x: {'met' if ratio['met'] else 'NOT MET'})"]
        if ratio.get("eager_without_graphs_ms"):
            lines.append(f"  with meta_batch's CUDA graphs off: {ratio['eager_without_graphs_ms']:.3f} ms = "
                         f"{ratio['ratio_without_graphs']:.2f}x the captured step")
    for label, run in results.get("profile", {}).items():
        lines += ["", f"profile {label} ({run['source']}): {run['total_us']:.0f} µs of kernels per iteration, "
                      f"{run['kernel_launches']:.0f} launches; top kernels:"]
        lines += [f"  {k['share']:6.1%} {k['us']:9.1f} µs {k['calls']:5.1f}x  {k['name'][:80]}" for k in run["kernels"][:8]]
    chosen = results.get("precision")
    if chosen:
        lines += ["", f"matmul precision: the default to set is {chosen['choice']} (passing: "
                      f"{', '.join(m for m, ok in chosen['passing'].items() if ok) or 'none'})"]
        lines += [f"  {r['workload']} {r['mode']:<6} {r['row']:<24} {r['status']:<11} "
                  f"{'-' if r['relative_error'] is None else format(r['relative_error'], '.2e')}"
                  for r in chosen["rows"]]
    tuned = results.get("tune")
    if tuned:
        lines += ["", f"tile sweep: {len(tuned['table']['entries'])} shape classes tuned at {tuned['sm_count']} SMs, "
                      f"{len(tuned['left'])} left to the rule (commit tune.table as kernels/tile_table.json):"]
        for key, c in sorted(tuned["classes"].items(), key=lambda kv: -(kv[1]["plan_ms"] or 0))[:10]:
            if c["best_ms"] is not None and c["plan_ms"] is not None:
                lines.append(f"  {key:<44} plan {c['plan_ms']:.4f} ms, best {c['best_ms']:.4f} ms "
                             f"({c['plan_ms'] / c['best_ms']:.2f}x)")
        for family, p in tuned.get("preferences", {}).items():
            lines.append(f"  auto's first backend for {family} on CUDA: {p['backend']} "
                         f"({', '.join(f'{k} {v:.4f} ms' for k, v in p['ms'].items())}, {p['classes']} classes)")
        if tuned.get("preference_why_none"):
            lines.append(f"  no backend preference measured: {tuned['preference_why_none']}")


    counted = results.get("kernel_count")
    if counted:
        lines += ["", f"kernels per captured {counted['workload']} iteration: recorder {counted['recorder']} "
                      f"({', '.join(f'{k} {v}' for k, v in counted['recorder_by_source'].items())}), captured graph "
                      f"{counted['graph']} ({counted['graph_source']})"]
    seen = results.get("vision")
    if seen:
        lines += ["", f"vision models, {VISION_STEP} (issue 25): meta_batch against the per-task loop "
                      f"(target >= {seen['target']:g}x):"]
        lines += [f"  {s:<12} {r['image']:>3} px, {r['tasks']} tasks: loop {r['loop_ms']:.2f} ms, meta_batch "
                  f"{r['meta_batch_ms']:.2f} ms, {r['speedup']:.2f}x {'met' if r['met'] else 'NOT MET'}"
                  f"{'' if r['matches'] else ' (MISMATCH)'}"
                  for s, r in seen["shapes"].items() if r["speedup"] is not None]
    trained = results.get("train")
    if trained:
        lines += ["", f"train {trained['preset']}: {trained['iterations_reached']} iterations at "
                      f"{trained['iterations_per_second'] or 0:.1f} it/s; test ({trained['test_source']}):"]
        lines += [f"  {t['steps']:>2} steps: {100 * t['accuracy']:.2f} ± {100 * t['ci95']:.2f} % on {t['tasks']} tasks"
                  for t in trained["test"]]
    lines += ["", "bench:"] + (bench_tables(results) or ["  nothing measured yet"])
    pending = [n for n, s in results["steps"].items() if s.get("status") not in ("passed", "carried", "clean",
                                                                                   "unavailable")]
    lines += ["", "left for a resumed run (--resume): " + (", ".join(pending) if pending else "nothing")]
    if len(lines) > SUMMARY_MAX_LINES:
        lines = lines[:SUMMARY_MAX_LINES - 1] + [f"... {len(lines) - SUMMARY_MAX_LINES + 1} more lines in results.json"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where the four files go (default: $OUT)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="an earlier run's folder (results.json, verified.json): carry over what passed")
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}; dry run 600)")
    parser.add_argument("--only", default=None, metavar="STEP,...",
                        help="run only these steps (shell patterns: 'triton:*,bench:W1-*'); others are 'not-run'")
    parser.add_argument("--dry-run", action="store_true", help="the same plumbing on a CPU machine, tiny shapes")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the steps (default: this one)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out: no folder given and $OUT is not set")
    if args.budget is None:
        args.budget = 600 if args.dry_run else DEFAULT_BUDGET_S
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.resume and not (Path(args.resume) / "results.json").is_file():
        parser.error(f"--resume {args.resume}: no results.json there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args)

    def on_signal(signum, frame):
        check.stop_children()
        with check.lock:
            check.results["interrupted"] = True
            for name, s in check.results["steps"].items():
                if s.get("status") == "running":
                    s["status"] = "interrupted"
            check.event("signal", signal=signal.Signals(signum).name)
            check.publish()
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    check.event("start", budget_s=args.budget, resume=args.resume)
    print(f"gpu_check: out={check.out} work={check.work} budget={args.budget:.0f} s"
          f"{' (dry run)' if check.dry_run else ''}", flush=True)
    try:
        probe(check)
        install(check)
        read_catalog(check)
        correctness(check)
        profile(check)
        kernel_count(check)
        eager_vs_captured(check)
        precision(check)
        tune(check)
        bench(check)
        vision(check)
        train(check)
        memcheck(check)
    except Interrupted:
        pass
    with check.lock:
        check.results["finished"] = True
        check.event("end", seconds=round(check.elapsed(), 1))
        check.publish()
    text = (check.out / "summary.txt").read_text()
    print(text, flush=True)
    shutil.rmtree(check.work, ignore_errors=True)
    bad = [n for n, s in check.results["steps"].items() if s.get("status") in ("failed", "errors")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
