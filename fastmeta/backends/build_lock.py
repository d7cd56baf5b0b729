"""One build per cache folder, however many processes ask for it at once.

Two processes that started on an empty extension cache both compiled it (issue 26: a
``fastmeta build`` and a ``meta_batch`` call 2 s apart took 71 s and 67 s, each printing
"building the C++ extension"). :func:`build_once` serialises them:

- an exclusive ``fcntl.flock`` on ``<build folder>/fastmeta-build.lock`` is held while a
  process checks, builds and loads; the others block on it, then find the build complete
  and only load it. The kernel drops the lock when its holder dies (``kill -9`` too), so
  a lock is never stale;
- a build counts as complete only once the marker ``fastmeta-build.complete`` is written
  (through a temporary file and a rename) after the library was built and loaded. A
  library without the marker (a build killed while linking) is deleted and built again,
  so no process loads a half-written build.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (the marker still guards loading)
    fcntl = None

LOCK_NAME = "fastmeta-build.lock"
COMPLETE_NAME = "fastmeta-build.complete"


@contextlib.contextmanager
def exclusive(build_dir: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the build folder's lock; call ``on_wait`` once if another process holds it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    descriptor = os.open(build_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def is_complete(build_dir: Path, library: Path) -> bool:
    return library.is_file() and (build_dir / COMPLETE_NAME).is_file()


def build_once(build_dir: Path, library: Path, build_and_load: Callable[[bool], None],
               on_wait: Callable[[], None] | None = None) -> bool:
    """Under the folder's lock: ``build_and_load(first_build)`` (it compiles what is missing
    and loads the library), then mark the build complete. Returns whether this process
    found the build incomplete (and so built it)."""
    with exclusive(build_dir, on_wait):
        first_build = not is_complete(build_dir, library)
        if first_build:
            with contextlib.suppress(FileNotFoundError):
                library.unlink()  # a library without the marker may be half-written
        build_and_load(first_build)
        if first_build:
            temporary = build_dir / f".{COMPLETE_NAME}.{os.getpid()}.tmp"
            temporary.write_text(library.name + "\n")
            os.replace(temporary, build_dir / COMPLETE_NAME)
        return first_build
