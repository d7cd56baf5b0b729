"""bench/tune_tiles.py's parts (its dry run is gpu_check's ``tune`` step, tests/bench/test_gpu_check.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tune_tiles():
    return load_script(REPO / "bench" / "tune_tiles.py", "tune_tiles")


def test_candidates_vary_one_setting_each(tune_tiles):
    base = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4, "num_stages": 3}
    out = tune_tiles.candidates(base, 12)
    assert out[0] == base and len(out) == len({tuple(sorted(c.items())) for c in out})
    assert all(sum(c[k] != base[k] for k in base) == 1 for c in out[1:])
    assert {"SPLIT_K": 1} in [{k: v for k, v in c.items() if v != base[k]} for c in out]
    assert all(16 <= c["BLOCK_M"] <= 128 and 16 <= c["BLOCK_N"] <= 128 and c["num_warps"] <= 8 for c in out)
    assert not any(c["BLOCK_N"] == 8 for c in out)  # a side below 16 is no candidate
    assert tune_tiles.candidates(base, 2) == out[:2]
    # The rule's tiles without split-K come second, whole.
    unsplit = {**base, "BLOCK_M": 16, "SPLIT_K": 1, "num_warps": 1}
    assert tune_tiles.candidates(base, 3, unsplit)[:2] == [base, unsplit]
    assert tune_tiles.candidates(base, 12, dict(base)) == out  # the plan does not split: nothing new


def test_the_unsplit_rule_shrinks_tiles_instead(tune_tiles):
    from fastmeta.kernels.tiles import plan_config

    # W2's last conv with the shared meta-parameters: split 4 with 16 x 32 tiles; unsplit,
    # 16 x 16 tiles (the most busy programs without a split).
    split = plan_config("conv_forward", 1, ((640, 576),), 64)
    unsplit = tune_tiles.unsplit_config(1, 640, 64, 576, kernel="conv_forward", sm_count=132)
    assert (split["BLOCK_M"], split["BLOCK_N"], split["SPLIT_K"]) == (16, 32, 4)
    assert (unsplit["BLOCK_M"], unsplit["BLOCK_N"], unsplit["SPLIT_K"], unsplit["busy_programs"]) == (16, 16, 1, 160)


def test_the_table_of_a_sweep(tune_tiles):
    from fastmeta.kernels.tiles import check_table

    config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 2, "num_stages": 3}
    tuned = {"conv_forward/b32/m256/n64/k1024": {
        "kernel": "task_conv2d", "calls": 2, "issued_macs": 1,
        "candidates": [{"config": config, "ms": 0.02, "status": "ok"}, {"config": config, "ms": None, "status": "wrong"}],
        "best": {"config": config, "ms": 0.02, "status": "ok"}},
        "conv_forward/b1/m8/n8/k8": {"kernel": "task_conv2d", "calls": 1, "issued_macs": 1, "candidates": [],
                                     "best": None}}
    table = check_table(tune_tiles.table_of(tuned, 132, "NVIDIA H100"))
    assert table["entries"] == {"conv_forward/b32/m256/n64/k1024": {**config, "ms": 0.02, "candidates": 1}}
    assert (table["sm_count"], table["device"]) == (132, "NVIDIA H100")
