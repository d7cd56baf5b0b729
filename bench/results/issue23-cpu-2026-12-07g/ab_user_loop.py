"""The user loop (meta_batch, loss.backward(), torch.optim.Adam with its defaults) per
iteration, one thread, on W4S's shape (W2S with W4's BatchNorm -> ReLU -> max-pool blocks),
run against the old and the new tree in turn (PYTHONPATH=<tree>), as bench/RESULTS.md says:

    PYTHONPATH=<tree> OMP_NUM_THREADS=1 python ab_user_loop.py OUT.json 7

Prints, per round, the median of 40 iterations (8 batches of new tensors, in turn)."""
import json, sys, time, dataclasses
import torch
import fastmeta as fm
from fastmeta.tools.workloads import HOST_COST_WORKLOADS
torch.set_num_threads(1)
w2s = HOST_COST_WORKLOADS["W2S"]
cases = {
    "pool-structure": (dataclasses.replace(w2s, name="W4S", model_args={**w2s.model_args, "variant": "pool"}), "maml"),
}
out = {}
for name, (w, learner) in cases.items():
    torch.manual_seed(0)
    model = w.build_model()
    if learner == "maml":
        meta = fm.MAML(model, lr=w.inner_lr, steps=w.steps, loss=w.loss)
    else:
        meta = fm.ModelAwareMAML(model, lr=w.inner_lr, steps=w.steps, loss=w.loss)  # per-parameter, per-step rates
    opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
    batches = [w.make_batch("cpu", s) for s in range(8)]
    def step(b):
        opt.zero_grad(set_to_none=True)
        o = meta.meta_batch(*b)
        o.loss.backward()
        opt.step()
    for i in range(10): step(batches[i % 8])
    meds = []
    for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 7):
        ts = []
        for i in range(40):
            t0 = time.perf_counter(); step(batches[i % 8]); ts.append(time.perf_counter() - t0)
        ts.sort(); meds.append(ts[len(ts) // 2] * 1e3)
    out[name] = meds
    print(name, "median-of-40 per round (ms):", " ".join(f"{m:.3f}" for m in meds), "min", f"{min(meds):.3f}")
json.dump(out, open(sys.argv[1], "w"), indent=1)
