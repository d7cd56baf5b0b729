"""``learn2learn.nn.PrototypicalClassifier``: nearest-prototype classification (Snell et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DISTANCES = ("euclidean", "cosine")


class PrototypicalClassifier(nn.Module):
    """Logits of queries against class prototypes, the mean support embedding of each class.

    ``PrototypicalClassifier(support=None, labels=None, distance="euclidean", normalize=False)``;
    ``fit_(support [N, D], labels [N])`` computes the prototypes (classes in sorted label
    order), ``forward(x [M, D])`` returns ``[M, classes]`` logits: the negative squared
    Euclidean distance, or the cosine similarity. normalize: L2-normalise embeddings first.
    """

    def __init__(self, support: Tensor | None = None, labels: Tensor | None = None,
                 distance: str = "euclidean", normalize: bool = False):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        self.normalize = bool(normalize)
        self.prototypes: Tensor | None = None
        if support is not None and labels is not None:
            self.fit_(support, labels)
        elif (support is None) != (labels is None):
            raise ValueError("pass both support and labels, or neither")

    def _embed(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, p=2, dim=1) if self.normalize else x

    def fit_(self, support: Tensor, labels: Tensor) -> Tensor:
        if support.dim() != 2 or labels.dim() != 1 or labels.numel() != support.size(0):
            raise ValueError(
                f"fit_: support must be [N, D] and labels [N], got {list(support.shape)} and {list(labels.shape)}"
            )
        support = self._embed(support)
        classes = torch.unique(labels)
        self.prototypes = torch.stack([support[labels == c].mean(dim=0) for c in classes])
        return self.prototypes

    def forward(self, x: Tensor) -> Tensor:
        if self.prototypes is None:
            raise RuntimeError("PrototypicalClassifier: call fit_(support, labels) first")
        x = self._embed(x)
        if self.distance == "cosine":
            return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(self.prototypes, dim=1).t()
        return -((x[:, None, :] - self.prototypes[None, :, :]) ** 2).sum(dim=-1)
