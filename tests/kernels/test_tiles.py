"""The tiles and split-K of the GEMM-like launches (kernels/tiles.py): the rule, the shape
classes and the table, and the GPU's exact tiles run under the interpreter at W2's layer
shapes (the batch shrunk, each task's geometry kept)."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

from fastmeta.backends import get_backend
from fastmeta.backends.table import TABLE
from fastmeta.kernels import tiles
from fastmeta.kernels.tiles import (
    H100_SM_COUNT,
    MIN_K_STEPS_PER_SPLIT,
    TABLE_SCHEMA,
    TARGET_WAVES,
    check_table,
    device_sm_count,
    interpreter_config,
    k_steps,
    launch_config,
    load_table,
    plan_config,
    planned_for_sm_count,
    shape_class,
    using_table,
)
from helpers import GridLog

# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------


def test_shape_class():
    assert shape_class("conv_forward", 32, ((245, 576),), 64) == "conv_forward/b32/m256/n64/k1024"
    assert shape_class("conv_input_grad", 1, ((640, 256), (640, 128), (640, 128), (640, 64)), 64) == \
        "conv_input_grad/b1/m1024/n64/k256/p4"
    assert shape_class("linear_weight_grad", 1, ((5, 160),), 256) == "linear_weight_grad/b1/m8/n256/k256"
    with pytest.raises(ValueError, match="unknown GEMM kernel 'conv'"):
        shape_class("conv", 1, ((1, 1),), 1)


def test_a_launch_of_many_tiles_keeps_the_largest_tiles_and_does_not_split():
    # W4's first conv over the query set: 4 tasks × 75 · 84 · 84 pixels, 32 filters, K = 27.
    cfg = plan_config("conv_forward", 4, ((75 * 84 * 84, 27),), 32)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]) == (64, 32, 32, 1)
    assert cfg["busy_programs"] == 4 * triton.cdiv(75 * 84 * 84, 64) and cfg["source"] == "rule"
    assert cfg["sm_count"] == H100_SM_COUNT and cfg["num_warps"] == 4


def test_w2_layers_split_k():
    # W2's second conv with the shared meta-parameters: 160 images of 7 × 7 outputs, 64
    # filters, K = 64 · 9: 123 tiles of 64 × 64 were one wave; 3 K ranges of 6 steps make
    # 369 busy programs.
    cfg = plan_config("conv_forward", 1, ((160 * 49, 576),), 64)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["k_per_split"], cfg["busy_programs"]) == \
        (64, 64, 3, 192, 369)
    # Its last conv: 10 tiles; 4 ranges (the most of 4 steps each) and 16 × 32 tiles.
    cfg = plan_config("conv_forward", 1, ((160 * 4, 576),), 64)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["busy_programs"]) == (16, 32, 4, 320)
    # The same launch on a GPU of 1000 SMs cannot reach two waves: the most busy programs.
    cfg = plan_config("conv_forward", 1, ((160 * 4, 576),), 64, sm_count=1000)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["busy_programs"]) == (16, 16, 4, 640)


@pytest.mark.parametrize("kernel", ["conv_forward", "conv_weight_grad", "linear_forward"])
def test_the_rule_on_a_grid_of_problems(kernel):
    """Every plan: K ranges of whole BLOCK_K steps (at least MIN_K_STEPS_PER_SPLIT where K is
    split), no MAC added by the split, and two waves of busy programs unless the split is
    at its most and the tiles at their smallest."""
    for batch, M, N, K, sm_count in itertools.product((1, 4, 32), (5, 20, 245, 7840), (5, 9, 64, 288),
                                                       (9, 100, 576, 31360), (8, 132)):
        cfg = plan_config(kernel, batch, ((M, K),), N, sm_count)
        bm, bn, bk, split, kps = (cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "k_per_split"))
        assert kps % bk == 0 and split == triton.cdiv(K, kps)
        assert k_steps(K, bk, kps) == triton.cdiv(K, bk)  # the split adds no K-step
        most = max(1, triton.cdiv(K, bk) // MIN_K_STEPS_PER_SPLIT)
        if split > 1:
            assert kps // bk >= MIN_K_STEPS_PER_SPLIT and split <= most
        busy = batch * triton.cdiv(M, bm) * triton.cdiv(N, bn) * split
        assert cfg["busy_programs"] == busy
        if busy < TARGET_WAVES * sm_count:
            assert (bm, bn) == (16, 16) or split == most, (batch, M, N, K, sm_count, cfg)
        # No more padding than the fixed sides (the smallest power of two ≥ each side, 16–64).
        side = lambda n: max(16, min(64, triton.next_power_of_2(n)))  # noqa: E731
        assert triton.cdiv(M, bm) * bm <= triton.cdiv(M, side(M)) * side(M)
        assert triton.cdiv(N, bn) * bn <= triton.cdiv(N, side(N)) * side(N)


def test_an_activation_forbids_the_split():
    cfg = plan_config("linear_forward", 1, ((5, 4096),), 5, can_split=False)
    assert cfg["SPLIT_K"] == 1 and cfg["k_per_split"] == 4096


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def entry(**changes):
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 2, "num_warps": 2, "num_stages": 4, **changes}


def test_the_committed_table_is_valid():
    table = load_table()
    assert table["schema"] == TABLE_SCHEMA and table["sm_count"] == H100_SM_COUNT
    assert check_table(table) is table


def test_a_table_entry_replaces_the_rule_for_its_class():
    key = shape_class("conv_forward", 32, ((245, 576),), 64)
    table = {"schema": TABLE_SCHEMA, "sm_count": H100_SM_COUNT, "entries": {key: entry()}}
    with using_table(table):
        cfg = plan_config("conv_forward", 32, ((245, 576),), 64)
        assert cfg["source"] == "table" and cfg["shape_class"] == key
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"], cfg["num_warps"],
                cfg["num_stages"]) == (32, 32, 16, 2, 2, 4)
        # Another shape of the class takes the entry too; another class the rule.
        assert plan_config("conv_forward", 17, ((200, 600),), 33)["source"] == "table"
        assert plan_config("conv_forward", 32, ((245, 576),), 128)["source"] == "rule"
        # At another SM count the rule sizes the split for the entry's tiles.
        cfg = plan_config("conv_forward", 32, ((245, 576),), 64, sm_count=4)
        assert cfg["source"] == "table" and (cfg["BLOCK_M"], cfg["SPLIT_K"]) == (32, 1)
    assert plan_config("conv_forward", 32, ((245, 576),), 64)["source"] == "rule"


@pytest.mark.parametrize("table,message", [
    ({"schema": "x", "sm_count": 132, "entries": {}}, "schema"),
    ({"schema": TABLE_SCHEMA, "sm_count": 0, "entries": {}}, "sm_count"),
    ({"schema": TABLE_SCHEMA, "sm_count": 132, "entries": {"conv/b1/m1/n1/k1": entry()}}, "unknown kernel"),
    ({"schema": TABLE_SCHEMA, "sm_count": 132, "entries": {"conv_forward/b1/m1/n1/k1": entry(BLOCK_M=24)}},
     "BLOCK_M must be a power of two"),
    ({"schema": TABLE_SCHEMA, "sm_count": 132, "entries": {"conv_forward/b1/m1/n1/k1": entry(SPLIT_K=0)}},
     "SPLIT_K must be a positive integer"),
    ({"schema": TABLE_SCHEMA, "sm_count": 132, "entries": {"conv_forward/b1/m1/n1/k1": {"BLOCK_M": 16}}},
     "must hold"),
])
def test_a_bad_table_is_refused_by_name(table, message):
    with pytest.raises(ValueError, match=message):
        check_table(table)


# ---------------------------------------------------------------------------------------
# The SM count and the interpreter
# ---------------------------------------------------------------------------------------


def test_the_sm_count_a_launch_is_planned_for(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert device_sm_count(cpu) is None
    assert launch_config("conv_forward", 1, ((640, 576),), 64, None) == interpreter_config(640, 64, 576)
    with planned_for_sm_count(8):
        assert device_sm_count(cpu) == 8
        cfg = launch_config("conv_forward", 1, ((640, 576),), 64, None)
        assert cfg["sm_count"] == 8 and cfg["source"] == "rule"
    assert device_sm_count(cpu) is None
    with pytest.raises(ValueError, match="positive number of SMs"):
        with planned_for_sm_count(0):
            pass


# ---------------------------------------------------------------------------------------
# The GPU's tiles under the interpreter: a W2 layer's plan at 132 SMs, run at 2 tasks
# ---------------------------------------------------------------------------------------


def needs_the_interpreter():
    if not get_backend("triton").available()[0] or not tiles.interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")


W2_T, W2_N, TASKS = 32, 5, 2  # W2: 32 tasks of 5 images; run with 2 tasks


# kernel, jitted function, W2 layer (C, H, W, O, stride, padding), what the plan does there
CONV_GPU_CASES = [
    # the second conv, per-task weights: M = 5 · 7 · 7 = 245, K = 576: 64 × 64 tiles, 3 ranges
    ("task_conv2d", "conv2d_forward_kernel", (64, 14, 14, 64, 2, 1), (64, 64, 3)),
    # the last conv's input gradient: phases of 2 × 2, 2 × 1, 1 × 2, 1 × 1 pixels: 32 × 32, 2 ranges
    ("task_conv2d_input_grad", "conv2d_input_grad_kernel", (64, 4, 4, 64, 2, 1), (32, 32, 2)),
    # the first conv's weight gradient: M = O = 64, N = 1 · 9, K = 5 · 14 · 14: 32 × 16, 5 ranges
    ("task_conv2d_weight_grad", "conv2d_weight_grad_kernel", (1, 28, 28, 64, 2, 1), (32, 16, 5)),
]


@pytest.mark.parametrize("name,jitted,layer,expected", CONV_GPU_CASES, ids=[c[0] for c in CONV_GPU_CASES])
def test_conv_runs_the_gpu_tiles_of_a_w2_layer(monkeypatch, name, jitted, layer, expected):
    from fastmeta.kernels import task_conv2d

    needs_the_interpreter()
    C, H, W, O, s, p = layer
    plan_of = {"task_conv2d": task_conv2d.forward_launch, "task_conv2d_input_grad": task_conv2d.input_grad_launch,
               "task_conv2d_weight_grad": task_conv2d.weight_grad_launch}[name]
    gpu = plan_of(W2_T, W2_N, C, H, W, O, 3, 3, (s, s), (p, p), config_for=task_conv2d.gpu_conv_config)
    assert (gpu.config["BLOCK_M"], gpu.config["BLOCK_N"], gpu.split_k) == expected
    assert gpu.sm_count == H100_SM_COUNT and gpu.busy_programs >= TARGET_WAVES * H100_SM_COUNT
    monkeypatch.setattr(task_conv2d, "conv_config", lambda *a, **k: dict(gpu.config))
    log = GridLog(getattr(task_conv2d, jitted))
    monkeypatch.setattr(task_conv2d, jitted, log)

    g = torch.Generator().manual_seed(11)
    HO, WO = (H + 2 * p - 3) // s + 1, (W + 2 * p - 3) // s + 1
    x, w = torch.randn(TASKS, W2_N, C, H, W, generator=g), torch.randn(TASKS, O, C, 3, 3, generator=g) / 8
    gy = torch.randn(TASKS, W2_N, O, HO, WO, generator=g)
    args = {"task_conv2d": (x, w, torch.randn(TASKS, O, generator=g), [s, s], [p, p]),
            "task_conv2d_input_grad": (gy, w, [H, W], [s, s], [p, p]),
            "task_conv2d_weight_grad": (gy, x, [3, 3], [s, s], [p, p], False)}[name]
    out = getattr(task_conv2d, name)(*args)
    want = TABLE[name].reference(*args)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    # The launch ran the GPU plan's tiles and K ranges: its grid is the plan's with 2 tasks.
    assert log.grids == [(gpu.grid[0], TASKS, gpu.grid[2])]


def test_linear_runs_the_gpu_tiles_of_w2s_head(monkeypatch):
    """W2's head (5 images × 256 features → 5 ways per task) with its bias: the GPU plan's
    16 × 16 tiles and 2 K ranges (the first adds the bias), at 2 tasks."""
    from fastmeta.kernels import task_linear

    needs_the_interpreter()
    gpu = task_linear.matmul_launch("forward", W2_T, W2_N, 5, 256, True, config_for=task_linear.gpu_matmul_config)
    assert (gpu.config["BLOCK_M"], gpu.config["BLOCK_N"], gpu.split_k) == (16, 16, 2)
    monkeypatch.setattr(task_linear, "matmul_config", lambda *a, **k: dict(gpu.config))
    log = GridLog(task_linear.task_matmul_kernel)
    monkeypatch.setattr(task_linear, "task_matmul_kernel", log)
    g = torch.Generator().manual_seed(12)
    args = (torch.randn(TASKS, W2_N, 256, generator=g), torch.randn(TASKS, 5, 256, generator=g) / 16,
            torch.randn(TASKS, 5, generator=g), "none", 0.0)
    out = task_linear.task_linear(*args)
    want = TABLE["task_linear"].reference(*args)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    assert log.grids == [(gpu.grid[0], TASKS, gpu.grid[2])]
