"""Paper presets, the training loop and the evaluation behind ``fastmeta train`` and ``fastmeta eval``.

A run lives in one folder:
- ``checkpoint.pt``: the latest checkpoint (``fastmeta.checkpoint``: atomic, verified,
  ``weights_only``), written every ``checkpoint_every`` iterations and at the end. It holds
  the resolved configuration, so ``fastmeta eval`` and ``--resume`` need nothing else.
- ``metrics.jsonl``: one JSON object per line, ``{"kind": "train" | "val" | "test", ...}``.

Resuming is exact on the CPU: tasks are a pure function of (seed, iteration, task index)
(``fastmeta.data.random``), and the checkpoint restores the model, the meta-parameters,
Adam's state, the global RNGs and the iteration count, so iteration i computes the same
loss whether or not the run stopped before it. A run killed with SIGKILL loses only the
iterations since its last checkpoint; SIGINT or SIGTERM stop it at the end of the current
iteration and write a checkpoint first (``Stopped``: ``fastmeta train`` then exits with
128 + the signal's number, the shell's convention: 130 for SIGINT, 143 for SIGTERM).

Before the first iteration, every split the run will use (train; val when it validates;
test for the final evaluation) is loaded and checked against the preset's ways, shots and
queries, and the run folder is created only then: a dataset too small for the preset
fails at once, leaving nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from fastmeta import checkpoint, distributed
from fastmeta.data import ImageFolderTasks, Omniglot, SinusoidTasks, TaskBatch
from fastmeta.tools.schedules import check_schedules, iteration_schedule
from fastmeta.tools.evaluation_chunks import evaluation_chunk
from fastmeta.tools.resume_message import resume_message

__all__ = [
    "ModelAwareOptions",
    "RunConfig",
    "PRESETS",
    "LEARNERS",
    "Run",
    "train",
    "evaluate",
    "task_scores",
    "Score",
    "Stopped",
    "check_run_folder",
    "splits_used",
    "format_results",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
LEARNERS = ("maml", "model-aware")
RUN_FORMAT = "fastmeta-run-1"
# The fixed evaluation tasks: every run and every checkpoint is scored on the same ones.
TEST_SEED = 0
VALIDATION_SEED = 1


@dataclass(frozen=True)
class ModelAwareOptions:
    """The ``ModelAwareMAML`` options of ``--learner model-aware`` (see its docstring).

    The defaults (bench/RESULTS.md, "The model-aware learner against MAML"): one rate per
    parameter and inner step, learned as a logarithm, and MAML++'s per-step BatchNorm
    weights wherever the model has BatchNorm. On sinusoid (seed 0), per-tensor rates end at
    MSE 0.302 after one step and per-parameter ones at 0.253; rates left free to turn
    negative diverge on 164 of 600 tasks at 10 steps.
    """

    lr_mode: str = "param"
    lr_per_step: bool = True
    log_lr: bool = True
    per_step_bn: bool | None = None


# What a checkpoint written before ModelAwareOptions existed trained with.
_LEGACY_MODEL_AWARE = ModelAwareOptions(lr_per_step=False, log_lr=False, per_step_bn=False)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; a preset is a RunConfig, and the checkpoint stores one.

    data: "sinusoid", "omniglot" or "image-folder". ways, shots, queries: N, K, Q (ways is
    0 for regression). test_steps: the inner steps evaluated at test time (the paper's,
    then 10). validate_every, checkpoint_every, log_every: in iterations.

    The training schedules (``fastmeta.tools.schedules``) apply to every learner alike, so
    that a comparison on one preset is at equal budget: outer_lr_schedule ("constant" or
    "cosine", down to outer_lr_min), multi_step_loss_iterations (MAML++'s multi-step loss,
    annealed to the last step's over that many iterations; 0: off),
    first_order_iterations (derivative-order annealing: first order for that many
    iterations). model_aware: the options of ``--learner model-aware``.
    """

    preset: str
    summary: str
    data: str
    meta_batch: int
    inner_steps: int
    inner_lr: float
    iterations: int
    test_steps: tuple[int, ...]
    ways: int = 0
    shots: int = 10
    queries: int = 10
    first_order: bool = False
    outer_lr: float = 1e-3
    validate_every: int = 1000
    validation_tasks: int = 100
    checkpoint_every: int = 1000
    log_every: int = 10
    image_size: int = 28
    channels: int = 1
    learner: str = "maml"
    seed: int = 0
    data_path: str | None = None
    outer_lr_schedule: str = "constant"
    outer_lr_min: float = 0.0
    multi_step_loss_iterations: int = 0
    first_order_iterations: int = 0
    model_aware: ModelAwareOptions = ModelAwareOptions()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"checkpoint configuration has unknown fields {sorted(unknown)}; written by a newer fastmeta?")
        values = dict(values)
        values["test_steps"] = tuple(values["test_steps"])
        options = values.get("model_aware")
        values["model_aware"] = _LEGACY_MODEL_AWARE if options is None else ModelAwareOptions(**options)
        return cls(**values)

    @property
    def is_regression(self) -> bool:
        return self.data == "sinusoid"

    @property
    def validation_steps(self) -> int:
        """The inner steps validation uses: the paper's test steps (the first non-zero entry)."""
        return next(s for s in self.test_steps if s > 0)


def _omniglot(name, summary, ways, meta_batch, inner_steps, inner_lr, test_steps, **overrides) -> RunConfig:
    values = dict(
        preset=name,
        summary=summary,
        data="omniglot",
        ways=ways,
        shots=1,
        queries=1,
        meta_batch=meta_batch,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        iterations=60_000,
        test_steps=test_steps,
        validate_every=1000,
        checkpoint_every=1000,
    )
    values.update(overrides)
    return RunConfig(**values)


_SINUSOID = dict(
    data="sinusoid",
    shots=10,
    queries=10,
    meta_batch=25,
    inner_steps=1,
    inner_lr=0.01,
    test_steps=(0, 1, 10),
    validate_every=1000,
    checkpoint_every=2000,
    log_every=100,
)

PRESETS: dict[str, RunConfig] = {
    preset.preset: preset
    for preset in (
        # The paper's full 70k iterations: on a 2-core CPU `auto` runs the fused C++
        # meta-step (about 1 ms per meta-iteration with Adam), so the run takes a minute or
        # two; the reference backend alone needs about 4-6 ms per iteration (5-7 min).
        # sinusoid: the paper's tasks and 70k iterations with a cosine-annealed meta
        # learning rate (issue 17: 10-step MSE 0.083 against 0.094 with a constant one,
        # model-aware, seed 0); sinusoid-paper: the paper's protocol exactly.
        RunConfig(preset="sinusoid", summary="sinusoid regression, K=10, the paper's 70k iterations, cosine meta-lr", iterations=70_000, outer_lr_schedule="cosine", **_SINUSOID),
        RunConfig(preset="sinusoid-paper", summary="the MAML paper's sinusoid protocol: K=10, 70k iterations, constant meta-lr", iterations=70_000, **_SINUSOID),
        _omniglot("omniglot-5w1s", "Omniglot 5-way 1-shot, the MAML paper protocol", 5, 32, 1, 0.4, (3, 10)),
        _omniglot("omniglot-5w1s-fo", "Omniglot 5-way 1-shot, first-order MAML", 5, 32, 1, 0.4, (3, 10), first_order=True),
        _omniglot("omniglot-20w1s", "Omniglot 20-way 1-shot, the MAML paper protocol", 20, 16, 5, 0.1, (5, 10)),
        # About 0.25 s per meta-iteration on the 2-core CPU (reference backend): 3000
        # iterations plus validation and the 600-task test fit in 20 minutes. So short a
        # run ends while the meta-gradient is still noisy: the meta learning rate is
        # cosine-annealed to 0 over it (for both learners; issue 17).
        _omniglot(
            "omniglot-5w1s-cpu",
            "Omniglot 5-way 1-shot, the paper's settings for 3000 iterations, cosine meta-lr (<= 20 min on a 2-core CPU)",
            5, 32, 1, 0.4, (3, 10),
            iterations=3000, validate_every=500, checkpoint_every=250, log_every=5, outer_lr_schedule="cosine",
        ),
        RunConfig(
            preset="miniimagenet-5w1s",
            summary="miniImageNet-style image folder, 5-way 1-shot, the MAML paper protocol",
            data="image-folder",
            ways=5,
            shots=1,
            queries=15,
            meta_batch=4,
            inner_steps=5,
            inner_lr=0.01,
            iterations=60_000,
            test_steps=(10,),
            image_size=84,
            channels=3,
        ),
    )
}


def build_model(config: RunConfig) -> torch.nn.Module:
    # Imported here so that `fastmeta --help` and the data/checkpoint code do not pull in the engine.
    from fastmeta import models

    if config.data == "sinusoid":
        return models.mlp((1, 40, 40, 1), activation="relu")
    if config.data == "omniglot":
        return models.conv4(in_channels=config.channels, ways=config.ways, hidden=64, variant="strided", image_size=config.image_size)
    return models.conv4(in_channels=config.channels, ways=config.ways, hidden=32, variant="pool", image_size=config.image_size)


def build_learner(config: RunConfig, model: torch.nn.Module):
    import fastmeta

    if config.learner == "maml":
        return fastmeta.MAML(model, config.inner_lr, config.first_order, steps=config.inner_steps)
    if config.learner == "model-aware":
        options = config.model_aware
        return fastmeta.ModelAwareMAML(
            model, config.inner_lr, config.first_order, steps=config.inner_steps, lr_mode=options.lr_mode,
            lr_per_step=options.lr_per_step, log_lr=options.log_lr, per_step_bn=options.per_step_bn,
        )
    raise ValueError(f"learner must be one of {LEARNERS}, got {config.learner!r}")


class Run:
    """The pieces of one run, built from its RunConfig: model, learner, optimizer, tasks."""

    def __init__(self, config: RunConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        if config.data != "sinusoid" and not config.data_path:
            what = "images_background.zip and images_evaluation.zip" if config.data == "omniglot" else "train/ val/ test/"
            raise ValueError(f"preset {config.preset!r} needs --data PATH: the folder holding {what}")
        check_schedules(config)
        self._dataset = None
        torch.manual_seed(config.seed)  # the initial weights are part of the run's definition
        self.model = build_model(config).to(self.device)
        self.learner = build_learner(config, self.model)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=config.outer_lr)

    @property
    def dataset(self):
        """The dataset, loaded on first use (eval needs only the test split)."""
        if self._dataset is None:
            config = self.config
            if config.data == "sinusoid":
                self._dataset = SinusoidTasks(config.shots, config.queries, seed=config.seed, device=self.device)
            elif config.data == "omniglot":
                self._dataset = Omniglot(config.data_path, device=self.device, image_size=config.image_size)
            else:
                mode = "RGB" if config.channels == 3 else "L"
                self._dataset = ImageFolderTasks(config.data_path, image_size=config.image_size, mode=mode, device=self.device)
        return self._dataset

    def sampler(self, split: str, seed: int):
        config = self.config
        if config.data == "sinusoid":
            return self.dataset if split == "train" else None
        return self.dataset.tasks(split, ways=config.ways, shots=config.shots, queries=config.queries, seed=seed)

    def check_splits(self, splits: tuple[str, ...]) -> None:
        """Load each split and check it can make this run's tasks; ValueError (or
        FileNotFoundError, DatasetError) naming the split otherwise."""
        config = self.config
        for split in splits:
            try:
                self.sampler(split, TEST_SEED)
            except ValueError as error:
                tasks = f"{config.ways}-way {config.shots}-shot tasks with {config.queries} queries per class"
                raise type(error)(f"{config.preset}: the {split} split cannot make {tasks}: {error}") from None

    def task_chunks(self, split: str, tasks: range, chunk: int) -> Iterator[TaskBatch]:
        """The fixed evaluation tasks ``tasks`` (global indices: all of them, or a rank's
        shard) of ``split``, ``chunk`` tasks at a time."""
        seed = TEST_SEED if split == "test" else VALIDATION_SEED
        if self.config.data == "sinusoid":

            def draw(indices: range) -> TaskBatch:
                # The MAML paper's evaluation: K random support points, 100 evenly spaced queries.
                return self.dataset.evaluation_tasks(indices, seed=seed).batch

        else:
            sampler = self.sampler(split, seed)

            def draw(indices: range) -> TaskBatch:
                return sampler.sample(0, indices)

        for start in range(tasks.start, tasks.stop, chunk):
            yield draw(range(start, min(start + chunk, tasks.stop)))

    def state(self, iteration: int, elapsed: float) -> dict:
        return {
            "format": RUN_FORMAT,
            "config": self.config.to_dict(),
            "iteration": iteration,
            "elapsed_seconds": elapsed,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": checkpoint.rng_state(),
        }

    def restore(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        # A run saved by a CUDA graph keeps a capturable Adam with a tensor rate: on a GPU it
        # stays so (on this device), elsewhere Adam goes back to a plain rate.
        for group in self.optimizer.param_groups:
            if self.device.type == "cuda" and group.get("capturable"):
                make_capturable(self.optimizer, self.device)
                break
            group["capturable"] = False
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
        checkpoint.set_rng_state(state["rng"])


def splits_used(config: RunConfig, start: int) -> tuple[str, ...]:
    """The splits a run from iteration ``start`` reads: train, val if it validates, and test."""
    splits = ["train"] if start < config.iterations else []
    validates = any(done % config.validate_every == 0 for done in range(start + 1, config.iterations))
    return (*splits, *(["val"] if validates else []), "test")


def check_run_folder(out: str | os.PathLike, argument: str = "out") -> Path:
    """``out`` as a Path, after checking it can be a run folder: ValueError naming
    ``argument`` when it (or a folder above it) is a file."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                above = "" if path == out else f" ({path}, above it, is a file)"
                raise ValueError(f"{argument} {out} is not a folder{above}: a run folder is created there, or continued")
            break
    return out


def read_run_checkpoint(path: str | os.PathLike) -> tuple[RunConfig, dict]:
    """Load a run checkpoint (a file, or a run folder holding checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    state = checkpoint.load(path, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise checkpoint.CheckpointError(f"{path} is a fastmeta checkpoint but not a training run's ({RUN_FORMAT})")
    return RunConfig.from_dict(state["config"]), state


# -- evaluation -----------------------------------------------------------------------------


class Score(NamedTuple):
    """One evaluation figure: the mean and 95% confidence half-width over the tasks whose
    adaptation stayed finite, and how many did not (``diverged``: non-finite predictions
    or loss, e.g. a learned rate tuned for 1 step taken 10 times)."""

    mean: float
    ci95: float
    diverged: int


def evaluate(
    run: Run, split: str, num_tasks: int, steps: tuple[int, ...], chunk: int | None = None,
    context: distributed.DistributedContext | None = None,
) -> dict[int, Score]:
    """A Score over ``num_tasks`` fixed tasks for each step count in ``steps``.

    Accuracy (a fraction) for classification, query MSE for regression. Adaptation runs
    under ``no_grad``: the learner differentiates the inner loop itself but builds no
    second-order graph. With a distributed ``context`` each rank scores its shard of the
    tasks and the per-task scores are gathered, so every rank returns the full figures.
    """
    results = {}
    for step_count, values in task_scores(run, split, num_tasks, steps, chunk, context).items():
        finite = ~values.isnan()
        diverged = int((~finite).sum())
        mean, ci = distributed.mean_ci95(values[finite]) if diverged < num_tasks else (float("nan"), float("nan"))
        results[step_count] = Score(mean, ci, diverged)
    return results


def task_scores(
    run: Run, split: str, num_tasks: int, steps: tuple[int, ...], chunk: int | None = None,
    context: distributed.DistributedContext | None = None,
) -> dict[int, torch.Tensor]:
    """Per step count, the score of each of the ``num_tasks`` fixed tasks (float64
    ``[num_tasks]``; NaN where adaptation diverged): what :func:`evaluate` summarises, and
    what a paired comparison of two runs on the same tasks needs."""
    config = run.config
    shard = context.shard(num_tasks) if context is not None else range(num_tasks)
    chunk = evaluation_chunk(num_tasks, config.is_regression, config.meta_batch, chunk)  # issue 26: bounded memory
    per_task: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    validate = run.learner.validate
    # A task whose adaptation diverges is a result to report, not an error to raise.
    run.learner.validate = False
    try:
        with torch.no_grad():
            for batch in run.task_chunks(split, shard, chunk):
                for step_count in steps:
                    fast = run.learner.fast_weights(batch.support_x, batch.support_y, steps=step_count)
                    prediction = run.learner.predict(fast, batch.query_x)
                    if config.is_regression:
                        score = (prediction - batch.query_y).pow(2).flatten(1).mean(1).double()
                    else:
                        score = (prediction.argmax(-1) == batch.query_y).to(torch.float64).mean(1)
                    finite = torch.isfinite(prediction.flatten(1)).all(1) & torch.isfinite(score)
                    per_task[step_count].append(score.masked_fill(~finite, float("nan")).cpu())
    finally:
        run.learner.validate = validate
    values = {}
    for step_count, scores in per_task.items():
        values[step_count] = torch.cat(scores)
        if context is not None:
            values[step_count] = distributed.gather_task_values(values[step_count], num_tasks, context)
    return values


def _mse(value: float) -> str:
    # Three decimals for the figures that matter; exponent notation once adaptation blows up.
    return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"


def format_results(config: RunConfig, split: str, num_tasks: int, results: dict[int, Score]) -> str:
    if config.is_regression:
        lines = [f"{config.preset}: {split} on {num_tasks} tasks (K={config.shots}, 100 evenly spaced query points)"]
    else:
        lines = [f"{config.preset}: {split} on {num_tasks} tasks ({config.ways}-way {config.shots}-shot, {config.queries} queries per class)"]
    for step_count, (mean, ci, diverged) in results.items():
        if config.is_regression:
            label = "before adapting" if step_count == 0 else f"after {step_count} step{'s' if step_count > 1 else ''}"
            line = f"  steps {step_count:>2}: MSE {_mse(mean)} ± {_mse(ci)}  ({label})"
        else:
            line = f"  steps {step_count:>2}: accuracy {100 * mean:.2f}% ± {100 * ci:.2f}%"
        if diverged:
            line += f"  [{diverged} of {num_tasks} tasks diverged (non-finite); the figure is over the other {num_tasks - diverged}]"
        lines.append(line)
    return "\n".join(lines)


def result_records(kind: str, iteration: int, config: RunConfig, num_tasks: int, results) -> list[dict]:
    metric = "mse" if config.is_regression else "accuracy"
    return [
        {"kind": kind, "iteration": iteration, "steps": s, metric: score.mean, "ci95": score.ci95, "tasks": num_tasks, "diverged": score.diverged}
        for s, score in results.items()
    ]


# -- the training loop ------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as they come."""

    def __init__(self, path: Path, keep_through: int | None):
        self.path = path
        if keep_through is not None and path.exists():
            # Resuming: drop what was logged after the checkpoint (those iterations run
            # again), the test results (recomputed at the end) and a line cut short by a kill.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("iteration", 0) <= keep_through and record.get("kind") != "test":
                    kept.append(line + "\n")
            checkpoint.atomic_write_bytes(path, [line.encode() for line in kept])
        elif keep_through is None:
            path.write_text("")
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fastmeta run folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records


class Stopped(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM (a checkpoint was written unless a second
    signal cut it short). ``exit_code`` is 128 + the signal's number: 130 or 143."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations.

    Stopping mid-iteration could leave Adam half-applied; at the end of an iteration the
    state is consistent and can be checkpointed. A second signal stops at once.
    """

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal_number is not None:
            raise Stopped(number)
        self.signal_number = number
        print(f"\nfastmeta: {signal.Signals(number).name}: stopping after this iteration and writing a checkpoint", file=sys.stderr)

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _meta_batches(sampler, iterations: range, tasks: range) -> Iterator[TaskBatch]:
    """Each iteration's meta-batch in turn, drawn ``sample_block`` iterations at a time.

    On a GPU a draw is launch-bound, so blocks of up to 64 MiB amortise its two dozen
    launches over many iterations. On the CPU a block pays off only while it stays
    cache-sized: drawn in blocks, W1's meta-batches measured 4x faster (blocks of 256,
    4 KiB each), W2's 3x slower (blocks of 64, 1 MiB each); hence a 1 MiB budget there.
    """
    if not iterations:
        return
    first = sampler.sample(iterations[0], tasks)
    yield first
    per_iteration = sum(t.numel() * t.element_size() for t in first)
    budget = (64 << 20) if first.support_x.is_cuda else (1 << 20)
    block = max(1, min(256, budget // per_iteration))
    if block == 1:
        for iteration in iterations[1:]:
            yield sampler.sample(iteration, tasks)
        return
    for begin in range(iterations[0] + 1, iterations.stop, block):
        yield from sampler.sample_block(range(begin, min(begin + block, iterations.stop)), tasks)


def train(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    test_tasks: int = 600,
    progress: bool | None = None,
    echo=print,
    eager: bool = False,
) -> dict:
    """Train (or resume) a run in folder ``out``; returns the final test results.

    Iterations run as whole steps where they apply (:class:`WholeStep`: a CUDA graph on a
    GPU, one fused C++ call for a plain MLP on the CPU); ``eager=True`` runs each one as
    ``meta_batch``, ``backward`` and ``optimizer.step()``.

    ``progress=None`` shows the tqdm bar when stderr is a terminal. Raises FileExistsError
    when ``out`` already holds a checkpoint and ``resume`` is False.

    Launched by torchrun, every rank calls this: each trains on its shard of every
    meta-batch (``fastmeta.distributed``), evaluation is split across ranks, and only rank
    0 writes files, prints and shows the bar. A rank that fails stops all of them.
    """
    with distributed.init_from_env(device) as context:  # one process, no torchrun: a world of 1
        return _train(config, out, context, resume=resume, test_tasks=test_tasks, progress=progress, echo=echo,
                      eager=eager)


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _train(config: RunConfig, out, context: distributed.DistributedContext, *, resume, test_tasks, progress, echo,
           eager=False) -> dict:
    device = context.device
    if not context.is_main:
        echo = lambda *args, **kwargs: None  # noqa: E731  (rank 0 speaks for the run)
        progress = False
    out = check_run_folder(out)
    checkpoint_path = out / CHECKPOINT_NAME
    start, elapsed_before, saved = 0, 0.0, None
    if checkpoint_path.exists():
        if not resume:
            raise FileExistsError(
                f"{out} already holds a run ({checkpoint_path}); pass --resume to continue it, or --out to start another"
            )
        saved_config, saved = read_run_checkpoint(checkpoint_path)
        config = dataclasses.replace(saved_config, iterations=config.iterations, data_path=config.data_path or saved_config.data_path)
        start, elapsed_before = saved["iteration"], saved["elapsed_seconds"]
    elif resume:
        echo(f"fastmeta: no checkpoint in {out}; starting from iteration 0")

    # issue 26: also when a kill during the first checkpoint write left only a temporary.
    for stale in checkpoint.stale_temporaries(checkpoint_path) if context.is_main else ():
        stale.unlink(missing_ok=True)  # left by a writer that was killed
    run = Run(config, device)
    run.check_splits(splits_used(config, start))
    if saved is not None:
        run.restore(saved)
        echo(resume_message(config.preset, start, config.iterations))  # issue 26
    parallel = distributed.TaskParallel(run.learner, context)  # rank 0's weights everywhere
    # On --resume each rank read the checkpoint itself: Adam's state (with its step count)
    # shows they all read the same one. Called on every rank, resumed or not, so that a
    # rank that found no checkpoint fails here with a clear error instead of desynchronising.
    distributed.verify_replicas(run.learner, context, run.optimizer)
    created = context.is_main and not out.exists()
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _train_loop(config, out, context, run, parallel, start, elapsed_before, saved, test_tasks, progress, echo,
                           eager)
    except BaseException:
        if created:
            _remove_if_nothing_was_written(out)
        raise


def _remove_if_nothing_was_written(out: Path) -> None:
    """Remove a run folder this run created when it failed before writing any result."""
    metrics = out / METRICS_NAME
    if metrics.exists() and metrics.stat().st_size == 0:
        metrics.unlink()
    try:
        out.rmdir()  # only if empty: a checkpoint or a logged line is kept
    except OSError:
        pass


def set_outer_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """The meta learning rate of every group; a tensor rate (a captured step's) in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam as a CUDA graph can hold it: ``capturable`` (its step count on the device) and
    its rate a device tensor, so that a schedule changes the rate between replays. The
    state and the update's arithmetic are Adam's own; a checkpoint keeps these settings."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
    optimizer.defaults["capturable"] = True
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != device:
            state["step"] = step.to(device=device, dtype=torch.float32)


class WholeStep:
    """``fastmeta train``'s whole-step execution: each iteration (meta-gradient and Adam's
    update) as one replayable step from ``learner.capture``: a CUDA graph on a GPU, the
    fused C++ meta-step with torch's fused Adam inside for a plain MLP on the CPU.

    It applies to an iteration whose schedule is plain (no multi-step loss weights besides
    the last step's), in one process (several ranks all-reduce the meta-gradient between
    the backward and the update), unless ``eager``. One step is built per meta-gradient
    order the run uses (derivative-order annealing uses two). A model the whole step does
    not take (learned rates on the CPU, a conv net on the CPU, ...) trains eagerly, and
    :attr:`reason` says why.

    Validation: the CUDA graph validates the meta-batch once, at capture; the CPU step
    checks every meta-batch in its kernel. Neither syncs per iteration: a non-finite loss
    is flagged on the device and :meth:`check_finite` (a sync) raises, which the training
    loop calls before it logs, validates or writes a checkpoint, so a non-finite run never
    overwrites the last good checkpoint.
    """

    def __init__(self, run: "Run", context, eager: bool):
        self.run = run
        self.steps: dict[bool, object] = {}
        self.reason = None
        if eager:
            self.reason = "--eager"
        elif context.is_distributed:
            self.reason = "several ranks: the meta-gradient is all-reduced between the backward and the update"

    @staticmethod
    def plain(schedule) -> bool:
        weights = schedule.step_weights
        return weights is None or (not any(weights[:-1]) and weights[-1] == 1)

    def step_for(self, schedule, batch):
        """The whole step for this iteration, or None (eager)."""
        if self.reason is not None or not self.plain(schedule):
            return None
        step = self.steps.get(schedule.first_order)
        if step is None:
            run = self.run
            try:
                if run.device.type == "cuda":
                    make_capturable(run.optimizer, run.device)
                step = run.learner.capture(run.optimizer, *batch, first_order=schedule.first_order)
            except ValueError as error:
                self.reason = str(error)
                return None
            self.steps[schedule.first_order] = step
        return step

    def check_finite(self) -> None:
        for step in self.steps.values():
            step.check_finite()


def _train_loop(config, out, context, run, parallel, start, elapsed_before, saved, test_tasks, progress, echo,
                eager=False) -> dict:
    checkpoint_path = out / CHECKPOINT_NAME
    # This rank's shard of every meta-batch (all of it in one process), drawn ahead in blocks.
    meta_batches = _meta_batches(run.sampler("train", config.seed), range(start, config.iterations), context.shard(config.meta_batch))
    metrics = MetricsLog(out / METRICS_NAME, keep_through=start if saved is not None else None) if context.is_main else _NoMetrics()
    learner, optimizer = run.learner, run.optimizer

    whole_step = WholeStep(run, context, eager)

    def save(iteration: int) -> None:
        whole_step.check_finite()  # before replacing the last good checkpoint
        if context.is_main:
            checkpoint.save(run.state(iteration, elapsed_before + time.perf_counter() - started), checkpoint_path)

    def validate(iteration: int) -> None:
        whole_step.check_finite()
        steps = config.validation_steps
        results = evaluate(run, "val", config.validation_tasks, (steps,), context=context)
        for record in result_records("val", iteration, config, config.validation_tasks, results):
            metrics.write(record)
        mean, ci, diverged = results[steps]
        shown = f"MSE {mean:.4f} ± {ci:.4f}" if config.is_regression else f"accuracy {100 * mean:.2f}% ± {100 * ci:.2f}%"
        if diverged:
            shown += f" ({diverged} of {config.validation_tasks} tasks diverged)"
        if context.is_main:
            bar.write(f"iteration {iteration}: validation {shown} after {steps} step{'s' if steps > 1 else ''}")

    started = time.perf_counter()
    window_start, window_iterations = started, 0
    loss_sum = torch.zeros((), device=run.device)
    accuracy_sum = torch.zeros((), device=run.device)
    accuracy_iterations = 0  # the CPU whole step returns no accuracy
    bar = tqdm(
        total=config.iterations, initial=start, desc=config.preset, unit="it", dynamic_ncols=True,
        disable=None if progress is None else not progress,  # None: shown on a terminal only
    )
    done = start
    try:
        with _StopRequest() as stop:
            for iteration in range(start, config.iterations):
                schedule = iteration_schedule(config, iteration)
                set_outer_lr(optimizer, schedule.outer_lr)
                batch = next(meta_batches)
                replay = whole_step.step_for(schedule, batch)
                if replay is not None:
                    output = replay(*batch)
                    step_loss = output.loss
                    step_accuracy = None if output.accuracy is None else output.accuracy.mean()
                    should_stop = stop.signal_number is not None
                else:
                    optimizer.zero_grad(set_to_none=True)
                    # This rank's shard of the meta-batch (all of it in one process); on exit the
                    # meta-gradient is the mean over all tasks on every rank, and a stop request
                    # on any rank stops every rank after this same iteration.
                    with parallel.meta_step(config.meta_batch,
                                            stop_requested=lambda: stop.signal_number is not None) as step:
                        output = learner.meta_batch(*batch, step_weights=schedule.step_weights,
                                                    first_order=schedule.first_order)
                        step.backward(output)
                    optimizer.step()
                    step_loss, step_accuracy, should_stop = step.loss, step.accuracy, step.should_stop
                # Summed on the device: reading a loss every iteration would sync the GPU.
                loss_sum += step_loss
                if step_accuracy is not None:
                    accuracy_sum += step_accuracy
                    accuracy_iterations += 1
                window_iterations += 1
                done = iteration + 1
                bar.update(1)

                if done % config.log_every == 0 or done == config.iterations:
                    whole_step.check_finite()
                    now = time.perf_counter()
                    record = {
                        "kind": "train",
                        "iteration": done,
                        "loss": loss_sum.item() / window_iterations,
                        "iterations_per_second": window_iterations / max(now - window_start, 1e-9),
                        "seconds": elapsed_before + now - started,
                        "outer_lr": schedule.outer_lr,
                        "execution": "eager" if replay is None else "whole-step",
                    }
                    postfix = {"loss": f"{record['loss']:.4f}"}
                    if accuracy_iterations:
                        record["accuracy"] = accuracy_sum.item() / accuracy_iterations
                        postfix["acc"] = f"{100 * record['accuracy']:.1f}%"
                    metrics.write(record)
                    bar.set_postfix(postfix, refresh=False)
                    loss_sum.zero_()
                    accuracy_sum.zero_()
                    accuracy_iterations = 0
                    window_start, window_iterations = now, 0
                if done % config.validate_every == 0 and done != config.iterations:
                    validate(done)
                if done % config.checkpoint_every == 0 or done == config.iterations or should_stop:
                    save(done)
                if should_stop:
                    bar.close()
                    echo(f"fastmeta: stopped at iteration {done}; checkpoint in {checkpoint_path} (continue with --resume)")
                    # A rank that got no signal itself stops because another rank was terminated.
                    raise Stopped(stop.signal_number or signal.SIGTERM)
        bar.close()
        if start >= config.iterations:
            echo(f"fastmeta: {out} has already run {start} of {config.iterations} iterations")
        whole_step.check_finite()
        total = elapsed_before + time.perf_counter() - started
        echo(f"fastmeta: trained {config.iterations} iterations in {total:.1f} s ({done - start} in this session)")
        results = evaluate(run, "test", test_tasks, config.test_steps, context=context)
        for record in result_records("test", done, config, test_tasks, results):
            metrics.write(record)
    finally:
        bar.close()
        metrics.close()
    echo(format_results(config, "test", test_tasks, results))
    return results
