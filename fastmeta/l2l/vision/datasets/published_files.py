"""Reading the published files of the few-shot benchmarks, safely.

Some are pickles (miniImageNet's ``mini-imagenet-cache-*.pkl``, FC100's
``FC100_*.pickle``). Unpickling runs whatever the file names, so these load through
:class:`RestrictedUnpickler`, which admits only what those files hold: numpy arrays
(``_reconstruct``, ``ndarray``, ``dtype``, numpy scalars), dicts, lists, numbers and
strings. A file that names anything else is refused.
"""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

# Pickles of the published benchmarks are under 3 GiB (miniImageNet's train split: 0.8 GiB).
MAX_PICKLE_BYTES = 4 << 30

# (module, name) a published pickle may name: numpy's array and scalar reconstruction, and
# the builtins some dict/list/number/string pickles spell by name. Protocol-2 pickles written
# by Python 3 store an array's bytes as ``_codecs.encode(text, "latin1")``, which only turns
# a string into bytes; protocol 5 writes arrays through numpy's ``_frombuffer``.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "complex"),
    ("__builtin__", "bytearray"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names something other than arrays, dicts, lists, numbers and strings."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, *, where: str, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.where}: refused to load: the pickle names {module}.{name}, and only numpy arrays, "
                "dicts, lists, numbers and strings are admitted"
            )
        return super().find_class(module, name)


def check_regular_file(path: Path, max_bytes: int, what: str) -> int:
    """The size of ``path``, after checking that it is a regular file of at most
    ``max_bytes``; raises FileNotFoundError or ValueError with a one-line message."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what}: {path} is not a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"{what}: {path} holds {info.st_size} bytes, more than the {max_bytes} allowed")
    if info.st_size == 0:
        raise ValueError(f"{what}: {path} is empty")
    return info.st_size


def load_pickle(path: str | os.PathLike, *, encoding: str = "ASCII", max_bytes: int = MAX_PICKLE_BYTES,
                what: str = "pickle"):
    """The object in the pickle at ``path``, through :class:`RestrictedUnpickler`.
    encoding: how Python 2 strings decode (``"latin1"`` for FC100's files)."""
    path = Path(path)
    check_regular_file(path, max_bytes, what)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, where=str(path), encoding=encoding).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # a truncated or corrupt file
            raise ValueError(f"{what}: {path} could not be read as a pickle ({type(error).__name__}: {error})") from None
