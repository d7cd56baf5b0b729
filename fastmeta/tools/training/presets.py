"""The paper presets of ``fastmeta train``: a run's whole configuration (:class:`RunConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


LEARNERS = ("maml", "model-aware")


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
