"""ModelAwareMAML: MAML that knows the network's structure and meta-learns how each part
adapts (per-layer/per-step rates as in MAML++, per-parameter rates as in Meta-SGD, ANIL's
head-only adaptation, per-unit gates, a diagonal preconditioner, MAML++'s per-step
BatchNorm weights and biases); and learn2learn's MetaSGD.

>>> import fastmeta as fm
>>> learner = fm.ModelAwareMAML(fm.models.conv4(ways=5), lr=0.1, steps=5,
...                             lr_mode="layer", lr_per_step=True, gates=True)
>>> out = learner.meta_batch(support_x, support_y, query_x, query_y)    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fastmeta.engine import LossSpec
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
    - ``log_lr``: the rates are exp(ρ) of learned log-rates ρ (``log_lrs``), so they stay
      positive (a negative rate climbs the support loss: adaptation beyond the trained
      steps then diverges) and Adam moves them by relative amounts (its step of 1e-3 is
      10% of a raw rate of 0.01, 0.1% of its log). Without it, ``lrs`` holds the rates.
    - ``per_step_bn`` (MAML++): every BatchNorm's weight and bias get their own learned
      value at each weight state (after 1, 2, ... inner steps; ``bn_per_step``), instead
      of being adapted; state 0 (before adapting) uses the model's own. None (default):
      on when the model has affine BatchNorm layers; True requires them.

    Beyond the trained ``steps`` (evaluation with more steps), the last step's rates and
    BatchNorm values are reused: the rule of the last trained step, whose stability the
    training saw. Every meta-learned quantity is in ``parameters()`` and ``state_dict()``.
    ``cuda_graphs``: as :class:`fastmeta.learners.base.MetaLearner`'s.
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
        lr_mode: str = "param",
        lr_per_step: bool = True,
        adapt_layers: str | Sequence[str] = "all",
        gates: bool = False,
        precondition: bool = False,
        loss: LossSpec = None,
        validate: bool = True,
        lrs: Sequence[Tensor] | None = None,
        task_chunk: int | None = None,
        batch_norm: str = "transductive",
        log_lr: bool = True,
        per_step_bn: bool | None = None,
        cuda_graphs: bool = True,
    ):
        super().__init__(
            model, lr, first_order, allow_unused, allow_nograd, steps, loss, validate, task_chunk, batch_norm,
            cuda_graphs,
        )
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {LR_MODES}, got {lr_mode!r}")
        if per_step_bn not in (None, True, False):
            raise TypeError(f"per_step_bn must be None, True or False, got {per_step_bn!r}")
        if log_lr and lrs is None and self.lr <= 0:
            # log(lr) would be NaN (lr < 0) or -inf (lr = 0, never learnable).
            raise ValueError(f"lr must be > 0 with log_lr=True (the rates are learned as logarithms), got {self.lr}; "
                             "pass log_lr=False for a zero or negative rate")
        self.lr_mode = lr_mode
        self.lr_per_step = bool(lr_per_step)
        self.log_lr = bool(log_lr)
        self._adapt_selection = self._select_adapting(adapt_layers)
        bn_segments = self._batch_norm_segments()
        if per_step_bn and not bn_segments:
            raise ValueError("per_step_bn=True needs a model with affine BatchNorm layers; this one has none")
        self.per_step_bn = bool(bn_segments) if per_step_bn is None else per_step_bn
        self._per_state = frozenset(self.layout.index[s.name] for s in bn_segments) if self.per_step_bn else frozenset()
        # The set segments in offset order: the order of _bn_index and of bn_per_step's columns.
        self._set_segments = tuple(self.layout.index[s.name] for s in bn_segments) if self.per_step_bn else ()
        params = self._engine.params
        like = params[0]
        factory = {"dtype": like.dtype, "device": like.device}
        rates = self._initial_rates(lrs, params, factory)
        if self.log_lr:
            self.log_lrs = rates
        else:
            self.lrs = rates
        if self.per_step_bn:
            index = torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in bn_segments])
            self.register_buffer("_bn_index", index.to(like.device), persistent=False)
            start = self.layout.pack([p.detach() for p in params])[index.to(like.device)]
            # Rows are the states after 1 .. steps inner steps; state 0 is the model itself.
            self.bn_per_step = nn.Parameter(start.expand(self.steps, -1).clone())
        self.gates = bool(gates)
        if self.gates:
            unit_index, units = self._gate_units()
            self.register_buffer("_gate_unit_index", unit_index.to(like.device), persistent=False)
            self.gate_logits = nn.Parameter(torch.zeros(units, **factory))
        self.precondition = bool(precondition)
        if self.precondition:
            self.precond = nn.Parameter(torch.ones(self.layout.numel, **factory))

    def _initial_rates(self, lrs, params, factory):
        """The rate parameters at their initial values (log-rates under ``log_lr``)."""
        lead = (self.steps,) if self.lr_per_step else ()
        to_stored = torch.log if self.log_lr else (lambda t: t)
        if lrs is not None:
            if self.lr_mode != "param":
                raise ValueError("lrs (initial per-parameter rates) needs lr_mode='param'")
            lrs = list(lrs)
            if len(lrs) != len(params) or any(
                tuple(l.shape) != lead + tuple(p.shape) for l, p in zip(lrs, params)
            ):
                raise ValueError(
                    "lrs must hold one tensor per model parameter, shaped like it"
                    + (" with a leading steps dim" if lead else "")
                )
            if self.log_lr and not all(bool((l > 0).all()) for l in lrs):
                raise ValueError("lrs must be > 0 with log_lr=True (the rates are learned as logarithms)")
            return nn.ParameterList(
                [nn.Parameter(to_stored(l.detach().clone().to(**factory))) for l in lrs]
            )
        start = to_stored(torch.tensor(self.lr, **factory))
        if self.lr_mode == "param":
            return nn.ParameterList([nn.Parameter(start.expand(lead + tuple(p.shape)).clone()) for p in params])
        if self.lr_mode == "layer":
            return nn.Parameter(start.expand(lead + (len(params),)).clone())
        return nn.Parameter(start.expand(lead).clone())

    def _batch_norm_segments(self):
        """The layout segments of the model's affine BatchNorm weights and biases."""
        index = self.layout.index
        found = []
        for name, module in self.module.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                for kind in ("weight", "bias"):
                    key = f"{name}.{kind}" if name else kind
                    if key in index:
                        found.append(self.layout.segments[index[key]])
        return sorted(found, key=lambda s: s.offset)

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

    def _adapting(self, params: list[Tensor]) -> tuple[bool, ...]:
        # Per-step BatchNorm values are per state, so the inner loop reads them from the
        # fast weights; the plan sets them (StepRule.set_values) instead of stepping them.
        return tuple(
            (a and p.requires_grad) or k in self._per_state
            for k, (a, p) in enumerate(zip(self._adapt_selection, params))
        )

    def _rule(self) -> dict:
        """The plan's rule fields: the rate tensors and how they are stored, the gates, the
        preconditioner and the per-step BatchNorm values (see :class:`AdaptationPlan`)."""
        stored = self.log_lrs if self.log_lr else self.lrs
        rule = {
            "rate_mode": self.lr_mode,
            "lr": self.lr,
            "rates": tuple(stored) if self.lr_mode == "param" else (stored,),
            "rates_per_step": self.lr_per_step,
            "log_rates": self.log_lr,
        }
        if self.gates:
            rule.update(gate_logits=self.gate_logits, gate_unit_index=self._gate_unit_index)
        if self.precondition:
            rule["precond"] = self.precond
        if self.per_step_bn:
            rule.update(set_index=self._bn_index, set_per_step=self.bn_per_step, set_segments=self._set_segments)
        return rule

    def rates(self, step: int) -> Tensor | list[Tensor]:
        """The rates of inner step ``step`` (beyond the trained steps: the last one's), as
        the plan evaluates them: one tensor (scalar or layer mode) or one per parameter
        (param mode)."""
        rates = self.plan().rates_at(step)
        return rates if self.lr_mode == "param" else rates[0]

    def _gate_units(self) -> tuple[Tensor, int]:
        """int64 ``[P]``: each parameter's gate; ungated parameters read the last entry (1).

        A module's parameters share its output units' gates: row i of a weight and entry
        i of its bias (or BatchNorm's γ, β for channel i) read gate i.
        """
        index = torch.full((self.layout.numel,), -1, dtype=torch.long)
        units, module_units = 0, {}
        for k, (seg, adapt) in enumerate(zip(self.layout.segments, self._adapt_selection)):
            if not adapt or not seg.shape or k in self._per_state:
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

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lr_mode={self.lr_mode!r}, lr_per_step={self.lr_per_step}, "
            f"gates={self.gates}, precondition={self.precondition}, log_lr={self.log_lr}, "
            f"per_step_bn={self.per_step_bn}"
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
        cuda_graphs: bool = True,
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
            log_lr=False,
            per_step_bn=False,
            cuda_graphs=cuda_graphs,
        )
