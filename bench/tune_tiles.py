"""The tuning sweep of the GEMM-like Triton launches (issue 24, "Tiles that fill the GPU"):
for each shape class of W2–W4, a few configurations (tiles, warps, stages, split-K) timed,
the fastest recorded in the format of the tile table (kernels/tile_table.json).

    python bench/tune_tiles.py [--workloads W2,W3,W4] [--device cuda|cpu] [--tasks T]
                               [--candidates N] [--repeats N] [--budget S] [--sm-count N]
                               [--json FILE]

1. **The launches.** One second-order meta-iteration of each workload on the triton
   backend, each GEMM-like kernel (the conv forward, input and weight gradients, the
   task_linear family) wrapped: the plan of each call (``conv_launch_plan`` /
   ``linear_launch_plan`` at the SM count) names its shape class; the first call of each
   class is kept (its arguments cloned) and the class's issued MACs are summed. The
   backward ops that are one op each (``task_conv2d_backward`` and its double backward,
   ``task_linear_backward`` and its double backward: most of a second-order iteration's
   MACs) are wrapped too and counted by their launches (:func:`component_calls`): each
   launch is kept as a call of the single-GEMM launcher it is, whose tiles the table then
   gives the composed op as well.
2. **The candidates** of a class (:func:`candidates`): the plan's own configuration first
   (the rule's, or the committed table's), the rule's without split-K (its tiles shrunk
   to two waves instead: no second pass), then variants of one setting each: split-K 1,
   halved and doubled; a tile side halved or doubled (16 to 128); warps halved and doubled;
   2 and 4 stages; up to ``--candidates``.
3. **Each candidate** runs the kept call with its configuration forced (the launcher's tile
   rule, ``task_conv2d.conv_config`` or ``task_linear.matmul_config``, replaced for the
   call), is checked against the plan's own output (norm-wise relative error ≤ 1e-5, else
   rejected) and timed: a warm-up call (Triton compiles there), then ``--repeats`` calls,
   each between CUDA events; the median.
4. **The budget.** Classes run in order of their issued MACs, heaviest first, until
   ``--budget`` seconds (counted from the start) are spent; the heaviest class is tuned
   whatever the budget, with two candidates at least. Those left are listed as not tuned
   (they keep the rule).
5. **The CUDA extension against Triton** (issue 24, item 4): every task_linear class's
   kept call also runs on the ``cuda`` backend's kernel (checked against the Triton
   output like a candidate) and is timed the same way. Each backend's medians, weighted by
   the class's calls, are summed; the faster backend goes into the table's
   ``preferences["task_linear"]``, which ``auto`` then tries first on CUDA for the whole
   family (fastmeta.backends.preference_order). Where the ``cuda`` backend is unavailable
   (the dry run on the CPU) no preference is written, and the JSON says why.

The JSON (schema ``fastmeta-tile-tune-1``): ``table``, in kernels/tile_table.json's format
(its entries the fastest candidate of each tuned class, with its median ``ms`` and the
number of candidates timed: commit it as that file); ``classes``, every candidate's median
and status; ``left``, the classes not tuned. ``bench/gpu_check.py`` runs it as its ``tune``
step. On the CPU (its dry run: ``TRITON_INTERPRET=1``, a small ``--sm-count``) the same code
runs under the interpreter and times with ``time.perf_counter``: the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import fastmeta as fm
from fastmeta.backends import get_backend, invalidate_kernel_choices
from fastmeta.kernels import task_conv2d, task_linear, tiles
from fastmeta.tools.bench import device_description, full_fp32
from fastmeta.tools.workloads import find_workload

SCHEMA = "fastmeta-tile-tune-1"
CONV_KERNELS = ("task_conv2d", "task_conv2d_input_grad", "task_conv2d_weight_grad")
LINEAR_KERNELS = ("task_linear", "task_linear_input_grad", "task_linear_weight_grad")
TOLERANCE = 1e-5  # a candidate's output against the plan's, norm-wise
SETTINGS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


def unsplit_config(batch, M, N, K, *, kernel, problems=None, sm_count=None, can_split=True):
    """The rule's tiles where K may not be split: the tiles shrink until two waves instead."""
    return tiles.plan_config(kernel, batch, problems or ((M, K),), N, sm_count, can_split=False)


def plan_of(name: str, args, sm_count: int, split: bool = True):
    """The launch plan of a call at ``sm_count`` SMs (split: False, the rule without split-K)."""
    if name.startswith("task_conv2d"):  # the three conv launchers and the double backward's two-term one
        return task_conv2d.conv_launch_plan(name, *args, sm_count=sm_count,
                                            config_for=task_conv2d.gpu_conv_config if split else unsplit_config)
    return task_linear.linear_launch_plan(name, *args, sm_count=sm_count,
                                          config_for=task_linear.gpu_matmul_config if split else unsplit_config)


def clone(a):
    """A kept call's argument: a copy, an expanded (shared) weight kept expanded."""
    if not isinstance(a, torch.Tensor):
        return a
    if a.dim() > 0 and a.size(0) > 1 and a.stride(0) == 0:
        return a[:1].detach().clone().expand(a.shape)
    return a.detach().clone()


COMPOSED_KERNELS = ("task_conv2d_backward", "task_conv2d_double_backward", "task_linear_backward",
                    "task_linear_double_backward")


def component_calls(name: str, args) -> list[tuple[str, tuple]]:
    """The single-GEMM launcher calls that the launcher ``name`` makes for ``args``, in
    order: itself for a single-GEMM one; for the composed conv ops their launch plans'
    calls (kernels/task_conv2d.py); for the linear pair ops the GEMMs their launchers run
    (kernels/task_linear.py: the input and weight gradients; d grad_out's two products, then
    d x's and d w's, each where its upstream is given and its output wanted)."""
    if name in CONV_KERNELS + LINEAR_KERNELS:
        return [(name, tuple(args))]
    if name in task_conv2d._COMPOSED:
        launches = task_conv2d._COMPOSED[name](*args)
        return [] if launches is None else [(kind, tuple(largs)) for kind, _, largs in launches]
    if name == "task_linear_backward":
        grad_out, x, w, mask = args[:4]
        return ([("task_linear_input_grad", (grad_out, w))] if mask[0] else []) + (
            [("task_linear_weight_grad", (grad_out, x, w.dim() == 2))] if mask[1] else [])
    if name == "task_linear_double_backward":
        g_dx, g_dw, grad_out, x, w, mask = args
        calls = [("task_linear", (a, b, None, "none", 0.0)) for a, b in ((g_dx, w), (x, g_dw))
                 if mask[0] and a is not None and b is not None]
        if mask[1] and g_dw is not None:
            calls.append(("task_linear_input_grad", (grad_out, g_dw)))
        if mask[2] and g_dx is not None:
            calls.append(("task_linear_weight_grad", (grad_out, g_dx, w.dim() == 2)))
        return calls
    raise ValueError(f"not a GEMM-like launcher: {name!r}")


def collect(workload_names, device, tasks, sm_count, progress=print) -> dict:
    """{shape class: {"name", "args", "issued_macs", "calls", "config"}} of one second-order
    meta-iteration of each workload on the triton backend."""
    backend = get_backend("triton")
    backend.kernel("inner_step")  # loads the backend's table
    original = dict(backend.kernels)
    classes: dict = {}

    def record(name, args):
        plan = plan_of(name, args, sm_count)
        if plan is None:
            return
        key = plan.config["shape_class"]
        if key not in classes:
            unsplit = plan_of(name, args, sm_count, split=False)
            classes[key] = {"name": name, "args": [clone(a) for a in args], "issued_macs": 0, "calls": 0,
                            "config": {k: plan.config[k] for k in SETTINGS},
                            "unsplit": {k: unsplit.config[k] for k in SETTINGS}}
        seen = classes[key]
        seen["issued_macs"] += plan.issued_macs
        seen["calls"] += 1

    def recorder(name, fn):
        def run(*args):
            for component, component_args in component_calls(name, args):
                record(component, component_args)
            return fn(*args)

        return run

    wrapped = CONV_KERNELS + LINEAR_KERNELS + COMPOSED_KERNELS
    backend.kernels.update({name: recorder(name, fn) if name in wrapped else fn for name, fn in original.items()})
    invalidate_kernel_choices()
    try:
        for workload_name in workload_names:
            workload = find_workload(workload_name)
            if tasks is not None:
                workload = workload.replace(tasks=tasks)
            torch.manual_seed(0)
            meta = fm.MAML(workload.build_model().to(device), lr=workload.inner_lr, first_order=False,
                           steps=workload.steps, loss=workload.loss, cuda_graphs=False)
            before = len(classes)
            try:
                with fm.use_backend("triton"):
                    meta.meta_batch(*workload.make_batch(device, 0)).loss.backward()
            except Exception as error:  # the classes recorded so far are still swept
                progress(f"{workload.name}: the iteration failed ({type(error).__name__}: {error}"[:300] + ")")
                continue
            progress(f"{workload.name}: {len(classes) - before} new shape classes")
    finally:
        backend.kernels.clear()
        backend.kernels.update(original)
        invalidate_kernel_choices()
    return classes


def candidates(base: dict, limit: int, unsplit: dict | None = None) -> list[dict]:
    """The plan's configuration, the rule's without split-K (``unsplit``: smaller tiles, no
    second pass), then variants of the plan's of one setting each, deduplicated; ``limit``
    in all."""
    bm, bn, split, warps = base["BLOCK_M"], base["BLOCK_N"], base["SPLIT_K"], base["num_warps"]
    variants = [{}, {k: v for k, v in (unsplit or {}).items() if v != base[k]},
                {"SPLIT_K": 1}, {"SPLIT_K": split * 2}, {"SPLIT_K": max(1, split // 2)},
                {"BLOCK_M": bm // 2}, {"BLOCK_N": bn // 2}, {"BLOCK_M": bm * 2}, {"BLOCK_N": bn * 2},
                {"num_warps": warps * 2}, {"num_warps": max(1, warps // 2)}, {"num_stages": 2}, {"num_stages": 4}]
    out = []
    for change in variants:
        cfg = {**base, **change}
        if not all(16 <= cfg[k] <= 128 for k in ("BLOCK_M", "BLOCK_N")) or cfg["num_warps"] > 8:
            continue
        if cfg not in out:
            out.append(cfg)
        if len(out) == limit:
            break
    return out


@contextmanager
def forced(config: dict):
    """The launchers' tile rules replaced by ``config`` (the launch plans make its SPLIT_K whole)."""
    saved = task_conv2d.conv_config, task_linear.matmul_config
    task_conv2d.conv_config = lambda *a, **k: dict(config)
    task_linear.matmul_config = lambda *a, **k: dict(config)
    try:
        yield
    finally:
        task_conv2d.conv_config, task_linear.matmul_config = saved


def launcher(name: str):
    return getattr(task_conv2d if name.startswith("task_conv2d") else task_linear, name)


def median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # compiles
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def tune(classes: dict, device, limit: int, repeats: int, budget_s: float, progress=print) -> tuple[dict, list]:
    """{class: {"kernel", "calls", "issued_macs", "candidates": [{config, ms, status}], "best"}} for
    the classes tuned within the budget (heaviest first), and the classes left."""
    began = time.monotonic()
    tuned, left = {}, []
    for key, seen in sorted(classes.items(), key=lambda kv: -kv[1]["issued_macs"]):
        if tuned and time.monotonic() - began > budget_s:  # the heaviest class is always tuned
            left.append(key)
            continue
        run = launcher(seen["name"])
        with forced(seen["config"]):
            reference = run(*seen["args"]).detach().clone()
        rows = []
        for cfg in candidates(seen["config"], limit, seen.get("unsplit")):
            if len(rows) >= 2 and time.monotonic() - began > budget_s:
                break
            with forced(cfg):
                try:
                    out = run(*seen["args"])
                    error = ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()
                    if not error <= TOLERANCE:
                        rows.append({"config": cfg, "ms": None, "status": f"wrong ({error:.1e})"})
                        continue
                    rows.append({"config": cfg, "ms": median_ms(lambda: run(*seen["args"]), repeats, device),
                                 "status": "ok", "error": error})
                except Exception as error:  # a configuration the compiler refuses (registers, shared memory)
                    rows.append({"config": cfg, "ms": None, "status": f"error: {type(error).__name__}: {error}"[:200]})
        timed = [r for r in rows if r["ms"] is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        tuned[key] = {"kernel": seen["name"], "calls": seen["calls"], "issued_macs": seen["issued_macs"],
                      "candidates": rows, "best": best}
        if best is not None:
            base_ms = timed[0]["ms"] if timed[0]["config"] == seen["config"] else None
            gain = f", {base_ms / best['ms']:.2f}x the plan's" if base_ms else ""
            progress(f"{key}: {len(timed)} timed, best {best['ms']:.4f} ms{gain} {best['config']}")
    return tuned, left


def compare_backends(classes: dict, tuned: dict, device, repeats: int, rival: str = "cuda",
                     progress=print) -> tuple[dict, dict]:
    """Step 5 (module docstring): ({"task_linear": {"backend", "ms": {"triton": total,
    rival: total}, "classes": n}} or {}, {"rival", "classes": per-class medians, "why"}).
    Each total is Σ median × calls over the linear classes both backends ran, Triton at the
    class's best candidate (the plan's configuration where the class was not tuned)."""
    backend = get_backend(rival)
    ok, reason = backend.available()
    report = {"rival": rival, "classes": {}, "why": None}
    if not ok or device.type not in backend.device_types():
        report["why"] = f"the {rival} backend does not run on {device.type} here: {reason or 'another device'}"
        return {}, report
    totals = {"triton": 0.0, rival: 0.0}
    for key, seen in sorted(classes.items()):
        if seen["name"] not in LINEAR_KERNELS:
            continue
        kernel = backend.kernel(seen["name"])
        best = (tuned.get(key) or {}).get("best")
        config = best["config"] if best else seen["config"]
        run = launcher(seen["name"])
        with forced(config):
            reference = run(*seen["args"]).detach().clone()
            triton_ms = best["ms"] if best else median_ms(lambda: run(*seen["args"]), repeats, device)
        row = {"triton_ms": triton_ms, "calls": seen["calls"]}
        out = kernel(*seen["args"]) if kernel is not None else NotImplemented
        if out is NotImplemented:
            row["status"] = f"the {rival} backend has no kernel for it, or declines it"
        else:
            error = ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()
            if not error <= TOLERANCE:
                row["status"] = f"wrong ({error:.1e})"
            else:
                row.update(status="ok", error=error,
                           rival_ms=median_ms(lambda: kernel(*seen["args"]), repeats, device))
                totals["triton"] += triton_ms * seen["calls"]
                totals[rival] += row["rival_ms"] * seen["calls"]
        report["classes"][key] = row
    compared = sum(r["status"] == "ok" for r in report["classes"].values())
    if not compared:
        report["why"] = f"no task_linear launch that both triton and {rival} ran"
        return {}, report
    faster = min(totals, key=totals.get)
    progress(f"task_linear: triton {totals['triton']:.4f} ms, {rival} {totals[rival]:.4f} ms over {compared} "
             f"classes: {faster} first")
    return {"task_linear": {"backend": faster, "ms": {k: round(v, 5) for k, v in totals.items()},
                            "classes": compared}}, report


def table_of(tuned: dict, sm_count: int, device_name: str, preferences: dict | None = None) -> dict:
    """The fastest candidate of each tuned class, and the measured backend preferences
    (:func:`compare_backends`), in kernels/tile_table.json's format."""
    entries = {key: {**{k: t["best"]["config"][k] for k in SETTINGS}, "ms": round(t["best"]["ms"], 5),
                     "candidates": sum(r["ms"] is not None for r in t["candidates"])}
               for key, t in sorted(tuned.items()) if t["best"] is not None}
    table = {"schema": tiles.TABLE_SCHEMA, "sm_count": sm_count, "device": device_name,
             "note": "written by bench/tune_tiles.py (bench/gpu_check.py's tune step)", "entries": entries}
    if preferences:
        table["preferences"] = preferences
    return tiles.check_table(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/tune_tiles.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W2,W3,W4", metavar="W2,...")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    parser.add_argument("--tasks", type=int, default=None, metavar="T", help="override the tasks per meta-batch")
    parser.add_argument("--candidates", type=int, default=6, metavar="N", help="configurations per class (default 6)")
    parser.add_argument("--repeats", type=int, default=20, metavar="N", help="timed calls per candidate (default 20)")
    parser.add_argument("--budget", type=float, default=150.0, metavar="S", help="seconds for the sweep (default 150)")
    parser.add_argument("--sm-count", type=int, default=None, metavar="N",
                        help="plan for N SMs (default: the GPU's; on the CPU an H100's)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the table and every timing as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sm_count = args.sm_count or tiles.device_sm_count(device) or tiles.H100_SM_COUNT
    began = time.monotonic()
    with full_fp32(), tiles.planned_for_sm_count(sm_count):
        classes = collect([w for w in args.workloads.split(",") if w], device, args.tasks, sm_count,
                          progress=lambda line: print(line, flush=True))
        left_s = args.budget - (time.monotonic() - began)
        tuned, left = tune(classes, device, args.candidates, args.repeats, left_s,
                           progress=lambda line: print(line, flush=True))
        preferences, rivalry = compare_backends(classes, tuned, device, args.repeats,
                                                progress=lambda line: print(line, flush=True))
        if rivalry["why"]:
            print(f"no backend preference: {rivalry['why']}", flush=True)
    description = device_description(device)
    table = table_of(tuned, sm_count, description.get("name"), preferences)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "schema": SCHEMA, "device": description, "sm_count": sm_count, "workloads": args.workloads,
            "tasks": args.tasks, "seconds": round(time.monotonic() - began, 1), "table": table,
            "classes": tuned, "left": left, "backends": rivalry}, indent=2) + "\n")
    print(f"TUNE_RESULT {json.dumps({'classes': len(classes), 'tuned': len(table['entries']), 'left': len(left)})}",
          flush=True)
    return 0 if classes and table["entries"] else 1


if __name__ == "__main__":
    sys.exit(main())
