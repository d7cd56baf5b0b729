"""Task-parallel meta-training on ``torch.distributed``, launched by torchrun.

fastmeta brings no runtime of its own: torchrun starts the processes, ``torch.distributed``
(NCCL on GPUs, gloo on CPUs) moves the bytes. This module adds the few pieces that
meta-learning needs and DDP cannot give:

- **Sharding.** A meta-batch of T tasks is split into W contiguous runs of *global* task
  indices (``shard_range``); the first ``T mod W`` ranks take one task more. The samplers
  of ``fastmeta.data`` draw task i from (seed, iteration, i), so a rank draws exactly its
  shard and the union over ranks is the single-process meta-batch, bit for bit.
- **The meta-gradient.** Each rank backpropagates the mean loss of its own ``n_r`` tasks.
  ``TaskParallel.meta_step`` then packs the ``.grad`` of every learner parameter (model
  weights and meta-parameters alike) into one flat buffer scaled by ``n_r / T`` and
  all-reduces it with SUM, once per step: Σ_r (n_r/T)·∇mean_r = ∇(mean over all T tasks),
  exactly the single-process gradient, also when W does not divide T. DDP is not used
  because its hooks fire on ``.backward()`` only: MAML's inner loop calls
  ``autograd.grad(create_graph=True)`` and its outer backward is a double backward,
  which DDP's reducer does not support.
- **Replicas stay identical by construction.** Parameters and buffers are broadcast from
  rank 0 when ``TaskParallel`` is built; afterwards every rank applies the same reduced
  gradient with the same optimizer, so parameters and optimizer state evolve identically.
  ``verify_replicas`` checks it (one checksum all-reduce) for tests, debugging and
  after ``--resume``.
- **Sharded evaluation.** ``evaluate_sharded`` scores each rank's slice of the evaluation
  tasks and gathers the per-task values, in global task order, to every rank; the mean and
  95% CI (``mean_ci95``) are computed from the gathered values, so they equal the
  single-process figures.

Failure handling: a rank that raises must not leave its peers waiting in a collective.

1. *Inside a meta-step* (sampling, the learner, backward: where almost every error
   happens) the failing rank still joins the step's all-reduce, contributing a zero
   gradient and a 1 in its own status slot; the status slots ride in the same flat buffer
   as the gradient, so the check costs no extra collective. Every rank reads the slots
   after the all-reduce; the failing rank re-raises its own exception, the others raise
   ``RankFailedError`` naming the failed rank and its error (published in the
   rendezvous store), all in the same iteration. ``stop_requested`` (SIGINT/SIGTERM) rides
   in the same buffer, so all ranks stop after the same iteration.
2. *Outside a meta-step* (optimizer step, rank 0's checkpoint I/O, evaluation), the
   ``DistributedContext`` used as a context manager publishes the error in the store and
   calls ``destroy_process_group``. With gloo the peers' pending collective then fails at
   once (the failing rank's sockets close) and fastmeta's collectives turn that failure
   into a ``RankFailedError`` quoting the published error. With NCCL a peer's pending
   collective does not notice a remote abort: torchrun's agent, which tears all workers
   down as soon as one exits, or else the collective timeout, bounds the wait.
3. *Always bounded.* ``init_from_env`` passes ``timeout=`` to ``init_process_group``: it
   bounds the rendezvous, every gloo collective, and (through NCCL's watchdog, which
   aborts the process) every NCCL collective.

Shutting down: ``DistributedContext.close`` (the context manager's exit) destroys the
process group, and that joins the backend's worker threads, but only if nothing else still
refers to the group. A gloo worker releases a finished collective's tensors after the
caller's ``wait`` has returned, and that release takes the GIL. If its threads are still
running when the interpreter shuts down, a worker that is late with that release (a loaded
machine) takes the GIL during ``Py_FinalizeEx``; Python ends the thread (``pthread_exit``),
the unwind meets a ``noexcept`` destructor, and the process aborts with "terminate called
without an active exception" (issue 26: rank 0 of ``fastmeta train --nproc 2``, exit -6,
after its results were printed). What kept the group alive were torch's own default
arguments: ``torch.distributed.nn.functional`` defines ``group=group.WORLD``, evaluated at
its import, and torch.optim's first optimizer imports it (through torch._dynamo) after
``init_process_group``. ``init_from_env`` therefore imports it first
(:func:`import_default_group_holders`), and ``close`` leaves no thread behind.

Typical use (``fastmeta.tools.training`` does this when launched by torchrun)::

    with fastmeta.distributed.init_from_env() as context:   # world 1 without torchrun
        learner = fm.MAML(model.to(context.device), lr=0.4)
        parallel = fastmeta.distributed.TaskParallel(learner, context)  # broadcast from rank 0
        optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
        for iteration in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            with parallel.meta_step(meta_batch) as step:
                step.backward(learner.meta_batch(*sampler.sample(iteration, step.tasks)))
            optimizer.step()            # step.loss: the mean over all T tasks, on every rank
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "TIMEOUT_ENV",
    "DistributedContext",
    "RankFailedError",
    "ReplicaMismatchError",
    "TaskParallel",
    "MetaStep",
    "init_from_env",
    "shard_range",
    "broadcast_module",
    "verify_replicas",
    "gather_task_values",
    "evaluate_sharded",
    "mean_ci95",
    "launch",
    "is_launched_by_torchrun",
    "import_default_group_holders",
]

# Collectives and the rendezvous give up after this long. Ten minutes, not torch's 30 for
# gloo: long enough for a first iteration that JIT-builds the C++ extension or compiles
# Triton kernels on one rank while the others wait in the all-reduce, short enough that a
# wedged job does not hold a node for half an hour.
DEFAULT_TIMEOUT_SECONDS = 600.0
TIMEOUT_ENV = "FASTMETA_DISTRIBUTED_TIMEOUT"
_FAILURE_KEY = "fastmeta/failure"


class RankFailedError(RuntimeError):
    """Another rank failed; this rank stops too. The message names the rank and its error."""


class ReplicaMismatchError(RuntimeError):
    """Parameters, buffers or optimizer state differ between ranks."""


# -- sharding ---------------------------------------------------------------------------------


def shard_range(num_tasks: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous run of the global task indices ``0 .. num_tasks-1``.

    The first ``num_tasks % world_size`` ranks take one task more, so shards differ by at
    most one task and, concatenated in rank order, give ``range(num_tasks)``.
    """
    for name, value in (("num_tasks", num_tasks), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if num_tasks < world_size:
        raise ValueError(
            f"num_tasks={num_tasks} cannot be split over {world_size} ranks: every rank needs at "
            f"least one task (use a meta-batch of >= {world_size} tasks, or fewer processes)"
        )
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# -- the process group ---------------------------------------------------------------------------


def is_launched_by_torchrun() -> bool:
    """True inside a process that torchrun (``torch.distributed.run``) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _timeout_from_env(timeout: float | timedelta | None) -> timedelta:
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif timeout is not None:
        seconds = float(timeout)
    else:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            seconds = float(raw) if raw is not None else DEFAULT_TIMEOUT_SECONDS
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(f"environment variable {name} is not set (torchrun sets it; see docs/distributed.md)")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


@dataclass
class DistributedContext:
    """Who this process is in the job, and its device. World size 1 needs no process group.

    Use it as a context manager to get the failure handling of the module docstring: an
    exception leaving the block is published to the other ranks and the process group is
    destroyed, so the peers stop instead of waiting in a collective.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout: timedelta = field(default_factory=lambda: timedelta(seconds=DEFAULT_TIMEOUT_SECONDS))
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        """Whether collectives go through a process group (False: one process, no torchrun)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and metrics and shows progress."""
        return self.rank == 0

    def shard(self, num_tasks: int) -> range:
        """This rank's global task indices of a meta-batch of ``num_tasks`` (``shard_range``)."""
        return shard_range(num_tasks, self.rank, self.world_size)

    def publish_failure(self, error: BaseException) -> None:
        """Write ``error`` where the other ranks look when a collective fails (best effort)."""
        if not self.is_distributed:
            return
        message = f"{type(error).__name__}: {error}".strip()
        try:
            _failure_store().set(_failure_key(self.rank), message[:4000])
        except Exception:  # the store may be gone too (its host rank died); the peers still time out
            pass

    def close(self) -> None:
        """Destroy the process group this context created (idempotent)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    def __enter__(self) -> "DistributedContext":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, RankFailedError):
            # Publish before destroying: a gloo peer's collective fails the moment our sockets
            # close, and it reads the store right then.
            self.publish_failure(exc)
        self.close()


def init_from_env(
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: float | timedelta | None = None,
) -> DistributedContext:
    """Join the job torchrun started, reading its environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); without them, a one-process context with no process group.

    Args:
        device: "cuda" (this rank's GPU is ``cuda:LOCAL_RANK``), "cpu", or None (cuda when
            available). An explicit index ("cuda:1") is used as given.
        backend: None picks NCCL for CUDA and gloo for the CPU.
        timeout: seconds (or a timedelta) for the rendezvous and every collective; default
            ``$FASTMETA_DISTRIBUTED_TIMEOUT`` or 600.

    If the default process group already exists, it is adopted (and not destroyed by
    ``close``).
    """
    timeout = _timeout_from_env(timeout)
    launched = dist.is_initialized() or "WORLD_SIZE" in os.environ
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif launched:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    else:
        rank, world_size = 0, 1
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                    "start at most one process per GPU (torchrun --nproc-per-node)"
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cuda' or 'cpu', got {str(device)!r}")

    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend='nccl' needs device='cuda'; use gloo for the CPU")

    if not launched:
        return DistributedContext(0, 1, 0, device, None, timeout, False)
    if dist.is_initialized():
        return DistributedContext(rank, world_size, local_rank, device, dist.get_backend(), timeout, False)

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set: launch with torchrun (see docs/distributed.md)")
    import_default_group_holders()  # before the group exists: see "Shutting down" above
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        world_size=world_size,
        rank=rank,
        timeout=timeout,
        # Binds NCCL's communicator to this rank's GPU up front, so a wrong device fails here.
        device_id=device if device.type == "cuda" else None,
    )
    return DistributedContext(rank, world_size, local_rank, device, backend, timeout, True)


def import_default_group_holders() -> None:
    """Import the torch modules whose functions take the default process group as the
    default value of an argument, so that they take None (see "Shutting down" in the
    module docstring). ``init_from_env`` calls it before it creates the group; call it
    before ``torch.distributed.init_process_group`` when creating the group yourself."""
    # torch.distributed.nn.functional: broadcast, all_reduce, all_gather, ... take
    # ``group=group.WORLD``. torch.optim's first optimizer imports torch._dynamo, which
    # imports it (through FSDP), so without this a training run imports it after the group
    # exists.
    with contextlib.suppress(ImportError):  # a torch without distributed support has no group to hold
        import torch.distributed.nn  # noqa: F401


def _failure_store():
    # The rendezvous store: hosted by torchrun's agent under torchrun, so it outlives any
    # worker and a peer can still read what a dead rank published.
    return dist.distributed_c10d._get_default_store()


def _failure_key(rank: int) -> str:
    # torchrun's agent keeps its store across restarts (--max-restarts): keep attempts apart.
    return f"{_FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _published_failures(world_size: int, ranks: Iterable[int] | None = None) -> dict[int, str]:
    failures = {}
    try:
        store = _failure_store()
        for rank in ranks if ranks is not None else range(world_size):
            key = _failure_key(rank)
            if store.check([key]):
                failures[rank] = store.get(key).decode("utf-8", "replace")
    except Exception:
        pass
    return failures


def _describe_failures(failed: Sequence[int], published: dict[int, str], world_size: int) -> str:
    parts = []
    for rank in failed:
        error = published.get(rank, "its error is in that rank's own output")
        parts.append(f"rank {rank} of {world_size}: {error}")
    return "; ".join(parts)


def _run_collective(context: DistributedContext, what: str, collective: Callable[[], object]):
    """Run a collective; if it fails because a peer went away, say which peer and why."""
    try:
        return collective()
    except RuntimeError as error:  # DistBackendError, DistNetworkError and gloo's errors
        published = _published_failures(context.world_size)
        published.pop(context.rank, None)
        if published:
            raise RankFailedError(
                f"fastmeta.distributed: {what} on rank {context.rank} stopped because "
                + _describe_failures(sorted(published), published, context.world_size)
            ) from error
        raise RankFailedError(
            f"fastmeta.distributed: {what} on rank {context.rank} of {context.world_size} failed "
            f"({type(error).__name__}: {error}); a peer rank probably exited or timed out after "
            f"{context.timeout.total_seconds():.0f} s: look for the first error in the other ranks' output"
        ) from error


# -- keeping replicas identical ---------------------------------------------------------------


def _named_state(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[tuple[str, Tensor]]:
    named = [(name, p.detach()) for name, p in module.named_parameters()]
    named += [(name, b) for name, b in module.named_buffers()]
    if optimizer is not None:
        for index, state in sorted(optimizer.state_dict()["state"].items()):
            for key, value in sorted(state.items()):
                if isinstance(value, Tensor):
                    named.append((f"optimizer.state[{index}].{key}", value))
                else:
                    named.append((f"optimizer.state[{index}].{key}", torch.tensor(float(value))))
    return named


def broadcast_module(module: nn.Module, context: DistributedContext, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (in place)."""
    if not context.is_distributed:
        return
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            # One broadcast per tensor: it runs once per run, where clarity beats packing.
            payload = tensor.detach()
            carrier = payload.to(torch.uint8) if payload.dtype == torch.bool else payload
            if carrier.device.type != context.device.type:
                carrier = carrier.to(context.device)
            _run_collective(context, f"broadcasting {name!r}", lambda c=carrier: dist.broadcast(c, src))
            if carrier is not payload:
                payload.copy_(carrier.to(payload.dtype))


def _checksums(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """One float64 checksum per tensor, sensitive to values and their positions.

    Identical tensors give bitwise-identical checksums (same reduction, same order); a
    single changed element changes the checksum except in astronomically unlikely cases.
    """
    sums = []
    for tensor in tensors:
        values = tensor.detach().reshape(-1).to(device=device, dtype=torch.float64)
        # Position weights in [1, 2): a permutation of the same values changes the sum.
        weights = 1.0 + torch.arange(values.numel(), device=device, dtype=torch.float64).remainder_(7919) / 7919
        sums.append(torch.nan_to_num((values * weights).sum(), nan=1.2345e300, posinf=1e301, neginf=-1e301))
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)


def verify_replicas(module: nn.Module, context: DistributedContext, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise ``ReplicaMismatchError`` unless every rank holds the same parameters, buffers
    and (if given) optimizer state, naming the tensors that differ.

    Two small all-reduces (MAX): first the tensor count, then one checksum per tensor
    packed with its negation, so max == -max(-x) exactly when all ranks agree.
    """
    if not context.is_distributed:
        return
    named = _named_state(module, optimizer)
    count = torch.tensor([len(named), -len(named)], dtype=torch.float64, device=context.device)
    _run_collective(context, "verify_replicas (count)", lambda: dist.all_reduce(count, op=dist.ReduceOp.MAX))
    if count[0].item() != -count[1].item():
        raise ReplicaMismatchError(
            f"ranks hold different numbers of tensors ({-int(count[1].item())}..{int(count[0].item())}; "
            f"rank {context.rank} has {len(named)}): did one rank restore optimizer state and another not?"
        )
    sums = _checksums([t for _, t in named], context.device)
    both = torch.cat([sums, -sums])
    _run_collective(context, "verify_replicas (checksums)", lambda: dist.all_reduce(both, op=dist.ReduceOp.MAX))
    differing = [name for (name, _), high, low in zip(named, both[: len(named)].tolist(), both[len(named) :].tolist()) if high != -low]
    if differing:
        shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more" if len(differing) > 8 else "")
        raise ReplicaMismatchError(f"{len(differing)} tensor(s) differ between ranks: {shown}")


# -- the meta-gradient all-reduce --------------------------------------------------------------


class MetaStep:
    """One meta-step's view for this rank, yielded by ``TaskParallel.meta_step``.

    tasks: this rank's global task indices (sample exactly these).
    num_tasks: T, the whole meta-batch.
    After the ``with`` block, on every rank:
    loss: the mean query loss over all T tasks (0-d, detached), if ``backward`` was used.
    accuracy: the mean query accuracy over all T tasks, or None (regression).
    should_stop: True if any rank passed ``stop_requested=True``.
    """

    def __init__(self, tasks: range, num_tasks: int):
        self.tasks = tasks
        self.num_tasks = num_tasks
        self.loss: Tensor | None = None
        self.accuracy: Tensor | None = None
        self.should_stop = False
        self._local_loss: Tensor | None = None
        self._local_accuracy: Tensor | None = None

    def backward(self, output) -> None:
        """``output.loss.backward()`` for this rank's ``MetaBatchOutput``, recording its loss
        and accuracy so that the step reports means over all T tasks."""
        got = int(output.task_loss.shape[0])
        if got != len(self.tasks):
            raise ValueError(
                f"output holds {got} tasks but this rank's shard is {len(self.tasks)} tasks "
                f"({self.tasks.start}..{self.tasks.stop - 1}): sample exactly step.tasks"
            )
        output.loss.backward()
        self._local_loss = output.loss.detach()
        if output.accuracy is not None:
            self._local_accuracy = output.accuracy.detach().mean()


class TaskParallel:
    """Averages a learner's meta-gradient over ranks, each rank owning a shard of the tasks.

    Construction broadcasts the learner's parameters and buffers from rank 0, so every
    replica starts equal. Build the optimizer on ``learner.parameters()`` as usual.

    Args:
        learner: a fastmeta learner (any ``nn.Module``: every parameter with
            ``requires_grad`` takes part, model weights and meta-parameters alike).
        context: from ``init_from_env``.
        broadcast: copy rank 0's parameters and buffers now (skip only when they are
            already equal, e.g. all ranks loaded the same checkpoint and verified it).
    """

    # The flat buffer, summed over ranks:
    #   [gradients of every parameter | loss, accuracy]   scaled by n_r / T on the device
    #   [one count per parameter | has-accuracy, stop | one failure flag per rank]   from the host
    # A count is how many ranks produced that gradient (None and zero differ for Adam).

    def __init__(self, learner: nn.Module, context: DistributedContext, *, broadcast: bool = True):
        if not isinstance(learner, nn.Module):
            raise TypeError(f"learner must be an nn.Module (a fastmeta learner), got {type(learner).__name__}")
        self.learner = learner
        self.context = context
        self.parameters = [p for p in learner.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("learner has no parameters that require grad: nothing to train")
        # One buffer in the widest dtype, so one collective even if dtypes are mixed;
        # float32 -> float64 -> float32 is exact for the values themselves.
        self.buffer_dtype = max({p.dtype for p in self.parameters}, key=lambda d: torch.finfo(d).bits)
        self.sizes = [p.numel() for p in self.parameters]
        self.steps_taken = 0
        if broadcast:
            broadcast_module(learner, context)

    @property
    def gradient_numel(self) -> int:
        """Elements all-reduced per step for the gradients (the volume the docs estimate)."""
        return sum(self.sizes)

    @contextmanager
    def meta_step(self, num_tasks: int, *, stop_requested: bool | Callable[[], bool] = False):
        """Run one meta-step's forward and backward for this rank's shard, then average the
        meta-gradient over all ranks, weighting each rank by its number of tasks.

        Zero the gradients before the block: on exit each ``.grad`` is replaced by the
        all-reduced mean-over-T gradient (a parameter that got no gradient on any rank
        keeps ``grad=None``, as in one process). An exception in the block on any rank
        stops every rank at the end of the block (see the module docstring).

        ``stop_requested`` (a bool, or a callable read at the end of the block, e.g. "has
        SIGINT arrived"): if it is true on any rank, ``step.should_stop`` is True on all,
        so that every rank stops after this same step.
        """
        context = self.context
        step = MetaStep(context.shard(num_tasks), num_tasks)
        self.steps_taken += 1
        if not context.is_distributed:
            # One process: the gradients are already the mean over all T tasks. Nothing is
            # packed and nothing is read back, so a single-GPU loop keeps running ahead of
            # the device, as it does without fastmeta.distributed.
            yield step
            step.loss, step.accuracy = step._local_loss, step._local_accuracy
            step.should_stop = bool(stop_requested() if callable(stop_requested) else stop_requested)
            return
        try:
            yield step
        except BaseException as error:
            # Still join the all-reduce, so the peers learn of the failure now, not at a timeout.
            context.publish_failure(error)
            try:
                self._all_reduce(step, failed=True, stop_requested=stop_requested)
            except RankFailedError:
                pass  # peers failed as well; our own error is the one to report here
            raise
        self._all_reduce(step, failed=False, stop_requested=stop_requested)

    def _all_reduce(self, step: MetaStep, failed: bool, stop_requested: bool) -> None:
        context = self.context
        if callable(stop_requested):
            stop_requested = stop_requested()
        weight = len(step.tasks) / step.num_tasks
        device, dtype = self.parameters[0].device, self.buffer_dtype
        grads = [None if failed else p.grad for p in self.parameters]
        pieces = [
            torch.zeros(size, dtype=dtype, device=device) if grad is None else grad.reshape(-1).to(dtype)
            for grad, size in zip(grads, self.sizes)
        ]
        loss = step._local_loss if not failed and step._local_loss is not None else None
        accuracy = step._local_accuracy if not failed and step._local_accuracy is not None else None
        zero = torch.zeros((), dtype=dtype, device=device)
        pieces.append(torch.stack([zero if v is None else v.to(dtype) for v in (loss, accuracy)]))
        # Flags and counts are known on the host: one small copy, instead of one kernel per
        # element written into a device tensor (~18 launches per step for conv4).
        host = [0.0 if g is None else 1.0 for g in grads]
        host += [float(accuracy is not None), float(bool(stop_requested))]
        host += [float(failed and rank == context.rank) for rank in range(context.world_size)]
        host = torch.tensor(host, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory().to(device, non_blocking=True)
        pieces.append(host.to(device))
        flat = torch.cat(pieces)
        gradient_and_scalars = self.gradient_numel + 2
        flat[:gradient_and_scalars].mul_(weight)

        if context.is_distributed:
            what = f"the meta-gradient all-reduce (meta-step {self.steps_taken})"
            _run_collective(context, what, lambda: dist.all_reduce(flat))
        # The one host read per step (a device sync on GPUs): every rank must learn of a
        # failure in this same iteration, before it enters the next collective.
        count = len(self.parameters)
        flags = flat[gradient_and_scalars:].tolist()
        producers, (has_accuracy, stop), status = flags[:count], flags[count : count + 2], flags[count + 2 :]
        failed_ranks = [rank for rank, flag in enumerate(status) if flag > 0]
        if failed_ranks:
            if failed:
                return  # the caller re-raises this rank's own error
            published = _published_failures(context.world_size, failed_ranks)
            raise RankFailedError(
                f"fastmeta.distributed: meta-step {self.steps_taken} stopped on rank {context.rank} because "
                + _describe_failures(failed_ranks, published, context.world_size)
            )

        with torch.no_grad():
            for parameter, reduced, produced in zip(self.parameters, flat[: self.gradient_numel].split(self.sizes), producers):
                if produced == 0:
                    continue  # no rank produced a gradient: keep None, as one process would
                if parameter.grad is None:
                    parameter.grad = torch.empty_like(parameter)
                parameter.grad.copy_(reduced.view_as(parameter))
        step.should_stop = stop > 0
        mean_loss, mean_accuracy = flat[self.gradient_numel], flat[self.gradient_numel + 1]
        if step._local_loss is not None:
            step.loss = mean_loss.to(step._local_loss.dtype)
        if has_accuracy > 0 and step._local_accuracy is not None:
            step.accuracy = mean_accuracy.to(step._local_accuracy.dtype)


# -- sharded evaluation ------------------------------------------------------------------------------


def gather_task_values(values: Tensor, num_tasks: int, context: DistributedContext) -> Tensor:
    """Concatenate every rank's per-task values ``[len(shard), ...]`` into ``[num_tasks, ...]``
    (global task order) on every rank. The shards must be ``context.shard(num_tasks)``."""
    return _gather_shards(values, num_tasks, context, failure=None)


def evaluate_sharded(score_tasks: Callable[[range], Tensor], num_tasks: int, context: DistributedContext) -> Tensor:
    """Per-task scores ``[num_tasks]`` (float64, global order, on every rank), each rank
    scoring only its shard.

    ``score_tasks(tasks)`` gets this rank's global task indices (a range) and returns one
    value per task. If it raises on any rank, every rank raises: the failing rank its own
    error, the others ``RankFailedError``.
    """
    shard = context.shard(num_tasks)
    failure = None
    try:
        local = score_tasks(shard).detach().to(torch.float64).reshape(-1)
    except BaseException as error:
        if not context.is_distributed:
            raise
        context.publish_failure(error)
        local, failure = torch.zeros(len(shard), dtype=torch.float64), error
    values = _gather_shards(local, num_tasks, context, failure=failure)
    if failure is not None:
        raise failure
    return values


def _gather_shards(values: Tensor, num_tasks: int, context: DistributedContext, failure) -> Tensor:
    shard = context.shard(num_tasks)
    if values.dim() < 1 or values.shape[0] != len(shard):
        raise ValueError(
            f"values must have {len(shard)} rows (this rank's shard {shard.start}..{shard.stop - 1} of "
            f"{num_tasks} tasks), got shape {tuple(values.shape)}"
        )
    if not context.is_distributed:
        return values
    world = context.world_size
    lengths = [len(shard_range(num_tasks, rank, world)) for rank in range(world)]
    row = values[0].numel()
    # all_gather needs equal sizes: pad every shard to rank 0's (the largest) and append a
    # status word, so a rank that failed to score still joins this one collective.
    device = context.device if context.backend == "nccl" else torch.device("cpu")
    dtype = torch.float64 if values.is_floating_point() else torch.int64
    padded = torch.zeros(lengths[0] * row + 1, dtype=dtype, device=device)
    padded[: values.numel()] = values.reshape(-1).to(device=device, dtype=dtype)
    padded[-1] = 1 if failure is not None else 0
    gathered = [torch.empty_like(padded) for _ in range(world)]
    _run_collective(context, "gathering evaluation results", lambda: dist.all_gather(gathered, padded))
    failed = [rank for rank, g in enumerate(gathered) if g[-1].item() != 0]
    if failed and failure is None:
        published = _published_failures(world, failed)
        raise RankFailedError(
            f"fastmeta.distributed: evaluation stopped on rank {context.rank} because "
            + _describe_failures(failed, published, world)
        )
    rows = [g[: n * row].view(n, *values.shape[1:]) for n, g in zip(lengths, gathered)]
    return torch.cat(rows).to(device=values.device, dtype=values.dtype)


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width (1.96 · sample std / √n) of per-task values."""
    values = values.detach().to(torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("values is empty: nothing to average")
    spread = values.std().item() if values.numel() > 1 else 0.0
    return values.mean().item(), 1.96 * spread / math.sqrt(values.numel())


# -- launching ----------------------------------------------------------------------------------------


def launch(nproc: int, module_args: Sequence[str], *, module: str = "fastmeta") -> int:
    """Re-run ``python -m <module> <module_args>`` under torchrun with ``nproc`` processes on
    this node (``--standalone``: a private rendezvous on a free local port). Returns the exit
    status; torchrun's own report names the first rank that failed."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if is_launched_by_torchrun():
        raise ValueError("--nproc cannot be used inside torchrun: torchrun already started the processes")
    from torch.distributed import run as torchrun

    args = ["--standalone", "--nproc-per-node", str(nproc), "-m", module, *module_args]
    try:
        torchrun.main(args)
    except SystemExit as exit_:  # torchrun's parser exits on bad arguments
        return int(exit_.code or 0)
    except Exception as error:  # ChildFailedError: torchrun already printed which rank failed and why
        code = launch_exit_code(error)
        if code != 128 + 15:  # a rank stopped by SIGTERM (checkpointed) is no failure to report
            print(f"fastmeta: distributed run failed: {type(error).__name__}", file=sys.stderr)
        return code
    return 0


def launch_exit_code(error: BaseException) -> int:
    """The exit status of a launch whose ranks failed: the first failed rank's (143 when it
    was stopped by SIGTERM and checkpointed, as a single process exits; 128 + N for a rank
    killed by signal N), or 1 when torchrun gives none."""
    try:
        _, failure = error.get_first_failure()  # torchrun's ChildFailedError
        code = int(failure.exitcode)
    except Exception:
        return 1
    if code < 0:
        return 128 - code
    return code if code > 0 else 1
