"""Issue 26, defect 9: one line, not a traceback, for an unwritable --out (at the start or
at a checkpoint) and for --backend cuda without a GPU."""

from __future__ import annotations

import pytest
import torch

from fastmeta import checkpoint
from fastmeta.tools import cli

QUIET = ["--no-progress", "--threads", "1"]


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_backend_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code = cli.main(["train", "sinusoid", "--iterations", "1", "--out", str(tmp_path / "r"), "--backend", "cuda", *QUIET])
    assert code == 1
    assert "--backend cuda" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_an_unwritable_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def refuse(path, chunks):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", refuse)
    out = tmp_path / "r"
    code = cli.main(["train", "sinusoid", "--iterations", "2", "--out", str(out), "--test-tasks", "5", *QUIET])
    assert code == 1
    line = one_error_line(capsys)
    assert "Permission denied" in line and str(out) in line


def test_an_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["train", "sinusoid", "--iterations", "1", "--out", str(tmp_path / "file" / "r"), *QUIET]) == 1
    assert "--out" in one_error_line(capsys)
