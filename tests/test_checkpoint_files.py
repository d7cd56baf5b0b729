"""Issue 26, defect 7: a checkpoint's file type, size and first bytes are checked before its
body is read. A FIFO, a device, a large junk file and a refused pickle each give one
fastmeta line naming the file, without hanging or reading the whole file."""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys

import pytest
import torch

from fastmeta import checkpoint
from fastmeta.checkpoint import CheckpointError


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(fifo)  # before the fix this blocked forever in open()
    assert str(fifo) in one_line(caught.value) and "FIFO" in str(caught.value)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_is_refused_as_a_device():
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load("/dev/zero")  # before the fix: MemoryError after reading without end
    assert "/dev/zero" in one_line(caught.value) and "character device" in str(caught.value)


def test_a_large_junk_file_is_refused_from_its_first_bytes(tmp_path):
    # A 1 GiB sparse file: refusing it must not read it (peak RSS stays far below its size).
    junk = tmp_path / "junk.pt"
    with open(junk, "wb") as handle:
        handle.truncate(1 << 30)
    code = (
        "import resource, sys\n"
        "from fastmeta import checkpoint\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "try:\n    checkpoint.load(sys.argv[1])\n"
        "except checkpoint.CheckpointError as e:\n    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(junk)], capture_output=True, text=True, timeout=600)
    before_kib, message, peak_kib = done.stdout.strip().splitlines()
    assert "is not a fastmeta checkpoint" in message and str(junk) in message
    # The import's own peak varies with the environment; the load adds far less than 1 GiB.
    assert int(peak_kib) - int(before_kib) < 256 * 1024


def test_a_zip_start_without_an_end_record_is_refused_before_reading_the_body(tmp_path):
    path = tmp_path / "cut.pt"
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04")
        handle.truncate(1 << 28)
    with pytest.raises(CheckpointError, match="truncated") as caught:
        checkpoint.load(path)
    assert str(path) in one_line(caught.value)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_refused_pickle_gets_one_fastmeta_line_without_torchs_advice(tmp_path):
    state = {"evil": Payload()}
    path = tmp_path / "evil.pt"
    torch.save({"fastmeta_checkpoint": checkpoint.FORMAT, "sha256": checkpoint.state_digest(state), "state": state},
               path, pickle_module=pickle)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path)
    text = one_line(caught.value)
    assert str(path) in text and "system" in text
    assert "weights_only=False" not in text


@pytest.mark.parametrize("content", [b"", b"P", b"PK\x03", b"\x00" * 100, b"FMCKPT", b"PK\x05\x06" + b"\x00" * 18])
def test_short_and_junk_files_give_one_line(tmp_path, content):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path)
    assert str(path) in one_line(caught.value)
    assert path.read_bytes() == content  # never modified


def test_a_symlink_to_a_checkpoint_loads_and_a_dangling_one_is_refused(tmp_path):
    real = tmp_path / "real.pt"
    checkpoint.save({"x": torch.arange(3)}, real)
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    assert torch.equal(checkpoint.load(link)["x"], torch.arange(3))
    dangling = tmp_path / "gone.pt"
    dangling.symlink_to(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(dangling)
