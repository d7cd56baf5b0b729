"""A training run: its model, learner, optimizer and data (:class:`Run`), its folder and
its checkpoint (``checkpoint.pt``: the resolved configuration with the state, so that
``fastmeta eval`` and ``--resume`` need nothing else)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fastmeta import checkpoint
from fastmeta.data import DatasetError, ImageFolderTasks, Omniglot, SinusoidTasks, TaskBatch
from fastmeta.engine.whole_step_policy import make_capturable
from fastmeta.tools.schedules import check_schedules
from fastmeta.tools.training.presets import LEARNERS, RunConfig


CHECKPOINT_NAME = "checkpoint.pt"
RUN_FORMAT = "fastmeta-run-1"
# The fixed evaluation tasks: every run and every checkpoint is scored on the same ones.
TEST_SEED = 0
VALIDATION_SEED = 1


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
            except DatasetError as error:
                # A corrupt or unreadable file: its own message names it, and the task shape
                # is not the cause.
                raise DatasetError(f"{config.preset}: the {split} split cannot be read: {error}") from None
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
