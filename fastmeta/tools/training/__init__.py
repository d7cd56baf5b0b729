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

The package, top to bottom: :mod:`.presets` (the configurations), :mod:`.run` (a run's
model, learner, data, folder and checkpoint), :mod:`.evaluation`, :mod:`.metrics` (the
log), :mod:`.signals` and :mod:`.loop` (``train``). Whether an iteration runs as a whole
step is the engine's policy (:mod:`fastmeta.engine.whole_step_policy`).
"""

from fastmeta.tools.training.evaluation import Score, evaluate, format_results, result_records, task_scores
from fastmeta.tools.training.loop import _meta_batches, remove_if_nothing_was_written, train
from fastmeta.tools.training.metrics import METRICS_NAME, MetricsLog, read_metrics
from fastmeta.tools.training.presets import LEARNERS, PRESETS, ModelAwareOptions, RunConfig
from fastmeta.tools.training.run import (
    CHECKPOINT_NAME,
    RUN_FORMAT,
    TEST_SEED,
    VALIDATION_SEED,
    Run,
    build_learner,
    build_model,
    check_run_folder,
    read_run_checkpoint,
    splits_used,
)
from fastmeta.tools.training.signals import Stopped

__all__ = [
    "ModelAwareOptions",
    "RunConfig",
    "PRESETS",
    "LEARNERS",
    "Run",
    "train",
    "remove_if_nothing_was_written",
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
