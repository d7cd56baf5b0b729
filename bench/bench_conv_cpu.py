"""Per-task convolutions on the CPU: the C++ kernels (im2col + GEMM, csrc/cpu/task_conv2d.cpp)
against the reference's grouped convolution, at W2's and W4's layer shapes, in one run.

For each conv layer of the workload's conv4 (the shapes of
``fastmeta.tools.workloads.WORKLOAD_OP_SHAPES`` and the layers after them) and each of the
three kernels (forward, input_grad, weight_grad), the public op runs on the ``torch``
backend (``groups=T`` grouped convolution, oneDNN) and on the ``cpu`` backend, interleaved
(torch, cpu, torch, cpu, ...), with per-task weights as views of the flat [T, P] buffer
and a per-task bias, as the engine calls them. Prints the median ms of each and the ratio
torch / cpu (> 1: the C++ kernel is faster), per kernel and summed per workload.

Usage: ``python bench/bench_conv_cpu.py [--workloads W2,W4] [--reps 7] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import fastmeta as fm
from fastmeta.backends import get_backend
from fastmeta.ops import task_conv2d, task_conv2d_input_grad, task_conv2d_weight_grad
from fastmeta.tools.workloads import WORKLOAD_OP_SHAPES, WORKLOADS

BACKENDS = ("torch", "cpu")
KERNELS = ("forward", "input_grad", "weight_grad")


def layer_shapes(workload: str) -> list[dict]:
    """The listed conv shapes of the workload, then its conv4's later layers (strided:
    each halves the map; pool: max-pooling halves it between layers), same T, N, O."""
    listed = list(WORKLOAD_OP_SHAPES[workload]["task_conv2d"])
    last = listed[-1]
    strided = WORKLOADS[workload].model_args["variant"] == "strided"
    shapes, size = list(listed), last["H"]
    while len(shapes) < 4:
        size = (size + 2 * last["padding"] - 3) // last["stride"] + 1 if strided else size // 2
        shapes.append({**last, "C": last["O"], "H": size, "W": size})
    return shapes


def make_calls(shape: dict):
    T, N, C, H, W, O = (shape[k] for k in ("T", "N", "C", "H", "W", "O"))
    s, p = [shape["stride"]] * 2, [shape["padding"]] * 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, N, C, H, W, generator=g)
    flat = torch.randn(T, O * C * 9 + O + 7, generator=g)  # the flat buffer: weights, bias, more
    w = flat[:, : O * C * 9].view(T, O, C, 3, 3)
    b = flat[:, O * C * 9: O * C * 9 + O]
    y = task_conv2d(x, w, b, s, p)
    gy = torch.randn(y.shape, generator=g)
    return {
        "forward": lambda: task_conv2d(x, w, b, s, p),
        "input_grad": lambda: task_conv2d_input_grad(gy, w, [H, W], s, p),
        "weight_grad": lambda: task_conv2d_weight_grad(gy, x, [3, 3], s, p, False),
    }


def measure(fn, backend: str) -> float:
    with fm.use_backend(backend):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W2,W4")
    parser.add_argument("--reps", type=int, default=7, help="timed samples per backend (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results as JSON")
    args = parser.parse_args()
    ok, reason = get_backend("cpu").available()
    if not ok:
        raise SystemExit(f"the cpu backend is unavailable: {reason}")

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for workload in args.workloads.split(","):
        for layer, shape in enumerate(layer_shapes(workload), 1):
            calls = make_calls(shape)
            for kernel in KERNELS:
                fn = calls[kernel]
                for _ in range(args.warmup):
                    for backend in BACKENDS:
                        measure(fn, backend)
                samples = {backend: [] for backend in BACKENDS}
                for _ in range(args.reps):
                    for backend in BACKENDS:
                        samples[backend].append(measure(fn, backend))
                median = {backend: statistics.median(v) for backend, v in samples.items()}
                row = {"workload": workload, "layer": layer, "shape": shape, "kernel": kernel,
                       "torch_ms": median["torch"], "cpu_ms": median["cpu"],
                       "ratio": median["torch"] / median["cpu"]}
                rows.append(row)
                dims = "T{T} N{N} C{C} {H}x{W} -> O{O} s{stride}".format(**shape)
                print(f"{workload} layer {layer} ({dims}) {kernel:11s}: torch {row['torch_ms']:9.2f} ms  "
                      f"cpu {row['cpu_ms']:9.2f} ms  ratio {row['ratio']:5.2f}", flush=True)
    print()
    for workload in args.workloads.split(","):
        for kernel in KERNELS + ("all",):
            mine = [r for r in rows if r["workload"] == workload and (kernel == "all" or r["kernel"] == kernel)]
            torch_ms, cpu_ms = sum(r["torch_ms"] for r in mine), sum(r["cpu_ms"] for r in mine)
            print(f"{workload} {kernel:11s} summed over layers: torch {torch_ms:9.2f} ms  cpu {cpu_ms:9.2f} ms  "
                  f"ratio {torch_ms / cpu_ms:5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
