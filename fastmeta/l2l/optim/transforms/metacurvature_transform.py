"""Meta-Curvature (Park & Oliva 2019): a learned, Kronecker-factored gradient transform."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MetaCurvatureTransform(nn.Module):
    """``MetaCurvatureTransform(param, lr=1.0)``: the update of ``param`` is ``lr · M(g)``.

    - a bias ``[O]``: ``M(g) = c ⊙ g`` (``mc``, initialised to ones);
    - a weight ``[O, I]``: ``M(g) = A g B`` (``mc_in`` A is O×O, ``mc_out`` B is I×I);
    - a convolution kernel ``[O, I, kh, kw]``: with F = kh·kw and g read as ``[O, I, F]``,
      ``M(g)[o, i, f] = Σ A[o, o'] B[i', i] C[f, f'] g[o', i', f']`` (``mc_f`` C is F×F).

    Every factor starts at the identity, so training starts at MAML. Other shapes are
    refused.
    """

    def __init__(self, param: Tensor, lr: float = 1.0):
        super().__init__()
        self.lr = lr
        shape = tuple(param.shape)
        factory = {"dtype": param.dtype, "device": param.device}
        if len(shape) == 1:
            self.dim = 1
            self.mc = nn.Parameter(torch.ones(shape, **factory))
        elif len(shape) == 2:
            self.dim = 2
            self.mc_in = nn.Parameter(torch.eye(shape[0], **factory))
            self.mc_out = nn.Parameter(torch.eye(shape[1], **factory))
        elif len(shape) == 4:
            self.dim = 4
            self.n_in, self.n_out = shape[0], shape[1]
            self.n_f = shape[2] * shape[3]
            self.mc_in = nn.Parameter(torch.eye(self.n_in, **factory))
            self.mc_out = nn.Parameter(torch.eye(self.n_out, **factory))
            self.mc_f = nn.Parameter(torch.eye(self.n_f, **factory))
        else:
            raise ValueError(f"MetaCurvatureTransform: parameters of shape {list(shape)} are not supported (1, 2 or 4 dims)")

    def forward(self, grad: Tensor) -> Tensor:
        if self.dim == 1:
            update = self.mc * grad
        elif self.dim == 2:
            update = self.mc_in @ grad @ self.mc_out
        else:
            g = grad.reshape(self.n_in, self.n_out, self.n_f)
            update = torch.einsum("oa,bi,fc,abc->oif", self.mc_in, self.mc_out, self.mc_f, g).reshape(grad.shape)
        return self.lr * update
