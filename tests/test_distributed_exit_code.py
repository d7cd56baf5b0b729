"""Issue 26, defect 11: ``train --nproc N`` exits with its first failed rank's status, so a
SIGTERM'd rank (which checkpoints and exits 143) makes the launch exit 143, not 1."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from fastmeta.distributed import launch_exit_code


def failed(*codes):
    failures = {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent")
                for rank, code in enumerate(codes)}
    return ChildFailedError("fastmeta", failures)


@pytest.mark.parametrize("codes,expected", [((143,), 143), ((143, -15), 143), ((1,), 1), ((-9,), 137),
                                            ((-6, 1), 134)])
def test_the_first_failed_ranks_status_is_the_launchs(codes, expected):
    assert launch_exit_code(failed(*codes)) == expected


def test_an_error_without_failures_is_1():
    assert launch_exit_code(RuntimeError("rendezvous")) == 1
