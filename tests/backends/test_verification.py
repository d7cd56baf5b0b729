"""The verification record has one writer, fastmeta.backends.verification.record: the GPU
check (bench/gpu_check.py) records through it too."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from fastmeta.backends import verification

REPO = Path(__file__).resolve().parents[2]


def test_record_writes_the_given_run_into_the_given_file(tmp_path):
    path = tmp_path / "verified.json"
    verification.record("cuda", "dry-run", ["a", "b"], "Some GPU", torch_version="9.9", date="2026-01-02", path=path)
    verification.record("cuda", "dry-run", ["b"], "Other GPU", torch_version="9.8", date="2026-01-03", path=path)
    assert json.loads(path.read_text()) == {"cuda": {"dry-run": {
        "a": {"date": "2026-01-02", "device": "Some GPU", "torch": "9.9"},
        "b": {"date": "2026-01-03", "device": "Other GPU", "torch": "9.8"},
    }}}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_gpu_check_writes_no_record_entries_itself():
    """It calls verification.record, and never builds a kernel entry of its own."""
    tree = ast.parse((REPO / "bench" / "gpu_check.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "record" and getattr(n.func.value, "id", None) == "verification"]
    assert len(calls) >= 2, "the GPU check no longer records through verification.record"
    entries = [n for n in ast.walk(tree) if isinstance(n, ast.Dict)
               and {"date", "device", "torch"} <= {k.value for k in n.keys if isinstance(k, ast.Constant)}]
    assert not entries, f"the GPU check builds record entries itself (line {entries[0].lineno})" if entries else ""
