"""One run per run folder: a lock held from the run's start to its end.

Two ``fastmeta train ... --out s`` at once used to both exit 0, their lines interleaved in
``metrics.jsonl`` and the last writer's checkpoint kept (issue 26). Now:

- a run holds an exclusive ``fcntl.flock`` on ``<out>/.fastmeta-run.lock``, which holds its
  pid; a second run refuses at its start with one line naming the folder and that pid;
- the lock belongs to the kernel's open file: when its process is gone (``kill -9``
  included) the lock is free, and the next run takes the file over;
- one run, one lock: ``train --nproc N`` takes it in the launcher and passes it to its
  ranks through the environment (``FASTMETA_RUN_LOCK``, the folder's absolute path);
  under a plain torchrun, the global rank 0 takes it and the other ranks share it;
- the file is removed when the run ends, and the folder too if the run created it and
  left nothing in it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCK_NAME = ".fastmeta-run.lock"
ENVIRONMENT = "FASTMETA_RUN_LOCK"


class RunFolderInUse(ValueError):
    """Another live run holds the run folder."""


def _held_by_launcher(out: Path) -> bool:
    """Whether this process is a rank of a run whose launcher (or rank 0) holds the lock."""
    if os.environ.get(ENVIRONMENT) == str(out.resolve()):
        return True
    launched = "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)
    return launched and os.environ.get("RANK", "0") != "0"


@contextlib.contextmanager
def hold(out: Path, argument: str = "--out", cleanup: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold ``out``'s run lock for the body (see the module docstring); RunFolderInUse,
    naming ``argument``, the folder and the holder's pid, if another run holds it.
    cleanup(out) runs after the lock file is gone, when this call created the folder (to
    remove what a run that failed early left empty)."""
    out = Path(out)
    if fcntl is None or _held_by_launcher(out):
        yield
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{argument} {out} cannot be created: {error.strerror or error}") from None
    path = out / LOCK_NAME
    descriptor = _acquire(path, out, argument)
    previous = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = str(out.resolve())  # the ranks a launcher starts share it
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENVIRONMENT, None)
        else:
            os.environ[ENVIRONMENT] = previous
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiter re-checks the inode (see _acquire)
        os.close(descriptor)
        if created:
            if cleanup is not None:
                cleanup(out)
            with contextlib.suppress(OSError):
                out.rmdir()  # only if the run left nothing in it


def _acquire(path: Path, out: Path, argument: str) -> int:
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise ValueError(f"{argument} {out} is not writable: {error.strerror or error}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise RunFolderInUse(
                f"{argument} {out} is in use by another fastmeta run (pid {holder}); wait for it to end, or choose "
                "another folder") from None
        # The file may have been unlinked by the run that just ended: lock the one at the path.
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            return descriptor
        os.close(descriptor)
