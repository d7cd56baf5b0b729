"""Kronecker-factored layers of ``learn2learn.nn`` (Jose et al. 2018; Arnold et al. 2019).

``KroneckerLinear(n, m)`` maps ``x ∈ R^{nm}`` to ``A x + b`` with ``A = Rᵀ ⊗ L``,
``L ∈ R^{n×n}``, ``R ∈ R^{m×m}``: with ``X`` the ``n × m`` matrix whose columns are the
consecutive n-slices of ``x``, ``Y = L X R + B``. L and R start at the identity, B at 0.
Inputs are vectors of ``n·m`` (one example) or tensors ending in ``(n, m)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KroneckerLinear(nn.Module):
    """``y = (Rᵀ ⊗ L) x + b``, stored as its factors L (n×n) and R (m×m).

    psd: use ``LᵀL`` and ``RᵀR`` instead (a positive semi-definite A). device: where the
    factors live.
    """

    def __init__(self, n: int, m: int, bias: bool = True, psd: bool = False, device=None):
        super().__init__()
        for name, v in (("n", n), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KroneckerLinear: {name} must be a positive int, got {v!r}")
        self.left = nn.Parameter(torch.eye(n, device=device))
        self.right = nn.Parameter(torch.eye(m, device=device))
        self.bias = nn.Parameter(torch.zeros(n, m, device=device)) if bias else None
        self.psd = bool(psd)
        self.n, self.m = n, m

    def forward(self, x: Tensor) -> Tensor:
        return kronecker_linear(x, self.left, self.right, self.bias, self.psd)


@torch.fx.wrap
def kronecker_linear(x: Tensor, left: Tensor, right: Tensor, bias: Tensor | None, psd: bool) -> Tensor:
    """KroneckerLinear's map. One function that torch.fx records as a single call (its shape
    checks branch on the input), so ``fm.trace`` runs it under ``torch.vmap`` over tasks."""
    if psd:
        left = left.t() @ left
        right = right.t() @ right
    n, m = left.size(0), right.size(0)
    if x.dim() == 1:
        if x.numel() != n * m:
            raise ValueError(f"KroneckerLinear: a vector input needs n*m = {n * m} entries, got {x.numel()}")
        y = left @ x.reshape(m, n).t() @ right
        y = y if bias is None else y + bias
        return y.t().reshape(-1)
    if tuple(x.shape[-2:]) != (n, m):
        raise ValueError(f"KroneckerLinear: input must end in (n, m) = ({n}, {m}), got {list(x.shape)}")
    y = left @ x @ right
    return y if bias is None else y + bias


class KroneckerRNN(nn.Module):
    """An RNN cell with Kronecker-factored matrices: ``h' = σ(W_h x + U_h h)``,
    ``y = W_y h'``; returns ``(y, h')``. sigma defaults to tanh."""

    def __init__(self, n: int, m: int, bias: bool = True, sigma=None):
        super().__init__()
        self.W_h = KroneckerLinear(n, m, bias=bias)
        self.U_h = KroneckerLinear(n, m, bias=bias)
        self.W_y = KroneckerLinear(n, m, bias=bias)
        self.sigma = nn.Tanh() if sigma is None else sigma

    def forward(self, x: Tensor, hidden: Tensor):
        new_hidden = self.sigma(self.W_h(x) + self.U_h(hidden))
        return self.W_y(new_hidden), new_hidden


class KroneckerLSTM(nn.Module):
    """An LSTM cell with Kronecker-factored matrices; ``forward(x, (h, c))`` returns
    ``(h', (h', c'))``. sigma (the gates' activation) defaults to the sigmoid."""

    def __init__(self, n: int, m: int, bias: bool = True, sigma=None):
        super().__init__()
        for gate in ("i", "f", "g", "o"):
            setattr(self, f"W_i{gate}", KroneckerLinear(n, m, bias=bias))
            setattr(self, f"W_h{gate}", KroneckerLinear(n, m, bias=bias))
        self.sigma = nn.Sigmoid() if sigma is None else sigma
        self.tanh = nn.Tanh()

    def forward(self, x: Tensor, hidden):
        h, c = hidden
        i = self.sigma(self.W_ii(x) + self.W_hi(h))
        f = self.sigma(self.W_if(x) + self.W_hf(h))
        g = self.tanh(self.W_ig(x) + self.W_hg(h))
        o = self.sigma(self.W_io(x) + self.W_ho(h))
        c = f * c + i * g
        h = o * self.tanh(c)
        return h, (h, c)
