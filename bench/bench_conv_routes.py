"""The CPU convolution's two routes, side by side: im2col + GEMM and oneDNN
(csrc/cpu/task_conv2d.cpp, ``FASTMETA_CPU_CONV``), and what the ``auto`` rule picks.

    python bench/bench_conv_routes.py [--reps 5] [--json FILE]

The route is read once per process, so each route runs in a child process of its own
(``FASTMETA_CPU_CONV=im2col``, ``onednn``, ``auto``), one thread, on the same shapes and
seeds: per-task weights ``[T, O, C, k, k]``, the ``cpu`` backend, the public ops
(``task_conv2d``; ``task_conv2d_backward`` with one output asked for, for the input and the
weight gradient). Each figure is the median ms over ``--reps`` calls after two warm-up
calls. The shapes are the layers of W2, OmniglotCNN at 25 queries, CNN4 and ResNet-12 at
32×32, and W4; the ``auto`` column should be the faster of the two on every row (the rule's
table in task_conv2d.cpp comes from this command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (T, N, C, O, H, stride, k): the per-task convolutions of the vision workloads.
SHAPES = [
    (32, 5, 1, 64, 28, 2, 3),     # W2 / OmniglotCNN, first layer
    (32, 5, 64, 64, 14, 2, 3),    # W2, second layer
    (32, 5, 64, 64, 7, 2, 3),     # W2, third layer
    (16, 25, 64, 64, 14, 2, 3),   # OmniglotCNN's query set, second layer
    (16, 25, 64, 64, 16, 1, 3),   # CNN4 at 32x32, second layer (query set)
    (16, 5, 64, 160, 16, 1, 3),   # ResNet-12, second stage
    (16, 5, 64, 160, 32, 1, 1),   # ResNet-12, a 1x1 shortcut
    (16, 25, 320, 640, 4, 1, 3),  # ResNet-12, last stage (query set)
    (4, 75, 32, 32, 42, 1, 3),    # W4, second layer
]
PASSES = ("forward", "input_grad", "weight_grad")
ROUTES = ("im2col", "onednn", "auto")


def child(reps: int) -> None:
    """Times every shape and pass under this process's route; prints one JSON line."""
    import torch

    import fastmeta as fm
    from fastmeta.ops import task_conv2d, task_conv2d_backward

    torch.set_num_threads(1)
    out = {}
    for shape in SHAPES:
        T, N, C, O, H, stride, k = shape
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, N, C, H, H, generator=g)
        w = torch.randn(T, O, C, k, k, generator=g)
        s, p = [stride, stride], [k // 2, k // 2]
        with fm.use_backend("cpu"):
            gy = torch.randn(task_conv2d(x, w, None, s, p).shape, generator=g)
            calls = {
                "forward": lambda: task_conv2d(x, w, None, s, p),
                "input_grad": lambda: task_conv2d_backward(gy, x, w, s, p, [True, False]),
                "weight_grad": lambda: task_conv2d_backward(gy, x, w, s, p, [False, True]),
            }
            row = {}
            for name, fn in calls.items():
                fn()
                fn()
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - start) * 1e3)
                row[name] = statistics.median(times)
        out[",".join(map(str, shape))] = row
    print(json.dumps(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.reps)
        return 0
    results = {}
    for route in ROUTES:
        env = {**os.environ, "FASTMETA_CPU_CONV": route, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results[route] = json.loads(done.stdout.strip().splitlines()[-1])
    print("| T, N, C→O, H, stride, k | MMAC per task | " + " | ".join(
        f"{p} im2col / oneDNN / auto ms" for p in PASSES) + " |")
    print("|---|---|" + "---|" * len(PASSES))
    worse = 0
    for shape in SHAPES:
        key = ",".join(map(str, shape))
        T, N, C, O, H, stride, k = shape
        ho = (H + 2 * (k // 2) - k) // stride + 1
        cells = []
        for p in PASSES:
            a, b, c = (results[r][key][p] for r in ROUTES)
            slower = c > 1.1 * min(a, b)  # auto more than 10% behind the better route
            worse += slower
            cells.append(f"{a:.2f} / {b:.2f} / {c:.2f}{' (!)' if slower else ''}")
        print(f"| {T}, {N}, {C}→{O}, {H}, {stride}, {k} | {N * O * C * k * k * ho * ho / 1e6:.1f} | "
              + " | ".join(cells) + " |")
    print(f"\nauto more than 10% behind the faster route on {worse} of {len(SHAPES) * len(PASSES)} cells (marked (!))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shapes": SHAPES, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
