"""W1's user loop part by part (zero_grad, meta_batch, loss.backward(), torch's Adam.step),
medians of 400 iterations after 50 warm-up, one thread; then the native kernels' and the
optimizer's average times from torch.profiler over 50 iterations (bench/RESULTS.md, the
eighth session of 2026-12-07):

    OMP_NUM_THREADS=1 python w1_parts.py
"""
import time, torch, fastmeta as fm
from fastmeta.tools.workloads import find_workload
torch.set_num_threads(1)
w = find_workload("W1"); torch.manual_seed(0)
meta = fm.MAML(w.build_model(), lr=w.inner_lr, steps=w.steps, loss=w.loss)
opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
batches = [w.make_batch("cpu", s) for s in range(8)]
parts = {"meta_batch": [], "backward": [], "Adam.step": [], "zero_grad": []}
def step(b, rec):
    t0 = time.perf_counter(); opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter(); o = meta.meta_batch(*b)
    t2 = time.perf_counter(); o.loss.backward()
    t3 = time.perf_counter(); opt.step(); t4 = time.perf_counter()
    if rec:
        for k, a, c in (("zero_grad", t0, t1), ("meta_batch", t1, t2), ("backward", t2, t3), ("Adam.step", t3, t4)):
            parts[k].append((c - a) * 1e3)
for i in range(50): step(batches[i % 8], False)
for i in range(400): step(batches[i % 8], True)
tot = 0
for k, v in parts.items():
    v.sort(); m = v[len(v)//2]; tot += m; print(f"{k:12s} {m:.3f} ms")
print("sum of medians", round(tot, 3))
# the native fused kernel alone
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for i in range(50): step(batches[i % 8], False)
for e in p.key_averages():
    if e.key.startswith("fastmeta_ext::") or e.key.startswith("Optimizer"):
        print(e.key, round(e.cpu_time_total / e.count / 1e3, 3), "ms avg x", e.count // 50)
