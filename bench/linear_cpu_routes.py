"""The CPU's linear layer: the reference (MKL's bmm through torch) against the C++ kernels
(BLAS above the tiny-matrix size, the micro-kernel below; csrc/cpu/blas.h), per public-op
call, at the linear layers of the workloads (fastmeta/tools/workloads.py).

    OMP_NUM_THREADS=1 python bench/linear_cpu_routes.py [--rounds 7] [--calls 20]

Weights and biases are views of a flat ``[T, P]`` buffer, as the engine passes them. Each
op runs under the ``torch`` backend, then the ``cpu`` backend, in turn, in one process;
the figures are medians over rounds of the median call. The measurement behind
``AUTO_PREFERENCE``'s choice for task_linear (docs/benchmarks.md, "Measurements behind code
decisions").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastmeta as fm
from fastmeta import ops

# (T, N, I, O) of the workloads' linear layers.
SHAPES = {
    "W2 head": (32, 5, 256, 5), "W4 head, query": (4, 75, 800, 5), "W4 head, support": (4, 5, 800, 5),
    "OFC 784-256": (32, 5, 784, 256), "OFC 256-128": (32, 5, 256, 128), "OFC 128-64": (32, 5, 128, 64),
    "OFC 64-64": (32, 5, 64, 64), "OFC head": (32, 5, 64, 5), "W2S head": (2, 5, 32, 5),
}


def median_call_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"{'layer (T, N, I, O)':<34} {'op':<12} {'reference µs':>12} {'C++ µs':>8} {'ratio':>6}")
    for name, (T, N, I, O) in SHAPES.items():
        flat = torch.randn(T, 3 + O * I + O)
        w, b = flat[:, 3:3 + O * I].view(T, O, I), flat[:, 3 + O * I:]
        x, g = torch.randn(T, N, I), torch.randn(T, N, O)
        calls = {"forward": lambda: ops.task_linear(x, w, b, "none", 0.0),
                 "input_grad": lambda: ops.task_linear_input_grad(g, w),
                 "weight_grad": lambda: ops.task_linear_weight_grad(g, x, False)}
        for op, fn in calls.items():
            reference, native = [], []
            for _ in range(args.rounds):
                with fm.use_backend("torch"):
                    reference.append(median_call_us(fn, args.calls))
                with fm.use_backend("cpu"):
                    native.append(median_call_us(fn, args.calls))
            r, c = statistics.median(reference), statistics.median(native)
            print(f"{name + ' ' + str((T, N, I, O)):<34} {op:<12} {r:>12.1f} {c:>8.1f} {c / r:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
