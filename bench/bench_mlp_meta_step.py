"""W1 (sinusoid) meta-iterations: the fused meta-step against its peers, in one run.

One meta-iteration = the inner loop of every task, the query loss, the meta-gradient and
an Adam step (torch.optim.Adam, lr 1e-3, fused=True: 45 µs against 133 µs for the
single-tensor loop on this 2-core CPU; every provider uses the same optimizer) on the
MLP's parameters. W1 (docs/benchmarks.md):
T=25 tasks, K=10 support and 10 query examples, MLP 1-40-40-1 ReLU, 1 inner step with
lr 0.01, MSE, second order.

Providers (the same model, data and optimizer step):

- fused-<device>: ``fastmeta.ops.mlp_meta_step`` on the ``cpu`` (or ``cuda``) backend: one
  C++ call for the forward, one for the meta-gradient;
- reference: the same op on the ``torch`` backend (its batched analytic reference);
- unrolled: the inner loop batched over tasks with bmm, differentiated by autograd
  (create_graph) — the test suite's ground truth;
- vmap: torch.func.vmap over tasks of grad + functional_call (the functorch MAML example);
- loop: a per-task Python loop with autograd.grad(create_graph=True) (learn2learn's way).

Usage: ``python bench/bench_mlp_meta_step.py [--device cpu] [--iters 50] [--first-order]
[--json FILE]``. Prints the median ms per meta-iteration and the ratios to the fused one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import fastmeta as fm
from fastmeta.backends import get_backend
from fastmeta.ops.mlp_meta_step import mlp_meta_step, plain_reference_meta_step

# W1, as docs/benchmarks.md defines it.
W1 = dict(tasks=25, support=10, query=10, layer_sizes=[1, 40, 40, 1], act="relu", steps=1, inner_lr=0.01,
          outer_lr=1e-3)


def make_model(layer_sizes):
    layers = []
    for k, (i, o) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
        layers.append(nn.Linear(i, o))
        if k < len(layer_sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_optimizer(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"], fused=True)


def make_data(cfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, K, Q = cfg["tasks"], cfg["support"], cfg["query"]
    amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=g) * torch.pi
    sx = torch.rand(T, K, 1, generator=g) * 10 - 5
    qx = torch.rand(T, Q, 1, generator=g) * 10 - 5
    return [t.to(device) for t in (sx, amp * torch.sin(sx + phase), qx, amp * torch.sin(qx + phase))]


def fused_step(model, opt, data, cfg, first_order, backend, params):
    sx, sy, qx, qy = data
    theta = torch.cat([p.reshape(-1) for p in params])  # its backward hands each parameter its slice
    lr = torch.full((cfg["steps"],), cfg["inner_lr"], device=theta.device)
    with fm.use_backend(backend):
        losses, _ = mlp_meta_step(theta, cfg["layer_sizes"], cfg["act"], 0.0, sx, sy, qx, qy, "mse", lr,
                                  cfg["steps"], first_order)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return loss


def unrolled_step(model, opt, data, cfg, first_order, params):
    sx, sy, qx, qy = data
    theta = torch.cat([p.reshape(-1) for p in params])
    lr = torch.full((cfg["steps"],), cfg["inner_lr"], device=theta.device)
    losses, _ = plain_reference_meta_step(theta, cfg["layer_sizes"], cfg["act"], 0.0, sx, sy, qx, qy, "mse", lr,
                                   cfg["steps"], first_order, create_graph=True)
    loss = losses.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def make_vmap_step(model, cfg, first_order):
    def task_loss(params, x, y):
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def task(params, sx, sy, qx, qy):
        fast = params
        for _ in range(cfg["steps"]):
            g = grad(task_loss)(fast, sx, sy)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            fast = {k: fast[k] - cfg["inner_lr"] * g[k] for k in fast}
        return task_loss(fast, qx, qy)

    batched = vmap(task, in_dims=(None, 0, 0, 0, 0))

    params = dict(model.named_parameters())

    def step(model, opt, data, cfg, first_order):
        loss = batched(params, *data).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def loop_step(model, opt, data, cfg, first_order, params):
    sx, sy, qx, qy = data
    names = [n for n, _ in model.named_parameters()]
    total = 0.0
    for t in range(sx.size(0)):
        fast = params
        for _ in range(cfg["steps"]):
            inner = F.mse_loss(functional_call(model, dict(zip(names, fast)), (sx[t],)), sy[t])
            gs = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [p - cfg["inner_lr"] * g for p, g in zip(fast, gs)]
        total = total + F.mse_loss(functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t])
    loss = total / sx.size(0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def time_providers(steps: dict, iters: int, warmup: int, device: str, clock=time.perf_counter,
                   block: int = 10) -> dict:
    """Median ms per provider. Providers take turns in blocks of `block` iterations, so that
    a change in the machine's load (a shared CI box) hits all of them alike, while each
    block runs with its own working set warm (one iteration per turn measured the fused
    step 50% slower: the peers' allocations evicted it and triggered Python's GC)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    while any(len(t) < iters for t in times.values()):
        for name, fn in steps.items():
            fn()  # re-warm after the other providers' turn
            for _ in range(min(block, iters - len(times[name]))):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append((clock() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated providers to leave out")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: CPU time of this thread (with --threads 1 only): on a shared, loaded "
                         "machine it leaves out the time other processes hold the core")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, dev = W1, args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    backend = "cpu" if dev == "cpu" else "cuda"
    ok, reason = get_backend(backend).available()
    data = make_data(cfg, dev)
    providers = {}
    if ok:
        providers[f"fused-{backend}"] = lambda m, o, p: fused_step(m, o, data, cfg, args.first_order, backend, p)
    else:
        print(f"fused-{backend}: unavailable ({reason})")
    providers["reference"] = lambda m, o, p: fused_step(m, o, data, cfg, args.first_order, "torch", p)
    providers["unrolled"] = lambda m, o, p: unrolled_step(m, o, data, cfg, args.first_order, p)
    providers["loop"] = lambda m, o, p: loop_step(m, o, data, cfg, args.first_order, p)
    skip = set(filter(None, args.skip.split(",")))
    steps = {}
    for name, step in providers.items():
        if name in skip:
            continue
        torch.manual_seed(0)
        model = make_model(cfg["layer_sizes"]).to(dev)
        opt = make_optimizer(model, cfg)
        params = list(model.parameters())  # looked up once, as a learner does
        steps[name] = (lambda step, model, opt, params: (lambda: step(model, opt, params)))(step, model, opt, params)
    if "vmap" not in skip:
        torch.manual_seed(0)
        model = make_model(cfg["layer_sizes"]).to(dev)
        opt = make_optimizer(model, cfg)
        vstep = make_vmap_step(model, cfg, args.first_order)
        steps["vmap"] = lambda: vstep(model, opt, data, cfg, args.first_order)
    if args.clock == "thread" and (dev != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    results = time_providers(steps, args.iters, args.warmup, dev, clock)
    fused = results.get(f"fused-{backend}")
    order = "first" if args.first_order else "second"
    print(f"W1 sinusoid, {order} order, {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median {args.clock} time of {args.iters} meta-iterations (Adam included), load average {_load()}:")
    for name, ms in results.items():
        ratio = f"  ({ms / fused:6.1f}x the fused time)" if fused else ""
        print(f"  {name:14s} {ms:9.3f} ms{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": "W1", "order": order, "device": dev, "torch": torch.__version__,
                       "ms": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
