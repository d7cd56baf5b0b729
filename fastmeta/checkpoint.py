"""Checkpoints that are written atomically, verified before they are read, and never unpickled.

File layout (all integers little-endian):

    bytes 0-7     magic b"FMCKPT\\x00\\x01" (format version 1)
    bytes 8-15    payload length in bytes, uint64
    bytes 16-47   sha256 of the payload
    bytes 48-     payload: the bytes of ``torch.save(state)``

- **Atomic.** ``save`` writes a temporary file in the destination's directory, flushes and
  fsyncs it, then ``os.replace``-s it over the destination, so a reader (or a run killed
  with SIGKILL mid-write) sees either the old file or the new one, never half of one.
- **Verified.** ``load`` checks the magic, the length and the sha256 before it hands the
  payload to torch. A truncated file, one with bytes flipped or appended, or a file that
  is not a checkpoint gives a ``CheckpointError`` that names the path. The sha256 detects
  damage, not a forger (who can recompute it); safety against a malicious file comes from
  the next point.
- **Never unpickled.** The payload is read with ``torch.load(weights_only=True)``, which
  only rebuilds tensors, dicts, lists, tuples, strings, numbers, bools and None. ``save``
  checks the state holds nothing else, so a bad state fails when it is saved, not when a
  resume is attempted hours later.
- **RNG states as tensors.** ``rng_state()`` captures torch (CPU and, when initialised,
  CUDA), numpy and Python ``random`` generators as tensors, so they pass ``weights_only``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "MAGIC",
    "save",
    "load",
    "atomic_write_bytes",
    "stale_temporaries",
    "rng_state",
    "set_rng_state",
]

MAGIC = b"FMCKPT\x00\x01"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload length, sha256


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, corrupt, tampered or unsafe."""


def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write ``chunks`` (an iterable of bytes-like objects) to ``path`` atomically.

    The temporary file lives in the same directory, because ``os.replace`` is only atomic
    within one filesystem. The data is fsync-ed before the rename, and the directory after
    it, so after a power loss the path holds the old or the new content, not an empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            # mkstemp creates the file 0600; give it the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some filesystems and platforms do not open directories
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files ``atomic_write_bytes`` left next to ``path`` when a writer was killed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


_LOADABLE_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_loadable(value, where: str) -> None:
    """Raise CheckpointError naming the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"{where} is a {type(value).__name__}; store a plain tensor")
        return
    if isinstance(value, _LOADABLE_SCALARS):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_loadable(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_loadable(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store tensors, dicts, lists, tuples, str, numbers or None"
    )


def save(state: dict, path: str | os.PathLike) -> None:
    """Save ``state`` (tensors, dicts, lists, tuples, str, numbers, None) to ``path`` atomically."""
    _check_loadable(state, "state")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest())
    atomic_write_bytes(path, (header, payload))


def load(path: str | os.PathLike, map_location=None) -> dict:
    """Load a checkpoint written by ``save``, after checking its length and sha256.

    Raises CheckpointError, naming the path, if the file is missing, is not a fastmeta
    checkpoint, is truncated or has extra bytes, fails its sha256, or holds objects that
    ``weights_only`` loading refuses.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if len(data) < _HEADER.size:
        if MAGIC.startswith(data[: len(MAGIC)]) and data:
            raise CheckpointError(f"checkpoint {path} is truncated: {len(data)} bytes, shorter than its header")
        raise CheckpointError(f"{path} is not a fastmeta checkpoint (it is only {len(data)} bytes)")
    magic, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        if magic[:6] == MAGIC[:6]:
            raise CheckpointError(f"checkpoint {path} has format version {magic[6:]!r}; this fastmeta reads {MAGIC[6:]!r}")
        raise CheckpointError(f"{path} is not a fastmeta checkpoint (bad magic bytes {magic!r})")
    payload = memoryview(data)[_HEADER.size :]
    if len(payload) < length:
        raise CheckpointError(
            f"checkpoint {path} is truncated: its header announces {length} payload bytes, the file holds {len(payload)}"
        )
    if len(payload) > length:
        raise CheckpointError(
            f"checkpoint {path} has {len(payload) - length} unexpected bytes after its payload (corrupt or tampered)"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} failed its sha256 check: the file is corrupt or was modified")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # an UnpicklingError for refused globals, or a torch format error
        raise CheckpointError(f"checkpoint {path} could not be loaded with weights_only=True: {error}") from error


def rng_state() -> dict:
    """Every global random generator's state, as tensors (see ``set_rng_state``)."""
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_cached_gauss = np.random.get_state()
    if numpy_kind != "MT19937":  # the only kind np.random.get_state returns; guard a future change
        raise CheckpointError(f"cannot store numpy's {numpy_kind} generator state")
    python_version, python_words, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "position": torch.tensor(numpy_position, dtype=torch.int64),
            "has_gauss": torch.tensor(numpy_has_gauss, dtype=torch.int64),
            "cached_gauss": torch.tensor(numpy_cached_gauss, dtype=torch.float64),
        },
        "python": {
            "version": torch.tensor(python_version, dtype=torch.int64),
            # Mersenne Twister words are below 2**32, so int64 holds them exactly.
            "words": torch.tensor(python_words, dtype=torch.int64),
            "has_gauss": torch.tensor(python_gauss is not None),
            "gauss": torch.tensor(0.0 if python_gauss is None else python_gauss, dtype=torch.float64),
        },
    }
    # Only when CUDA is already in use: querying it otherwise would initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [generator_state.cpu() for generator_state in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators captured by ``rng_state``."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["position"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gauss"]),
        )
    )
    python_state = state["python"]
    random.setstate(
        (
            int(python_state["version"]),
            tuple(int(word) for word in python_state["words"].tolist()),
            float(python_state["gauss"]) if bool(python_state["has_gauss"]) else None,
        )
    )
    if "torch_cuda" in state and torch.cuda.is_available():
        saved = state["torch_cuda"]
        for device in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[device].cpu(), device)
