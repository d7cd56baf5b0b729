"""Issue 26, defect 6: processes that start on an empty extension cache build it once.
One holds the build folder's lock and compiles; the others wait, then load; a library
without the completion marker (a build killed mid-way) is never loaded. These tests run
the locking with a fake compile; the slow test runs two real builds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastmeta.backends import build_lock

FAKE_BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from fastmeta.backends.build_lock import build_once
    build_dir, log = Path(sys.argv[1]), Path(sys.argv[2])
    library = build_dir / "ext.so"

    def build_and_load(first_build):
        if first_build:
            with open(log, "a") as f:
                f.write(f"compile {os.getpid()}\\n")
            library.write_bytes(b"half")
            # Compile until the other process has reached the lock (not a timing guess).
            deadline = time.monotonic() + 300
            while not list(log.parent.glob("waiting-*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            library.write_bytes(b"whole library")
        data = library.read_bytes()
        with open(log, "a") as f:
            f.write(f"load {os.getpid()} {data.decode()}\\n")

    def waiting():
        print("waiting", flush=True)
        (log.parent / f"waiting-{os.getpid()}").touch()

    build_once(build_dir, library, build_and_load, on_wait=waiting)
""")


def start(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FAKE_BUILDER, str(tmp_path / "build"), str(tmp_path / "log")],
                            stdout=subprocess.PIPE, text=True)


def test_two_processes_compile_once_and_both_load_the_whole_library(tmp_path):
    first = start(tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the first holds the lock and compiles
    second = start(tmp_path)
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    lines = (tmp_path / "log").read_text().splitlines()
    assert sum(line.startswith("compile") for line in lines) == 1, lines
    loads = [line for line in lines if line.startswith("load")]
    assert len(loads) == 2 and all(line.endswith("whole library") for line in loads), lines
    assert "waiting" in second.stdout.read()
    assert build_lock.is_complete(tmp_path / "build", tmp_path / "build" / "ext.so")


def test_a_library_without_the_completion_marker_is_rebuilt_not_loaded(tmp_path):
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    library = build_dir / "ext.so"
    library.write_bytes(b"half")  # a build killed while linking
    calls = []

    def build_and_load(first_build):
        assert not library.exists()  # the half-written library is gone before the build
        library.write_bytes(b"whole")
        calls.append(first_build)

    assert build_lock.build_once(build_dir, library, build_and_load) is True
    assert calls == [True] and library.read_bytes() == b"whole"
    assert build_lock.build_once(build_dir, library, lambda first: calls.append(first)) is False
    assert calls == [True, False]


def test_a_failed_build_is_not_marked_complete(tmp_path):
    build_dir = tmp_path / "build"
    library = build_dir / "ext.so"

    def failing(first_build):
        library.write_bytes(b"partial")
        raise RuntimeError("compiler error")

    with pytest.raises(RuntimeError, match="compiler error"):
        build_lock.build_once(build_dir, library, failing)
    assert not build_lock.is_complete(build_dir, library)


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    build_dir = tmp_path / "build"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from fastmeta.backends.build_lock import exclusive
        with exclusive(Path({str(build_dir)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=60)
    waited = []
    with build_lock.exclusive(build_dir, on_wait=lambda: waited.append(True)):
        pass
    assert waited == []


@pytest.mark.slow
def test_two_real_builds_on_an_empty_cache_compile_once(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), FASTMETA_BUILD_CUDA="0")
    code = "from fastmeta.backends import extension; ok, why = extension.build(); assert ok, why"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    out = [p.communicate(timeout=3600)[1] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, out
    assert sum("fastmeta: building the C++ extension" in text for text in out) == 1, out  # not "waiting for ... building"
    assert "waiting for another process" in out[1], out
