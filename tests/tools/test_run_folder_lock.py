"""Issue 26, defect 5: one run per run folder. A second run refuses at its start with one
line naming the folder and the other run's pid; a lock whose process is gone is taken
over; the ranks of one run share its lock; the lock file goes when the run ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fastmeta.tools import cli, run_lock
from fastmeta.tools.run_lock import LOCK_NAME, RunFolderInUse

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fastmeta.tools import run_lock
    with run_lock.hold(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield out, process
    process.kill()
    process.wait(timeout=60)


@pytest.fixture(autouse=True)
def not_a_rank(monkeypatch):
    for name in (run_lock.ENVIRONMENT, "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def test_a_second_run_refuses_naming_the_folder_and_the_pid(holder, capsys):
    out, process = holder
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RunFolderInUse) as caught:
        with run_lock.hold(out):
            pytest.fail("the body must not run")
    text = str(caught.value)
    assert "\n" not in text and str(out) in text and f"pid {process.pid}" in text
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_cli_refuses_a_second_train_on_the_same_out(holder, capsys):
    out, process = holder
    code = cli.main(["train", "sinusoid", "--iterations", "2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and str(out) in err and f"pid {process.pid}" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()


def test_a_stale_lock_is_taken_over(holder):
    out, process = holder
    process.kill()
    process.wait(timeout=60)
    assert (out / LOCK_NAME).exists()  # left by the killed run
    with run_lock.hold(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (out / LOCK_NAME).exists()


def test_ranks_share_their_launchers_lock(holder, monkeypatch):
    out, _ = holder
    monkeypatch.setenv(run_lock.ENVIRONMENT, str(out.resolve()))
    with run_lock.hold(out):  # a rank under --nproc: the launcher holds it
        pass
    monkeypatch.delenv(run_lock.ENVIRONMENT)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with run_lock.hold(out):  # a rank other than 0 under a plain torchrun
        pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunFolderInUse):
        with run_lock.hold(out):
            pass


def test_a_run_that_creates_its_folder_and_writes_nothing_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with run_lock.hold(out, cleanup=lambda folder: None):
            assert (out / LOCK_NAME).exists()
            raise RuntimeError("failed at start")
    assert not out.exists()


def test_an_existing_folder_keeps_its_files(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with run_lock.hold(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_an_unwritable_out_is_one_line_naming_it(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=f"--out {tmp_path / 'run'}"):
            with run_lock.hold(tmp_path / "run"):
                pass
    finally:
        tmp_path.chmod(0o700)
