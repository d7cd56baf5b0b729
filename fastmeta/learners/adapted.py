"""learn2learn's per-task API: ``learner.clone()`` and ``clone.adapt(loss)``.

>>> learner = fm.MAML(model, lr=0.4)                    # doctest: +SKIP
>>> for task in tasks:                                   # doctest: +SKIP
...     clone = learner.clone()
...     clone.adapt(loss_fn(clone(sx), sy))             # one inner step, in place
...     loss_fn(clone(qx), qy).backward()               # meta-gradient into learner.parameters()

A clone is an ``nn.Module`` holding a copy of the user's model (``clone.module``) whose
parameters are tensors of the autograd graph: before the first ``adapt`` they are clones
of the model's parameters, after it the adapted weights. Calling the clone runs the
user's own ``forward`` on them, with any inputs and outputs; every other attribute and
method of the model (``clone.log_prob(...)``, submodules, custom methods) is the copy's,
so it too runs with the adapted weights. This is what learn2learn computes, and it is the
same as a ``torch.func.functional_call`` + ``torch.autograd.grad`` loop over the
parameters, only cheaper (:mod:`fastmeta.learners.module_tree`). ``meta_batch`` is the
fast path for many tasks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from fastmeta.engine.plan import AdaptationPlan, parameter_coefficients, parameter_rates, parameter_set_values
from fastmeta.learners.module_tree import ModuleTree


def adapt_in_place(
    plan: AdaptationPlan,
    tree: ModuleTree,
    modules: Sequence[nn.Module],
    loss: Tensor,
    step: int,
    first_order: bool,
    allow_unused: bool,
    allow_nograd: bool,
    lr,
    lrs: Sequence[Tensor] | None,
    rate_cache: dict,
) -> None:
    """One inner step on ``loss`` for the parameters in ``modules`` (a tree of ``tree``'s
    shape): each adapting parameter θ becomes θ − c ⊙ ∂loss/∂θ, where c is ``lrs[k]``
    (MetaSGD), else ``lr`` for MAML's constant rule, else the plan's rule for ``step``
    (ModelAwareMAML; :func:`fastmeta.engine.plan.parameter_coefficients`).

    Everything is checked before anything changes: a failed step leaves the weights as
    they were.
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"adapt: loss must be a scalar tensor, got {got}")
    params = tree.read(modules)
    if not allow_nograd:
        frozen = [n for n, p in zip(tree.names, params) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"adapt: parameters {frozen} have requires_grad=False; pass allow_nograd=True "
                "to leave them unadapted (they are never changed)"
            )
    index = [k for k, (a, p) in enumerate(zip(plan.adapting, params)) if a and p.requires_grad]
    if not index:
        return  # nothing adapts: the step leaves every parameter as it is
    if not loss.requires_grad:
        raise ValueError(
            "adapt: loss does not depend on the clone's parameters (was it computed under "
            "torch.no_grad(), or from detached outputs?)"
        )
    if plan.validate and not math.isfinite(loss.item()):
        raise FloatingPointError(f"adapt got a loss of {loss.item()}")
    if lrs is not None:
        coefficients = list(lrs)
    elif isinstance(lr, Tensor):
        coefficients = [lr] * len(params)
    elif plan.rate_mode == "constant":
        coefficients = None  # MAML: the clone's own rate, lr
    else:
        coefficients = parameter_coefficients(plan, step, params[index[0]], rate_cache)  # before any change
    create_graph = not first_order and torch.is_grad_enabled()
    grads = torch.autograd.grad(loss, [params[k] for k in index], create_graph=create_graph, allow_unused=True)
    unused = [tree.names[k] for k, g in zip(index, grads) if g is None]
    if unused and not allow_unused:
        raise ValueError(
            f"adapt: the loss does not depend on parameters {unused}; pass allow_unused=True "
            "to leave them unadapted"
        )
    stepped = [(k, g) for k, g in zip(index, grads) if g is not None]
    set_values = parameter_set_values(plan, step)  # MAML++'s per-step BatchNorm weights
    if not stepped:
        if set_values:
            tree.write(modules, [set_values.get(k) for k in range(len(params))])
        return
    current = [params[k] for k, _ in stepped]
    grads = [g for _, g in stepped]
    # θ − c·g as a product then a difference, rounded as the functional loop rounds it: a
    # fused multiply-add (``_foreach_add(alpha=)``) differs in the last bit, and on
    # Omniglot conv4 in fp32 one task in 32 has a query pre-activation 6e-8 from ReLU's
    # kink, which that bit flips (a 1e-2 meta-gradient difference for that task). Two
    # foreach ops, two autograd nodes, instead of two per tensor.
    if coefficients is None:
        new = torch._foreach_sub(current, torch._foreach_mul(grads, float(lr)))
    else:
        new = torch._foreach_sub(current, torch._foreach_mul(grads, [coefficients[k] for k, _ in stepped]))
    updated: list[Tensor | None] = [None] * len(params)
    for (k, _), t in zip(stepped, new):
        updated[k] = t
    for k, value in set_values.items():
        updated[k] = value
    tree.write(modules, updated)


class ModelAttributes:
    """Mixed into an ``nn.Module`` holding ``self.module``: attributes it lacks are the
    module's (``learner.log_prob``, ``clone.log_prob``), as learn2learn's learners do."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "module" not in modules:
                raise
            return getattr(modules["module"], name)


class AdaptedModel(ModelAttributes, nn.Module):
    """One task's adapted copy of the model, as learn2learn's ``clone()`` returns.

    - ``clone(*args, **kwargs)`` runs the model's ``forward`` with the clone's weights;
      ``clone.module`` is that copy of the model; any other attribute or method not
      defined here is the copy's (``clone.log_prob(obs, act)``).
    - ``clone.adapt(loss, first_order=None, allow_unused=None, allow_nograd=None)``: one
      inner step in place, on any scalar loss built from the clone (its outputs, its
      methods, its ``parameters()``).
    - ``clone.clone()``: a copy that continues from the adapted weights.
    - ``clone.parameters()`` are the adapted tensors; gradients flow back to the
      learner's parameters. ``clone.lr`` is the rate of ``adapt`` (MAML; change it to
      step one clone differently), ``clone.lrs`` MetaSGD's per-parameter rates.
    - It is an ``nn.Module``: ``train()``, ``eval()``, ``buffers()``, ``state_dict()``
      (keys ``module.*``, as learn2learn's), ``zero_grad()``, hooks, and ``to()``, which
      keeps the adapted tensors in the graph.
    """

    def __init__(self, plan: AdaptationPlan, tree: ModuleTree, copies: list[nn.Module], lr, steps_taken: int,
                 first_order: bool, allow_unused: bool, allow_nograd: bool, transductive: bool):
        super().__init__()
        self.module = copies[0]
        # Plain attributes go straight into __dict__: nn.Module.__setattr__'s checks were 2%
        # of the sine meta-iteration (11 assignments per task).
        state = self.__dict__
        state["_plan"] = plan  # the learner's plan at clone(): the rule adapt() steps by
        state["_tree"] = tree
        state["_copies"] = copies
        state["_transductive"] = transductive
        state["_rate_cache"] = {}
        state["lr"] = lr
        lrs = parameter_rates(plan)
        if lrs is not None:
            state["lrs"] = list(lrs)
        state["steps_taken"] = steps_taken
        state["first_order"] = first_order
        state["allow_unused"] = allow_unused
        state["allow_nograd"] = allow_nograd

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def adapt(self, loss: Tensor, first_order=None, allow_unused=None, allow_nograd=None) -> None:
        """One inner step on ``loss`` (a scalar tensor computed from this clone), in place."""
        adapt_in_place(
            self._plan, self._tree, self._copies, loss, self.steps_taken,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
            self.lr, self.__dict__.get("lrs"), self._rate_cache,
        )
        self.__dict__["steps_taken"] += 1

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None) -> "AdaptedModel":
        """A new clone that continues from this one's weights (graph-connected to them)."""
        tree, copies = self._tree, self._copies
        new = tree.copy(copies, [t.clone() for t in tree.read(copies)], self._transductive)
        clone = AdaptedModel(
            self._plan, tree, new, self.lr, self.steps_taken,
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
            self._transductive,
        )
        if "lrs" in self.__dict__:
            clone.__dict__["lrs"] = list(self.lrs)  # this clone's rates, as set on it
        return clone

    def _apply(self, fn, recurse=True):
        """What ``.to()``, ``.double()``, ``.cuda()`` ... run: the clone's tensors become
        ``fn(tensor)`` *in the graph* (nn.Module's version would make them new leaves and
        cut the clone off from the learner); buffers as nn.Module does, which makes them
        the clone's own."""
        tree, copies = self._tree, self._copies
        tree.write(copies, [fn(t) for t in tree.read(copies)])
        if "lrs" in self.__dict__:
            self.__dict__["lrs"] = [fn(l) for l in self.lrs]
        with torch.no_grad():
            for c in copies:
                buffers = c._buffers
                for key, b in buffers.items():
                    if b is not None:
                        buffers[key] = fn(b)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad`` on the clone's leaf tensors (frozen or detached ones):
        the adapted tensors are not leaves and hold no ``.grad``."""
        for p in self.parameters():
            if not p.is_leaf or p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def extra_repr(self) -> str:
        return f"lr={self.lr}, steps_taken={self.steps_taken}, first_order={self.first_order}"
