"""The ``fastmeta`` command: ``fastmeta train | eval | plot | bench | profile | build | info``.

Subcommands are looked up in ``SUBCOMMANDS``, name -> (one-line help, "module:attribute").
The attribute is a ``Subcommand``: a help line, ``add_arguments(parser)`` and
``run(args) -> exit code``. Only the chosen subcommand's module is imported, so
``fastmeta --help`` is quick and a half-written module breaks only its own subcommand.

To add a subcommand from another module, define there::

    COMMAND = fastmeta.tools.command.Subcommand(help="...", add_arguments=..., run=...)

and point its ``SUBCOMMANDS`` entry at ``"your.module:COMMAND"``. Code that cannot edit
this file can call ``register_subcommand(name, subcommand)`` before ``main()`` runs. A
listed module that does not exist yet makes its subcommand print "not available yet".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import signal
import sys
from pathlib import Path

from fastmeta.tools.command import Subcommand

__all__ = ["Subcommand", "SUBCOMMANDS", "register_subcommand", "main"]


SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train a learner on a paper preset", "fastmeta.tools.cli:TRAIN"),
    "eval": ("evaluate a checkpoint on 600 fixed test tasks", "fastmeta.tools.cli:EVAL"),
    "plot": ("draw a run's learning curves (and the sinusoid fit) as PNGs", "fastmeta.tools.plotting:COMMAND"),
    "bench": ("benchmark fastmeta against its peers on the standard workloads", "fastmeta.tools.bench:COMMAND"),
    "profile": ("profile a preset's meta-iteration with torch.profiler", "fastmeta.tools.profiling:COMMAND"),
    "build": ("build the C++/CUDA extension ahead of time", "fastmeta.tools.backend_commands:BUILD"),
    "info": ("show the backends, their availability and what was verified where", "fastmeta.tools.backend_commands:INFO"),
}

_REGISTERED: dict[str, Subcommand] = {}

# Errors that are the user's input, not a bug: printed as one line, exit code 1.
# PermissionError: an unwritable --out (at the start, or at a later checkpoint) is the
# user's to fix; its message names the file.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError)


def register_subcommand(name: str, subcommand: Subcommand) -> None:
    """Add or replace a subcommand at run time (see the module docstring)."""
    if not isinstance(subcommand, Subcommand):
        raise TypeError(f"subcommand must be a fastmeta.tools.cli.Subcommand, got {type(subcommand).__name__}")
    _REGISTERED[name] = subcommand
    SUBCOMMANDS.setdefault(name, (subcommand.help, ""))


def _not_available(name: str, reason: str) -> Subcommand:
    def run(args):
        print(f"fastmeta {name}: not available yet ({reason})", file=sys.stderr)
        return 2

    return Subcommand(help=SUBCOMMANDS[name][0], add_arguments=lambda parser: parser.add_argument("rest", nargs=argparse.REMAINDER), run=run)


def _resolve(name: str) -> Subcommand:
    if name in _REGISTERED:
        return _REGISTERED[name]
    _, target = SUBCOMMANDS[name]
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):  # the module itself is missing
            return _not_available(name, f"{module_name} does not exist")
        raise
    subcommand = getattr(module, attribute, None)
    if subcommand is None:
        return _not_available(name, f"{module_name} has no {attribute}")
    return subcommand


# -- train ------------------------------------------------------------------------------------

# Flags that change what a run computes; on --resume they must agree with the checkpoint.
_RUN_DEFINING_FLAGS = {
    "learner": "--learner",
    "seed": "--seed",
    "first_order": "--first-order",
    "meta_batch": "--meta-batch",
    "outer_lr_schedule": "--outer-lr-schedule",
    "multi_step_loss_iterations": "--multi-step-loss",
    "first_order_iterations": "--first-order-iterations",
}
_SCHEDULE_FLAGS = {
    "validate_every": "--validate-every",
    "validation_tasks": "--validation-tasks",
    "checkpoint_every": "--checkpoint-every",
    "log_every": "--log-every",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--backend", default=None, metavar="NAME", help="fastmeta backend (default: FASTMETA_BACKEND or auto)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N",
        help="CPU threads for torch (default: torch's). 1 is often faster for small workloads on a busy machine",
    )


def _select_device(args) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend is not None:
        import fastmeta

        try:
            fastmeta.use_backend(args.backend)
        except (RuntimeError, KeyError, TypeError) as error:  # unavailable (no GPU, no compiler) or unknown
            reason = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ValueError(f"--backend {args.backend}: {reason}") from None
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from fastmeta.tools.training import LEARNERS, PRESETS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "presets:\n" + "\n".join(f"  {name:<20} {preset.summary}" for name, preset in PRESETS.items())
    parser.add_argument("preset", choices=sorted(PRESETS), metavar="PRESET", help="a paper protocol (listed below)")
    parser.add_argument("--learner", choices=LEARNERS, default=None, help="default: maml")
    parser.add_argument("--data", default=None, metavar="PATH", help="dataset folder (Omniglot: the one holding images_background.zip)")
    parser.add_argument("--iterations", type=_positive_int, default=None, metavar="N", help="meta-iterations (default: the preset's)")
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/PRESET-LEARNER)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _add_device_arguments(parser)
    parser.add_argument("--seed", type=_non_negative_int, default=None, metavar="S", help="run seed (default: 0)")
    parser.add_argument("--first-order", action="store_true", default=None, help="first-order meta-gradient")
    parser.add_argument("--meta-batch", type=_positive_int, default=None, metavar="T", help="tasks per meta-iteration")
    # The training schedules (fastmeta/tools/schedules.py): the same for --learner maml and model-aware.
    parser.add_argument(
        "--outer-lr-schedule", choices=("constant", "cosine"), default=None,
        help="the meta learning rate: constant, or cosine-annealed over the run (default: the preset's)",
    )
    parser.add_argument(
        "--multi-step-loss", type=_non_negative_int, default=None, metavar="N", dest="multi_step_loss_iterations",
        help="MAML++'s multi-step loss, annealed to the last step's over the first N iterations (0: off; default: the preset's)",
    )
    parser.add_argument(
        "--first-order-iterations", type=_non_negative_int, default=None, metavar="N",
        help="derivative-order annealing: first order for the first N iterations, then second (default: the preset's)",
    )
    parser.add_argument("--validate-every", type=_positive_int, default=None, metavar="N")
    parser.add_argument("--validation-tasks", type=_positive_int, default=None, metavar="N")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N")
    parser.add_argument("--log-every", type=_positive_int, default=None, metavar="N", help="iterations per metrics.jsonl line")
    parser.add_argument("--test-tasks", type=_positive_int, default=600, metavar="N", help="tasks of the final test (default: 600)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--eager", action="store_true",
        help="run each iteration op by op (meta_batch, backward, optimizer.step) instead of as one whole step "
        "(a CUDA graph on a GPU; one fused call for a plain MLP on the CPU)",
    )
    parser.add_argument(
        "--nproc", type=_positive_int, default=None, metavar="N",
        help="train with N processes on this node (one per GPU): re-runs this command under torchrun; "
        "for several nodes run torchrun yourself (docs/distributed.md)",
    )


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def _run_train(args) -> int:
    from fastmeta import distributed
    from fastmeta.tools import run_lock, training

    preset = training.PRESETS[args.preset]
    given = {
        field: getattr(args, field)
        for field in (*_RUN_DEFINING_FLAGS, *_SCHEDULE_FLAGS, "iterations")
        if getattr(args, field) is not None
    }
    # Absolute, because the checkpoint keeps it for `fastmeta eval` run from anywhere.
    data_path = str(Path(args.data).expanduser().resolve()) if args.data else None
    config = dataclasses.replace(preset, **given, data_path=data_path)
    out = training.check_run_folder(args.out or Path("runs") / f"{config.preset}-{config.learner}", "--out")
    # One run per folder, held from here to the end; --nproc's ranks share the launcher's.
    with run_lock.hold(out, "--out", cleanup=training.remove_if_nothing_was_written):
        if args.nproc is not None:
            # torchrun starts N copies of this same command (minus --nproc) and sets their ranks.
            return distributed.launch(args.nproc, _without_nproc(args.argv))
        return _run_train_locked(args, training, distributed, config, given, data_path, out)


def _run_train_locked(args, training, distributed, config, given, data_path, out) -> int:
    checkpoint_path = out / training.CHECKPOINT_NAME
    if args.resume and checkpoint_path.exists():
        saved, _ = training.read_run_checkpoint(checkpoint_path)
        if saved.preset != config.preset:
            raise ValueError(f"PRESET {config.preset} does not match the checkpoint's preset {saved.preset} ({checkpoint_path})")
        for field, flag in _RUN_DEFINING_FLAGS.items():
            if field in given and given[field] != getattr(saved, field):
                raise ValueError(
                    f"{flag} {given[field]} does not match the checkpoint's {getattr(saved, field)} ({checkpoint_path}); "
                    "a resumed run keeps its settings"
                )
        # The schedule (how often to log, validate, checkpoint) may change on resume.
        config = dataclasses.replace(saved, **{f: given[f] for f in (*_SCHEDULE_FLAGS, "iterations") if f in given})
        config = dataclasses.replace(config, data_path=data_path or saved.data_path)
    device = _select_device(args)
    try:
        training.train(config, out, resume=args.resume, device=device, test_tasks=args.test_tasks, progress=False if args.no_progress else None,
                       eager=args.eager)
    except distributed.RankFailedError as error:  # another rank failed; its own traceback is in its output
        print(f"fastmeta train: {error}", file=sys.stderr)
        return 1
    return 0


TRAIN = Subcommand(help=SUBCOMMANDS["train"][0], add_arguments=_train_arguments, run=_run_train)


# -- eval -------------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run folder holding checkpoint.pt")
    parser.add_argument("--data", default=None, metavar="PATH", help="dataset folder (default: the one the run trained on)")
    parser.add_argument("--tasks", type=_positive_int, default=600, metavar="N", help="number of test tasks (default: 600)")
    parser.add_argument(
        "--steps", type=_non_negative_int, nargs="+", default=None, metavar="N",
        help="inner steps to evaluate (default: the paper's test steps, then 10)",
    )
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    _add_device_arguments(parser)


def _run_eval(args) -> int:
    from fastmeta.tools import training

    config, state = training.read_run_checkpoint(args.checkpoint)
    if args.data:
        config = dataclasses.replace(config, data_path=str(Path(args.data).expanduser().resolve()))
    run = training.Run(config, _select_device(args))
    run.learner.load_state_dict(state["learner"])
    steps = tuple(args.steps) if args.steps else config.test_steps
    results = training.evaluate(run, args.split, args.tasks, steps)
    print(training.format_results(config, args.split, args.tasks, results))
    if args.json:
        records = training.result_records(args.split, state["iteration"], config, args.tasks, results)
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "preset": config.preset, "results": records}, indent=2) + "\n")
    return 0


EVAL = Subcommand(help=SUBCOMMANDS["eval"][0], add_arguments=_eval_arguments, run=_run_eval)


# -- main -------------------------------------------------------------------------------------


def _parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmeta", description="fastmeta: fast MAML and model-aware MAML for PyTorch")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_line, _) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            subcommand = _resolve(name)
            subcommand.add_arguments(subparser)
            subparser.set_defaults(_run=subcommand.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastmeta`` and ``python -m fastmeta``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    args.argv = argv  # as given, so that `train --nproc N` can re-launch itself under torchrun
    if args.command is None:
        parser.print_help()
        return 2
    from fastmeta.checkpoint import CheckpointError

    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as stop:  # 128 + the signal's number (training.Stopped), as a shell reports it
        return getattr(stop, "exit_code", 128 + signal.SIGINT)
    except (*_USER_ERRORS, CheckpointError) as error:
        print(f"fastmeta {args.command}: error: {error}", file=sys.stderr)
        return 1
