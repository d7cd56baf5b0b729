"""Checkpoints that are plain torch files, written atomically and verified before they are used.

A checkpoint is what ``torch.save`` writes, of a dict with three entries::

    {"fastmeta_checkpoint": 2,            # the format version
     "sha256": "<64 hex digits>",         # state_digest(state)
     "state": state}                      # what the caller saved

so ``torch.load(path, weights_only=True)["state"]`` reads it anywhere, without fastmeta.

- **Atomic.** ``save`` writes a temporary file in the destination's directory, flushes and
  fsyncs it, then ``os.replace``-s it over the destination, so a reader (or a run killed
  with SIGKILL mid-write) sees either the old file or the new one, never half of one.
- **Verified.** ``load`` checks that the file ends where its zip archive ends (nothing cut
  off, nothing appended), loads it, and recomputes the digest of the state: every tensor's
  dtype, shape and bytes, every key, string and number, in order (:func:`state_digest`).
  torch does not check its archive's CRCs when loading, so a flipped bit in a tensor
  would otherwise load silently. A truncated or altered file, or one that is not a
  checkpoint, gives a ``CheckpointError`` that names the path. The digest detects damage,
  not a forger (who can recompute it); safety against a malicious file comes from the
  next point.
- **Never unpickled.** The file is read with ``torch.load(weights_only=True)``, which only
  rebuilds tensors, dicts, lists, tuples, strings, numbers, bools and None. ``save``
  checks the state holds nothing else, so a bad state fails when it is saved, not when a
  resume is attempted hours later.
- **Format 1**, a 48-byte ``FMCKPT`` header (magic, length, sha256) before the torch
  payload, written by fastmeta before this format, is still read, with the same checks.
- **RNG states as tensors.** ``rng_state()`` captures torch (CPU and, when initialised,
  CUDA), numpy and Python ``random`` generators as tensors, so they pass ``weights_only``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FORMAT",
    "save",
    "load",
    "state_digest",
    "atomic_write_bytes",
    "stale_temporaries",
    "rng_state",
    "set_rng_state",
]

FORMAT = 2
_ZIP_START = b"PK\x03\x04"  # a local file header: how every torch.save file begins
_ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record: 22 bytes + a comment
_ZIP_END_SIZE = 22
# Format 1: magic, payload length, sha256 of the payload, then the torch.save payload.
FORMAT_1_MAGIC = b"FMCKPT\x00\x01"
_FORMAT_1_HEADER = struct.Struct("<8sQ32s")


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


def state_digest(state) -> str:
    """The sha256 (hex) of a state's content: structure, keys, scalars, tensors' dtypes, shapes and bytes.

    The same before ``torch.save`` and after ``torch.load``, on any device: tensors are
    read as contiguous CPU bytes, so strides, storage sharing and ``map_location`` do not
    change it.
    """
    digest = hashlib.sha256()
    _add_to_digest(digest, state)
    return digest.hexdigest()


def _add_to_digest(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.resolve_conj().resolve_neg().cpu()
        # A fresh tensor: ``contiguous()`` keeps a size-1 dim's stride, which may be 0.
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
        digest.update(f"tensor {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key, item in value.items():
            _add_to_digest(digest, key)
            _add_to_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _add_to_digest(digest, item)
    else:  # the scalars _check_loadable lets through; repr round-trips each of them
        digest.update(f"{type(value).__name__} {value!r}\n".encode())


def save(state: dict, path: str | os.PathLike) -> None:
    """Save ``state`` (tensors, dicts, lists, tuples, str, numbers, None) to ``path`` atomically."""
    _check_loadable(state, "state")
    buffer = io.BytesIO()
    torch.save({"fastmeta_checkpoint": FORMAT, "sha256": state_digest(state), "state": state}, buffer)
    atomic_write_bytes(path, (buffer.getbuffer(),))


def load(path: str | os.PathLike, map_location=None) -> dict:
    """Load a checkpoint written by ``save``, after checking that it is whole and unaltered.

    Raises CheckpointError, naming the path, if the file is missing, is not a fastmeta
    checkpoint, is truncated or has extra bytes, fails its sha256, or holds objects that
    ``weights_only`` loading refuses.
    """
    path = Path(path)
    data = _read_checkpoint_file(path)
    if data.startswith(FORMAT_1_MAGIC[:6]):
        return _load_format_1(path, data, map_location)
    _check_archive_end(path, data)
    wrapper = _torch_load(path, data, map_location)
    if not isinstance(wrapper, dict) or "fastmeta_checkpoint" not in wrapper:
        raise CheckpointError(f"{path} is a torch file but not a fastmeta checkpoint (no 'fastmeta_checkpoint' entry)")
    if wrapper["fastmeta_checkpoint"] != FORMAT or set(wrapper) != {"fastmeta_checkpoint", "sha256", "state"}:
        raise CheckpointError(
            f"checkpoint {path} has format {wrapper['fastmeta_checkpoint']!r} with entries {sorted(wrapper)}; "
            f"this fastmeta reads format {FORMAT} (and 1)"
        )
    if state_digest(wrapper["state"]) != wrapper["sha256"]:
        raise CheckpointError(f"checkpoint {path} failed its sha256 check: the file is corrupt or was modified")
    return wrapper["state"]


def _read_checkpoint_file(path: Path) -> bytes:
    """The file's bytes, read only after its type, size and first bytes say it can be a
    checkpoint: a FIFO, a device (/dev/zero) or a large junk file is refused before any
    read of its body (reading them whole would hang or exhaust memory)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error.strerror or error}") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
        raise CheckpointError(f"checkpoint {path} is not a regular file ({_file_kind(info.st_mode)})")
    with os.fdopen(descriptor, "rb") as handle:
        size = info.st_size
        try:
            head = handle.read(len(FORMAT_1_MAGIC))
            if head.startswith(FORMAT_1_MAGIC[:6]):
                return head + handle.read()  # format 1: its header states and checks the length
            if not head.startswith(_ZIP_START):
                if head and _ZIP_START.startswith(head) and size < len(_ZIP_START):
                    raise CheckpointError(f"checkpoint {path} is truncated: {size} bytes")
                raise CheckpointError(f"{path} is not a fastmeta checkpoint (it does not start like a torch file)")
            # The zip end record closes a whole file: check it before reading the body.
            tail_start = max(0, size - (1 << 16) - _ZIP_END_SIZE)
            handle.seek(tail_start)
            tail = handle.read()
            _check_archive_end(path, tail, size - tail_start)
            handle.seek(0)
            return handle.read()
        except OSError as error:
            raise CheckpointError(f"checkpoint {path} cannot be read: {error.strerror or error}") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def _check_archive_end(path: Path, data: bytes, size: int | None = None) -> None:
    """A torch file is a zip archive whose end record, with no comment, closes the file."""
    end = data.rfind(_ZIP_END, max(0, len(data) - (1 << 16) - _ZIP_END_SIZE))
    if end < 0 or end + _ZIP_END_SIZE > len(data):
        raise CheckpointError(
            f"checkpoint {path} is truncated: its zip archive has no end record ({size or len(data)} bytes)")
    comment = int.from_bytes(data[end + 20 : end + 22], "little")
    extra = len(data) - (end + _ZIP_END_SIZE + comment)
    if extra > 0:
        raise CheckpointError(f"checkpoint {path} has {extra} unexpected bytes after its archive (corrupt or tampered)")
    if extra < 0:
        raise CheckpointError(f"checkpoint {path} is truncated: its archive's end record is cut short")


def _torch_load(path: Path, data, map_location):
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # an UnpicklingError for refused globals, or a torch format error
        # torch's message is many lines of advice to pass weights_only=False (which would
        # run the pickle); keep the one line that names what was refused.
        text = str(error)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Weights only load failed" in text or "Unsupported global" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            reasons = [ln for ln in lines if "weights_only" not in ln.lower() and "weights only" not in ln.lower()
                       and "documentation" not in ln]
            what = found.group(1) if found else (reasons[0][:120] if reasons else "an unsupported object")
            raise CheckpointError(
                f"checkpoint {path} holds an object that weights_only loading refuses ({what}); fastmeta never "
                "unpickles one: the file is not a fastmeta checkpoint, or it was tampered with") from None
        first = lines[0] if lines else type(error).__name__
        raise CheckpointError(f"checkpoint {path} could not be loaded with weights_only=True: {first[:200]}") from None


def _load_format_1(path: Path, data: bytes, map_location) -> dict:
    """A checkpoint of format 1: the FMCKPT header, then the payload it describes."""
    if len(data) < _FORMAT_1_HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(data)} bytes, shorter than its header")
    magic, length, digest = _FORMAT_1_HEADER.unpack_from(data)
    if magic != FORMAT_1_MAGIC:
        raise CheckpointError(f"checkpoint {path} has format version {magic[6:]!r}; this fastmeta reads {FORMAT} and 1")
    payload = memoryview(data)[_FORMAT_1_HEADER.size :]
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
    return _torch_load(path, payload, map_location)


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
