"""A run's ``metrics.jsonl``: one JSON object per line, ``{"kind": "train" | "val" | "test", ...}``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastmeta import checkpoint


METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as they come."""

    def __init__(self, path: Path, keep_through: int | None):
        self.path = path
        if keep_through is not None and path.exists():
            # Resuming: drop what was logged after the checkpoint (those iterations run
            # again), the test results (recomputed at the end) and a line cut short by a kill.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("iteration", 0) <= keep_through and record.get("kind") != "test":
                    kept.append(line + "\n")
            checkpoint.atomic_write_bytes(path, [line.encode() for line in kept])
        elif keep_through is None:
            path.write_text("")
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fastmeta run folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records



class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
