"""MAML (Finn et al. 2017), first and second order.

>>> import fastmeta as fm
>>> learner = fm.MAML(fm.models.conv4(ways=5), lr=0.4, steps=1)
>>> opt = torch.optim.Adam(learner.parameters(), 1e-3)                  # doctest: +SKIP
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)    # doctest: +SKIP
>>> opt.zero_grad(); out.loss.backward(); opt.step()                    # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from fastmeta.engine import LossSpec
from fastmeta.learners.base import MetaLearner


class MAML(MetaLearner):
    """Model-agnostic meta-learning (Finn et al. 2017), first or second order.

    ``MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False, *,
    steps=1, loss=None, validate=True, task_chunk=None, batch_norm="transductive",
    cuda_graphs=True)``; the
    positional arguments are learn2learn's.

    - lr: the inner-loop learning rate (any finite number, as in learn2learn).
    - first_order: drop the second-order terms of the meta-gradient.
    - allow_unused: tolerate parameters the forward does not use (default: allow_nograd).
    - allow_nograd: leave parameters with ``requires_grad=False`` unadapted; without it
      they are an error, as in learn2learn. They are never changed either way.
    - steps: inner steps per task in ``meta_batch`` (>= 1).
    - loss: None (integer labels → cross-entropy, float targets → MSE), "cross_entropy",
      "mse", or a callable ``(pred [T, N, ...], target [T, N, ...]) -> [T]``.
    - validate: run the checks that need a device sync (NaN/Inf, label range).
    - task_chunk: run ``meta_batch`` k tasks at a time, recomputing each chunk's graph in
      the backward (same meta-gradient, less memory); None runs all tasks at once.
    - batch_norm: "transductive" or "running" (learn2learn's), for ``clone()/adapt()``;
      see :class:`fastmeta.learners.base.MetaLearner`.
    - cuda_graphs: ``meta_batch`` on a CUDA device replays CUDA graphs (False, or
      ``FASTMETA_CUDA_GRAPHS=0``: eager); see :class:`fastmeta.learners.base.MetaLearner`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        steps: int = 1,
        loss: LossSpec = None,
        validate: bool = True,
        task_chunk: int | None = None,
        batch_norm: str = "transductive",
        cuda_graphs: bool = True,
    ):
        super().__init__(
            model, lr, first_order, allow_unused, allow_nograd, steps, loss, validate, task_chunk, batch_norm,
            cuda_graphs,
        )
