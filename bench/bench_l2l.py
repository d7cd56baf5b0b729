"""The learn2learn drop-in against the loop it replaces (issue 13), one process, one thread.

    python bench/bench_l2l.py [--shapes sine,omniglot] [--samples 15] [--contenders loop,clone/adapt,...]
                              [--json FILE]

An older fastmeta runs the same bench from an export of its commit (the loop is the
common reference):

    git archive COMMIT fastmeta csrc kernels | tar -x -C /tmp/fastmeta-COMMIT
    PYTHONPATH=/tmp/fastmeta-COMMIT python bench/bench_l2l.py --contenders loop,clone/adapt

Two shapes, each with the model written as a custom ``nn.Module`` (not ``nn.Sequential``):

- sine: 16 tasks × 5 inner steps, MLP 1-40-40-1, 10 support and 10 query points, lr 0.01,
  MSE (learn2learn's sine example);
- omniglot: 32 tasks × 1 inner step, conv4 (4 × [Conv 3×3 stride 2 → BatchNorm → ReLU],
  64 channels, 28×28 inputs) with a linear head, 5-way 1-shot (5 support, 5 query), lr
  0.4, cross-entropy (learn2learn's Omniglot example).

Contenders, each a full second-order meta-iteration (every task's inner loop, query
loss, backward, one Adam step on the model's parameters):

- ``loop``: the reference loop (plain autograd, task by task), ``torch.func.functional_call`` + ``torch.autograd.grad``
  (``create_graph=True``), each task's query loss backpropagated as soon as it is computed,
  as learn2learn's examples do. BatchNorm: the module's own behaviour (training mode).
- ``clone/adapt``: the same loop written against ``fm.MAML``'s learn2learn API, BatchNorm
  transductive (the default); ``clone/adapt running``: with ``batch_norm="running"``
  (learn2learn's BatchNorm, the loop's);
- ``meta_batch``: ``fm.MAML(...).meta_batch`` over the whole meta-batch.

Before timing, every contender's meta-gradient is compared with the loop's (norm-wise
relative error, printed; above 1e-4 the command fails). Timing interleaves the
contenders (A B C A B C ...) and reports medians over ``--samples`` rounds of the wall
time and of the thread's CPU time, and the speed-ups loop ms / contender ms. On a shared
machine the CPU time is the steadier figure: it leaves out the time the thread waited
for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta as fm

ADAM_LR = 1e-3
# fp32 meta-gradients of these shapes agree with the loop's to about 1e-6 (meta_batch) or
# better (clone/adapt, whose adapted weights are the loop's bit for bit).
MATCH_TOLERANCE = 1e-4


class SineModel(nn.Module):
    """learn2learn's sine regressor, written by hand."""

    def __init__(self, hidden: int = 40):
        super().__init__()
        self.hidden1 = nn.Linear(1, hidden)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        x = F.relu(self.hidden1(x))
        x = F.relu(self.hidden2(x))
        return self.out(x)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class OmniglotCNN(nn.Module):
    """The MAML paper's Omniglot conv4, as learn2learn's OmniglotCNN is written."""

    def __init__(self, ways: int = 5, hidden: int = 64):
        super().__init__()
        self.features = nn.ModuleList([ConvBlock(1 if i == 0 else hidden, hidden) for i in range(4)])
        self.classifier = nn.Linear(hidden * 2 * 2, ways)

    def forward(self, x):
        for block in self.features:
            x = block(x)
        return self.classifier(x.flatten(1))


SHAPES = {
    "sine": dict(model=SineModel, tasks=16, steps=5, lr=0.01, loss=F.mse_loss),
    "omniglot": dict(model=OmniglotCNN, tasks=32, steps=1, lr=0.4, loss=F.cross_entropy),
}


def make_tasks(shape: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if shape == "sine":
        T, n = 16, 10
        amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
        phase = torch.rand(T, 1, 1, generator=g) * torch.pi
        sx = torch.rand(T, n, 1, generator=g) * 10 - 5
        qx = torch.rand(T, n, 1, generator=g) * 10 - 5
        return sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase)
    T, ways = 32, 5
    sx = torch.rand(T, ways, 1, 28, 28, generator=g)
    qx = torch.rand(T, ways, 1, 28, 28, generator=g)
    y = torch.arange(ways).expand(T, ways).contiguous()
    return sx, y, qx, y.clone()


class Contender:
    def __init__(self, name: str, shape: str, state: dict, tasks):
        spec = SHAPES[shape]
        self.name = name
        self.model = spec["model"]()
        self.model.load_state_dict(state)
        self.model.train()
        self.steps, self.lr, self.loss = spec["steps"], spec["lr"], spec["loss"]
        self.tasks = tasks
        self.setup()
        self.optimizer = torch.optim.Adam(self.trained_parameters(), lr=ADAM_LR)

    def setup(self) -> None:
        pass

    def trained_parameters(self):
        return list(self.model.parameters())

    def meta_iteration(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_iteration()
        self.optimizer.step()

    def meta_gradient(self) -> torch.Tensor:
        """The meta-gradient of one meta-iteration at the initial weights (no Adam step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_iteration()
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.model.parameters()
        ])


class Loop(Contender):
    def meta_iteration(self) -> None:
        sx, sy, qx, qy = self.tasks
        T = sx.size(0)
        model, loss_fn, lr = self.model, self.loss, self.lr
        for t in range(T):
            params = dict(model.named_parameters())
            for _ in range(self.steps):
                loss = loss_fn(torch.func.functional_call(model, params, (sx[t],)), sy[t])
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
            (loss_fn(torch.func.functional_call(model, params, (qx[t],)), qy[t]) / T).backward()


class CloneAdapt(Contender):
    batch_norm = "transductive"

    def setup(self) -> None:
        # Without the keyword for the default, so that an older fastmeta on PYTHONPATH runs too.
        options = {} if self.batch_norm == "transductive" else {"batch_norm": self.batch_norm}
        self.learner = fm.MAML(self.model, self.lr, **options)

    def meta_iteration(self) -> None:
        sx, sy, qx, qy = self.tasks
        T = sx.size(0)
        learner, loss_fn = self.learner, self.loss
        for t in range(T):
            clone = learner.clone()
            for _ in range(self.steps):
                clone.adapt(loss_fn(clone(sx[t]), sy[t]))
            (loss_fn(clone(qx[t]), qy[t]) / T).backward()


class CloneAdaptRunning(CloneAdapt):
    batch_norm = "running"


class MetaBatch(Contender):
    def setup(self) -> None:
        self.learner = fm.MAML(self.model, self.lr, steps=self.steps, validate=False)

    def meta_iteration(self) -> None:
        self.learner.meta_batch(*self.tasks).loss.backward()


CONTENDERS = {"loop": Loop, "clone/adapt": CloneAdapt, "clone/adapt running": CloneAdaptRunning,
              "meta_batch": MetaBatch}


def contenders_for(shape: str, chosen: list[str]):
    """The chosen contenders that apply to ``shape`` (the loop first: it is the reference)."""
    names = ["loop"] + [n for n in chosen if n != "loop"]
    if shape != "omniglot":  # no BatchNorm: the running mode is the default's twin
        names = [n for n in names if n != "clone/adapt running"]
    return [(n, CONTENDERS[n]) for n in names]


def run_shape(shape: str, samples: int, chosen: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    state = SHAPES[shape]["model"]().state_dict()
    tasks = make_tasks(shape)
    named = contenders_for(shape, list(CONTENDERS) if chosen is None else chosen)
    contenders = [cls(name, shape, state, tasks) for name, cls in named]
    reference = contenders[0].meta_gradient()
    errors = {c.name: float((c.meta_gradient() - reference).norm() / reference.norm()) for c in contenders}
    for c in contenders:  # warm-up: one full step each
        c.step()
    wall: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu: dict[str, list[float]] = {c.name: [] for c in contenders}
    for _ in range(samples):
        for c in contenders:
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            c.step()
            cpu[c.name].append((time.thread_time() - start_cpu) * 1e3)
            wall[c.name].append((time.perf_counter() - start_wall) * 1e3)
    loop_wall, loop_cpu = statistics.median(wall["loop"]), statistics.median(cpu["loop"])
    rows = []
    for c in contenders:
        ms, cpu_ms = statistics.median(wall[c.name]), statistics.median(cpu[c.name])
        rows.append({"contender": c.name, "median_ms": ms, "min_ms": min(wall[c.name]), "median_cpu_ms": cpu_ms,
                     "speedup_vs_loop": loop_wall / ms, "cpu_speedup_vs_loop": loop_cpu / cpu_ms,
                     "meta_gradient_error_vs_loop": errors[c.name]})
    return {"shape": shape, "rows": rows}


def print_table(result: dict) -> None:
    spec = SHAPES[result["shape"]]
    print(f"\n{result['shape']}: {spec['tasks']} tasks x {spec['steps']} steps")
    print("| contender | meta-gradient vs loop | wall ms, median (min) | speed-up vs loop | CPU ms | CPU speed-up |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        check = f"{r['meta_gradient_error_vs_loop']:.1e}"
        if r["meta_gradient_error_vs_loop"] > MATCH_TOLERANCE:
            check += " MISMATCH"
        print(f"| {r['contender']} | {check} | {r['median_ms']:.1f} ({r['min_ms']:.1f}) | {r['speedup_vs_loop']:.2f}x "
              f"| {r['median_cpu_ms']:.1f} | {r['cpu_speedup_vs_loop']:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="sine,omniglot")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated; the loop always runs (it is the reference)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"--shapes: unknown shape {s!r}; known: {sorted(SHAPES)}")
    chosen = args.contenders.split(",")
    for c in chosen:
        if c not in CONTENDERS:
            parser.error(f"--contenders: unknown contender {c!r}; known: {list(CONTENDERS)}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"load average {os.getloadavg()[0]:.1f}, {args.samples} interleaved rounds, fastmeta from {fm.__file__}")
    results = [run_shape(s, args.samples, chosen) for s in shapes]
    for r in results:
        print_table(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": 1, "samples": args.samples,
                       "load_average": os.getloadavg()[0], "results": results}, f, indent=1)
    mismatched = [r["contender"] for res in results for r in res["rows"]
                  if r["meta_gradient_error_vs_loop"] > MATCH_TOLERANCE]
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
