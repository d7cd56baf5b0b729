"""ModelAwareMAML: MAML that knows the network's structure and meta-learns how each part
adapts (per-layer/per-step rates as in MAML++, per-parameter rates as in Meta-SGD, ANIL's
head-only adaptation, per-unit gates, a diagonal preconditioner); and learn2learn's MetaSGD.

>>> import fastmeta as fm
>>> learner = fm.ModelAwareMAML(fm.models.conv4(ways=5), lr=0.1, steps=5,
...                             lr_mode="layer", lr_per_step=True, gates=True)
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fastmeta.engine import LossSpec, StepRule
from fastmeta.learners.base import MetaLearner

LR_MODES = ("scalar", "layer", "param")


class ModelAwareMAML(MetaLearner):
    """MAML that knows the network's structure and meta-learns how each part adapts.

    For parameter segment k at inner step s::

        θ_k ← θ_k − α_{k,s} ⊙ m_k ⊙ p_k ⊙ g_k

    - ``lr_mode``: α is one rate ("scalar"), one per parameter tensor ("layer", MAML++'s
      LSLR) or one per parameter ("param", Meta-SGD); ``lr_per_step`` gives each inner
      step its own. All start at ``lr``.
    - ``adapt_layers``: "all", "head" (ANIL: only the last module with parameters) or a
      list of module-name prefixes. Other segments keep θ and skip their weight-gradient
      work in the inner loop.
    - ``gates``: m is a learned per-output-unit gate, broadcast over the unit's weights and
      bias. fastmeta uses m = 2σ(logit) with logits starting at 0, so training starts
      exactly at MAML (m = 1) with a well-conditioned gradient (σ' = 1/4 there), rather
      than σ(logit) which would halve the initial rate or start saturated.
    - ``precondition``: p is a learned diagonal preconditioner over all parameters,
      starting at 1.

    Every meta-learned quantity is in ``parameters()`` and ``state_dict()``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        steps: int = 5,
        lr_mode: str = "layer",
        lr_per_step: bool = True,
        adapt_layers: str | Sequence[str] = "all",
        gates: bool = False,
        precondition: bool = False,
        loss: LossSpec = None,
        validate: bool = True,
        lrs: Sequence[Tensor] | None = None,
        task_chunk: int | None = None,
        batch_norm: str = "transductive",
    ):
        super().__init__(
            model, lr, first_order, allow_unused, allow_nograd, steps, loss, validate, task_chunk, batch_norm
        )
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {LR_MODES}, got {lr_mode!r}")
        self.lr_mode = lr_mode
        self.lr_per_step = bool(lr_per_step)
        self._adapt_selection = self._select_adapting(adapt_layers)
        params = self._engine.params
        like = params[0]
        factory = {"dtype": like.dtype, "device": like.device}
        lead = (self.steps,) if self.lr_per_step else ()
        if lrs is not None:
            if lr_mode != "param":
                raise ValueError("lrs (initial per-parameter rates) needs lr_mode='param'")
            lrs = list(lrs)
            if len(lrs) != len(params) or any(
                tuple(l.shape) != lead + tuple(p.shape) for l, p in zip(lrs, params)
            ):
                raise ValueError(
                    "lrs must hold one tensor per model parameter, shaped like it"
                    + (" with a leading steps dim" if lead else "")
                )
            self.lrs = nn.ParameterList(
                [nn.Parameter(l.detach().clone().to(**factory)) for l in lrs]
            )
        elif lr_mode == "param":
            self.lrs = nn.ParameterList(
                [nn.Parameter(torch.full(lead + tuple(p.shape), self.lr, **factory)) for p in params]
            )
        elif lr_mode == "layer":
            self.lrs = nn.Parameter(torch.full(lead + (len(params),), self.lr, **factory))
        else:
            self.lrs = nn.Parameter(torch.full(lead, self.lr, **factory))
        self.gates = bool(gates)
        if self.gates:
            unit_index, units = self._gate_units()
            self.register_buffer("_gate_unit_index", unit_index.to(like.device), persistent=False)
            self.gate_logits = nn.Parameter(torch.zeros(units, **factory))
        self.precondition = bool(precondition)
        if self.precondition:
            self.precond = nn.Parameter(torch.ones(self.layout.numel, **factory))

    def _select_adapting(self, adapt_layers) -> list[bool]:
        names = [s.name for s in self.layout.segments]
        if adapt_layers == "all":
            return [True] * len(names)
        if adapt_layers == "head":
            head = names[-1].rpartition(".")[0]
            return [n.rpartition(".")[0] == head for n in names]
        if isinstance(adapt_layers, str) or not all(isinstance(p, str) for p in adapt_layers):
            raise ValueError(
                f"adapt_layers must be 'all', 'head' or a list of module-name prefixes, got {adapt_layers!r}"
            )
        chosen = [any(n == p or n.startswith(p + ".") for p in adapt_layers) for n in names]
        for p in adapt_layers:
            if not any(n == p or n.startswith(p + ".") for n in names):
                raise ValueError(f"adapt_layers: no parameter under {p!r}; parameters are {names}")
        return chosen

    def adapting(self) -> list[bool]:
        return [a and p.requires_grad for a, p in zip(self._adapt_selection, self._engine.params)]

    def _gate_units(self) -> tuple[Tensor, int]:
        """int64 ``[P]``: each parameter's gate; ungated parameters read the last entry (1).

        A module's parameters share its output units' gates: row i of a weight and entry
        i of its bias (or BatchNorm's γ, β for channel i) read gate i.
        """
        index = torch.full((self.layout.numel,), -1, dtype=torch.long)
        units, module_units = 0, {}
        for seg, adapt in zip(self.layout.segments, self._adapt_selection):
            if not adapt or not seg.shape:
                continue
            module = seg.name.rpartition(".")[0]
            rows = seg.shape[0]
            if module not in module_units or module_units[module][1] != rows:
                module_units[module] = (units, rows)
                units += rows
            start, _ = module_units[module]
            per_row = seg.numel // rows
            index[seg.offset : seg.offset + seg.numel] = torch.arange(
                start, start + rows
            ).repeat_interleave(per_row)
        index[index < 0] = units  # the constant 1 appended after the gates
        return index, units

    def step_rule(self, step: int, like: Tensor) -> StepRule:
        if self.lr_per_step and step >= self.steps:
            raise ValueError(
                f"lr_per_step holds rates for {self.steps} steps; step {step + 1} has none "
                "(raise steps, or use lr_per_step=False)"
            )
        segments = None
        if self.lr_mode == "param":
            lr = torch.cat([(l[step] if self.lr_per_step else l).reshape(-1) for l in self.lrs])
        else:
            lr = self.lrs[step] if self.lr_per_step else self.lrs
            if self.lr_mode == "layer":
                segments = self.layout.segment_ids(like.device)
        mask = None
        if self.gates:
            values = torch.cat([2 * torch.sigmoid(self.gate_logits), self.gate_logits.new_ones(1)])
            mask = values[self._gate_unit_index]
        precond = self.precond if self.precondition else None
        return StepRule(lr, mask, precond, segments)

    def step_coefficients(self, step: int, like: Tensor) -> list[Tensor]:
        return self._engine.segment_coefficients(self.step_rule(step, like))

    def per_parameter_lrs(self) -> list[Tensor] | None:
        if self.lr_mode == "param" and not self.lr_per_step and not self.gates and not self.precondition:
            return list(self.lrs)
        return None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lr_mode={self.lr_mode!r}, lr_per_step={self.lr_per_step}, "
            f"gates={self.gates}, precondition={self.precondition}"
        )


class MetaSGD(ModelAwareMAML):
    """learn2learn's MetaSGD (Li et al. 2017): one learned rate per parameter.

    ``MetaSGD(model, lr=1.0, first_order=False, lrs=None)`` is
    ``ModelAwareMAML(lr_mode="param", lr_per_step=False, steps=1)``; ``meta.lrs`` holds
    one tensor per parameter, initialised to ``lr`` (or to ``lrs``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Sequence[Tensor] | None = None,
        *,
        steps: int = 1,
        loss: LossSpec = None,
        validate: bool = True,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        batch_norm: str = "transductive",
    ):
        super().__init__(
            model,
            lr,
            first_order,
            allow_unused,
            allow_nograd,
            steps=steps,
            lr_mode="param",
            lr_per_step=False,
            loss=loss,
            validate=validate,
            lrs=lrs,
            batch_norm=batch_norm,
        )
