"""fastmeta train's whole-step execution (WholeStep): the same training as eager, a clear
fallback where it does not apply, and no checkpoint overwritten by a non-finite run.

The CUDA tests (marked ``gpu``) run the captured graph against eager training and NCCL
with one rank against one process; they skip without a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from fastmeta import checkpoint
from fastmeta.tools import training
from fastmeta.tools.training import loop as training_loop


def sinusoid(iterations: int, **changes):
    return dataclasses.replace(
        training.PRESETS["sinusoid"], iterations=iterations, meta_batch=5, log_every=1, checkpoint_every=2,
        validate_every=10_000, **changes,
    )


def trained(config, out, **kwargs):
    training.train(config, out, test_tasks=5, progress=False, echo=lambda *a: None, **kwargs)
    return checkpoint.load(out / training.CHECKPOINT_NAME)["learner"], training.read_metrics(out)


def assert_same_weights(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def train_records(records):
    return [r for r in records if r["kind"] == "train"]


def test_cpu_whole_step_trains_as_eager_does(tmp_path):
    # The cosine meta-lr changes the rate every iteration: the whole step must read it.
    config = sinusoid(12)
    got, whole = trained(config, tmp_path / "whole")
    want, eager = trained(config, tmp_path / "eager", eager=True)
    assert {r["execution"] for r in train_records(whole)} == {"whole-step"}
    assert {r["execution"] for r in train_records(eager)} == {"eager"}
    # torch's fused Adam (inside the whole step) and its for-loop Adam round differently.
    assert_same_weights(got, want, rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in train_records(whole)] == pytest.approx([r["loss"] for r in train_records(eager)],
                                                                       rel=1e-4)


def test_cpu_whole_step_follows_derivative_order_annealing(tmp_path):
    # First order for 3 iterations, then second order: one whole step per order.
    config = sinusoid(6, first_order_iterations=3)
    got, whole = trained(config, tmp_path / "whole")
    want, _ = trained(config, tmp_path / "eager", eager=True)
    assert {r["execution"] for r in train_records(whole)} == {"whole-step"}
    assert_same_weights(got, want, rtol=1e-4, atol=1e-6)


def test_cpu_whole_step_resumes_exactly(tmp_path):
    config = sinusoid(8, outer_lr_schedule="constant")
    straight, _ = trained(config, tmp_path / "straight")
    trained(dataclasses.replace(config, iterations=4), tmp_path / "resumed")
    resumed, records = trained(config, tmp_path / "resumed", resume=True)
    assert [r["iteration"] for r in train_records(records)] == list(range(1, 9))
    assert_same_weights(resumed, straight, rtol=0, atol=0)


def test_runs_the_whole_step_does_not_take_train_eagerly(tmp_path):
    # Learned per-parameter rates: the CPU whole step takes fixed rates only.
    config = sinusoid(3, learner="model-aware")
    _, records = trained(config, tmp_path / "ma")
    assert {r["execution"] for r in train_records(records)} == {"eager"}
    # The multi-step loss's annealed weights: eager while they anneal, whole step after.
    config = sinusoid(6, inner_steps=2, multi_step_loss_iterations=3, outer_lr_schedule="constant")
    _, records = trained(config, tmp_path / "msl")
    assert [r["execution"] for r in train_records(records)] == ["eager"] * 3 + ["whole-step"] * 3


def test_a_non_finite_iteration_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = sinusoid(6, outer_lr_schedule="constant")
    batches = training_loop._meta_batches

    def poisoned(sampler, iterations, tasks):
        for iteration, batch in zip(iterations, batches(sampler, iterations, tasks)):
            if iteration == 2:  # the third iteration: after the checkpoint of iteration 2
                batch = batch._replace(query_y=torch.full_like(batch.query_y, math.nan))
            yield batch

    monkeypatch.setattr(training_loop, "_meta_batches", poisoned)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="iteration"):
        training.train(config, out, test_tasks=5, progress=False, echo=lambda *a: None)
    saved = checkpoint.load(out / training.CHECKPOINT_NAME)
    assert saved["iteration"] == 2
    assert [r["iteration"] for r in train_records(training.read_metrics(out))] == [1, 2]


# -- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_training_equals_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = sinusoid(10)  # cosine: the captured Adam reads its rate from a device tensor
    got, whole = trained(config, tmp_path / "graph", device="cuda")
    want, eager = trained(config, tmp_path / "eager", device="cuda", eager=True)
    assert {r["execution"] for r in train_records(whole)} == {"whole-step"}
    assert_same_weights(got, want, rtol=1e-5, atol=1e-6)
    # Resuming a graph-trained run (its Adam capturable, its rate a tensor) continues it.
    trained(dataclasses.replace(config, iterations=12), tmp_path / "graph", device="cuda", resume=True)


@pytest.mark.gpu
def test_nccl_world_size_1_equals_one_process(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    common = ["train", "sinusoid", "--iterations", "10", "--meta-batch", "5", "--device", "cuda", "--test-tasks", "5",
              "--no-progress", "--outer-lr-schedule", "constant"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for out, extra in (("nccl", ["--nproc", "1"]), ("single", ["--eager"])):
        done = subprocess.run([sys.executable, "-m", "fastmeta", *common, "--out", str(tmp_path / out), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = checkpoint.load(tmp_path / "nccl" / training.CHECKPOINT_NAME)["learner"]
    want = checkpoint.load(tmp_path / "single" / training.CHECKPOINT_NAME)["learner"]
    # One rank: the all-reduce sums one term, so the run is the one-process eager run.
    assert_same_weights(got, want, rtol=1e-6, atol=1e-7)
