"""The training schedules (cosine meta learning rate, multi-step loss, derivative-order
annealing), how `fastmeta train` applies them to both learners, and the paired comparison
of bench/learner_comparison.py."""

from __future__ import annotations

import dataclasses
import json
import math
import signal

import pytest
import torch

from fastmeta import checkpoint
from fastmeta.learners.base import MetaLearner
from fastmeta.tools import cli, comparison, training
from fastmeta.tools.schedules import check_schedules, iteration_schedule, multi_step_loss_weights, outer_lr_at
from fastmeta.tools.training import CHECKPOINT_NAME, PRESETS, read_metrics

QUIET = ["--no-progress", "--threads", "1"]


def test_cosine_meta_learning_rate():
    assert outer_lr_at(500, 1000, 1e-3, "constant", 0.0) == 1e-3
    values = [outer_lr_at(i, 1001, 1e-3, "cosine", 1e-5) for i in range(1001)]
    assert values[0] == pytest.approx(1e-3) and values[-1] == pytest.approx(1e-5)
    assert values[500] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_multi_step_loss_weights_anneal_to_the_last_step():
    assert multi_step_loss_weights(0, 1, 100) is None  # one step: the plain loss
    assert multi_step_loss_weights(0, 5, 0) is None  # off
    assert multi_step_loss_weights(100, 5, 100) is None  # annealed: the plain loss
    assert multi_step_loss_weights(0, 4, 100) == pytest.approx((0.25,) * 4)
    halfway = multi_step_loss_weights(50, 4, 100)
    assert halfway[:3] == pytest.approx((0.125,) * 3) and halfway[3] == pytest.approx(0.625)
    previous = None
    for i in range(100):
        w = multi_step_loss_weights(i, 3, 100)
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0
        if previous is not None:
            assert w[-1] > previous[-1]
        previous = w


def test_derivative_order_annealing_and_the_schedule_of_an_iteration():
    config = dataclasses.replace(PRESETS["sinusoid"], inner_steps=2, iterations=10, outer_lr_schedule="cosine",
                                 multi_step_loss_iterations=4, first_order_iterations=3)
    schedules = [iteration_schedule(config, i) for i in range(10)]
    assert [s.first_order for s in schedules] == [True] * 3 + [False] * 7
    assert [s.step_weights is None for s in schedules] == [False] * 4 + [True] * 6
    assert schedules[0].outer_lr == config.outer_lr and schedules[-1].outer_lr == 0.0
    second_order = dataclasses.replace(config, first_order=True)
    assert all(iteration_schedule(second_order, i).first_order for i in range(10))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(outer_lr_schedule="linear"), "outer_lr_schedule must be one of"),
        (dict(outer_lr_min=1.0), r"outer_lr_min must be in \[0, outer_lr"),
        (dict(multi_step_loss_iterations=-1), "multi_step_loss_iterations must be an integer >= 0"),
        (dict(first_order_iterations=2.5), "first_order_iterations must be an integer >= 0"),
    ],
)
def test_bad_schedules_are_named_before_a_run_starts(change, message):
    config = dataclasses.replace(PRESETS["sinusoid"], **change)
    with pytest.raises(ValueError, match=message):
        check_schedules(config)
    with pytest.raises(ValueError, match=message):
        training.Run(config, "cpu")


def spy_on_meta_batch(monkeypatch):
    calls = []
    original = MetaLearner.meta_batch

    def meta_batch(self, *args, **kwargs):
        calls.append((kwargs.get("step_weights"), kwargs.get("first_order")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MetaLearner, "meta_batch", meta_batch)
    return calls


@pytest.mark.parametrize("learner", ["maml", "model-aware"])
def test_training_applies_the_schedules_to_both_learners(tmp_path, monkeypatch, learner):
    config = dataclasses.replace(
        PRESETS["sinusoid"], learner=learner, inner_steps=2, iterations=6, log_every=1, validate_every=100,
        outer_lr_schedule="cosine", multi_step_loss_iterations=4, first_order_iterations=2,
    )
    calls = spy_on_meta_batch(monkeypatch)
    # Eager, so that every iteration is a meta_batch call (test_training_whole_step.py checks
    # that the whole step follows the same schedules).
    training.train(config, tmp_path, test_tasks=5, progress=False, echo=lambda *a, **k: None, eager=True)
    assert [c[1] for c in calls] == [True, True, False, False, False, False]
    assert [c[0] for c in calls] == [multi_step_loss_weights(i, 2, 4) for i in range(6)]
    logged = [r["outer_lr"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert logged == pytest.approx([outer_lr_at(i, 6, config.outer_lr, "cosine", 0.0) for i in range(6)])


def test_resume_with_schedules_is_exact(tmp_path, monkeypatch):
    # The schedules span the run's iterations (the cosine reaches its end at the last), so
    # the interrupted run is stopped as Ctrl-C stops it: SIGINT, at the end of iteration 4.
    config = dataclasses.replace(
        PRESETS["sinusoid"], learner="model-aware", inner_steps=2, iterations=8, log_every=1, validate_every=100,
        checkpoint_every=100, outer_lr_schedule="cosine", multi_step_loss_iterations=5, first_order_iterations=3,
    )
    quiet = dict(test_tasks=5, progress=False, echo=lambda *a, **k: None)
    training.train(config, tmp_path / "straight", **quiet)
    calls = spy_on_meta_batch(monkeypatch)
    original = MetaLearner.meta_batch

    def interrupt_at_four(self, *args, **kwargs):
        if len(calls) == 3:  # the spy has seen 3 calls: this is iteration 4
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MetaLearner, "meta_batch", interrupt_at_four)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, tmp_path / "interrupted", **quiet)
    assert checkpoint.load(tmp_path / "interrupted" / CHECKPOINT_NAME)["iteration"] == 4
    monkeypatch.undo()
    training.train(config, tmp_path / "interrupted", resume=True, **quiet)
    a = checkpoint.load(tmp_path / "straight" / CHECKPOINT_NAME)["learner"]
    b = checkpoint.load(tmp_path / "interrupted" / CHECKPOINT_NAME)["learner"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cli_schedule_flags_define_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "sinusoid", "--out", str(out), "--iterations", "3", "--test-tasks", "5", *QUIET]
    flags = ["--outer-lr-schedule", "cosine", "--multi-step-loss", "7", "--first-order-iterations", "2"]
    assert cli.main(args + flags) == 0
    config, _ = training.read_run_checkpoint(out)
    assert (config.outer_lr_schedule, config.multi_step_loss_iterations, config.first_order_iterations) == ("cosine", 7, 2)
    capsys.readouterr()
    assert cli.main(args[:5] + ["6", "--resume", "--first-order-iterations", "5", *QUIET]) == 1
    assert "--first-order-iterations 5 does not match the checkpoint's 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(args + ["--outer-lr-schedule", "linear"])
    assert "--outer-lr-schedule" in capsys.readouterr().err


def test_model_aware_options_reach_the_learner_and_old_checkpoints_keep_theirs():
    config = dataclasses.replace(PRESETS["omniglot-5w1s"], learner="model-aware", data_path="unused")
    learner = training.build_learner(config, training.build_model(config))
    options = config.model_aware
    assert (learner.lr_mode, learner.lr_per_step, learner.log_lr) == (options.lr_mode, options.lr_per_step, options.log_lr)
    assert learner.per_step_bn  # conv4 has BatchNorm: the default turns it on
    values = config.to_dict()
    assert training.RunConfig.from_dict(values) == config
    del values["model_aware"]  # a checkpoint written before the options existed
    old = training.RunConfig.from_dict(values)
    assert (old.model_aware.lr_per_step, old.model_aware.log_lr, old.model_aware.per_step_bn) == (False, False, False)


def record(values):
    return {"scores": {"1": values}, "seconds": 1.0, "iterations": 1, "tasks": len(values)}


def test_paired_difference_by_hand():
    rows = [record([1.0, 2.0, 3.0, None]), record([2.0, 2.0, 5.0, 1.0])]
    base = [record([0.0, 1.0, 1.0, 1.0]), record([1.0, 1.0, 2.0, 1.0])]
    d = comparison.paired_difference(rows, base, 1)
    # Task 3 diverged in seed 0 of the row: left out. Per task, averaged over seeds:
    # (1 + 1) / 2 = 1, (1 + 1) / 2 = 1, (2 + 3) / 2 = 2.5.
    per_task = torch.tensor([1.0, 1.0, 2.5], dtype=torch.float64)
    assert d["left_out"] == 1
    assert d["mean"] == pytest.approx(1.5)
    assert d["ci95"] == pytest.approx(1.96 * per_task.std().item() / math.sqrt(3))
    assert d["per_seed"] == pytest.approx([(1 + 1 + 2) / 3, (1 + 1 + 3) / 3])


def test_comparison_runs_rows_and_seeds_and_reuses_finished_runs(tmp_path, capsys):
    args = ["sinusoid", "--rows", "maml", "model-aware", "--seeds", "0", "1", "--out", str(tmp_path),
            "--iterations", "4", "--test-tasks", "12", "--threads", "1", "--report", str(tmp_path / "table.md")]
    assert comparison.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| model-aware |" in table and "vs maml" in table and "**10 steps**" in table
    scores = json.loads((tmp_path / "model-aware" / "seed1" / comparison.SCORES_NAME).read_text())
    assert scores["iterations"] == 4 and len(scores["scores"]["10"]) == 12
    config, _ = training.read_run_checkpoint(tmp_path / "model-aware" / "seed1")
    assert config.learner == "model-aware" and config.seed == 1
    stamp = (tmp_path / "maml" / "seed0" / CHECKPOINT_NAME).stat().st_mtime_ns
    assert comparison.main(args) == 0  # finished: scored from the cache, not retrained
    assert (tmp_path / "maml" / "seed0" / CHECKPOINT_NAME).stat().st_mtime_ns == stamp
    assert (tmp_path / "table.md").read_text() == table
