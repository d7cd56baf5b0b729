"""Issue 26, defect 12 (minor): a temporary left by a kill during the first checkpoint
write is removed at the next start, and a resume past --iterations says so."""

from __future__ import annotations

from fastmeta.tools import cli
from fastmeta.tools.training.loop import resume_message
from fastmeta.tools.training import CHECKPOINT_NAME

QUIET = ["--no-progress", "--threads", "1"]


def test_a_temporary_from_a_killed_first_checkpoint_is_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".{CHECKPOINT_NAME}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert cli.main(["train", "sinusoid", "--iterations", "1", "--out", str(out), "--test-tasks", "5", *QUIET]) == 0
    assert not stale.exists() and (out / CHECKPOINT_NAME).is_file()


def test_the_resume_line_never_says_3000_of_1000():
    assert resume_message("sinusoid", 300, 1000) == "fastmeta: resuming sinusoid from iteration 300 of 1000"
    line = resume_message("sinusoid", 3000, 1000)
    assert "3000 of 1000" not in line and "already past --iterations 1000" in line
