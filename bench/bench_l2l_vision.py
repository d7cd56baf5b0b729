"""fastmeta.l2l's vision models and example-script shapes against the plain per-task loop,
one process, one thread.

    python bench/bench_l2l_vision.py [--shapes OmniglotFC,OmniglotCNN,CNN4,ResNet12,WRN28,anil-head,metacurvature]
                                     [--tasks 16] [--samples 5] [--device cpu|cuda] [--json FILE]

Each shape is one second-order meta-iteration over ``--tasks`` tasks (5-way 1-shot, 5
queries per class, one inner step, an Adam step on the meta-parameters), run by:

- ``loop``: the plain per-task loop, ``torch.func.functional_call`` + ``torch.autograd.grad``
  (``create_graph=True``), each task's query loss backpropagated as soon as it is computed,
  as learn2learn's examples do (the reference);
- ``clone/adapt``: the same loop written against ``fastmeta.l2l`` as learn2learn's scripts
  write it (``maml.clone()``, ``learner.adapt(loss)``);
- ``meta_batch``: ``learner.meta_batch`` over all tasks at once (where the learner has it).

Shapes: ``OmniglotFC`` and ``OmniglotCNN`` on 28×28 (maml_omniglot.py's model is
OmniglotFC); ``CNN4``, ``ResNet12`` and ``WRN28`` at ``--image`` pixels (84 in the papers;
smaller here so that a CPU finishes: their cost is the convolutions', which the batched
path does not reduce); ``anil-head``: anil_fc100.py's shape (ConvBase features, MAML on
the linear head, 32×32); ``metacurvature``: metacurvature_fc100.py's (GBML with
MetaCurvatureTransform, whose ``loop`` applies the same transform by hand).

Before timing, each contender's meta-gradient is compared with the plain loop's run in
float64 (norm-wise relative error, printed). The fp32 loop's own error against it is the
scale of what fp32 rounding does to this shape's second order (OmniglotCNN's, through
stride-2 convolutions and BatchNorm at inner rate 0.4, is ill-conditioned: 10⁻³–10⁻² for
16 tasks, where float64 agrees to 10⁻¹⁴); a contender more than 10× that (and more than
1e-4) off the float64 loop fails the command. Rounds interleave the contenders; the figures are
medians of the wall time and of the thread's CPU time (steadier on a shared machine).
``GFLOP`` is one meta-iteration's arithmetic (torch's FlopCounterMode over the loop), and
each row's GFLOP/s that over its CPU time: the distance to the machine's floor (one core's
GEMM peak), which bounds any speed-up over the loop at peak ÷ the loop's rate.

``--device cuda`` (the GPU check's ``vision`` step, issue 25 on a GPU): the same models,
data and contenders on the GPU, each iteration timed to a ``torch.cuda.synchronize()``
(the wall time is the time; the CPU columns are omitted, and GFLOP/s is over the wall
time). ``meta_batch`` runs as a user's loop does, with the learner's defaults (on CUDA it
replays its graphs of the meta-batch where it can). ``--json`` is rewritten after every
shape, so a run stopped at its time box keeps the shapes it finished.
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
import fastmeta.l2l as l2l

ADAM_LR = 1e-3
MATCH_TOLERANCE = 1e-4
WAYS, QUERIES = 5, 5


def vision(build, size, channels, lr=0.4):
    return dict(build=build, size=size, channels=channels, lr=lr)


def shapes(image: int):
    M = l2l.vision.models
    final = image // 16  # four 2× pools
    return {
        "OmniglotFC": vision(lambda: M.OmniglotFC(28 ** 2, WAYS), 28, 1),
        "OmniglotCNN": vision(lambda: M.OmniglotCNN(WAYS), 28, 1),
        "CNN4": vision(lambda: M.CNN4(WAYS, embedding_size=64 * final * final), image, 3, lr=0.1),
        "ResNet12": vision(lambda: M.ResNet12(WAYS, dropblock_dropout=0.0), image, 3, lr=0.1),
        "WRN28": vision(lambda: M.WRN28(WAYS), image, 3, lr=0.1),
        "anil-head": vision(lambda: AnilHead(), 32, 3, lr=0.1),
        "metacurvature": vision(lambda: CifarCNN(), 32, 3, lr=0.1),
    }


class AnilHead(nn.Module):
    """anil_fc100.py's model: frozen-in-the-inner-loop ConvBase features, an adapted head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(l2l.vision.models.ConvBase(channels=3, max_pool=True), nn.Flatten())
        self.head = nn.Linear(256, WAYS)

    def forward(self, x):
        return self.head(self.features(x))


class CifarCNN(nn.Module):
    """metacurvature_fc100.py's CifarCNN (32 filters, mean over space)."""

    def __init__(self, hidden=32):
        super().__init__()
        base = l2l.vision.models.ConvBase(hidden=hidden, channels=3, max_pool=False, layers=4, max_pool_factor=0.5)
        self.features = nn.Sequential(base, l2l.nn.Lambda(lambda x: x.mean(dim=[2, 3])), l2l.nn.Flatten())
        self.linear = nn.Linear(hidden, WAYS)

    def forward(self, x):
        return self.linear(self.features(x))


def make_tasks(spec, tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (spec["channels"], spec["size"], spec["size"])
    sx = torch.rand(tasks, WAYS, *shape, generator=g)
    qx = torch.rand(tasks, WAYS * QUERIES, *shape, generator=g)
    sy = torch.arange(WAYS).expand(tasks, WAYS).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous()
    return sx, sy, qx, qy


class Contender:
    def __init__(self, name, shape, spec, state, tasks, dtype=torch.float32, device="cpu"):
        self.name, self.shape, self.spec = name, shape, spec
        self.tasks = tuple((t.to(dtype) if t.is_floating_point() else t).to(device) for t in tasks)
        self.model = spec["build"]()
        self.model.load_state_dict(state)
        self.model.to(device=device, dtype=dtype)
        self.model.train()
        self.lr = spec["lr"]
        self.setup()
        self.optimizer = torch.optim.Adam(self.trained_parameters(), lr=ADAM_LR)

    def setup(self):
        pass

    def adapted_names(self):
        if self.shape == "anil-head":
            return [n for n, _ in self.model.named_parameters() if n.startswith("head.")]
        return [n for n, _ in self.model.named_parameters()]

    def trained_parameters(self):
        return list(self.model.parameters())

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_iteration()
        self.optimizer.step()

    def meta_gradient(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_iteration()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.trained_parameters()])


class Loop(Contender):
    def setup(self):
        if self.shape == "OmniglotCNN":
            # OmniglotCNN holds its ConvBase twice (``base`` and ``features.1``), and
            # torch.func.functional_call then restores one of the two names with the
            # substituted tensors (the next task backpropagates into a freed graph). The
            # forward reads ``features`` only, so the loop drops the other name.
            del self.model._modules["base"]
        if self.shape == "metacurvature":
            names = [n for n, _ in self.model.named_parameters()]
            self.transforms = nn.ModuleList([l2l.optim.transforms.MetaCurvatureTransform(p)
                                             for p in self.model.parameters()])
            self.transform_of = dict(zip(names, self.transforms))

    def trained_parameters(self):
        extra = list(self.transforms.parameters()) if self.shape == "metacurvature" else []
        return list(self.model.parameters()) + extra

    def meta_iteration(self):
        sx, sy, qx, qy = self.tasks
        T, model = sx.size(0), self.model
        adapted = self.adapted_names()
        for t in range(T):
            params = dict(model.named_parameters())
            chosen = [params[n] for n in adapted]
            loss = F.cross_entropy(torch.func.functional_call(model, params, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, chosen, create_graph=True)
            for n, g in zip(adapted, grads):
                if self.shape == "metacurvature":
                    g = self.transform_of[n](g)
                params[n] = params[n] - self.lr * g
            query = torch.func.functional_call(model, params, (qx[t],))
            (F.cross_entropy(query, qy[t]) / T).backward()


class CloneAdapt(Contender):
    def setup(self):
        if self.shape == "metacurvature":
            self.learner = l2l.algorithms.GBML(self.model, l2l.optim.transforms.MetaCurvatureTransform, lr=self.lr)
        elif self.shape == "anil-head":
            self.learner = l2l.algorithms.MAML(self.model.head, lr=self.lr)
        else:
            self.learner = l2l.algorithms.MAML(self.model, lr=self.lr)

    def trained_parameters(self):
        extra = list(self.learner.compute_update.parameters()) if self.shape == "metacurvature" else []
        return list(self.model.parameters()) + extra

    def meta_iteration(self):
        sx, sy, qx, qy = self.tasks
        T = sx.size(0)
        if self.shape == "anil-head":
            features = self.model.features
            for t in range(T):
                clone = self.learner.clone()
                s, q = features(sx[t]), features(qx[t])
                clone.adapt(F.cross_entropy(clone(s), sy[t]))
                (F.cross_entropy(clone(q), qy[t]) / T).backward()
            return
        for t in range(T):
            clone = self.learner.clone()
            clone.adapt(F.cross_entropy(clone(sx[t]), sy[t]))
            (F.cross_entropy(clone(qx[t]), qy[t]) / T).backward()


class MetaBatch(Contender):
    def setup(self):
        if self.shape == "anil-head":
            self.learner = fm.ModelAwareMAML(self.model, lr=self.lr, steps=1, lr_mode="scalar", lr_per_step=False,
                                             adapt_layers=["head"], log_lr=False, per_step_bn=False)
            self.learner.lrs.requires_grad_(False)  # a fixed rate, as the others'
        else:
            self.learner = fm.MAML(self.model, self.lr, steps=1)  # the defaults a user gets, validation on

    def meta_iteration(self):
        self.learner.meta_batch(*self.tasks).loss.backward()


def run_shape(shape, spec, tasks, samples, device="cpu"):
    torch.manual_seed(0)
    state = spec["build"]().state_dict()
    data = make_tasks(spec, tasks)
    kinds = [("loop", Loop), ("clone/adapt", CloneAdapt)]
    if shape != "metacurvature":
        kinds.append(("meta_batch", MetaBatch))
    contenders = [cls(name, shape, spec, state, data, device=device) for name, cls in kinds]
    reference = Loop("loop (float64)", shape, spec, state, data, dtype=torch.float64, device=device).meta_gradient()
    errors = {}
    for c in contenders:
        g = c.meta_gradient().double()
        n = min(g.numel(), reference.numel())
        errors[c.name] = float((g[:n] - reference[:n]).norm() / reference[:n].norm())
    tolerance = max(MATCH_TOLERANCE, 10 * errors["loop"])
    flops = loop_flops(contenders[0])
    on_gpu = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for c in contenders:  # warm-up: on CUDA the first calls compile, capture and allocate
        for _ in range(2 if on_gpu else 1):
            c.step()
    sync()
    wall = {c.name: [] for c in contenders}
    cpu = {c.name: [] for c in contenders}
    for _ in range(samples):
        for c in contenders:
            w0, c0 = time.perf_counter(), time.thread_time()
            c.step()
            sync()
            cpu[c.name].append((time.thread_time() - c0) * 1e3)
            wall[c.name].append((time.perf_counter() - w0) * 1e3)
    loop_wall, loop_cpu = statistics.median(wall["loop"]), statistics.median(cpu["loop"])
    rows = []
    for c in contenders:
        ms, cms = statistics.median(wall[c.name]), statistics.median(cpu[c.name])
        row = {"contender": c.name, "median_ms": ms, "speedup_vs_loop": loop_wall / ms,
               "meta_gradient_error_vs_float64_loop": errors[c.name], "tolerance": tolerance,
               "matches": errors[c.name] <= tolerance}
        if on_gpu:  # the host's time is not the work's: the rate is over the synchronized wall time
            row["gflop_per_s"] = flops / ms / 1e6
        else:
            row.update(median_cpu_ms=cms, gflop_per_s_cpu=flops / cms / 1e6, cpu_speedup_vs_loop=loop_cpu / cms)
        rows.append(row)
    params = sum(p.numel() for p in contenders[0].model.parameters())
    return {"shape": shape, "image": spec["size"], "parameters": params, "tasks": tasks, "gflop_per_iteration": flops / 1e9,
            "device": torch.cuda.get_device_name() if on_gpu else (platform.processor() or platform.machine()),
            "rows": rows}


def loop_flops(loop) -> float:
    """FLOP of one meta-iteration: torch's FlopCounterMode over the plain loop's (its
    convolutions and matrix products, forward, backward and double backward, counted
    from the shapes; 2 per multiply-add). Every contender does the same arithmetic, so
    this over a row's CPU time is its rate, to set against one core's GEMM peak."""
    from torch.utils.flop_counter import FlopCounterMode

    loop.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        loop.meta_iteration()
    loop.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def write_json(path, data) -> None:
    """``data`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="OmniglotFC,OmniglotCNN,CNN4,ResNet12,WRN28,anil-head,metacurvature")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--image", type=int, default=32, help="CNN4/ResNet12/WRN28 input size (84 in the papers)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    parser.add_argument("--json", default=None, help="the results, rewritten after every shape")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    known = shapes(args.image)
    chosen = args.shapes.split(",")
    for s in chosen:
        if s not in known:
            parser.error(f"--shapes: unknown shape {s!r}; known: {list(known)}")
    on_gpu = device.type == "cuda"
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name(device) if on_gpu else f"{platform.processor() or platform.machine()}, 1 thread"
    print(f"torch {torch.__version__}, {where}, load average "
          f"{os.getloadavg()[0]:.1f}, {args.samples} interleaved rounds, {args.tasks} tasks, 5-way 1-shot, "
          f"{QUERIES} queries per class, second order")
    if on_gpu:
        print("| shape | image | parameters | GFLOP | contender | meta-gradient vs the float64 loop (tolerance) | ms "
              "| speed-up | GFLOP/s |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print("| shape | image | parameters | GFLOP | contender | meta-gradient vs the float64 loop (tolerance) | "
              "wall ms | speed-up | CPU ms | CPU speed-up | GFLOP/s (CPU) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for s in chosen:
        r = run_shape(s, known[s], args.tasks, args.samples, device)
        results.append(r)
        for row in r["rows"]:
            flag = "" if row["matches"] else " MISMATCH"
            head = (f"| {s} | {r['image']} | {r['parameters']:,} | {r['gflop_per_iteration']:.1f} | {row['contender']} | "
                    f"{row['meta_gradient_error_vs_float64_loop']:.1e} ({row['tolerance']:.0e}){flag} | ")
            if on_gpu:
                print(head + f"{row['median_ms']:.2f} | {row['speedup_vs_loop']:.2f}x | {row['gflop_per_s']:.0f} |",
                      flush=True)
            else:
                print(head + f"{row['median_ms']:.0f} | {row['speedup_vs_loop']:.2f}x | {row['median_cpu_ms']:.0f} | "
                      f"{row['cpu_speedup_vs_loop']:.2f}x | {row['gflop_per_s_cpu']:.1f} |", flush=True)
        if args.json:  # after every shape: a run stopped at a time box keeps what it finished
            write_json(args.json, {"torch": torch.__version__, "device": str(device), "threads": 1,
                                   "samples": args.samples, "results": results})
    bad = [row for r in results for row in r["rows"] if not row["matches"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
