"""``fastmeta plot RUN_DIR``: a run's learning curves, and for sinusoid runs the MAML paper's fit figure.

matplotlib is a dependency of fastmeta, installed with it; where it is missing all the
same (a broken environment), the command says how to install it and exits with status 1.

- ``learning_curves.png``: the training loss (and accuracy) per logged iteration, and the
  validation metric.
- ``sinusoid_fit.png`` (sinusoid runs): for three of the fixed test tasks, the true curve,
  the K support points, and the model's fit before adapting, after 1 and after 10 steps
  (Finn et al. 2017, figure 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmeta.tools.command import Subcommand

__all__ = ["MatplotlibMissing", "plot_run", "COMMAND"]

_INSTALL_HINT = "fastmeta plot needs matplotlib, a dependency of fastmeta missing here: pip install matplotlib"


class MatplotlibMissing(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissing(_INSTALL_HINT) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as pyplot

    return pyplot


def _learning_curves(pyplot, records: list[dict], title: str, path: Path) -> None:
    train = [r for r in records if r.get("kind") == "train"]
    validation = [r for r in records if r.get("kind") == "val"]
    regression = any("mse" in r for r in validation) or not any("accuracy" in r for r in train)
    figure, (loss_axis, metric_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["iteration"] for r in train], [r["loss"] for r in train], label="train query loss")
    loss_axis.set_xlabel("meta-iteration")
    loss_axis.set_ylabel("MSE" if regression else "cross-entropy")
    if regression:
        loss_axis.set_yscale("log")
    loss_axis.legend()
    metric = "mse" if regression else "accuracy"
    if not regression:
        metric_axis.plot([r["iteration"] for r in train], [r["accuracy"] for r in train], label="train query accuracy", alpha=0.6)
    if validation:
        steps = validation[0]["steps"]
        iterations = [r["iteration"] for r in validation]
        values = [r[metric] for r in validation]
        errors = [r["ci95"] for r in validation]
        metric_axis.errorbar(iterations, values, yerr=errors, marker="o", capsize=3, label=f"validation, {steps} step{'s' if steps != 1 else ''}")
    metric_axis.set_xlabel("meta-iteration")
    metric_axis.set_ylabel("query MSE" if regression else "query accuracy")
    if regression:
        metric_axis.set_yscale("log")
    metric_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _sinusoid_fit(pyplot, run_dir: Path, path: Path, tasks: int = 3) -> None:
    import torch

    from fastmeta.data import SinusoidTasks
    from fastmeta.tools.training import TEST_SEED, Run, read_run_checkpoint

    config, state = read_run_checkpoint(run_dir)
    run = Run(config, "cpu")
    run.learner.load_state_dict(state["learner"])
    evaluation = SinusoidTasks(config.shots, seed=config.seed).evaluation_tasks(tasks, seed=TEST_SEED)
    batch = evaluation.batch
    fits = {}
    with torch.no_grad():
        for steps in (0, 1, 10):
            fast = run.learner.fast_weights(batch.support_x, batch.support_y, steps=steps)
            fits[steps] = run.learner.predict(fast, batch.query_x)
    figure, axes = pyplot.subplots(1, tasks, figsize=(4.5 * tasks, 3.6), squeeze=False)
    for task, axis in enumerate(axes[0]):
        x = batch.query_x[task, :, 0]
        axis.plot(x, batch.query_y[task, :, 0], color="red", label="ground truth")
        axis.plot(x, fits[0][task, :, 0], ":", color="tab:green", label="pre-update")
        axis.plot(x, fits[1][task, :, 0], "--", color="tab:blue", label="1 grad step")
        axis.plot(x, fits[10][task, :, 0], "-.", color="tab:cyan", label="10 grad steps")
        axis.plot(batch.support_x[task, :, 0], batch.support_y[task, :, 0], "^", color="purple", label=f"{config.shots} points used for grad")
        axis.set_title(f"A={evaluation.amplitude[task]:.2f}, φ={evaluation.phase[task]:.2f}")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{config.preset} ({config.learner}) after {state['iteration']} iterations, K={config.shots}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write the run's figures (PNG) to ``out_dir`` (default: the run folder); returns their paths."""
    from fastmeta.tools.training import CHECKPOINT_NAME, read_metrics, read_run_checkpoint

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)  # FileNotFoundError, naming the file, for a wrong folder
    pyplot = _pyplot()
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    has_checkpoint = (run_dir / CHECKPOINT_NAME).exists()
    config = read_run_checkpoint(run_dir)[0] if has_checkpoint else None
    title = f"{config.preset} ({config.learner})" if config else str(run_dir)
    written = [out_dir / "learning_curves.png"]
    _learning_curves(pyplot, records, title, written[0])
    if config is not None and config.data == "sinusoid":
        written.append(out_dir / "sinusoid_fit.png")
        _sinusoid_fit(pyplot, run_dir, written[-1])
    return written


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding metrics.jsonl and checkpoint.pt)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")


def _run(args) -> int:
    try:
        written = plot_run(args.run_dir, args.out)
    except MatplotlibMissing as error:
        print(f"fastmeta plot: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


COMMAND = Subcommand(help="draw a run's learning curves (and the sinusoid fit) as PNGs", add_arguments=_add_arguments, run=_run)
