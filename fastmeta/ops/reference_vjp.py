"""The backward of a backward op, taken from its reference by autograd.

The backward ops (the inner step's, BatchNorm's and the loss's gradient ops)
are differentiated only for third-order terms and for gradgradcheck of
themselves. Their VJP is the autograd of their plain-PyTorch reference: exact, and itself
differentiable, because the saved inputs stay connected (through an alias) whenever they
are part of a graph.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def reference_vjp(
    reference: Callable[..., Tensor | Sequence[Tensor]],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
    upstream: Tensor | Sequence[Tensor | None],
) -> list[Tensor | None]:
    """Σ_k <upstream_k, d reference_k / d input_i> for each input i with ``needs[i]``."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = []
        for x, need in zip(inputs, needs):
            if x is not None and need:
                # A fresh alias: autograd.grad w.r.t. it is the *partial* derivative.
                # Asking for x itself would also follow paths from other inputs back to
                # x (e.g. an upstream gradient that was computed from x), and those paths
                # are the caller's engine's to follow, not ours.
                x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            leaves.append(x)
        outputs = reference(*leaves)
        if isinstance(outputs, Tensor):
            outputs, upstream = [outputs], [upstream]
        pairs = [
            (o, u)
            for o, u in zip(outputs, upstream)
            if u is not None and o.numel() > 0 and o.requires_grad
        ]
        wanted = [i for i, (x, need) in enumerate(zip(leaves, needs)) if x is not None and need]
        result: list[Tensor | None] = [None] * len(inputs)
        if not pairs or not wanted:
            return result
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [leaves[i] for i in wanted],
            [u for _, u in pairs],
            allow_unused=True,
            create_graph=create_graph,
            # The recomputed graph hangs off saved inputs that belong to the caller's
            # graph; without retain_graph the engine frees their saved tensors too.
            retain_graph=True,
        )
        for i, g in zip(wanted, grads):
            result[i] = g if g is not None else torch.zeros_like(leaves[i])
        return result
