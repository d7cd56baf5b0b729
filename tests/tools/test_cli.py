import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastmeta import checkpoint
from fastmeta.tools import cli, training
from fastmeta.tools.training import CHECKPOINT_NAME, METRICS_NAME, read_metrics

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--no-progress", "--threads", "1"]


def train_sinusoid(out, *extra):
    return cli.main(["train", "sinusoid", "--out", str(out), "--log-every", "1", "--test-tasks", "50", *QUIET, *extra])


def train_omniglot(out, data, *extra):
    return cli.main([
        "train", "omniglot-5w1s", "--data", str(data), "--out", str(out), "--meta-batch", "2",
        "--log-every", "1", "--validation-tasks", "4", "--test-tasks", "6", *QUIET, *extra,
    ])


def train_losses(run_dir):
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_train_sinusoid(tmp_path, capsys):
    assert train_sinusoid(tmp_path, "--iterations", "30", "--validate-every", "10", "--checkpoint-every", "10") == 0
    output = capsys.readouterr().out
    for steps in (0, 1, 10):
        assert re.search(rf"steps {steps:>2}: MSE \d+\.\d{{3}} ± \d+\.\d{{3}}", output)
    records = read_metrics(tmp_path)
    assert sorted(train_losses(tmp_path)) == list(range(1, 31))
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [10, 20]
    assert {r["steps"] for r in records if r["kind"] == "test"} == {0, 1, 10}
    state = checkpoint.load(tmp_path / CHECKPOINT_NAME)
    assert state["iteration"] == 30 and state["config"]["preset"] == "sinusoid"


def test_resume_continues_with_identical_losses(tmp_path):
    # A longer --iterations on resume continues the same run only under a constant meta
    # learning rate: the cosine spans the run's iterations (tests/tools/test_schedules.py checks
    # an exact resume under every schedule, stopped by SIGINT).
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    constant = ("--outer-lr-schedule", "constant")
    assert train_sinusoid(straight, "--iterations", "20", *constant) == 0
    assert train_sinusoid(interrupted, "--iterations", "8", *constant) == 0
    assert train_sinusoid(interrupted, "--iterations", "20", "--resume") == 0
    assert train_losses(interrupted) == train_losses(straight)  # exact float equality, all 20
    a = checkpoint.load(straight / CHECKPOINT_NAME)
    b = checkpoint.load(interrupted / CHECKPOINT_NAME)
    for name, tensor in a["learner"].items():
        assert torch.equal(tensor, b["learner"][name]), name


def test_resume_model_aware_omniglot_is_exact(tmp_path, synthetic_omniglot):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = ("--learner", "model-aware", "--validate-every", "3", "--checkpoint-every", "2")
    assert train_omniglot(straight, synthetic_omniglot, "--iterations", "6", *args) == 0
    assert train_omniglot(interrupted, synthetic_omniglot, "--iterations", "3", *args) == 0
    assert train_omniglot(interrupted, synthetic_omniglot, "--iterations", "6", "--resume", *args) == 0
    assert train_losses(interrupted) == train_losses(straight)
    learner = checkpoint.load(interrupted / CHECKPOINT_NAME)["learner"]
    assert any(not name.startswith("module.") for name in learner)  # the learned rates are saved too
    for name, tensor in checkpoint.load(straight / CHECKPOINT_NAME)["learner"].items():
        assert torch.equal(tensor, learner[name]), name


def test_existing_run_needs_resume_and_matching_flags(tmp_path, capsys):
    assert train_sinusoid(tmp_path, "--iterations", "4") == 0
    capsys.readouterr()
    assert train_sinusoid(tmp_path, "--iterations", "8") == 1
    assert "pass --resume" in capsys.readouterr().err
    assert train_sinusoid(tmp_path, "--iterations", "8", "--resume", "--seed", "5") == 1
    assert "--seed 5 does not match the checkpoint's 0" in capsys.readouterr().err
    assert cli.main(["train", "sinusoid-paper", "--out", str(tmp_path), "--resume", *QUIET]) == 1
    assert "does not match the checkpoint's preset sinusoid" in capsys.readouterr().err


def test_sigkill_loses_only_iterations_after_the_last_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "fastmeta", "train", "sinusoid", "--iterations", "100000", "--out", str(run_dir),
         "--checkpoint-every", "25", "--log-every", "1", *QUIET],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        saved = 0
        while saved < 50:  # a second checkpoint: the first was overwritten atomically at least once
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.05)
            if (run_dir / CHECKPOINT_NAME).exists():
                saved = checkpoint.load(run_dir / CHECKPOINT_NAME)["iteration"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    killed_at = checkpoint.load(run_dir / CHECKPOINT_NAME)["iteration"]
    assert killed_at >= 50 and killed_at % 25 == 0
    logged = max(train_losses(run_dir))
    assert logged >= killed_at  # iterations after the checkpoint ran, and are lost
    capsys.readouterr()
    assert train_sinusoid(run_dir, "--iterations", str(killed_at + 5), "--resume", "--checkpoint-every", "25") == 0
    assert f"resuming sinusoid from iteration {killed_at} of {killed_at + 5}" in capsys.readouterr().out
    iterations = [r["iteration"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert iterations == list(range(1, killed_at + 6))  # each once: the lost ones were run again
    assert checkpoint.load(run_dir / CHECKPOINT_NAME)["iteration"] == killed_at + 5
    assert not checkpoint.stale_temporaries(run_dir / CHECKPOINT_NAME)


def test_eval_output_and_json(tmp_path, synthetic_omniglot, capsys):
    run_dir = tmp_path / "run"
    assert train_omniglot(run_dir, synthetic_omniglot, "--iterations", "2") == 0
    output = capsys.readouterr().out
    assert re.search(r"omniglot-5w1s: test on 6 tasks \(5-way 1-shot, 1 queries per class\)", output)
    assert cli.main(["eval", str(run_dir / CHECKPOINT_NAME), "--tasks", "10", "--threads", "1"]) == 0
    output = capsys.readouterr().out
    assert re.search(r"test on 10 tasks", output)
    # The paper's test steps for 5-way (3), then 10.
    assert re.findall(r"steps +(\d+): accuracy \d+\.\d\d% ± \d+\.\d\d%", output) == ["3", "10"]
    result = tmp_path / "result.json"
    assert cli.main(["eval", str(run_dir), "--tasks", "10", "--steps", "0", "1", "--json", str(result), "--threads", "1"]) == 0
    records = json.loads(result.read_text())["results"]
    assert [r["steps"] for r in records] == [0, 1]
    assert all(0 <= r["accuracy"] <= 1 and r["tasks"] == 10 for r in records)


def test_eval_is_deterministic(tmp_path, capsys):
    assert train_sinusoid(tmp_path, "--iterations", "3") == 0
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        assert cli.main(["eval", str(tmp_path), "--tasks", "100", "--threads", "1"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert re.search(r"steps  1: MSE \d+\.\d{3} ± \d+\.\d{3}  \(after 1 step\)", outputs[0])


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    assert train_sinusoid(tmp_path, "--iterations", "3") == 0
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-10])
    capsys.readouterr()
    assert cli.main(["eval", str(path)]) == 1
    error = capsys.readouterr().err
    assert str(path) in error and "truncated" in error
    assert train_sinusoid(tmp_path, "--iterations", "6", "--resume") == 1
    assert "truncated" in capsys.readouterr().err


def test_dataset_problems_are_reported(tmp_path, capsys):
    assert cli.main(["train", "omniglot-5w1s", "--out", str(tmp_path / "a"), *QUIET]) == 1
    assert "needs --data PATH" in capsys.readouterr().err
    missing = tmp_path / "no-such-folder"
    assert cli.main(["train", "omniglot-5w1s", "--data", str(missing), "--out", str(tmp_path / "b"), *QUIET]) == 1
    assert str(missing) in capsys.readouterr().err


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "sinusoid", "--iterations", "0"])
    assert "--iterations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "no-such-preset"])
    assert "PRESET" in capsys.readouterr().err


def test_subcommands_from_other_modules(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", ("a subcommand whose module is not written yet", "fastmeta.no_such_module:COMMAND"))
    assert cli.main(["later"]) == 2
    assert "not available yet" in capsys.readouterr().err
    seen = []
    command = cli.Subcommand(
        help="echo a value",
        add_arguments=lambda parser: parser.add_argument("--value", type=int),
        run=lambda args: seen.append(args.value) or 0,
    )
    monkeypatch.setattr(cli, "_REGISTERED", {})
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    cli.register_subcommand("echo", command)
    assert cli.main(["echo", "--value", "7"]) == 0 and seen == [7]
    assert cli.main([]) == 2
    assert "echo" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    assert train_sinusoid(tmp_path, "--iterations", "3") == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err


def test_matplotlib_is_installed_with_fastmeta():
    # `fastmeta plot` works after the README's `pip install -e ".[dev]"`: no extra to know about.
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "matplotlib" in [re.split(r"[\s<>=;\[]", d)[0] for d in project["dependencies"]]
    assert all("matplotlib" not in d for extra in project.get("optional-dependencies", {}).values() for d in extra)


def test_plot_writes_pngs(tmp_path, capsys):
    assert train_sinusoid(tmp_path, "--iterations", "10", "--validate-every", "5") == 0
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == ["learning_curves.png", "sinusoid_fit.png"]
    for path in written:
        assert Path(path).read_bytes().startswith(b"\x89PNG")


def test_plot_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert METRICS_NAME in capsys.readouterr().err


def write_image_folder(root, classes=None, images=16):
    """miniImageNet's layout in miniature: ``classes[split]`` classes per split (5 by default),
    ``images`` images each (16 = 1 shot + 15 queries)."""
    classes = {"train": 5, "val": 5, "test": 5, **(classes or {})}
    for split, count in classes.items():
        for class_index in range(count):
            folder = root / split / f"n{class_index:02d}"
            folder.mkdir(parents=True)
            for image_index in range(images):
                Image.new("RGB", (12, 12), (50 * class_index, 10 * image_index, 100)).save(folder / f"{image_index}.png")
    return root


def train_image_folder(data, out, *extra):
    return cli.main([
        "train", "miniimagenet-5w1s", "--data", str(data), "--out", str(out), "--meta-batch", "1",
        "--validation-tasks", "1", "--test-tasks", "1", "--log-every", "1", *QUIET, *extra,
    ])


def test_train_on_an_image_folder(tmp_path, capsys):
    code = train_image_folder(write_image_folder(tmp_path / "images"), tmp_path / "run", "--iterations", "1")
    assert code == 0
    output = capsys.readouterr().out
    assert re.search(r"miniimagenet-5w1s: test on 1 tasks \(5-way 1-shot, 15 queries per class\)", output)
    assert re.findall(r"steps +(\d+): accuracy", output) == ["10"]
    assert sorted(train_losses(tmp_path / "run")) == [1]


def test_diverging_adaptation_is_counted_not_raised():
    # An inner rate of 100 makes 10 steps blow up on every task; 0 steps cannot.
    run = training.Run(dataclasses.replace(training.PRESETS["sinusoid"], inner_lr=100.0), "cpu")
    results = training.evaluate(run, "test", 20, (0, 10))
    assert results[0].diverged == 0 and math.isfinite(results[0].mean)
    assert results[10].diverged > 0
    assert run.learner.validate  # switched off for the evaluation only
    text = training.format_results(run.config, "test", 20, results)
    assert f"{results[10].diverged} of 20 tasks diverged" in text


def test_every_split_the_run_uses_is_checked_before_the_first_iteration(tmp_path, capsys):
    data = write_image_folder(tmp_path / "images", {"val": 3})  # too few classes for 5-way validation
    run_dir = tmp_path / "run"
    assert train_image_folder(data, run_dir, "--iterations", "4", "--validate-every", "2") == 1
    error = capsys.readouterr().err
    assert "miniimagenet-5w1s: the val split cannot make 5-way 1-shot tasks with 15 queries per class" in error
    assert "ways=5 needs at least 5 classes" in error
    assert not run_dir.exists()  # no iteration ran, nothing was written
    # A run that never validates does not need the val split.
    assert train_image_folder(data, run_dir, "--iterations", "2", "--validate-every", "100") == 0
    # The test split is read at the end; it is checked at the start.
    shutil.rmtree(data / "test")
    assert train_image_folder(data, tmp_path / "run2", "--iterations", "2", "--validate-every", "100") == 1
    assert f"{data / 'test'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_a_corrupt_image_is_named_not_blamed_on_the_task_shape(tmp_path, capsys):
    """A corrupt file is the cause, so the error names the file and says the split cannot be
    read; it does not say the split cannot make 5-way tasks."""
    data = write_image_folder(tmp_path / "images")
    (data / "test" / "n02" / "3.png").write_bytes(b"not a png at all")
    assert train_image_folder(data, tmp_path / "run", "--iterations", "3", "--validate-every", "100") == 1
    error = capsys.readouterr().err
    assert "miniimagenet-5w1s: the test split cannot be read" in error
    assert "n02" in error and "3.png" in error
    assert "cannot make" not in error
    assert not (tmp_path / "run").exists()


def test_too_few_images_per_class_in_a_split_is_named(tmp_path, capsys):
    data = write_image_folder(tmp_path / "images")
    for image in sorted((data / "test" / "n03").iterdir())[10:]:
        image.unlink()
    assert train_image_folder(data, tmp_path / "run", "--iterations", "3", "--validate-every", "100") == 1
    error = capsys.readouterr().err
    assert "the test split cannot make" in error and "test/n03 in 'image-folder/test' has only 10" in error
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a run folder")
    assert train_sinusoid(existing, "--iterations", "2") == 1
    assert f"--out {existing} is not a folder" in capsys.readouterr().err
    assert train_sinusoid(existing / "run", "--iterations", "2") == 1
    assert f"({existing}, above it, is a file)" in capsys.readouterr().err
    assert existing.read_text() == "not a run folder"
    with pytest.raises(ValueError, match=f"out {existing} is not a folder"):
        training.train(training.PRESETS["sinusoid"], existing, progress=False)


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-data"
    assert cli.main(["train", "omniglot-5w1s", "--data", str(missing), "--out", str(tmp_path / "a"), *QUIET]) == 1
    assert not (tmp_path / "a").exists()
    # A failure in the first iteration: nothing was logged or saved, so nothing is left.
    import fastmeta

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the first iteration")

    monkeypatch.setattr(fastmeta.MAML, "meta_batch", broken)
    with pytest.raises(RuntimeError, match="a bug in the first iteration"):
        train_sinusoid(tmp_path / "b", "--iterations", "3", "--eager")  # eager: the iteration is meta_batch
    assert not (tmp_path / "b").exists()
    # A folder the user made is never removed.
    (tmp_path / "c").mkdir()
    with pytest.raises(RuntimeError):
        train_sinusoid(tmp_path / "c", "--iterations", "3", "--eager")
    assert (tmp_path / "c").is_dir()


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_writes_a_checkpoint_and_exits_with_128_plus_the_signal(tmp_path, signal_number, exit_code):
    run_dir = tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "fastmeta", "train", "sinusoid", "--iterations", "1000000", "--out", str(run_dir),
         "--checkpoint-every", "100000", "--log-every", "1", *QUIET],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / METRICS_NAME).exists() or not train_losses(run_dir):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no iteration after 120 s"
            time.sleep(0.05)
        process.send_signal(signal_number)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == exit_code, err
    assert f"{signal.Signals(signal_number).name}: stopping after this iteration" in err
    stopped_at = checkpoint.load(run_dir / CHECKPOINT_NAME)["iteration"]
    assert stopped_at >= 1 and f"stopped at iteration {stopped_at}" in out
