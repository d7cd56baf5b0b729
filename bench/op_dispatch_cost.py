"""The host cost of one public-op call above its kernel, per op: forward and backward.

    python bench/op_dispatch_cost.py [--repeats 400] [--ops task_linear,inner_step] [--path operator]

Every kernel of the table (fastmeta/backends/table.py), on its family's fp32 sample
(``OpFamily.sample_args``: tiny CPU inputs, so the kernels themselves take a few µs), under
the ``cpu`` backend, one thread. Interleaved in one process, medians of rounds:

- ``fwd``: the public op (the object ``fastmeta.ops.<family>`` defines), no autograd;
- ``native``: the C++ kernel ``torch.ops.fastmeta_ext.<name>`` called directly on the
  launcher's prepared arguments (no public op, no registry); ``fwd − native`` is the
  forward cost above the kernel;
- ``fwd+bwd``: ``torch.autograd.grad`` of every float output (weights of ones) through the
  public op, w.r.t. every float tensor argument; ``bwd = fwd+bwd − fwd(grad)`` where
  ``fwd(grad)`` is the forward with autograd recording, and ``bwd − native bwd`` the
  backward's cost above its kernels. ``native bwd``: the ``fastmeta_ext`` kernels the
  backward calls, timed by torch.profiler (their total CPU time per backward).

Kernels with no C++ CPU kernel (or whose sample the C++ declines) have no ``native``
column: their cost above the kernel is not defined here. The summary line gives the medians
over ops of the two "above the kernel" columns. The last row, for scale, is an aten op
(``torch.bmm``, autograd in C++): its backward "above the kernel" is what
``torch.autograd.grad`` itself costs on the machine, a floor no op goes below. A micro-benchmark of the dispatch, not of
the kernels: see bench/bench_op_overhead.py for the project's op-overhead table.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import fastmeta as fm
from fastmeta.backends import get_backend
from fastmeta.backends.table import FAMILIES, TABLE


def public_op(name: str, path: str = "public"):
    """The public op object of kernel ``name``: what ``fastmeta.ops.<family>`` defines; with
    ``path="operator"``, the dispatcher's operator ``torch.ops.fastmeta.<name>.default``
    (its torch.library registrations: implementation, autograd) instead."""
    if path == "operator":
        return getattr(torch.ops.fastmeta, name).default
    module = importlib.import_module(f"fastmeta.ops.{TABLE[name].family}")
    for value in vars(module).values():
        if getattr(value, "_qualname", None) == f"fastmeta::{name}":
            return value
    return getattr(torch.ops.fastmeta, name)


def timed_rounds(fns: dict, repeats: int, rounds: int) -> dict:
    """µs per call of each fn: medians over ``rounds`` rounds, the fns interleaved per round."""
    for fn in fns.values():
        for _ in range(max(5, repeats // 10)):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[k].append((time.perf_counter() - start) / repeats * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def _float_tensors(args):
    out = []
    for i, a in enumerate(args):
        if torch.is_tensor(a) and a.is_floating_point():
            out.append((i, None))
        elif isinstance(a, list) and a and all(torch.is_tensor(t) and t.is_floating_point() for t in a):
            out.extend((i, j) for j in range(len(a)))
    return out


def _with_leaves(args, slots):
    args = [list(a) if isinstance(a, list) else a for a in args]
    leaves = []
    for i, j in slots:
        if j is None:
            args[i] = args[i].detach().clone().requires_grad_(True)
            leaves.append(args[i])
        else:
            args[i][j] = args[i][j].detach().clone().requires_grad_(True)
            leaves.append(args[i][j])
    return args, leaves


def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if torch.is_tensor(o) and o.requires_grad]


def native_backward_us(fn, iterations: int = 50) -> float:
    """µs per call of fastmeta_ext kernels inside ``fn`` (the profiler's CPU time of them)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            fn()
    total = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("fastmeta_ext::"))
    return total / iterations


def measure(name: str, repeats: int, rounds: int, path: str = "public") -> dict:
    spec = TABLE[name]
    op = public_op(name, path)
    args = FAMILIES[spec.family].sample_args[name]()
    row = {"op": name}
    native_op = getattr(torch.ops.fastmeta_ext, name, None)
    launcher = get_backend("cpu").kernel(name)
    fns = {}
    mutates = "update" in name  # the whole step writes its arguments: forward only
    fns["fwd"] = lambda: op(*args)
    if native_op is not None and launcher is not None and launcher(*args) is not NotImplemented:
        prepared = spec.native.args(*args) if spec.native.args is not None else args
        fns["native"] = lambda: native_op(*prepared)
    slots = [] if mutates else _float_tensors(args)
    if slots:
        grad_args, leaves = _with_leaves(args, slots)
        probe = [o for o in _outputs(op(*grad_args)) if o.numel() > 0]
        try:  # a backward op's own backward may refuse its sample's flags: forward only then
            torch.autograd.grad(probe, leaves, [torch.ones_like(o) for o in probe], allow_unused=True)
        except RuntimeError:
            probe = []
        if probe:
            weights = [torch.ones_like(o) for o in probe]

            def forward_backward():
                outs = [o for o in _outputs(op(*grad_args)) if o.numel() > 0]
                torch.autograd.grad(outs, leaves, weights, allow_unused=True)

            fns["fwd_grad"] = lambda: op(*grad_args)
            fns["fwd+bwd"] = forward_backward
    with torch.no_grad():
        no_grad = {k: v for k, v in fns.items() if k in ("fwd", "native")}
    row.update(timed_rounds({**{k: _no_grad(v) for k, v in no_grad.items()},
                             **{k: v for k, v in fns.items() if k not in no_grad}}, repeats, rounds))
    if "fwd+bwd" in row:
        row["bwd"] = row["fwd+bwd"] - row["fwd_grad"]
        row["native_bwd"] = native_backward_us(fns["fwd+bwd"]) - native_backward_us(fns["fwd_grad"])
    return row


def aten_floor(repeats: int, rounds: int) -> dict:
    """For scale: the same columns for ``torch.bmm`` (an aten op, its autograd in C++) on
    task_linear's sample sizes; its backward kernels are the two bmm of its gradients."""
    x, w = torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    g = torch.ones(2, 3, 4)
    row = timed_rounds({
        "fwd": _no_grad(lambda: torch.bmm(x, w.transpose(1, 2))),
        "native": _no_grad(lambda: torch.bmm(x, w.transpose(1, 2))),
        "fwd_grad": lambda: torch.bmm(xg, wg.transpose(1, 2)),
        "fwd+bwd": lambda: torch.autograd.grad(torch.bmm(xg, wg.transpose(1, 2)), (xg, wg), g),
        "native_bwd": _no_grad(lambda: (torch.bmm(g, w), torch.bmm(g.transpose(1, 2), x))),
    }, repeats, rounds)
    row["bwd"] = row["fwd+bwd"] - row["fwd_grad"]
    return row


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", default="", help="comma-separated kernel names (default: every kernel)")
    parser.add_argument("--path", choices=("public", "operator"), default="public",
                        help="time the public op (default) or the dispatcher's operator torch.ops.fastmeta.<name>")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fm.backends()  # loads the backends (and builds the extension) before timing
    names = [n for n in args.ops.split(",") if n] or list(TABLE)
    print(f"{args.path} path; µs per call, one thread, cpu backend, medians of {args.rounds} interleaved rounds of {args.repeats} "
          f"calls (torch {torch.__version__})")
    header = f"{'op':<36} {'fwd':>7} {'native':>7} {'above':>7} {'fwd(g)':>7} {'bwd':>7} {'nat.bwd':>7} {'above':>7}"
    print(header)
    above_fwd, above_bwd = [], []
    with fm.use_backend("cpu"):
        for name in names:
            r = measure(name, args.repeats, args.rounds, args.path)

            def cell(key):
                return f"{r[key]:>7.1f}" if key in r else f"{'-':>7}"

            fwd_above = r["fwd"] - r["native"] if "native" in r else None
            bwd_above = r["bwd"] - r["native_bwd"] if "bwd" in r and "native" in r else None
            if fwd_above is not None:
                above_fwd.append(fwd_above)
            if bwd_above is not None:
                above_bwd.append(bwd_above)
            fa = f"{fwd_above:>7.1f}" if fwd_above is not None else f"{'-':>7}"
            ba = f"{bwd_above:>7.1f}" if bwd_above is not None else f"{'-':>7}"
            print(f"{name:<36} {cell('fwd')} {cell('native')} {fa} {cell('fwd_grad')} {cell('bwd')} "
                  f"{cell('native_bwd')} {ba}", flush=True)
    floor = aten_floor(args.repeats, args.rounds)
    print(f"{'(scale) aten bmm, C++ autograd':<36} {floor['fwd']:>7.1f} {floor['native']:>7.1f} {0.0:>7.1f} "
          f"{floor['fwd_grad']:>7.1f} {floor['bwd']:>7.1f} {floor['native_bwd']:>7.1f} "
          f"{floor['bwd'] - floor['native_bwd']:>7.1f}")
    if above_fwd:
        print(f"median above the kernel: forward {statistics.median(above_fwd):.1f} µs over {len(above_fwd)} ops; "
              f"backward {statistics.median(above_bwd):.1f} µs over {len(above_bwd)} ops" if above_bwd else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
