"""The standard workloads W1–W4 and the host-cost workloads W2S, OFC, R12
(docs/benchmarks.md): one definition each.

A :class:`Workload` names the model, the task shapes, the inner loop and the loss of one
paper protocol; ``fastmeta bench``, ``fastmeta profile``, the benchmark scripts in bench/
and the GPU tier of the tests read them from here. ``WORKLOAD_OP_SHAPES`` turns them into
the shapes each op sees.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastmeta.data import TaskBatch

# ---------------------------------------------------------------------------------------
# The workloads: the single source of truth for W1–W4 (docs/benchmarks.md). The scripts in
# bench/ import them from here; they live in the package so that the installed
# `fastmeta bench` and `fastmeta profile` need no checkout.
# ---------------------------------------------------------------------------------------


L2L_MODEL_PREFIX = "l2l:"  # Workload.model names a learn2learn vision model


@dataclass(frozen=True, eq=False)
class Workload:
    """One standard meta-learning workload.

    support / query: examples per task (for classification, ``ways`` classes, labelled
    ``i % ways``). steps, inner_lr: the inner loop. loss: "mse" or "cross_entropy".
    model, model_args: ``fastmeta.models.<model>(**model_args)``, or for a name
    ``"l2l:<Name>"``, learn2learn's ``fastmeta.l2l.vision.models.<Name>(**model_args)``.
    """

    name: str
    title: str
    preset: str
    model: str
    model_args: dict
    input_shape: tuple[int, ...]
    tasks: int
    support: int
    query: int
    steps: int
    inner_lr: float
    loss: str
    ways: int = 0

    def build_model(self) -> nn.Module:
        if self.model.startswith(L2L_MODEL_PREFIX):
            from fastmeta.l2l.vision import models as l2l_models

            return getattr(l2l_models, self.model[len(L2L_MODEL_PREFIX):])(**self.model_args)
        from fastmeta import models

        return getattr(models, self.model)(**self.model_args)

    @property
    def has_batch_norm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.build_model().modules())

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        return {
            "name": self.name, "title": self.title, "preset": self.preset,
            "model": f"{self.model}({', '.join(f'{k}={v!r}' for k, v in self.model_args.items())})",
            "input_shape": list(self.input_shape), "tasks": self.tasks, "support": self.support,
            "query": self.query, "steps": self.steps, "inner_lr": self.inner_lr, "loss": self.loss,
        }

    def make_batch(self, device: torch.device | str, seed: int = 0) -> TaskBatch:
        """Random tasks, the same for a given seed on every device (drawn on the CPU)."""
        g = torch.Generator().manual_seed(seed)
        T = self.tasks
        if self.loss == "mse":
            # Sinusoid tasks (docs/benchmarks.md's protocol): y = A sin(x − φ).
            amplitude = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
            phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=g)

            def draw(n):
                x = torch.empty(T, n, *self.input_shape).uniform_(-5.0, 5.0, generator=g)
                return x, amplitude * torch.sin(x - phase)

            sx, sy = draw(self.support)
            qx, qy = draw(self.query)
        else:
            def draw(n):
                x = torch.randn(T, n, *self.input_shape, generator=g)
                return x, (torch.arange(n) % self.ways).expand(T, n).contiguous()

            sx, sy = draw(self.support)
            qx, qy = draw(self.query)
        return TaskBatch(*(t.to(device) for t in (sx, sy, qx, qy)))


WORKLOADS: dict[str, Workload] = {
    "W1": Workload(
        name="W1", title="sinusoid", preset="sinusoid", model="mlp", model_args={"sizes": (1, 40, 40, 1)},
        input_shape=(1,), tasks=25, support=10, query=10, steps=1, inner_lr=0.01, loss="mse",
    ),
    "W2": Workload(
        name="W2", title="omniglot-5w1s", preset="omniglot-5w1s", model="conv4",
        model_args={"in_channels": 1, "ways": 5, "variant": "strided", "image_size": 28},
        input_shape=(1, 28, 28), tasks=32, support=5, query=5, steps=1, inner_lr=0.4,
        loss="cross_entropy", ways=5,
    ),
    "W3": Workload(
        name="W3", title="omniglot-20w1s", preset="omniglot-20w1s", model="conv4",
        model_args={"in_channels": 1, "ways": 20, "variant": "strided", "image_size": 28},
        input_shape=(1, 28, 28), tasks=16, support=20, query=20, steps=5, inner_lr=0.1,
        loss="cross_entropy", ways=20,
    ),
    "W4": Workload(
        name="W4", title="miniimagenet-5w1s", preset="miniimagenet-5w1s", model="conv4",
        model_args={"in_channels": 3, "ways": 5, "variant": "pool", "image_size": 84},
        input_shape=(3, 84, 84), tasks=4, support=5, query=75, steps=5, inner_lr=0.01,
        loss="cross_entropy", ways=5,
    ),
}

# The host-cost workloads (issue 23, docs/benchmarks.md): where what the host pays per op
# (the Python between the user's call and the kernels) decides the time, not the arithmetic.
HOST_COST_WORKLOADS: dict[str, Workload] = {
    "W2S": Workload(  # W2's structure with negligible arithmetic: 8 filters, 2 tasks
        name="W2S", title="w2-structure", preset="omniglot-5w1s", model="conv4",
        model_args={"in_channels": 1, "ways": 5, "hidden": 8, "variant": "strided", "image_size": 28},
        input_shape=(1, 28, 28), tasks=2, support=5, query=5, steps=1, inner_lr=0.4,
        loss="cross_entropy", ways=5,
    ),
    "W4S": Workload(  # W2S with W4's pooled blocks (BatchNorm -> ReLU -> 2x2 max pool, as CNN4 and W4)
        name="W4S", title="w4-structure", preset="omniglot-5w1s", model="conv4",
        model_args={"in_channels": 1, "ways": 5, "hidden": 8, "variant": "pool", "image_size": 28},
        input_shape=(1, 28, 28), tasks=2, support=5, query=5, steps=1, inner_lr=0.4,
        loss="cross_entropy", ways=5,
    ),
    "OFC": Workload(  # learn2learn's examples/vision/maml_omniglot.py: OmniglotFC, 5-way 1-shot
        name="OFC", title="omniglot-fc", preset="omniglot-5w1s", model="l2l:OmniglotFC",
        model_args={"input_size": 28 * 28, "output_size": 5},
        input_shape=(1, 28, 28), tasks=32, support=5, query=5, steps=1, inner_lr=0.5,
        loss="cross_entropy", ways=5,
    ),
    "R12": Workload(  # learn2learn's ResNet12 (widths 64-160-320-640) at CIFAR-FS's 32x32, 5-way 1-shot
        name="R12", title="resnet12-32", preset="cifarfs-5w1s", model="l2l:ResNet12",
        model_args={"output_size": 5, "dropblock_dropout": 0.0},
        input_shape=(3, 32, 32), tasks=16, support=5, query=5, steps=1, inner_lr=0.01,
        loss="cross_entropy", ways=5,
    ),
}


ALL_WORKLOADS: dict[str, Workload] = {**WORKLOADS, **HOST_COST_WORKLOADS}


def find_workload(name: str) -> Workload:
    """A workload by id ("W2", "R12") or by the preset it mirrors ("omniglot-5w1s") or its
    title ("w2-structure")."""
    key = name.strip()
    if key.upper() in ALL_WORKLOADS:
        return ALL_WORKLOADS[key.upper()]
    for w in ALL_WORKLOADS.values():
        if key in (w.preset, w.title):
            return w
    known = ", ".join(f"{w.name} ({w.title})" for w in ALL_WORKLOADS.values())
    raise ValueError(f"unknown workload {name!r}; known: {known}")



# ---------------------------------------------------------------------------------------
# W1–W4 as per-op shapes. T tasks; N is the larger of the support and query sets (what a
# query forward sees). Conv layers: (C_in, H, W) → C_out with kernel 3, and the stride and
# padding of the workload; conv4-strided halves 28 → 14 → 7 → 4 → 2, conv4-pool keeps the
# size and max-pools 84 → 42 → 21 → 10 → 5.
# ---------------------------------------------------------------------------------------


def _conv4_strided_params(ways: int) -> int:
    convs = (1 * 64 * 9 + 64) + 3 * (64 * 64 * 9 + 64)
    return convs + 4 * 2 * 64 + (256 * ways + ways)


def _conv4_pool_params(ways: int) -> int:
    convs = (3 * 32 * 9 + 32) + 3 * (32 * 32 * 9 + 32)
    return convs + 4 * 2 * 32 + (800 * ways + ways)


WORKLOAD_OP_SHAPES = {
    "W1": {
        "inner_step": {"T": 25, "P": (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1)},
        "task_linear": [{"T": 25, "N": 10, "I": 40, "O": 40, "act": "relu"},
                        {"T": 25, "N": 10, "I": 1, "O": 40, "act": "relu"}],
        "task_loss": [{"kind": "mse", "T": 25, "N": 10, "K": 1}],
    },
    "W2": {
        "inner_step": {"T": 32, "P": _conv4_strided_params(5)},
        "task_linear": [{"T": 32, "N": 5, "I": 256, "O": 5, "act": "none"}],
        "task_conv2d": [{"T": 32, "N": 5, "C": 1, "H": 28, "W": 28, "O": 64, "stride": 2, "padding": 1},
                        {"T": 32, "N": 5, "C": 64, "H": 14, "W": 14, "O": 64, "stride": 2, "padding": 1}],
        "task_batch_norm": [{"T": 32, "N": 5, "C": 64, "H": 14, "W": 14, "act": "relu"}],
        "task_loss": [{"kind": "cross_entropy", "T": 32, "N": 5, "K": 5}],
    },
    "W3": {
        "inner_step": {"T": 16, "P": _conv4_strided_params(20)},
        "task_linear": [{"T": 16, "N": 20, "I": 256, "O": 20, "act": "none"}],
        "task_conv2d": [{"T": 16, "N": 20, "C": 64, "H": 14, "W": 14, "O": 64, "stride": 2, "padding": 1}],
        "task_batch_norm": [{"T": 16, "N": 20, "C": 64, "H": 7, "W": 7, "act": "relu"}],
        "task_loss": [{"kind": "cross_entropy", "T": 16, "N": 20, "K": 20}],
    },
    "W4": {
        "inner_step": {"T": 4, "P": _conv4_pool_params(5)},
        "task_linear": [{"T": 4, "N": 75, "I": 800, "O": 5, "act": "none"}],
        "task_conv2d": [{"T": 4, "N": 75, "C": 3, "H": 84, "W": 84, "O": 32, "stride": 1, "padding": 1},
                        {"T": 4, "N": 75, "C": 32, "H": 42, "W": 42, "O": 32, "stride": 1, "padding": 1}],
        "task_batch_norm": [{"T": 4, "N": 75, "C": 32, "H": 84, "W": 84, "act": "relu"}],
        "max_pool2d": [{"B": 300, "C": 32, "H": 84, "W": 84, "kernel_size": [2, 2]},
                       {"B": 300, "C": 32, "H": 42, "W": 42, "kernel_size": [2, 2]}],
        "task_loss": [{"kind": "cross_entropy", "T": 4, "N": 75, "K": 5}],
    },
}
