"""The CPU BatchNorm kernels at W2's four layer sizes (32 tasks × 5 examples × 64 channels),
one thread: median ms of 20 calls of the extension's ops (forward with relu, backward with
y, relu and a dx addend, double backward with y and every upstream), and a copy of x for
scale. Run with PYTHONPATH=<tree> to time another checkout's kernels:

    PYTHONPATH=/path/to/tree OMP_NUM_THREADS=1 python bn_kernels.py
"""
import time

import torch

from fastmeta.backends import extension

extension.build()
ext = torch.ops.fastmeta_ext
torch.set_num_threads(1)


def median_ms(f, reps=20):
    for _ in range(3):
        f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


for shape in [(32, 5, 64, 14, 14), (32, 5, 64, 7, 7), (32, 5, 64, 4, 4), (32, 5, 64, 2, 2)]:
    x, g, y = torch.randn(shape), torch.randn(shape), torch.relu(torch.randn(shape))
    gamma, beta, addend, up = torch.randn(32, 64), torch.randn(32, 64), torch.randn(shape), torch.randn(shape)
    forward = median_ms(lambda: ext.task_batch_norm(x, gamma, beta, 1e-5, "relu", 0.01))
    backward = median_ms(lambda: ext.task_batch_norm_backward(g, x, gamma, 1e-5, [True, True, True], y, "relu", 0.01,
                                                              addend, None))
    double = median_ms(lambda: ext.task_batch_norm_double_backward(g, x, gamma, up, gamma, beta, 1e-5,
                                                                   [True, True, True], y, "relu", 0.01))
    n = x.numel()
    print(shape, f"fwd {forward:.3f} ms ({forward * 1e6 / n:.2f} ns/el)  bwd {backward:.3f} ({backward * 1e6 / n:.2f})  "
          f"dbl {double:.3f} ({double * 1e6 / n:.2f})  copy {median_ms(lambda: x.clone()):.3f}")
