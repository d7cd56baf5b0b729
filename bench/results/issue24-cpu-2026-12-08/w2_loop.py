"""W2's plain user loop (meta_batch, backward, torch's Adam), one thread: median and min ms
of N iterations after 3 warm-ups. PYTHONPATH=<tree> times another checkout:

    PYTHONPATH=/path/to/tree OMP_NUM_THREADS=1 python w2_loop.py W2 25
"""
import sys
import time

import torch

import fastmeta as fm
from fastmeta.tools.bench_peers import ADAM_LR
from fastmeta.tools.workloads import find_workload

torch.set_num_threads(1)
workload = find_workload(sys.argv[1] if len(sys.argv) > 1 else "W2")
torch.manual_seed(0)
meta = fm.MAML(workload.build_model(), lr=workload.inner_lr, first_order=False, steps=workload.steps,
               loss=workload.loss)
batch = tuple(workload.make_batch("cpu", 0))
optimizer = torch.optim.Adam(meta.parameters(), ADAM_LR)


def step():
    out = meta.meta_batch(*batch)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()


for _ in range(3):
    step()
times = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 20):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
times.sort()
print(f"median {times[len(times) // 2] * 1e3:.1f} ms  min {times[0] * 1e3:.1f}")
