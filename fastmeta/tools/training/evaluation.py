"""Scoring a run on held-out tasks: :func:`evaluate`, its figures and their records."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastmeta import distributed
from fastmeta.tools.training.presets import RunConfig
from fastmeta.tools.training.run import Run

# Evaluation adapts every task under ``no_grad`` and keeps one float per task and step
# count, so its peak memory is that of one chunk. Regression evaluation used to run all its
# tasks in one chunk: ``fastmeta eval RUN --tasks 20000`` (sinusoid, 100 query points per
# task) peaked at 2.36 GB RSS against 0.88 GB at 600 tasks, and ``--tasks 100000000`` reached
# 16 GB in 40 s. With at most :data:`REGRESSION_EVAL_CHUNK` tasks at once the peak no longer
# grows with the task count (bench/eval_memory.py measures it). Each task's data and
# adaptation depend on its index only, so the chunking does not change the tasks.
#
# 500 sinusoid tasks with 100 queries each: a few MB of activations per inner step, and
# already past the size where a larger batch runs faster on the CPU.
REGRESSION_EVAL_CHUNK = 500


def evaluation_chunk(num_tasks: int, is_regression: bool, meta_batch: int, chunk: int | None = None) -> int:
    """How many evaluation tasks run at once (a bound on evaluation's memory): ``chunk`` if
    given; else the meta-batch size for classification and at most
    :data:`REGRESSION_EVAL_CHUNK` for regression."""
    if chunk:
        return chunk
    if is_regression:
        return max(1, min(num_tasks, REGRESSION_EVAL_CHUNK))
    return meta_batch


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
    chunk = evaluation_chunk(num_tasks, config.is_regression, config.meta_batch, chunk)
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
