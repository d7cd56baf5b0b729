"""Issue 26, defect 4: evaluation runs its tasks in bounded chunks (regression used to run
every task at once: 20 000 sinusoid tasks peaked at 2.36 GB). The peak RSS itself is
measured by bench/eval_memory.py; here the chunk bound is pinned, as a count."""

from __future__ import annotations

import dataclasses

import torch

from fastmeta.tools import training
from fastmeta.tools.training.evaluation import REGRESSION_EVAL_CHUNK, evaluation_chunk


def test_the_chunk_is_bounded_for_regression_and_the_meta_batch_for_classification():
    assert evaluation_chunk(100_000_000, True, 25) == REGRESSION_EVAL_CHUNK
    assert evaluation_chunk(7, True, 25) == 7
    assert evaluation_chunk(100_000, False, 25) == 25
    assert evaluation_chunk(100_000, True, 25, chunk=3) == 3


def test_task_scores_never_adapts_more_than_a_chunk_of_tasks_at_once():
    run = training.Run(training.PRESETS["sinusoid"], "cpu")
    seen = []
    fast_weights = run.learner.fast_weights

    def counting(support_x, support_y, steps=None):
        seen.append(support_x.shape[0])
        return fast_weights(support_x, support_y, steps=steps)

    run.learner.fast_weights = counting
    tasks = 2 * REGRESSION_EVAL_CHUNK + 3
    scores = training.task_scores(run, "test", tasks, (0, 1))
    assert max(seen) == REGRESSION_EVAL_CHUNK
    assert sum(seen) == 2 * tasks  # every task, once per step count
    assert all(v.shape == (tasks,) and torch.isfinite(v).all() for v in scores.values())


def test_the_chunking_does_not_change_the_scores():
    run = training.Run(dataclasses.replace(training.PRESETS["sinusoid"]), "cpu")
    whole = training.task_scores(run, "test", 40, (0, 1), chunk=40)
    chunked = training.task_scores(run, "test", 40, (0, 1), chunk=7)
    for step in (0, 1):
        torch.testing.assert_close(chunked[step], whole[step], rtol=1e-6, atol=1e-9)
