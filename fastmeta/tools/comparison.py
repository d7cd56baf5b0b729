"""Paired comparisons of learners and options at equal budget: ``bench/learner_comparison.py``.

Each row is a variant of one preset (a learner, and what it changes of the preset); each
runs for every seed with the preset's iterations and training schedule, unless the row
itself is about the schedule. Every run is then scored on the same fixed test tasks
(``training.task_scores``), so two rows are compared task by task: for each task t, the
difference d_t = (row − baseline) averaged over the seeds, and the 95% confidence interval
of its mean over tasks, 1.96 · std(d) / √n. That interval is over the test tasks given
these seeds; the per-seed differences are listed beside it, to show the spread between
seeds. Tasks on which either run diverged are left out of the difference and counted.

Runs are resumable: a row/seed whose run folder holds a finished run is scored, not
retrained, and scores are kept in ``scores.json`` beside its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastmeta import distributed
from fastmeta.tools import training

SCORES_NAME = "scores.json"


@dataclass(frozen=True)
class Variant:
    """One row: a learner, and the run fields (and ModelAwareOptions fields) it changes."""

    name: str
    learner: str
    summary: str
    run: dict = field(default_factory=dict)
    model_aware: dict = field(default_factory=dict)

    def config(self, preset: training.RunConfig, seed: int, iterations: int | None, data: str | None):
        options = dataclasses.replace(preset.model_aware, **self.model_aware)
        changes = dict(self.run, learner=self.learner, seed=seed, model_aware=options)
        if iterations is not None:
            changes["iterations"] = iterations
        if data is not None:
            changes["data_path"] = str(Path(data).expanduser().resolve())
        return dataclasses.replace(preset, **changes)


# The rows: both learners at the preset's defaults, and one row per model-aware option or
# training schedule, each changing that one thing of the model-aware defaults. An option
# that is already the default's value (e.g. the rate mode) has its alternatives as rows.
VARIANTS = {
    v.name: v
    for v in (
        Variant("maml", "maml", "MAML, the preset's schedule"),
        Variant("model-aware", "model-aware", "ModelAwareMAML, the preset's defaults"),
        Variant("ma-raw-rates", "model-aware", "rates learned as they are (they may turn negative), not as logarithms",
                model_aware={"log_lr": False}),
        Variant("ma-shared-rates", "model-aware", "one set of rates for every inner step",
                model_aware={"lr_per_step": False}),
        Variant("ma-scalar-rate", "model-aware", "one learned rate for all parameters", model_aware={"lr_mode": "scalar"}),
        Variant("ma-layer-rates", "model-aware", "one learned rate per parameter tensor (MAML++'s LSLR)",
                model_aware={"lr_mode": "layer"}),
        Variant("ma-param-rates", "model-aware", "one learned rate per parameter (Meta-SGD)",
                model_aware={"lr_mode": "param"}),
        Variant("ma-no-per-step-bn", "model-aware", "BatchNorm weights adapted, not learned per step",
                model_aware={"per_step_bn": False}),
        Variant("ma-constant-lr", "model-aware", "a constant meta learning rate", run={"outer_lr_schedule": "constant"}),
        Variant("maml-constant-lr", "maml", "MAML with a constant meta learning rate", run={"outer_lr_schedule": "constant"}),
        # MAML++ anneals the derivative order over the first third of its training.
        Variant("ma-derivative-order-annealing", "model-aware", "first order for the first 20 000 iterations",
                run={"first_order_iterations": 20_000}),
        # The multi-step loss needs several inner steps: this pair trains with 5.
        Variant("ma-5-steps", "model-aware", "5 inner steps in training (per-step rates)", run={"inner_steps": 5}),
        Variant("ma-5-steps-msl", "model-aware", "5 inner steps, multi-step loss annealed over 20 000 iterations",
                run={"inner_steps": 5, "multi_step_loss_iterations": 20_000}),
        Variant("ma-legacy", "model-aware", "the options before issue 17: shared per-layer rates learned as they "
                "are, BatchNorm adapted, a constant meta learning rate",
                run={"outer_lr_schedule": "constant"},
                model_aware={"lr_mode": "layer", "lr_per_step": False, "log_lr": False, "per_step_bn": False}),
    )
}


def run_folder(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def train_and_score(config: training.RunConfig, folder: Path, test_tasks: int, echo=print) -> dict:
    """Train (or resume) one run, then score it on the fixed test tasks; the scores are
    cached in ``folder/scores.json``. Returns {"seconds", "iterations", "scores": {steps: [...]}}."""
    cached = folder / SCORES_NAME
    if cached.exists():
        record = json.loads(cached.read_text())
        if record["iterations"] == config.iterations and record["tasks"] == test_tasks:
            return record
    checkpoint_path = folder / training.CHECKPOINT_NAME
    done = 0
    if checkpoint_path.exists():
        _, state = training.read_run_checkpoint(checkpoint_path)
        done = state["iteration"]
    if done < config.iterations:
        training.train(config, folder, resume=checkpoint_path.exists(), test_tasks=test_tasks, progress=False, echo=echo)
    saved_config, state = training.read_run_checkpoint(checkpoint_path)
    run = training.Run(saved_config)
    run.learner.load_state_dict(state["learner"])
    scores = training.task_scores(run, "test", test_tasks, saved_config.test_steps)
    record = {
        "iterations": state["iteration"],
        "tasks": test_tasks,
        "seconds": state["elapsed_seconds"],
        "scores": {str(s): [None if math.isnan(v) else v for v in values.tolist()] for s, values in scores.items()},
    }
    cached.write_text(json.dumps(record) + "\n")
    return record


def _scores(record: dict, steps: int) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in record["scores"][str(steps)]], dtype=torch.float64)


def paired_difference(rows: list[dict], baselines: list[dict], steps: int) -> dict:
    """The paired difference (row − baseline) at ``steps`` over tasks and seeds.

    rows, baselines: one record per seed, in the same seed order. Returns the mean of the
    seed-averaged per-task differences, its 95% half-width over tasks, the per-seed mean
    differences and how many tasks were left out because a run diverged on them.
    """
    a = torch.stack([_scores(r, steps) for r in rows])  # [seeds, tasks]
    b = torch.stack([_scores(r, steps) for r in baselines])
    kept = ~(a.isnan() | b.isnan()).any(0)
    per_task = (a - b)[:, kept]
    mean, ci = distributed.mean_ci95(per_task.mean(0)) if bool(kept.any()) else (math.nan, math.nan)
    return {
        "mean": mean,
        "ci95": ci,
        "per_seed": per_task.mean(1).tolist() if bool(kept.any()) else [],
        "left_out": int((~kept).sum()),
    }


def _figure(value: float, regression: bool) -> str:
    if math.isnan(value):
        return "nan"
    if regression:
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"
    return f"{100 * value:.2f}"


def report(preset: training.RunConfig, records: dict[str, list[dict]], seeds: list[int], baseline: str) -> str:
    """Markdown: per row, the mean score per seed and over seeds, diverged tasks, the paired
    difference to ``baseline`` with its 95% CI, and the wall time per run."""
    regression = preset.is_regression
    unit = "MSE" if regression else "accuracy (%)"
    lines = [
        f"{preset.preset}: {unit} on the same fixed test tasks, seeds {', '.join(map(str, seeds))}; "
        f"difference = row − {baseline}, paired by task, mean over seeds; 95% CI over tasks "
        "(1.96 · std / √n); per-seed differences in brackets",
        "",
    ]
    for steps in preset.test_steps:
        lines.append(f"**{steps} step{'s' if steps != 1 else ''}**")
        lines.append("")
        lines.append(f"| row | {' | '.join(f'seed {s}' for s in seeds)} | mean | diverged | vs {baseline} | wall time per run |")
        lines.append("|---|" + "---|" * (len(seeds) + 4))
        for name, runs in records.items():
            per_seed = []
            diverged = 0
            for record in runs:
                values = _scores(record, steps)
                finite = ~values.isnan()
                diverged += int((~finite).sum())
                per_seed.append(values[finite].mean().item() if bool(finite.any()) else math.nan)
            mean = sum(per_seed) / len(per_seed)
            if name == baseline:
                difference = "—"
            else:
                d = paired_difference(runs, records[baseline], steps)
                scale = 1 if regression else 100
                bracket = ", ".join(f"{scale * x:+.3f}" if regression else f"{scale * x:+.2f}" for x in d["per_seed"])
                difference = (
                    f"{scale * d['mean']:+.3f} ± {scale * d['ci95']:.3f}" if regression
                    else f"{scale * d['mean']:+.2f} ± {scale * d['ci95']:.2f}"
                ) + f" [{bracket}]" + (f", {d['left_out']} tasks left out" if d["left_out"] else "")
            seconds = [r["seconds"] for r in runs]
            wall = f"{min(seconds):.0f}–{max(seconds):.0f} s" if len(seconds) > 1 else f"{seconds[0]:.0f} s"
            cells = " | ".join(_figure(v, regression) for v in per_seed)
            lines.append(f"| {name} | {cells} | {_figure(mean, regression)} | {diverged} | {difference} | {wall} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="learner_comparison",
        description="Train rows of variants × seeds of a preset at equal budget, and compare them paired by task.",
    )
    parser.add_argument("preset", choices=sorted(training.PRESETS), metavar="PRESET")
    parser.add_argument("--rows", nargs="+", default=["maml", "model-aware"], choices=sorted(VARIANTS), metavar="ROW",
                        help=f"variants to run (default: maml model-aware); known: {', '.join(VARIANTS)}")
    parser.add_argument("--baseline", default=None, metavar="ROW", help="the row differences are taken to (default: the first)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S")
    parser.add_argument("--out", required=True, metavar="DIR", help="runs go to DIR/ROW/seedS")
    parser.add_argument("--data", default=None, metavar="PATH", help="dataset folder (Omniglot: the one holding images_background.zip)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N", help="default: the preset's")
    parser.add_argument("--test-tasks", type=int, default=600, metavar="N")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    parser.add_argument("--report", default=None, metavar="FILE", help="also write the tables to FILE")
    args = parser.parse_args(argv)
    baseline = args.baseline or args.rows[0]
    if baseline not in args.rows:
        parser.error(f"--baseline {baseline} is not one of --rows")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = training.PRESETS[args.preset]
    out = Path(args.out)
    records = {}
    # Seeds outermost, so that an interrupted comparison has whole seeds of every row.
    for seed in args.seeds:
        for name in args.rows:
            config = VARIANTS[name].config(preset, seed, args.iterations, args.data)
            folder = run_folder(out, name, seed)
            print(f"== {name}, seed {seed}: {folder}", flush=True)
            records.setdefault(name, []).append(train_and_score(config, folder, args.test_tasks))
    text = report(preset, records, args.seeds, baseline)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
