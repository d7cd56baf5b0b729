"""What one fastmeta op call costs above its kernel: µs per call, forward and backward.

    python bench/bench_op_overhead.py [--repeats 200] [--rounds 7] [--out bench/results/op_overhead_cpu.md]

Every public op (``fastmeta.ops.__all__`` that is a kernel of the op table), on the CPU, on
the op family's own tiny sample arguments (``OpFamily.sample_args``: the kernel itself is
negligible, the host's cost is what is left), with the ``cpu`` backend (the native C++
kernels) chosen:

- **forward overhead** = the public op's call (``fastmeta.ops.<name>``: the custom-op
  wrapper, the argument checks, the backend lookup, the launcher in Python, the native
  call) − the native kernel called directly (``torch.ops.fastmeta_ext.<name>`` on
  arguments already laid out as the launcher lays them out);
- **backward overhead** = ``torch.autograd.grad`` through the public op's output (the graph
  built once and kept, ``retain_graph=True``: the backward alone is timed) − the native
  backward kernels that this backward runs, called directly. Which native kernels the
  backward runs, and on which arguments, is recorded from one backward beforehand (the
  ``cpu`` backend's launchers, wrapped; for an op with a C++ node, which calls its kernels
  past the launchers, from its Python node's backward, which runs the same kernels on the
  same arguments). Glue aten ops in the backward formula (sums, adds) are overhead: they
  are not kernels of the op.

Inputs have no ``requires_grad`` in the forward rows, so autograd records nothing there.
One process, one thread, interleaved: each round times every measurement of every op in
turn, and each figure is the median over rounds of the mean per call within a round.
An op whose ``cpu`` kernel declines the sample (the reference runs) or has no autograd
gets ``-`` with the reason. A last row, measured in the same rounds and left out of the
medians, is torch's own floor (:func:`floor_case`: ``aten::mul`` and its C++ backward node).
The medians over ops are the issue-23 targets: ≤ 10 µs forward,
≤ 20 µs backward.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastmeta.tools.bench import cpu_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "op_overhead_cpu.md"
FORWARD_TARGET_US, BACKWARD_TARGET_US = 10.0, 20.0


@dataclass
class OpCase:
    """The timed callables of one op; None where that measurement does not apply."""

    name: str
    public: Callable[[], object]
    native: Callable[[], object] | None
    backward: Callable[[], object] | None = None
    native_backward: Callable[[], object] | None = None
    native_backward_kernels: list[str] = field(default_factory=list)
    note: str = ""


def public_ops() -> list[str]:
    """The public ops that are kernels of the op table, in ``fastmeta.ops.__all__`` order."""
    import fastmeta.ops as ops
    from fastmeta.backends.table import TABLE

    return [name for name in ops.__all__ if name in TABLE]


def _native_call(spec, args) -> Callable[[], object]:
    """The native kernel of ``spec`` on ``args`` laid out as its launcher lays them out."""
    op = getattr(torch.ops.fastmeta_ext, spec.name)
    prepared = spec.native.args(*args) if spec.native.args is not None else args
    return lambda: op(*prepared)


def _cpu_kernel_takes(spec, args) -> str:
    """Empty when the ``cpu`` backend runs its native kernel for ``args``; else why not."""
    from fastmeta.backends import get_backend

    backend = get_backend("cpu")
    if backend.kernel(spec.name) is None:
        return "no native cpu kernel"
    if spec.native.takes is not None and not spec.native.takes("cpu", *args):
        return "the cpu kernel declines the sample (the reference runs)"
    return ""


class _RecordNativeCalls:
    """Within the block, every launch of a ``cpu`` backend kernel is recorded with its
    arguments (the backend's launchers wrapped, and restored on exit)."""

    def __init__(self):
        from fastmeta.backends import get_backend, invalidate_kernel_choices
        self._invalidate = invalidate_kernel_choices

        self.backend = get_backend("cpu")
        self.calls: list[tuple[str, tuple]] = []

    def __enter__(self):
        self.saved = dict(self.backend.kernels)
        for name, launch in self.saved.items():
            def recording(*args, name=name, launch=launch):
                out = launch(*args)
                if out is not NotImplemented:
                    self.calls.append((name, args))
                return out
            self.backend.kernels[name] = recording
        self._invalidate()  # the public ops cache their kernel: look the wrappers up
        return self

    def __exit__(self, *exc):
        self.backend.kernels.clear()
        self.backend.kernels.update(self.saved)
        self._invalidate()
        return False


def build_case(name: str) -> OpCase:
    import fastmeta.ops as ops
    from fastmeta.backends.table import FAMILIES, TABLE

    spec = TABLE[name]
    args = FAMILIES[spec.family].sample_args[name]()
    public_op = getattr(ops, name)
    case = OpCase(name=name, public=lambda: public_op(*args), native=None)
    why = _cpu_kernel_takes(spec, args)
    if why:
        case.note = why
        return case
    case.native = _native_call(spec, args)
    if "!" in spec.schema.split("->")[0]:  # Tensor(a!): an argument written in place
        case.note = "mutates its arguments: no autograd"
        return case
    # The backward: with respect to every float tensor argument the op differentiates (an
    # op may refuse some, naming them: those stay constants).
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    recorder, error = None, ""
    for wrt in [floats] + [[i] for i in floats]:
        backward = _backward_through(public_op, args, wrt)
        if backward is None:
            continue
        try:
            # The kernels the backward runs, with their arguments, recorded from the Python
            # node: an op's C++ node (register_native_node) calls the same kernels on the
            # same arguments itself, past the launchers this records
            # (tests/ops/test_native_nodes.py holds the two nodes equal, bit for bit).
            native_node, public_op._native_node = public_op._native_node, None
            try:
                twin = _backward_through(public_op, args, wrt)
            finally:
                public_op._native_node = native_node
            with _RecordNativeCalls() as recording:
                twin()
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
            continue
        recorder = recording
        if wrt != floats:
            names = list(inspect.signature(spec.reference).parameters)
            case.note = "backward w.r.t. " + ", ".join(names[i] for i in wrt) + " (the op refuses the others)"
        break
    if recorder is None:
        case.note = "no argument it differentiates" + (f" (its backward raised: {error})" if error else "")
        return case
    kernels = [_native_call(TABLE[kernel], kernel_args) for kernel, kernel_args in recorder.calls]
    case.backward = backward
    case.native_backward = lambda: [k() for k in kernels]
    case.native_backward_kernels = [kernel for kernel, _ in recorder.calls]
    if not kernels:
        case.note = "; ".join(filter(None, [case.note, "its backward runs no native kernel: all of it is overhead"]))
    return case


FLOOR_NAME = "(torch's floor: aten::mul)"


def floor_case() -> OpCase:
    """What torch itself costs for one op and one backward node written in C++: ``x.mul(2)``
    on a tiny tensor (its forward has no overhead above itself), and ``autograd.grad``
    through it, whose one native backward kernel is one ``mul`` (``MulBackward0``). Its
    backward overhead is the engine's fixed cost of an ``autograd.grad`` call plus one C++
    node: the lowest any op's backward overhead can be by this bench's definition. Measured
    in the same rounds, reported apart, not in the medians."""
    x = torch.randn(3, 5)
    leaf = x.clone().requires_grad_(True)
    out = leaf.mul(2)
    grad = torch.randn_like(out)
    return OpCase(name=FLOOR_NAME, public=lambda: x.mul(2), native=lambda: x.mul(2),
                  backward=lambda: torch.autograd.grad(out, leaf, grad, retain_graph=True),
                  native_backward=lambda: grad.mul(2), native_backward_kernels=["aten::mul"],
                  note="not a fastmeta op: the floor of the backward overhead (engine + one C++ node)")


def _backward_through(public_op, args, wrt: list[int]) -> Callable[[], object] | None:
    """``autograd.grad`` of the op's differentiable outputs with respect to ``args[i]`` for i
    in ``wrt``, on a graph built once and kept; None if the op refuses or nothing depends."""
    leaves = [a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(args)]
    try:
        out = public_op(*leaves)
    except RuntimeError:
        return None
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    if not outs:
        return None
    inputs = [leaves[i] for i in wrt]
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)


def measure(cases: list[OpCase], repeats: int, rounds: int) -> dict[str, dict[str, float]]:
    """µs per call, median over ``rounds`` rounds; every round times every callable of every
    op in turn (interleaved), ``repeats`` calls each, after a warm-up."""
    timed = [(case.name, kind, fn) for case in cases
             for kind, fn in (("public", case.public), ("native", case.native), ("backward", case.backward),
                              ("native_backward", case.native_backward)) if fn is not None]
    for _, _, fn in timed:
        for _ in range(max(3, repeats // 10)):
            fn()
    samples: dict[tuple[str, str], list[float]] = {(n, k): [] for n, k, _ in timed}
    for _ in range(rounds):
        for name, kind, fn in timed:
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[(name, kind)].append((time.perf_counter() - start) / repeats * 1e6)
    out: dict[str, dict[str, float]] = {case.name: {} for case in cases}
    for (name, kind), values in samples.items():
        out[name][kind] = statistics.median(values)
    return out


@dataclass
class OverheadRow:
    name: str
    public_us: float
    native_us: float | None
    forward_overhead_us: float | None
    backward_us: float | None
    native_backward_us: float | None
    backward_overhead_us: float | None
    native_backward_kernels: list[str]
    note: str


def overhead_rows(cases: list[OpCase], timings: dict[str, dict[str, float]]) -> list[OverheadRow]:
    rows = []
    for case in cases:
        t = timings[case.name]
        native, backward, native_backward = t.get("native"), t.get("backward"), t.get("native_backward")
        rows.append(OverheadRow(
            name=case.name, public_us=t["public"], native_us=native,
            forward_overhead_us=None if native is None else t["public"] - native,
            backward_us=backward, native_backward_us=native_backward,
            backward_overhead_us=None if backward is None else backward - (native_backward or 0.0),
            native_backward_kernels=case.native_backward_kernels, note=case.note,
        ))
    return rows


def medians(rows: list[OverheadRow]) -> tuple[float | None, float | None]:
    rows = [r for r in rows if r.name != FLOOR_NAME]
    forward = [r.forward_overhead_us for r in rows if r.forward_overhead_us is not None]
    backward = [r.backward_overhead_us for r in rows if r.backward_overhead_us is not None]
    return (statistics.median(forward) if forward else None, statistics.median(backward) if backward else None)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[OverheadRow], header: str) -> str:
    lines = [header, "",
             "| op | public op µs | native µs | forward overhead µs | autograd.grad µs | native backward µs "
             "| backward overhead µs | native backward kernels | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kernels = ", ".join(r.native_backward_kernels) or "-"
        lines.append(f"| {r.name} | {_cell(r.public_us)} | {_cell(r.native_us)} | {_cell(r.forward_overhead_us)} | "
                     f"{_cell(r.backward_us)} | {_cell(r.native_backward_us)} | {_cell(r.backward_overhead_us)} | "
                     f"{kernels} | {r.note} |")
    forward, backward = medians(rows)
    lines += ["", f"median over ops: forward overhead {_cell(forward)} µs (target ≤ {FORWARD_TARGET_US:g}), "
                  f"backward overhead {_cell(backward)} µs (target ≤ {BACKWARD_TARGET_US:g})"]
    return "\n".join(lines)


def run(repeats: int, rounds: int, ops: list[str] | None = None) -> tuple[list[OverheadRow], str]:
    import fastmeta as fm

    torch.set_num_threads(1)
    fm.backends()  # loads the backends (and builds the extension) before timing
    names = public_ops() if ops is None else ops
    with fm.use_backend("cpu"):
        cases = [build_case(name) for name in names] + [floor_case()]
        timings = measure(cases, repeats, rounds)
    rows = overhead_rows(cases, timings)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = (f"# fastmeta op overhead above the kernel, CPU\n\n{date} · {cpu_name()}, {torch.get_num_threads()} "
              f"thread · torch {torch.__version__} · backend cpu · `python bench/bench_op_overhead.py --repeats "
              f"{repeats} --rounds {rounds}` · µs per call, median of {rounds} interleaved rounds of {repeats} calls")
    return rows, format_table(rows, header)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="calls per round and measurement (default 200)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: every public op)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"markdown table to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1")
    ops = [n.strip() for n in args.ops.split(",") if n.strip()] if args.ops else None
    if ops is not None:
        unknown = sorted(set(ops) - set(public_ops()))
        if unknown:
            parser.error(f"--ops: not public ops of the table: {', '.join(unknown)}")
    _, table = run(args.repeats, args.rounds, ops)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
