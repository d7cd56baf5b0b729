"""How many evaluation tasks run at once: a bound on evaluation's memory.

Evaluation adapts every task under ``no_grad`` and keeps one float per task and step
count, so its peak memory is that of one chunk. Regression evaluation used to run all its
tasks in one chunk: ``fastmeta eval RUN --tasks 20000`` (sinusoid, 100 query points per
task) peaked at 2.36 GB RSS against 0.88 GB at 600 tasks, and ``--tasks 100000000`` reached
16 GB in 40 s. With at most :data:`REGRESSION_EVAL_CHUNK` tasks at once the peak no longer
grows with the task count (bench/eval_memory.py measures it). Each task's data and
adaptation depend on its index only, so the chunking does not change the tasks.
"""

from __future__ import annotations

# 500 sinusoid tasks with 100 queries each: a few MB of activations per inner step, and
# already past the size where a larger batch runs faster on the CPU.
REGRESSION_EVAL_CHUNK = 500


def evaluation_chunk(num_tasks: int, is_regression: bool, meta_batch: int, chunk: int | None = None) -> int:
    """The tasks per chunk: ``chunk`` if given; else the meta-batch size for classification
    and at most :data:`REGRESSION_EVAL_CHUNK` for regression."""
    if chunk:
        return chunk
    if is_regression:
        return max(1, min(num_tasks, REGRESSION_EVAL_CHUNK))
    return meta_batch
