"""``mlp_meta_step``: a whole MAML meta-step for a small MLP, for every task, in one op.

The model is ``Linear(I0→O0), act, Linear(O0→O1), act, ..., Linear(→O_last)``: every layer
has a bias, ``act`` (relu | leaky_relu | tanh | sigmoid | none) sits between layers and
nothing follows the last. For each task t, starting from the shared θ::

    θ_t ← θ_t − lr_s ⊙ ∇_θ L_support,t(θ_t)        for s = 0 … steps−1
    loss[t] = L_query,t(θ_t),  pred[t] = MLP(θ_t, query_x[t])

where L is the per-task mean loss of :func:`fastmeta.ops.task_loss` (``"mse"`` or
``"cross_entropy"``).

Arguments:

- theta ``[P]``: the flat parameters in ``named_parameters`` order: W0 ``[O0, I0]``,
  b0 ``[O0]``, W1 ``[O1, O0]``, b1, ...;
- layer_sizes: ``[I0, O0, O1, ..., O_last]``;
- act, negative_slope: the hidden activation (negative_slope for leaky_relu, ≥ 0);
- support_x ``[T, K, I0]``, query_x ``[T, Q, I0]``;
- support_y, query_y: ``[T, K|Q, O_last]`` floats for ``"mse"``, int64 ``[T, K|Q]`` class
  indices for ``"cross_entropy"``;
- loss_kind: ``"mse"`` or ``"cross_entropy"``;
- lr: the inner rates, ``[steps]`` (one per step), ``[steps, 2·layers]`` (one per
  parameter tensor per step, in θ's order: W0, b0, W1, ...) or ``[steps, P]`` (one per
  parameter per step; a learner folds gates and preconditioners into this);
- steps: the number of inner steps (≥ 0);
- first_order: drop the second-order terms (the inner gradients are treated as
  constants), as first-order MAML does.

Returns ``(losses [T], preds [T, Q, O_last])``. ``losses`` is differentiable w.r.t. theta
and lr; ``preds`` is not (it is for accuracy and logging).

Backward: ``mlp_meta_step_backward`` gives Σ_t w_t · d loss[t] / d(θ, lr) for the incoming
per-task weights w (the gradient of whatever was computed from ``losses``): exact second
order through every inner step (Hessian-vector products), or first order. Its own backward
(third-order terms, gradgradcheck) is the autograd of the reference below, so autograd is
exact for any use of the outputs.

Backends: the ``cpu`` backend runs the whole thing as one C++ call, parallel over tasks
(csrc/cpu/mlp_meta_step.cpp); the ``cuda`` backend as one kernel launch with one CTA per
task (csrc/cuda/mlp_meta_step.cu), for MLPs whose weights and activations fit the CTA's
shared memory (the limits are in that file; :mod:`fastmeta.backends.cuda_limits` asks for
them). Everything else runs the registered reference.

Two references live here, and the tests hold every kernel against both:

- :func:`plain_reference_meta_step`, the plain oracle: the unrolled inner loop, batched over
  tasks with ``bmm`` and differentiated by autograd. Obviously correct, and the definition
  the others are measured against; it cannot be a custom op's implementation (that runs
  below the autograd dispatch key).
- :func:`analytic_meta_step`, under the registered references ``reference_mlp_meta_step_*``:
  the same computation with the derivatives written out (the C++ kernels' algorithm), held
  against the plain oracle.

The whole training step (this meta-step and Adam in one call) is its own op family:
:mod:`fastmeta.ops.mlp_meta_step_update`.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.backends import REFERENCE, kernel_choice
from fastmeta.backends.cuda_limits import cuda_fits, cuda_smem_limit
from fastmeta.backends.extension import kernel_dtypes
from fastmeta.ops.registration import NativeCall, call_with_kernel, define_op
from fastmeta.ops.activation import apply_activation, check_activation
from fastmeta.ops.reference_vjp import reference_vjp
from fastmeta.ops.task_loss import LOSS_KINDS

# The fused kernels pad rows with zeros and rely on act(0) = 0, which the sigmoid breaks:
# it runs the reference.
FUSED_ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")


def num_parameters(layer_sizes: list[int]) -> int:
    return sum(o * (i + 1) for i, o in zip(layer_sizes[:-1], layer_sizes[1:]))


def segment_sizes(layer_sizes: list[int]) -> list[int]:
    """Sizes of θ's parameter tensors: W0, b0, W1, b1, ..."""
    sizes = []
    for i, o in zip(layer_sizes[:-1], layer_sizes[1:]):
        sizes += [o * i, o]
    return sizes


def check_arguments(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
                    loss_kind, lr, steps) -> None:
    """Shape, dtype and value checks at the public boundary (no device sync)."""
    if len(layer_sizes) < 2 or any(int(s) < 1 for s in layer_sizes):
        raise ValueError(f"layer_sizes must be [in, out, ...] with sizes >= 1, got {layer_sizes}")
    check_activation(act, negative_slope)
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {LOSS_KINDS}, got {loss_kind!r}")
    P = num_parameters(layer_sizes)
    params = list(theta) if isinstance(theta, (list, tuple)) else [theta]
    if not params or sum(p.numel() for p in params) != P or (len(params) == 1 and params[0].dim() != 1):
        shapes = [tuple(p.shape) for p in params]
        raise ValueError(f"params must hold P = {P} values for layer_sizes {layer_sizes} (one flat θ [P], or the "
                         f"parameter tensors in order), got {shapes}")
    if support_x.dim() != 3 or query_x.dim() != 3 or support_x.size(-1) != layer_sizes[0] \
            or query_x.size(-1) != layer_sizes[0] or query_x.size(0) != support_x.size(0):
        raise ValueError(
            f"support_x and query_x must be [T, K, {layer_sizes[0]}] and [T, Q, {layer_sizes[0]}], "
            f"got {tuple(support_x.shape)} and {tuple(query_x.shape)}"
        )
    for name, y, x in (("support_y", support_y, support_x), ("query_y", query_y, query_x)):
        want = tuple(x.shape[:2]) + ((layer_sizes[-1],) if loss_kind == "mse" else ())
        if tuple(y.shape) != want:
            raise ValueError(f"{name} must be {list(want)} for {loss_kind}, got {tuple(y.shape)}")
        if loss_kind == "cross_entropy" and y.dtype != torch.int64:
            raise ValueError(f"{name} must hold int64 class indices for cross_entropy, got {y.dtype}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    S = 2 * (len(layer_sizes) - 1)
    if not (lr.dim() == 1 or (lr.dim() == 2 and lr.size(1) in (S, P))) or lr.size(0) != steps:
        raise ValueError(
            f"lr must be [steps], [steps, {S}] or [steps, {P}] with steps = {steps}, got {tuple(lr.shape)}"
        )


# ---------------------------------------------------------------------------------------
# The plain reference (the oracle): the unrolled inner loop, batched over tasks,
# differentiated by autograd
# ---------------------------------------------------------------------------------------


def mlp_forward(theta_t: Tensor, layer_sizes: list[int], act: str, negative_slope: float, x: Tensor) -> Tensor:
    """The MLP with per-task parameters theta_t ``[T, P]`` on x ``[T, N, I0]`` → ``[T, N, O_last]``."""
    T = theta_t.size(0)
    h, offset = x, 0
    n_layers = len(layer_sizes) - 1
    for layer, (i, o) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
        w = theta_t[:, offset: offset + o * i].reshape(T, o, i)
        offset += o * i
        b = theta_t[:, offset: offset + o]
        offset += o
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if layer < n_layers - 1:
            h = apply_activation(h, act, negative_slope)
    return h


def _task_losses(pred: Tensor, target: Tensor, loss_kind: str) -> Tensor:
    T = pred.size(0)
    if loss_kind == "cross_entropy":
        per = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="none")
        return per.view(T, -1).mean(1)
    return (pred - target).pow(2).reshape(T, -1).mean(1)


def _step_rates(lr: Tensor, layer_sizes: list[int]) -> Tensor:
    """lr as ``[steps, P]`` (or ``[steps, 1]`` for one rate per step)."""
    if lr.dim() == 1:
        return lr.unsqueeze(1)
    P = num_parameters(layer_sizes)
    if lr.size(1) == P:
        return lr
    sizes = torch.tensor(segment_sizes(layer_sizes), device=lr.device)
    return torch.repeat_interleave(lr, sizes, dim=1)


def plain_reference_meta_step(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
                              loss_kind, lr, steps, first_order, create_graph: bool):
    """(losses, preds) through the unrolled inner loop: the plain oracle of the op. Not the
    registered reference (``reference_mlp_meta_step_with_task_gradients``, which runs
    :func:`analytic_meta_step`): the tests hold that one, and every kernel, against this.

    With ``create_graph`` the inner gradients stay in the graph (second order) unless
    ``first_order``; the result is then differentiable w.r.t. theta and lr to any order.
    """
    T = support_x.size(0)
    rates = _step_rates(lr, layer_sizes)
    with torch.enable_grad():
        fast = theta.expand(T, theta.numel())
        if not fast.requires_grad:
            # The inner loop needs gradients even when θ itself is a constant.
            fast = fast.detach().requires_grad_(True)
        for s in range(steps):
            pred = mlp_forward(fast, layer_sizes, act, negative_slope, support_x)
            inner = _task_losses(pred, support_y, loss_kind).sum()  # tasks are independent
            (g,) = torch.autograd.grad(inner, fast, create_graph=create_graph and not first_order)
            fast = fast - rates[s] * g
        preds = mlp_forward(fast, layer_sizes, act, negative_slope, query_x)
        losses = _task_losses(preds, query_y, loss_kind)
    return losses, preds


# The op's own reference. A custom op's implementation runs below the autograd dispatch
# key, so it cannot call autograd; this is the same computation with the derivatives
# written out (the algorithm of the C++ kernels, in batched torch ops): forward and
# backward through the MLP, and Hessian-vector products by the R-operator. The tests hold
# it, and every kernel, against plain_reference_meta_step above. Built from differentiable torch
# ops, it is itself differentiable: its autograd gives the third-order terms.


def _split(flat: Tensor, layer_sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """[T, P] → per layer (W [T, O, I], b [T, O]) views."""
    T, out, offset = flat.size(0), [], 0
    for i, o in zip(layer_sizes[:-1], layer_sizes[1:]):
        w = flat[:, offset: offset + o * i].reshape(T, o, i)
        offset += o * i
        out.append((w, flat[:, offset: offset + o]))
        offset += o
    return out


def _join(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    return torch.cat([t.reshape(t.size(0), -1) for pair in pairs for t in pair], dim=1)


def _derivative(y: Tensor, act: str, negative_slope: float) -> Tensor:
    if act == "relu":
        return (y > 0).to(y.dtype)
    if act == "leaky_relu":
        # Tensors, not Python scalars: where(cond, 1.0, s) is float32 whatever y's dtype.
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, negative_slope))
    if act == "tanh":
        return 1 - y * y
    if act == "sigmoid":
        return y * (1 - y)
    return torch.ones_like(y)


def _activation_second_derivative(y: Tensor, act: str) -> Tensor | None:
    """f''(z), written in y = f(z); None where it is zero. Not
    :func:`fastmeta.ops.activation.d_activation_derivative_dy` (d f'/dy): by the chain rule,
    f''(z) = d f'/dy · f'(z)."""
    if act == "tanh":
        return -2 * y * (1 - y * y)
    if act == "sigmoid":
        return y * (1 - y) * (1 - 2 * y)
    return None


class _Pass:
    """Forward and backward of the MLP at per-task parameters, with what an HVP reuses."""

    def __init__(self, params, x, y, cfg, need_backward: bool):
        layer_sizes, act, slope, loss_kind = cfg
        self.params, self.cfg = params, cfg
        hs = [x]
        for layer, (w, b) in enumerate(params):
            z = torch.baddbmm(b.unsqueeze(1), hs[-1], w.transpose(1, 2))
            hs.append(apply_activation(z, act, slope) if layer < len(params) - 1 else z)
        self.hs = hs
        out = hs[-1]
        self.loss = _task_losses(out, y, loss_kind)
        if not need_backward:
            return
        rows = out.size(1)
        if loss_kind == "mse":
            delta = (out - y) * (2.0 / (rows * out.size(2)))
        else:
            self.probs = torch.softmax(out, dim=-1)
            delta = (self.probs - F.one_hot(y, out.size(-1)).to(out.dtype)) / rows
        deltas, es, grads = [None] * len(params), [None] * len(params), [None] * len(params)
        for layer in range(len(params) - 1, -1, -1):
            w, _ = params[layer]
            deltas[layer] = delta
            grads[layer] = (torch.bmm(delta.transpose(1, 2), hs[layer]), delta.sum(1))
            if layer > 0:
                es[layer] = torch.bmm(delta, w)
                delta = es[layer] * _derivative(hs[layer], act, slope)
        self.deltas, self.es, self.grads = deltas, es, grads

    def hessian_vector(self, u):
        """Per task, the Hessian of this pass's loss times u (per-layer (V, c) pairs)."""
        layer_sizes, act, slope, loss_kind = self.cfg
        params, hs = self.params, self.hs
        rz, rh = [None] * len(params), [None] * (len(params) + 1)
        for layer, ((w, _), (v, c)) in enumerate(zip(params, u)):
            z = torch.baddbmm(c.unsqueeze(1), hs[layer], v.transpose(1, 2))
            if rh[layer] is not None:
                z = z + torch.bmm(rh[layer], w.transpose(1, 2))
            rz[layer] = z
            if layer < len(params) - 1:
                rh[layer + 1] = _derivative(hs[layer + 1], act, slope) * z
        out_rz, rows = rz[-1], hs[-1].size(1)
        if loss_kind == "mse":
            rd = out_rz * (2.0 / (rows * out_rz.size(2)))
        else:
            p = self.probs
            rd = p * (out_rz - (p * out_rz).sum(-1, keepdim=True)) / rows
        result = [None] * len(params)
        for layer in range(len(params) - 1, -1, -1):
            (w, _), (v, _) = params[layer], u[layer]
            delta = self.deltas[layer]
            rdw = torch.bmm(rd.transpose(1, 2), hs[layer])
            if rh[layer] is not None:
                rdw = rdw + torch.bmm(delta.transpose(1, 2), rh[layer])
            result[layer] = (rdw, rd.sum(1))
            if layer > 0:
                re = torch.bmm(rd, w) + torch.bmm(delta, v)
                rd = re * _derivative(hs[layer], act, slope)
                second = _activation_second_derivative(hs[layer], act)
                if second is not None:
                    rd = rd + self.es[layer] * second * rz[layer - 1]
        return result


def analytic_meta_step(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
                       loss_kind, lr, steps, first_order, loss_weights=None):
    """(losses, preds, dθ, dlr): the meta-step with its derivatives written out.

    With loss_weights w ``[T]`` (the weight of each task's query loss),
    dθ = Σ_t w_t dloss_t/dθ ``[P]`` and dlr likewise (lr's shape); otherwise both are None.
    """
    T, P = support_x.size(0), theta.numel()
    cfg = (layer_sizes, act, negative_slope, loss_kind)
    rates = _step_rates(lr, layer_sizes)  # [steps, P] or [steps, 1]
    need = loss_weights is not None
    fast = theta.expand(T, P)
    passes, thetas = [], []
    for s in range(steps):
        thetas.append(fast)
        inner = _Pass(_split(fast, layer_sizes), support_x, support_y, cfg, need_backward=True)
        passes.append(inner)
        fast = fast - rates[s] * _join(inner.grads)
    query = _Pass(_split(fast, layer_sizes), query_x, query_y, cfg, need_backward=need)
    losses, preds = query.loss, query.hs[-1]
    if not need:
        return losses, preds, None, None
    v = _join(query.grads) * loss_weights.unsqueeze(1)  # [T, P]: w_t ∇L_query,t(θ_S)
    d_rates = [None] * steps
    for s in range(steps - 1, -1, -1):
        g = _join(passes[s].grads)
        d_rates[s] = -(v * g).sum(0)  # [P]: dα_s summed over tasks
        if not first_order:
            hu = passes[s].hessian_vector(_split(rates[s] * v, layer_sizes))
            v = v - _join(hu)
    d_theta = v.sum(0)
    if steps == 0:
        return losses, preds, d_theta, torch.zeros_like(lr)
    d_rates = torch.stack(d_rates)  # [steps, P]
    if lr.dim() == 1:
        d_lr = d_rates.sum(1)
    elif lr.size(1) == P:
        d_lr = d_rates
    else:
        d_lr = torch.stack([seg.sum(1) for seg in d_rates.split(segment_sizes(layer_sizes), dim=1)], dim=1)
    return losses, preds, d_theta, d_lr


def _flat(params: list[Tensor]) -> Tensor:
    return params[0].reshape(-1) if len(params) == 1 else torch.cat([p.reshape(-1) for p in params])


def _per_parameter(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    return [g.view_as(p).clone() for g, p in zip(flat.split([p.numel() for p in params]), params)]


# What the kernel found non-finite when asked to validate: its last output, int64 ``[3]`` on
# the CPU = (kind, task, argument), zeros when nothing was. The numbering is that of
# NonFinite and NonFiniteArgument in csrc/mlp_meta_step_entry.h. A code rather than an
# exception because torch has no C++ error that reaches Python as FloatingPointError, and
# the op must not parse message text: :func:`raise_nonfinite` turns it into the error.
NONFINITE_NONE, NONFINITE_INPUT, NONFINITE_QUERY_LOSS = 0, 1, 2
NONFINITE_ARGUMENTS = ("support_x", "query_x", "support_y", "query_y")


def reference_mlp_meta_step_with_task_gradients(
    params: list[Tensor], layer_sizes: list[int], act: str, negative_slope: float, support_x: Tensor,
    support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_kind: str, lr: Tensor, steps: int, first_order: bool,
    task_gradients: bool, validate: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A MAML meta-step of a small MLP for every task, with each task's meta-gradient; see
    the module docstring. The kernel under :func:`mlp_meta_step_mean` and
    :func:`mlp_meta_step`, which return only the first three outputs.

    Returns (mean loss ``[]``, losses ``[T]``, preds ``[T, Q, O]``, dθ ``[T, P]``, dlr
    ``[T, *lr.shape]``, nonfinite ``[3]``). dθ and dlr are every task's meta-gradient when
    ``task_gradients`` is set, else empty: the fused kernels compute them on the way, almost
    for free (the inner loop's activations are still in cache), and the backward then only
    weighs them. ``validate``: look for NaN/Inf inputs and losses and report the first in
    ``nonfinite`` (int64, on the CPU: kind, task, argument; see ``NONFINITE_*``), for the
    caller to raise with :func:`raise_nonfinite` (the CPU kernel checks in its own loops,
    at no dispatch or sync; the CUDA kernel does not check, as that would sync the device).
    A label out of range is an error whether or not ``validate`` is set: ValueError from the
    CPU kernel, torch's own from the reference's ``cross_entropy``.
    """
    theta = _flat(params)
    nonfinite = torch.zeros(3, dtype=torch.int64)
    if validate:
        _find_nonfinite_inputs(support_x, support_y, query_x, query_y, loss_kind, nonfinite)
    losses, preds, _, _ = analytic_meta_step(
        theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
        loss_kind, lr, steps, first_order,
    )
    if validate and nonfinite[0] == NONFINITE_NONE:
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            nonfinite.copy_(torch.tensor([NONFINITE_QUERY_LOSS, int(bad[0]), -1]))
    mean = losses.mean()
    if not task_gradients:
        return mean, losses, preds.clone(), theta.new_empty(0), lr.new_empty(0), nonfinite
    one = theta.new_ones(1)
    per_task = [
        analytic_meta_step(theta, layer_sizes, act, negative_slope, support_x[t:t + 1], support_y[t:t + 1],
                           query_x[t:t + 1], query_y[t:t + 1], loss_kind, lr, steps, first_order, loss_weights=one)[2:]
        for t in range(support_x.size(0))
    ]
    return (mean, losses, preds.clone(), torch.stack([g for g, _ in per_task]).detach(),
            torch.stack([g for _, g in per_task]).detach(), nonfinite)


def _find_nonfinite_inputs(support_x, support_y, query_x, query_y, loss_kind, nonfinite: Tensor) -> None:
    """The first task with a NaN/Inf input, into ``nonfinite``, in the kernel's order."""
    named = [support_x, query_x] + ([support_y, query_y] if loss_kind == "mse" else [])
    for argument, t in enumerate(named):
        bad = (~torch.isfinite(t.reshape(t.size(0), -1)).all(1)).nonzero()
        if bad.numel():
            nonfinite.copy_(torch.tensor([NONFINITE_INPUT, int(bad[0]), argument]))
            return


def raise_nonfinite(nonfinite: Tensor, losses: Tensor) -> None:
    """Raise FloatingPointError for the finding of a validating meta-step (its ``nonfinite``
    output, read on the host: a CPU tensor, so no sync); return if there is none."""
    # Read through its pointer: tolist() and numpy() each cost dispatches (resolve_conj,
    # resolve_neg, ...), and W1's whole validating step is 4 (tests/engine/test_dispatch_budgets.py).
    if nonfinite.device.type != "cpu" or nonfinite.dtype != torch.int64 or nonfinite.numel() != 3:
        raise TypeError(f"nonfinite must be an int64 CPU tensor [3], got {nonfinite.dtype} "
                        f"{tuple(nonfinite.shape)} on {nonfinite.device}")
    kind, task, argument = (ctypes.c_int64 * 3).from_address(nonfinite.contiguous().data_ptr())
    if kind == NONFINITE_INPUT:
        raise FloatingPointError(f"{NONFINITE_ARGUMENTS[argument]} has NaN or Inf in task {task}")
    if kind == NONFINITE_QUERY_LOSS:
        raise FloatingPointError(f"the query loss of task {task} is {float(losses.detach()[task])}")


def _loss_weights(grad_mean: Tensor | None, grad_losses: Tensor | None, T: int, like: Tensor) -> Tensor:
    w = like.new_zeros(T)
    if grad_losses is not None:
        w = w + grad_losses
    if grad_mean is not None:
        w = w + grad_mean / T
    return w


def reference_mlp_meta_step_backward(
    grad_mean: Tensor | None, grad_losses: Tensor | None, params: list[Tensor], layer_sizes: list[int], act: str,
    negative_slope: float, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_kind: str,
    lr: Tensor, steps: int, first_order: bool, needs: list[bool],
) -> list[Tensor]:
    """[Σ_t w_t · dloss_t/dp for each parameter p, then the same for lr], with
    w_t = grad_losses[t] + grad_mean / T (either may be None: zero); empty where ``needs``
    (params, lr) says no."""
    theta = _flat(params)
    w = _loss_weights(grad_mean, grad_losses, support_x.size(0), theta)
    _, _, d_theta, d_lr = analytic_meta_step(
        theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
        loss_kind, lr, steps, first_order, loss_weights=w,
    )
    grads = _per_parameter(d_theta, params) if needs[0] else [p.new_empty(0) for p in params]
    return grads + [d_lr if needs[1] else lr.new_empty(0)]


def reference_mlp_meta_step_weigh_task_gradients(
    grad_mean: Tensor | None, grad_losses: Tensor | None, task_grad_theta: Tensor, task_grad_lr: Tensor,
    params: list[Tensor],
) -> list[Tensor]:
    """[Σ_t w_t · task_grad_theta[t] per parameter (shaped like it), Σ_t w_t · task_grad_lr[t]]:
    the backward of the forward's per-task gradients, w_t as in mlp_meta_step_backward."""
    T = task_grad_theta.size(0)
    w = _loss_weights(grad_mean, grad_losses, T, task_grad_theta)
    g_lr = (w @ task_grad_lr.reshape(T, -1)).view(task_grad_lr.shape[1:])
    return _per_parameter(w @ task_grad_theta, params) + [g_lr]


_ARGS = ("params", "layer_sizes", "act", "negative_slope", "support_x", "support_y", "query_x", "query_y",
         "loss_kind", "lr", "steps", "first_order")


def _native_takes(device_type, params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
                  loss_kind, lr, steps, first_order, *rest) -> bool:
    if any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
        return False
    return _kernel_inputs_ok(device_type, params[0], support_x, support_y, query_x, query_y, lr, act, loss_kind,
                             layer_sizes, steps)


def _contiguous(a):
    if isinstance(a, Tensor):
        return a.contiguous()
    if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
        return [t.contiguous() for t in a]
    return a


def _native_args(*args):
    return tuple(_contiguous(a) for a in args)


def _check(params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y, loss_kind, lr, steps,
           *rest) -> None:
    check_arguments(params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y, loss_kind, lr,
                    steps)


mlp_meta_step_op = define_op(reference_mlp_meta_step_with_task_gradients, NativeCall(takes=_native_takes, args=_native_args), _check)


def mlp_meta_step_mean(params: Tensor | Sequence[Tensor], layer_sizes: list[int], act: str, negative_slope: float,
                       support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_kind: str,
                       lr: Tensor, steps: int, first_order: bool, validate: bool = False,
                       kernel=None) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss ``[]``, losses ``[T]``, preds ``[T, Q, O]``): a MAML meta-step of a small MLP
    for every task, differentiable w.r.t. the parameters (one flat θ, or the model's
    parameter tensors in order) and lr; see the module docstring.

    kernel: the kernel :func:`choose_fused_kernel` chose for these arguments, by a caller
    that has checked them (the engine): the op then neither checks nor chooses again.
    None: the op checks the arguments and chooses its kernel itself."""
    params = [params] if isinstance(params, Tensor) else list(params)
    # The per-task gradients are worth computing in the forward only when a backward will
    # follow: computing them in the forward beats recomputing them in the backward, and
    # costs a forward alone more than twice its time (docs/benchmarks.md, "Measurements
    # behind code decisions").
    task_gradients = torch.is_grad_enabled() and (any(p.requires_grad for p in params) or lr.requires_grad)
    args = (params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y, loss_kind, lr,
            steps, first_order, task_gradients, validate)
    if kernel is None:
        mean, losses, preds, _, _, nonfinite = mlp_meta_step_op(*args)
    else:
        mean, losses, preds, _, _, nonfinite = call_with_kernel(mlp_meta_step_op, kernel, *args)
    if validate:
        raise_nonfinite(nonfinite, losses)
    return mean, losses, preds


def mlp_meta_step(theta: Tensor | Sequence[Tensor], layer_sizes: list[int], act: str, negative_slope: float,
                  support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, loss_kind: str, lr: Tensor,
                  steps: int, first_order: bool) -> tuple[Tensor, Tensor]:
    """(losses ``[T]``, preds ``[T, Q, O]``): :func:`mlp_meta_step_mean` without the mean."""
    _, losses, preds = mlp_meta_step_mean(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x,
                                          query_y, loss_kind, lr, steps, first_order)
    return losses, preds


@mlp_meta_step_op.register_fake
def _(params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y, loss_kind, lr, steps,
      first_order, task_gradients, validate):
    T, Q = query_x.size(0), query_x.size(1)
    like = params[0]
    P = sum(p.numel() for p in params)
    task_shapes = ((T, P), (T, *lr.shape)) if task_gradients else ((0,), (0,))
    return (like.new_empty(()), like.new_empty((T,)), like.new_empty((T, Q, layer_sizes[-1])),
            like.new_empty(task_shapes[0]), lr.new_empty(task_shapes[1]), torch.empty(3, dtype=torch.int64))


def _meta_step_setup(ctx, inputs, output):
    (params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
     loss_kind, lr, steps, first_order, task_gradients, validate) = inputs
    ctx.config = (list(layer_sizes), act, negative_slope, loss_kind, steps, first_order)
    ctx.num_params = len(params)
    ctx.mark_non_differentiable(*output[2:])
    # Unused outputs get None, not materialised zeros (each would be a dispatch).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(support_x, support_y, query_x, query_y, lr, output[3], output[4], *params)


def _meta_step_backward(ctx, grad_mean, grad_losses, grad_preds, grad_task_theta, grad_task_lr, grad_nonfinite):
    support_x, support_y, query_x, query_y, lr, task_theta, task_lr, *params = ctx.saved_tensors
    layer_sizes, act, negative_slope, loss_kind, steps, first_order = ctx.config
    for name, i in zip(_ARGS[4:8], (4, 5, 6, 7)):
        if ctx.needs_input_grad[i]:
            # Never a silently missing gradient: the fused step treats the data as constants.
            raise RuntimeError(f"mlp_meta_step is not differentiable w.r.t. {name}; detach it")
    # A list input's entry of needs_input_grad is a list too (one flag per tensor).
    needs = [any(ctx.needs_input_grad[0]), ctx.needs_input_grad[9]]
    # A list input's gradient is a list, even when none is wanted.
    none = ([None] * ctx.num_params,) + (None,) * 13
    if not any(needs) or (grad_mean is None and grad_losses is None):
        return none
    if task_theta.numel() and not torch.is_grad_enabled():
        # The forward kernel computed every task's meta-gradient on the way: weighing them
        # is the whole backward. Only without create_graph: to autograd they are constants.
        grads = mlp_meta_step_weigh_task_gradients(grad_mean, grad_losses, task_theta, task_lr, params)
    else:
        grads = mlp_meta_step_backward(grad_mean, grad_losses, params, layer_sizes, act, negative_slope, support_x,
                                       support_y, query_x, query_y, loss_kind, lr, steps, first_order, needs)
    return (grads[:-1] if needs[0] else [None] * ctx.num_params, None, None, None, None, None, None, None, None,
            grads[-1] if needs[1] else None, None, None, None, None)


mlp_meta_step_op.register_autograd(_meta_step_backward, setup_context=_meta_step_setup)


# ---------------------------------------------------------------------------------------
# mlp_meta_step_backward and mlp_meta_step_weigh_task_gradients
# ---------------------------------------------------------------------------------------


mlp_meta_step_backward = define_op(reference_mlp_meta_step_backward, NativeCall(
    takes=lambda device_type, grad_mean, grad_losses, *args: _native_takes(device_type, *args), args=_native_args))


@mlp_meta_step_backward.register_fake
def _(grad_mean, grad_losses, params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
      loss_kind, lr, steps, first_order, needs):
    return ([p.new_empty(p.shape if needs[0] else (0,)) for p in params]
            + [lr.new_empty(lr.shape if needs[1] else (0,))])


def _meta_step_backward_setup(ctx, inputs, output):
    (grad_mean, grad_losses, params, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y,
     loss_kind, lr, steps, first_order, needs) = inputs
    ctx.config = (list(layer_sizes), act, negative_slope, loss_kind, steps, first_order, list(needs))
    ctx.has_upstream = (grad_mean is not None, grad_losses is not None)
    ctx.num_params = len(params)
    ctx.save_for_backward(grad_mean, grad_losses, support_x, support_y, query_x, query_y, lr, *params)


def _meta_step_backward_backward(ctx, upstream):
    # Third-order terms: the exact VJP of the reference backward (autograd through the
    # unrolled loop). Slow, and only reached by double backward / gradgradcheck.
    grad_mean, grad_losses, support_x, support_y, query_x, query_y, lr, *params = ctx.saved_tensors
    layer_sizes, act, negative_slope, loss_kind, steps, first_order, needs = ctx.config
    for name, i in zip(_ARGS[4:8], (6, 7, 8, 9)):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"mlp_meta_step_backward is not differentiable w.r.t. {name}; detach it")
    n = len(params)
    has_mean, has_losses = ctx.has_upstream
    inputs = [grad_mean if has_mean else None, grad_losses if has_losses else None, *params, lr]

    def backward(gm, gl, *rest):
        return reference_mlp_meta_step_backward(gm, gl, list(rest[:n]), layer_sizes, act, negative_slope, support_x,
                                                support_y, query_x, query_y, loss_kind, rest[n], steps, first_order,
                                                needs)

    wanted = (has_mean and ctx.needs_input_grad[0], has_losses and ctx.needs_input_grad[1],
              *ctx.needs_input_grad[2], ctx.needs_input_grad[11])
    grads = reference_vjp(backward, tuple(inputs), wanted,
                          [u if (i < n and needs[0]) or (i == n and needs[1]) else None for i, u in enumerate(upstream)])
    return (grads[0], grads[1], list(grads[2:2 + n]), None, None, None,
            None, None, None, None, None, grads[2 + n], None, None, None)


mlp_meta_step_backward.register_autograd(_meta_step_backward_backward, setup_context=_meta_step_backward_setup)


mlp_meta_step_weigh_task_gradients = define_op(reference_mlp_meta_step_weigh_task_gradients, NativeCall(
    args=_native_args))


@mlp_meta_step_weigh_task_gradients.register_fake
def _(grad_mean, grad_losses, task_grad_theta, task_grad_lr, params):
    return [p.new_empty(p.shape) for p in params] + [task_grad_lr.new_empty(task_grad_lr.shape[1:])]


# ---------------------------------------------------------------------------------------
# Which backend kernel takes a call: the op's one rule
# ---------------------------------------------------------------------------------------

def _kernel_shape_ok(device: torch.device, dtype: torch.dtype, act: str, layer_sizes: list[int], K: int, Q: int,
                     steps: int) -> bool:
    """The fused C++/CUDA kernels' limits: dtype (the backend's table), activation and (CUDA)
    shared memory (the backend's sizing)."""
    if dtype not in kernel_dtypes(device.type):
        return False
    if act not in FUSED_ACTIVATIONS:
        return False
    if device.type == "cuda":
        return cuda_fits(layer_sizes, K, Q, steps, cuda_smem_limit(device))
    return True


def choose_fused_kernel(layer_sizes: list[int], act: str, loss_kind: str | None, device: torch.device,
                        dtype: torch.dtype, K: int, Q: int, steps: int):
    """The backend kernel that runs ``mlp_meta_step`` with these arguments, or None when
    only its reference would (a fused kernel is then no faster than the engine's general
    path). The op's one rule, asked once per call: by the engine before it takes the fused
    path (it then runs the op with this kernel, :func:`mlp_meta_step_mean`'s ``kernel``),
    and by the backend kernel's ``takes`` for a direct call of the op."""
    if loss_kind not in LOSS_KINDS:
        return None
    name, kernel = kernel_choice("mlp_meta_step_with_task_gradients", device.type, dtype)
    if name == REFERENCE or not _kernel_shape_ok(device, dtype, act, layer_sizes, K, Q, steps):
        return None
    # The engine has checked what the launcher would check again (dtypes, devices, shapes).
    return getattr(kernel, "unchecked", kernel)


def _kernel_inputs_ok(device_type: str, theta, support_x, support_y, query_x, query_y, lr, act,
                      loss_kind, layer_sizes, steps) -> bool:
    if any(t.dtype != theta.dtype for t in (support_x, query_x, lr)):
        return False
    if loss_kind == "mse" and (support_y.dtype != theta.dtype or query_y.dtype != theta.dtype):
        return False
    if any(t.device != theta.device for t in (support_x, support_y, query_x, query_y, lr)):
        return False
    return _kernel_shape_ok(theta.device, theta.dtype, act, layer_sizes, support_x.size(1), query_x.size(1), steps)


# ---------------------------------------------------------------------------------------
# The family: its kernels' samples (a block of its own, to move with the kernels)
# ---------------------------------------------------------------------------------------


def _sample_params():
    return [torch.randn(8, 1), torch.randn(8), torch.randn(1, 8), torch.randn(1)]


def _sample_problem():
    """A tiny meta-step problem (1-8-1 tanh MLP, 2 tasks, mse): the arguments after the
    parameters, shared with :mod:`fastmeta.ops.mlp_meta_step_update`'s sample."""
    T, K, Q, r = 2, 3, 4, torch.randn
    return ([1, 8, 1], "tanh", 0.0, r(T, K, 1), r(T, K, 1), r(T, Q, 1), r(T, Q, 1), "mse", torch.tensor([0.1]), 1,
            False)


def _samples():
    T = 2
    return {
        "mlp_meta_step_with_task_gradients": lambda: (_sample_params(), *_sample_problem(), True, False),
        "mlp_meta_step_backward": lambda: (torch.tensor(1.0), None, _sample_params(), *_sample_problem(),
                                           [True, True]),
        "mlp_meta_step_weigh_task_gradients": lambda: (torch.tensor(1.0), torch.randn(T), torch.randn(T, 25),
                                                       torch.randn(T, 1), _sample_params()),
    }


from fastmeta.ops.registration import OpFamily, define_family  # noqa: E402 (this block stands alone)

FAMILY = define_family(OpFamily(name="mlp_meta_step", sample_args=_samples(), check_seconds=12))
