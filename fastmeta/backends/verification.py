"""The record of which backend kernels passed their tests on which kind of device.

``verified.json`` beside this file is that record, kept in the repository. Its shape::

    {"<backend>": {"<device type>": {"<kernel>": {"date": ..., "device": ..., "torch": ...}}}}

``auto`` (see :mod:`fastmeta.backends`) only picks a kernel recorded here for the device
type it would run on. :func:`record` is its one writer: the GPU test tier calls it with
``python -m fastmeta.backends.verification record BACKEND DEVICE_TYPE KERNEL...`` after it
passes, and the GPU check (bench/gpu_check.py) calls it for each family it verifies. The file is committed with the results in
bench/RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

RECORD_PATH = Path(__file__).with_name("verified.json")
# A run of the GPU check (bench/gpu_check.py) points this at its own working copy, so that
# what it verifies is used by the runs that follow it and never edits the repository's file.
RECORD_PATH_VARIABLE = "FASTMETA_VERIFIED_RECORD"


def record_path() -> Path:
    """The record in use: ``$FASTMETA_VERIFIED_RECORD`` if set, else verified.json here."""
    override = os.environ.get(RECORD_PATH_VARIABLE)
    return Path(override) if override else RECORD_PATH


@lru_cache(maxsize=1)
def _record() -> dict:
    try:
        return json.loads(record_path().read_text())
    except FileNotFoundError:
        return {}


_listeners: list = []


def on_reload(callback) -> None:
    """Call ``callback()`` whenever the record is written or reloaded (the backend registry
    drops its cached kernel choices)."""
    _listeners.append(callback)


def reload() -> None:
    """Read the record again on next use (``FASTMETA_VERIFIED_RECORD`` read again too)."""
    _record.cache_clear()
    for callback in _listeners:
        callback()


def is_verified(backend: str, kernel: str, device_type: str) -> bool:
    return kernel in _record().get(backend, {}).get(device_type, {})


def verified_ops(backend: str) -> dict[str, list[str]]:
    """Device type -> sorted kernel names verified there, for ``backend``."""
    return {dev: sorted(ops) for dev, ops in _record().get(backend, {}).items()}


def record(backend: str, device_type: str, kernels: list[str], device_name: str, *,
           torch_version: str | None = None, date: str | None = None, path: Path | None = None) -> None:
    """Add kernels to the record, atomically (write a temporary file, then rename).

    The one writer of the record: the command line below and the GPU check
    (bench/gpu_check.py) both call it. ``torch_version`` and ``date`` default to this
    process's torch and today; the GPU check passes the ones of the run that verified the
    kernels (its children's torch) and, when it resumes, those of the earlier run. ``path``
    defaults to :func:`record_path`.
    """
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    path = record_path() if path is None else Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {
        "date": date or datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch_version,
    }
    for kernel in kernels:
        data.setdefault(backend, {}).setdefault(device_type, {})[kernel] = dict(entry)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    reload()


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "record":
        sys.exit("usage: python -m fastmeta.backends.verification record BACKEND DEVICE_TYPE KERNEL...")
    import torch

    dev_type = sys.argv[3]
    name = torch.cuda.get_device_name() if dev_type == "cuda" else "cpu"
    record(sys.argv[2], dev_type, sys.argv[4:], name)
