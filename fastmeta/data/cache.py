"""An on-disk cache of preprocessed datasets, so 32 000 PNGs are decoded once, not every run.

Entries are fastmeta checkpoints (``fastmeta.checkpoint``): written atomically, checked
with sha256 when read, loaded with ``weights_only=True``. A damaged entry is rebuilt, not
trusted. The key is derived from the source files' names, sizes and modification times
plus the preprocessing settings, so replacing an archive or changing the image size
builds a new entry instead of reading a stale one.

The directory is ``$FASTMETA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastmeta``, else
``~/.cache/fastmeta``. It is not kept next to the data because datasets often live on
read-only or shared storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from .. import checkpoint

__all__ = ["default_cache_dir", "cached"]


def default_cache_dir() -> Path:
    explicit = os.environ.get("FASTMETA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastmeta"


def cached(kind: str, key: object, build: Callable[[], dict], cache_dir: str | os.PathLike | None | bool = None) -> dict:
    """Return ``build()``'s dict of tensors and strings, from the cache when an entry for ``key`` exists.

    ``key`` is any JSON-serialisable description of the inputs. ``cache_dir=False``
    disables the cache; ``None`` uses ``default_cache_dir()``.
    """
    if cache_dir is False:
        return build()
    directory = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir).expanduser()
    digest = hashlib.sha256(json.dumps([kind, key], sort_keys=True).encode()).hexdigest()[:20]
    path = directory / f"{kind}-{digest}.pt"
    if path.exists():
        try:
            return checkpoint.load(path)
        except checkpoint.CheckpointError as error:
            warnings.warn(f"ignoring a damaged dataset cache entry and rebuilding it: {error}", stacklevel=3)
    entry = build()
    try:
        checkpoint.save(entry, path)
    except OSError as error:  # a read-only home directory must not stop training
        warnings.warn(f"could not write the dataset cache {path}: {error}", stacklevel=3)
    return entry
