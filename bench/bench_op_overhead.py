"""What one fastmeta op call costs beyond its kernel: µs per call, forward and backward.

    python bench/bench_op_overhead.py [--repeats 2000]

For each op, on tiny CPU inputs (so the kernel itself is negligible), in one process and
interleaved: the public op (``torch.ops.fastmeta.*``: the custom-op wrapper, the backend
registry, the launcher's checks and the native call), the native kernel called directly
(``torch.ops.fastmeta_ext.*``, no autograd, no registry), and, for scale, one aten op of
the same size (``torch.add``). The backward row times ``torch.autograd.grad`` through the
public op. Medians of rounds of calls; the per-call overhead is the public op's time minus
the native kernel's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastmeta as fm
from fastmeta import ops


def per_call_us(fn, repeats: int, rounds: int = 7) -> float:
    for _ in range(max(10, repeats // 20)):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fm.backends()  # loads the backends (and builds the extension) before timing
    T, N, I, O = 2, 3, 4, 5
    x, w, b = torch.randn(T, N, I), torch.randn(T, O, I), torch.randn(T, O)
    pred, target = torch.randn(T, N, O), torch.randint(0, O, (T, N))
    theta, grad, lr = torch.randn(T, 16), torch.randn(T, 16), torch.tensor(0.1)
    native = torch.ops.fastmeta_ext
    cases = [
        ("task_linear", lambda: ops.task_linear(x, w, b, "relu", 0.0), lambda: native.task_linear(x, w, b, "relu", 0.0),
         (x, w, b), lambda x, w, b: ops.task_linear(x, w, b, "relu", 0.0)),
        ("task_loss", lambda: ops.task_loss(pred, target, "cross_entropy"),
         lambda: native.task_loss(pred, target, "cross_entropy"), (pred,),
         lambda p: ops.task_loss(p, target, "cross_entropy")),
        ("inner_step", lambda: ops.inner_step(theta, grad, lr, None, None, None),
         lambda: native.inner_step(theta, grad, lr, None, None, None), (theta, grad),
         lambda t, g: ops.inner_step(t, g, lr, None, None, None)),
    ]
    print(f"µs per call, one thread, medians of 7 rounds of {args.repeats} calls (torch {torch.__version__})")
    print(f"{'op':<14} {'public op':>10} {'native':>8} {'overhead':>9} {'backward':>9}   (torch.add: "
          f"{per_call_us(lambda: torch.add(x, x), args.repeats):.1f})")
    with fm.use_backend("cpu"):
        for name, public, direct, inputs, differentiable in cases:
            leaves = [t.clone().requires_grad_(True) for t in inputs]

            def backward():
                out = differentiable(*leaves)
                torch.autograd.grad(out.sum(), leaves)

            public_us, native_us = per_call_us(public, args.repeats), per_call_us(direct, args.repeats)
            backward_us = per_call_us(backward, args.repeats // 4)
            print(f"{name:<14} {public_us:>10.1f} {native_us:>8.1f} {public_us - native_us:>9.1f} {backward_us:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
