"""The contenders of ``fastmeta bench``: fastmeta on each backend, and the peers.

A contender runs one full meta-iteration per :meth:`Contender.step`: the inner loop of
every task, the query loss, the meta-gradient and an Adam step (lr 1e-3), in the order a
user's training loop would run them. fastmeta's default row is exactly a user's loop
(:class:`FastmetaContender`): the learner and ``torch.optim.Adam`` with their defaults,
``out = learner.meta_batch(...)``, ``out.loss.backward()``, ``opt.step()``, fed a new batch
of the same shapes every iteration. The peers are what a user would run instead
(docs/benchmarks.md):

- ``loop``: a per-task Python loop with ``autograd.grad(create_graph=True)``, what
  learn2learn's ``clone()/adapt()`` does; BatchNorm uses batch statistics through
  ``functional_call`` on copies of the buffers. Each task's query loss is backpropagated
  as soon as it is computed, as learn2learn's examples do, so its peak memory is one
  task's graph.
- ``vmap``: ``torch.func.vmap`` over tasks, the inner loop built from ``torch.func.grad``
  and ``functional_call`` (the functorch MAML example; BatchNorm patched by
  ``torch.func.replace_all_batch_norm_modules_``).
- ``compile``: ``torch.compile`` of that vmap function.
- ``graph``: the whole vmap meta-iteration (forward, backward, ``Adam(capturable=True)``)
  captured once in a CUDA graph and replayed.
- ``jax``: ``jax.jit`` over ``vmap(grad)``, with the Adam update inside the jitted
  function; only when ``import jax`` works.

The benchmark checks each contender's meta-gradient against a reference before timing
it: :meth:`Contender.reset_parameters`, one :meth:`Contender.step`, then
:meth:`Contender.meta_gradient` reads the gradient that step computed (at the initial
parameters, before its Adam update). That is the same code path that is then timed.

Contenders take a :class:`Problem`: the workload, the device, the order, one initial
state shared by all, and one pool of distinct batches of the same shapes shared by all
(drawn before any timing). The correctness check runs on the pool's first batch
(``problem.batch``); the peers, as docs/benchmarks.md defines them, and fastmeta's
captured rows reuse that one batch; fastmeta's user-loop row cycles through the pool.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastmeta.data import TaskBatch
from fastmeta.testing.reference_loop import (
    constant_coefficient,
    flat_grad,
    per_task_query_losses,
    single_task_loss,
    task_query_loss,
)

ADAM_LR = 1e-3  # docs/benchmarks.md: every figure includes an Adam step with lr 1e-3


class ContenderSkipped(Exception):
    """This contender cannot run here (device, missing package); the message says why."""


@dataclass
class Problem:
    """What every contender of one benchmark row shares.

    workload: a :class:`fastmeta.tools.workloads.Workload` (its ``build_model()``, ``steps``,
    ``inner_lr``, ``loss``, ``has_batch_norm``); initial_state: the model's state_dict,
    fp32 on ``device``; batches: distinct batches of tasks of the same shapes, on
    ``device`` (the first is ``batch``, the one the check and the one-batch contenders use).
    """

    workload: object
    device: torch.device
    first_order: bool
    initial_state: dict[str, Tensor]
    batches: tuple[TaskBatch, ...]

    @property
    def batch(self) -> TaskBatch:
        return self.batches[0]

    def build_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        model = self.workload.build_model()
        model.load_state_dict(self.initial_state)
        return model.to(device=self.device, dtype=dtype).train()


def flatten_gradients(params: list[Tensor]) -> Tensor:
    """The ``.grad`` of each parameter, flattened and concatenated (zeros where None)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
    )


class Contender:
    """One implementation of the meta-iteration. Subclasses fill in the hooks.

    family: "fastmeta" or "peer". torch_func: its meta-gradient goes through torch.func's
    second order, which is wrong through BatchNorm (docs/benchmarks.md), so a mismatch there is
    "known-wrong" rather than a failure.
    """

    name = "contender"
    family = "peer"
    torch_func = False
    uses_torch_allocator = True  # its peak memory is torch.cuda.max_memory_allocated's

    def __init__(self, problem: Problem):
        self.problem = problem
        self.device = problem.device

    def prepare(self) -> None:
        """Build everything (may raise ContenderSkipped); not timed."""

    def step(self) -> None:
        """One full meta-iteration; may return before the device has finished."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until every step issued so far has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_parameters(self) -> None:
        """Put the initial parameters back (for the correctness check)."""
        raise NotImplementedError

    def meta_gradient(self) -> Tensor:
        """The flat meta-gradient computed by the last step, in ``named_parameters`` order."""
        raise NotImplementedError

    def active(self) -> contextlib.AbstractContextManager:
        """A context held around everything this contender runs (a backend choice)."""
        return contextlib.nullcontext()

    def details(self) -> dict:
        """Extra facts for the JSON (compile time, settings)."""
        return {}


class _TorchModelContender(Contender):
    """A contender that trains an ``nn.Module`` copy of the model with torch's Adam."""

    def _copy_initial_parameters(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.problem.initial_state[name])

    def reset_parameters(self) -> None:
        self._copy_initial_parameters()

    def meta_gradient(self) -> Tensor:
        return flatten_gradients(list(self.model.parameters()))


# -- fastmeta ------------------------------------------------------------------------------


class FastmetaContender(_TorchModelContender):
    """What a user's training loop runs: ``fm.MAML`` with its defaults (validation on) on
    one backend ("auto" included), ``torch.optim.Adam`` with its defaults (lr 1e-3 is
    torch's default), and per iteration ``opt.zero_grad()``, ``out =
    learner.meta_batch(batch)``, ``out.loss.backward()``, ``opt.step()``, with ``batch`` a
    new set of tensors of the same shapes each time (the problem's pool, cycled): no
    validation switched off, no batch reused, nothing captured.
    """

    family = "fastmeta"
    validate = True  # the learner's default; the captured rows below switch it off

    def __init__(self, problem: Problem, backend: str, cuda_graphs: bool = True):
        super().__init__(problem)
        self.backend = backend
        # cuda_graphs=False: the kernels launched one by one, the row that shows what the
        # graphs ``meta_batch`` replays without asking (its default on CUDA) buy.
        self.cuda_graphs = cuda_graphs
        self.name = f"fastmeta[{backend}]" if cuda_graphs else f"fastmeta[{backend},cuda_graphs=False]"
        self.next_batch = 0

    def active(self):
        import fastmeta as fm

        return fm.use_backend(self.backend)

    def _build(self) -> None:
        import fastmeta as fm

        w = self.problem.workload
        self.model = self.problem.build_model()
        options = {} if self.validate else {"validate": False}
        if not self.cuda_graphs:
            options["cuda_graphs"] = False
        self.learner = fm.MAML(self.model, lr=w.inner_lr, first_order=self.problem.first_order, steps=w.steps,
                               loss=w.loss, **options)
        self.params = list(self.learner.parameters())

    def prepare(self) -> None:
        self._build()
        self.optimizer = torch.optim.Adam(self.params)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.next_batch = 0  # the check's step runs on the pool's first batch, problem.batch

    def step(self) -> None:
        batches = self.problem.batches
        batch = batches[self.next_batch]
        self.next_batch = (self.next_batch + 1) % len(batches)
        self.optimizer.zero_grad()
        out = self.learner.meta_batch(*batch)
        out.loss.backward()
        self.optimizer.step()

    def details(self) -> dict:
        return {"loop": "user: learner and torch.optim.Adam defaults, a new batch each iteration",
                "distinct_batches": len(self.problem.batches)}


class FastmetaGraphContender(FastmetaContender):
    """fastmeta's eager meta-iteration captured whole in a CUDA graph (CUDA only): a row of
    its own beside the user loop, ``validate=False`` and one reused batch (a graph replays
    on fixed input buffers).

    The generic whole-network capture recipe (warm up on a side stream, capture forward,
    backward and ``Adam(capturable=True)``, replay), applied to ``learner.meta_batch``. It
    measures what whole-step capture gives fastmeta before the learner offers its own
    ``capture``; it is skipped with the reason when fastmeta's step is not capturable (a
    host sync somewhere on the path).
    """

    validate = False  # validation reads the inputs on the host: not capturable

    def __init__(self, problem: Problem, backend: str):
        super().__init__(problem, backend, cuda_graphs=False)  # it captures the whole step itself
        self.name = f"fastmeta[{backend}]+graph"

    def prepare(self) -> None:
        if self.device.type != "cuda":
            raise ContenderSkipped("CUDA graphs need a CUDA device")
        self._build()
        self.optimizer = torch.optim.Adam(self.params, lr=ADAM_LR, capturable=True)
        try:
            self.graph = capture_whole_step(self._eager_step, self.optimizer, self.device)
        except Exception as exc:  # e.g. a host sync in an op: not capturable (yet)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            message = str(exc).strip().splitlines()
            raise ContenderSkipped(
                f"fastmeta's step is not capturable: {type(exc).__name__}: {message[0] if message else ''}"[:300]
            ) from None

    def _eager_step(self) -> None:
        out = self.learner.meta_batch(*self.problem.batch)
        out.loss.backward()
        self.optimizer.step()

    def step(self) -> None:
        self.graph.replay()


class FastmetaWholeStepContender(FastmetaContender):
    """``learner.capture(optimizer, ...)`` on the CPU: the whole meta-iteration and Adam's
    update in one fused op per step (:class:`fastmeta.engine.FusedMLPStep`). Skipped with
    the learner's reason where the CPU has no whole step (not a plain MLP). A row of its
    own beside the user loop: ``validate=False``, one reused batch.

    The step keeps no ``.grad``: the check reads the meta-gradient from Adam's first
    moment after the first step from fresh state, ``exp_avg = (1 - β1)·g`` (weight decay
    0), the same arithmetic as torch's Adam.
    """

    validate = False

    def __init__(self, problem: Problem, backend: str):
        super().__init__(problem, backend)
        self.name = f"fastmeta[{backend}]+whole-step"

    def prepare(self) -> None:
        if self.device.type != "cpu":
            raise ContenderSkipped("the fused whole step is the CPU's; on CUDA see fastmeta[auto]+graph")
        self._build()
        self._capture()

    def _capture(self) -> None:
        self.optimizer = torch.optim.Adam(self.params, lr=ADAM_LR)
        try:
            self.whole_step = self.learner.capture(self.optimizer, *self.problem.batch)
        except ValueError as exc:
            raise ContenderSkipped(str(exc)) from None

    def reset_parameters(self) -> None:
        self._copy_initial_parameters()
        self._capture()  # fresh Adam state: meta_gradient reads the first moment of step 1

    def step(self) -> None:
        self.whole_step(*self.problem.batch)

    def meta_gradient(self) -> Tensor:
        beta1 = self.optimizer.param_groups[0]["betas"][0]
        moments = []
        for p in self.model.parameters():
            state = self.optimizer.state[p]
            if float(state["step"]) != 1.0:
                raise RuntimeError("the meta-gradient is read after exactly one step from fresh state")
            moments.append(state["exp_avg"].reshape(-1) / (1.0 - beta1))
        return torch.cat(moments)


def capture_whole_step(forward_backward_step: Callable[[], None], optimizer, device) -> "torch.cuda.CUDAGraph":
    """Capture ``zero_grad(set_to_none) + forward_backward_step()`` in one CUDA graph.

    PyTorch's whole-network recipe: warm up on a side stream (so that lazily created state,
    cuBLAS workspaces and autograd's streams exist before capture), then capture. Gradients
    are set to None before capture, so backward allocates them from the graph's pool and
    each replay writes them again: after a replay, ``p.grad`` holds that replay's
    meta-gradient.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            forward_backward_step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        forward_backward_step()
    return graph


# -- peer 1: the reference loop ----------------------------------------------------------------


def reference_meta_gradient(problem: Problem, dtype: torch.dtype = torch.float64) -> Tensor:
    """The meta-gradient of the mean query loss at the initial parameters, reference loop.

    This is the correctness reference (docs/benchmarks.md: the reference loop agrees with
    finite differences to 1e-8 in float64, also through BatchNorm).
    """
    model = problem.build_model(dtype)
    w = problem.workload
    losses = per_task_query_losses(model, *problem.batch.to(dtype), w.steps, problem.first_order,
                                   constant_coefficient(model, w.inner_lr))
    return flat_grad(losses.mean(), model.parameters())


class LoopPeer(_TorchModelContender):
    name = "loop"

    def prepare(self) -> None:
        self.model = self.problem.build_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ADAM_LR)
        self._coefficient = constant_coefficient(self.model, self.problem.workload.inner_lr)

    def step(self) -> None:
        w = self.problem.workload
        sx, sy, qx, qy = self.problem.batch
        T = sx.size(0)
        params = dict(self.model.named_parameters())
        self.optimizer.zero_grad(set_to_none=True)
        for t in range(T):  # one task's graph at a time, as learn2learn's loop keeps it
            loss = task_query_loss(self.model, params, sx[t], sy[t], qx[t], qy[t], w.steps, self.problem.first_order,
                                   self._coefficient)
            (loss / T).backward()
        self.optimizer.step()


# -- peers 2-4: torch.func vmap, compiled, captured ------------------------------------------


def vmap_meta_losses(model: nn.Module, steps: int, lr: float, first_order: bool) -> Callable:
    """``f(params, sx, sy, qx, qy) -> [T]`` query losses: the functorch MAML example.

    ``model`` must have had its BatchNorm patched by
    ``torch.func.replace_all_batch_norm_modules_`` (no running statistics under vmap).
    """
    buffers = dict(model.named_buffers())

    def task_query_loss(params, support_x, support_y, query_x, query_y):
        def support_loss(p):
            return single_task_loss(torch.func.functional_call(model, (p, buffers), (support_x,)), support_y)

        fast = params
        for _ in range(steps):
            grads = torch.func.grad(support_loss)(fast)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = {n: fast[n] - lr * grads[n] for n in fast}
        return single_task_loss(torch.func.functional_call(model, (fast, buffers), (query_x,)), query_y)

    return torch.func.vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))


class VmapPeer(_TorchModelContender):
    name = "vmap"
    torch_func = True

    def _build(self) -> None:
        self.model = self.problem.build_model()
        torch.func.replace_all_batch_norm_modules_(self.model)
        self.params = dict(self.model.named_parameters())
        w = self.problem.workload
        self.meta_losses = vmap_meta_losses(self.model, w.steps, w.inner_lr, self.problem.first_order)

    def prepare(self) -> None:
        self._build()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ADAM_LR)

    def _forward_backward(self) -> None:
        self.meta_losses(self.params, *self.problem.batch).mean().backward()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_backward()
        self.optimizer.step()


class CompilePeer(VmapPeer):
    """``torch.compile`` of the vmap function; the compile time is reported, not timed."""

    name = "compile"

    def __init__(self, problem: Problem, mode: str | None = None):
        super().__init__(problem)
        self.mode = mode
        if mode:
            self.name = f"compile[{mode}]"

    def prepare(self) -> None:
        import time

        super().prepare()
        self.meta_losses = torch.compile(self.meta_losses, mode=self.mode)
        start = time.perf_counter()
        self.step()  # the first call compiles
        self.synchronize()
        self.compile_seconds = time.perf_counter() - start

    def details(self) -> dict:
        return {"compile_seconds": round(getattr(self, "compile_seconds", float("nan")), 2), "mode": self.mode}


class GraphPeer(VmapPeer):
    """The whole vmap meta-iteration in one CUDA graph, ``Adam(capturable=True)``."""

    name = "graph"

    def prepare(self) -> None:
        if self.device.type != "cuda":
            raise ContenderSkipped("CUDA graphs need a CUDA device")
        self._build()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ADAM_LR, capturable=True)

        def forward_backward_step():
            self._forward_backward()
            self.optimizer.step()

        self.graph = capture_whole_step(forward_backward_step, self.optimizer, self.device)

    def step(self) -> None:
        self.graph.replay()


# -- peer 5: JAX ---------------------------------------------------------------------------


def import_jax():
    """jax configured for a fair comparison, or ContenderSkipped with the reason.

    - No preallocation: by default JAX takes 75% of the GPU's memory at its first use,
      which would starve the torch contenders run after it.
    - fp32 matmuls and convolutions in full fp32: JAX's default precision on GPUs is TF32,
      and the benchmark runs with TF32 off everywhere.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
    except Exception as exc:  # ImportError, or a broken install
        raise ContenderSkipped(f"jax is not importable ({type(exc).__name__}: {exc})") from None
    jax.config.update("jax_default_matmul_precision", "highest")
    return jax


def _jax_forward_program(model: nn.Module) -> Callable:
    """``forward(params: dict, x) -> y`` in jax.numpy for an ``nn.Sequential`` of the
    workloads' layers (Linear, Conv2d, BatchNorm with batch statistics, ReLU, MaxPool2d,
    Flatten), reading the same parameter names as torch's ``named_parameters``."""
    import jax.numpy as jnp
    from jax import lax

    if not isinstance(model, nn.Sequential):
        raise ContenderSkipped(f"the jax peer translates nn.Sequential models only, not {type(model).__name__}")
    layers: list[Callable] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            layers.append(lambda p, x, n=name: x @ p[f"{n}.weight"].T + p[f"{n}.bias"])
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.dilation != (1, 1) or not isinstance(m.padding, tuple):
                raise ContenderSkipped(f"the jax peer does not translate {m}")
            pad = [(m.padding[0], m.padding[0]), (m.padding[1], m.padding[1])]

            def conv(p, x, n=name, stride=m.stride, pad=pad):
                y = lax.conv_general_dilated(
                    x, p[f"{n}.weight"], window_strides=stride, padding=pad,
                    dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST,
                )
                return y + p[f"{n}.bias"][None, :, None, None]

            layers.append(conv)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):

            def batch_norm(p, x, n=name, eps=m.eps):
                # Batch statistics over every axis but the channels, biased variance:
                # what torch's BatchNorm normalises with in training mode.
                axes = (0,) + tuple(range(2, x.ndim))
                mean = jnp.mean(x, axis=axes, keepdims=True)
                var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
                shape = (1, -1) + (1,) * (x.ndim - 2)
                return (x - mean) / jnp.sqrt(var + eps) * p[f"{n}.weight"].reshape(shape) + p[
                    f"{n}.bias"
                ].reshape(shape)

            layers.append(batch_norm)
        elif isinstance(m, nn.ReLU):
            layers.append(lambda p, x: jnp.maximum(x, 0))
        elif isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            layers.append(
                lambda p, x, k=k: lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")
            )
        elif isinstance(m, nn.Flatten):
            layers.append(lambda p, x: x.reshape(x.shape[0], -1))
        else:
            raise ContenderSkipped(f"the jax peer does not translate {type(m).__name__}")

    def forward(params, x):
        for layer in layers:
            x = layer(params, x)
        return x

    return forward


class JaxPeer(Contender):
    """``jax.jit`` of value_and_grad over ``vmap`` of the per-task MAML loss, Adam inside.

    The same initial parameters (copied from the torch model), the same data, the same
    Adam (β = 0.9, 0.999, ε = 1e-8, bias-corrected, as torch's). Parameters and Adam state
    are donated to the jitted step, so XLA updates them in place.
    """

    name = "jax"
    uses_torch_allocator = False  # XLA's own allocator: torch cannot see its peak

    def prepare(self) -> None:
        jax = import_jax()
        import jax.numpy as jnp

        self.jax = jax
        w = self.problem.workload
        model = self.problem.build_model()
        self.names = [n for n, _ in model.named_parameters()]
        forward = _jax_forward_program(model)
        classification = not self.problem.batch.support_y.is_floating_point()
        steps, lr, first_order = w.steps, w.inner_lr, self.problem.first_order
        self.jax_device = self._jax_device()

        def loss_fn(params, x, y):
            pred = forward(params, x)
            if classification:
                logp = jax.nn.log_softmax(pred, axis=-1)
                return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
            return jnp.mean(jnp.square(pred - y.reshape(pred.shape)))

        def task_query_loss(params, sx, sy, qx, qy):
            fast = params
            for _ in range(steps):
                grads = jax.grad(loss_fn)(fast, sx, sy)
                if first_order:
                    grads = jax.lax.stop_gradient(grads)
                fast = jax.tree_util.tree_map(lambda p, g: p - lr * g, fast, grads)
            return loss_fn(fast, qx, qy)

        def meta_loss(params, sx, sy, qx, qy):
            return jnp.mean(jax.vmap(task_query_loss, in_axes=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy))

        b1, b2, eps = 0.9, 0.999, 1e-8

        def train_step(params, m, v, t, sx, sy, qx, qy):
            loss, grads = jax.value_and_grad(meta_loss)(params, sx, sy, qx, qy)
            t = t + 1
            m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
            v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
            c1, c2 = 1 - b1**t, 1 - b2**t
            params = jax.tree_util.tree_map(
                lambda p, m, v: p - ADAM_LR * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v
            )
            return params, m, v, t, loss, grads

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))
        self.batch = [self._to_jax(x) for x in self.problem.batch]
        self.reset_parameters()

    def _jax_device(self):
        kind = "gpu" if self.device.type == "cuda" else "cpu"
        try:
            return self.jax.devices(kind)[0]
        except RuntimeError as exc:
            raise ContenderSkipped(f"jax has no {kind} device ({exc})") from None

    def _to_jax(self, t: Tensor):
        array = t.detach().cpu().numpy()
        if array.dtype == "int64":  # jax runs without x64: labels as int32, said explicitly
            array = array.astype("int32")
        return self.jax.device_put(array, self.jax_device)

    def reset_parameters(self) -> None:
        import jax.numpy as jnp

        self.params = {n: self._to_jax(self.problem.initial_state[n]) for n in self.names}
        self.m = {n: jnp.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: jnp.zeros_like(p) for n, p in self.params.items()}
        self.t = self.jax.device_put(jnp.zeros((), jnp.float32), self.jax_device)
        self.last = None

    def step(self) -> None:
        self.params, self.m, self.v, self.t, loss, grads = self.train_step(
            self.params, self.m, self.v, self.t, *self.batch
        )
        self.last = (loss, grads)

    def synchronize(self) -> None:
        self.jax.block_until_ready((self.params, self.last))

    def meta_gradient(self) -> Tensor:
        import numpy as np

        _, grads = self.last
        return torch.cat([torch.from_numpy(np.asarray(grads[n]).copy()).reshape(-1) for n in self.names])


PEERS: dict[str, Callable[[Problem], Contender]] = {
    "loop": LoopPeer,
    "vmap": VmapPeer,
    "compile": CompilePeer,
    "graph": GraphPeer,
    "jax": JaxPeer,
}
