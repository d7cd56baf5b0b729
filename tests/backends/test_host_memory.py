"""FASTMETA_HOST_MALLOC (fastmeta/backends/host_memory.py): at import, glibc's malloc is set
to keep freed memory, so a [T, P]-sized buffer freed at the end of one iteration serves the
next without a page fault per 4 KiB. Page faults are counted by the kernel (getrusage), so
the counts below are deterministic; each case runs in a fresh interpreter, since the
setting is process-wide and applied once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GLIBC_LINUX = sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

# Allocate, touch and free a 64 MiB tensor (16 384 pages; above glibc's largest mmap
# threshold, 32 MiB) a few times after warm-up rounds, and report the minor faults. The
# warm-up lets the heap settle: torch's 64-byte-aligned requests do not always fit the
# chunk the previous one freed, and the heap grows for the first few (as an iteration's
# buffers settle in the first iterations of a training loop).
PROBE = r"""
import json, resource, torch
import fastmeta
from fastmeta.backends import host_memory
def touch():
    buffer = torch.empty(16 * 2**20)  # 64 MiB of float32
    buffer.fill_(1.0)
    del buffer
for _ in range(4):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"faults_per_buffer": faults, **host_memory.setting()}))
"""


def run_probe(setting: str | None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "FASTMETA_HOST_MALLOC"}
    if setting is not None:
        environment["FASTMETA_HOST_MALLOC"] = setting
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.skipif(not GLIBC_LINUX, reason="the setting applies to glibc on Linux only")
def test_freed_buffers_are_reused_without_page_faults():
    finished = run_probe(None)
    assert finished.returncode == 0, finished.stderr[-2000:]
    state = json.loads(finished.stdout.strip().splitlines()[-1])
    assert state["setting"] == "retain" and state["applied"], state
    assert state["faults_per_buffer"] < 200, state  # 16 384 pages: none faulted again


@pytest.mark.skipif(not GLIBC_LINUX, reason="the setting applies to glibc on Linux only")
def test_system_leaves_glibc_alone_and_every_buffer_faults():
    """The control: with glibc's defaults the same buffer is mapped and faulted afresh each
    time (which is what the default setting removes)."""
    finished = run_probe("system")
    assert finished.returncode == 0, finished.stderr[-2000:]
    state = json.loads(finished.stdout.strip().splitlines()[-1])
    assert state["setting"] == "system" and not state["applied"], state
    assert state["faults_per_buffer"] > 8000, state


def test_an_unknown_setting_is_refused_by_name():
    finished = run_probe("sometimes")
    assert finished.returncode != 0
    assert "FASTMETA_HOST_MALLOC='sometimes': expected one of retain, system" in finished.stderr
