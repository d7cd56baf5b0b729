"""Tiles and split-K for the GEMM-like Triton launches (issue 24, "Tiles that fill the GPU").

Every GEMM-like launch (the conv forward, input gradient and weight gradient of
kernels/task_conv2d.py, the task_linear family of kernels/task_linear.py) takes its tiles,
its split-K factor, its warps and stages from :func:`gemm_config`, from the per-task
problem and the GPU's SM count; the plan functions of those modules
(``conv_launch_plan``, ``linear_launch_plan``) turn it into the grid and count the
programs, the waves and the MACs.

Terms. A launch runs ``batch`` GEMMs (one per task, or one when the tasks fold into the
rows), each of M × N outputs reducing over K. The input gradient of a strided conv runs one
such problem per output phase, (M_p, K_p) with the same N, in one launch. A program
computes one BLOCK_M × BLOCK_N output tile over one K range of ``k_per_split`` (BLOCK_K
per step). Its **busy** programs are those with at least one K-step (the grid also holds
idle ones: the tiles and splits a smaller phase does not have). A **wave** is
``sm_count`` programs, one per SM: 132 on an H100 (:data:`H100_SM_COUNT`), the default
where no GPU is asked; the launchers pass their device's count.

The rule, for a shape class without an entry in the table:

1. Tiles: each side the smallest power of two ≥ the problem's, between 16 (``tl.dot``'s
   minimum) and 64 (a 64 × 64 fp32 accumulator is 32 registers a thread at 4 warps);
   BLOCK_K 16 where K ≤ 16, else 32.
2. Split-K: where the busy programs are fewer than :data:`TARGET_WAVES` waves, K is cut
   into SPLIT_K ranges of ``k_per_split``, a multiple of BLOCK_K (so splitting adds no
   MAC: each range's last step is the only one that can be partial, as without the
   split), each of at least :data:`MIN_K_STEPS_PER_SPLIT` K-steps, as few as reach the
   target (or as many as the steps allow).
3. Still under the target: halve the larger tile side (BLOCK_M first on a tie), not below
   16, and go back to 2. A smaller power-of-two tile never pads more, so no step adds
   MACs. The first tiles that reach the target are taken; where none does, the ones with
   the most busy programs (the largest tiles among equals).

``num_warps`` is BLOCK_M · BLOCK_N / 512 (4 at 64 × 32 and up, 1 at 16 × 32 and down),
``num_stages`` 3. Splitting is off where the kernel cannot sum partial tiles before its
epilogue (``can_split=False``: an activation after the bias).

The partial tiles of a split launch go to a buffer ``[SPLIT_K, *out]`` and are summed in
split order (deterministic, unlike atomics): by the launch's last K range of each tile, in
its epilogue, where split-K in one pass is in force (kernels/split_k.py: under the
interpreter, and on CUDA once the GPU check has verified it), else in a second pass
(``torch.sum`` over the first dimension). Only split 0 adds a bias (and an addend).

**The table** (kernels/tile_table.json, :func:`load_table`): the tiles, warps, stages and
split-K that bench/gpu_check.py's ``tune`` step measured fastest for each shape class on a
GPU, in the format that step writes (``results.json``'s ``tune.table``). A class
(:func:`shape_class`) is the kernel and each of batch, M, N, K (the largest phase's)
rounded up to a power of two, and the phase count where there are several: e.g.
``conv_forward/b32/m256/n64/k1024``. An entry's tiles replace step 1's and 3's; its
SPLIT_K is taken where the table was tuned at the same SM count, and otherwise step 2
sizes the split for the entry's tiles.

Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) each program costs ~7 ms, so
the launchers use :func:`interpreter_config` (one tile covers each dimension, no split)
unless a test asks for a GPU's plan with :func:`planned_for_sm_count`.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from fastmeta.kernels.launch_checks import interpreting

H100_SM_COUNT = 132  # NVIDIA H100 SXM (and H200): the SM count the plans assume by default
TARGET_WAVES = 2  # split K or shrink tiles while a launch has fewer busy programs than 2 waves
MIN_K_STEPS_PER_SPLIT = 4  # a split's K range: at least 4 BLOCK_K steps
MIN_TILE, MAX_TILE = 16, 64
DEFAULT_STAGES = 3

TABLE_SCHEMA = "fastmeta-tile-table-1"
TABLE_PATH = Path(__file__).resolve().with_name("tile_table.json")
GEMM_KERNELS = ("conv_forward", "conv_input_grad", "conv_weight_grad",
                "linear_forward", "linear_input_grad", "linear_weight_grad")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
# The backends a table's measured preference may name for an op family on CUDA (issue 24,
# item 4: the sweep times the CUDA extension's GEMMs against the tuned Triton kernels).
PREFERABLE_BACKENDS = ("triton", "cuda")


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ (triton.cdiv is a constexpr function: ~9 µs a call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------
# The SM count a launch is planned for
# ---------------------------------------------------------------------------------------

_forced_sm_count: list[int] = []


@contextmanager
def planned_for_sm_count(sm_count: int):
    """Within: every launcher plans its launches for ``sm_count`` SMs with the GPU rule, also
    under the interpreter (whose launchers otherwise take :func:`interpreter_config`). For
    tests: a small count makes tiny problems split K as a GPU's large ones do."""
    if int(sm_count) < 1:
        raise ValueError(f"sm_count must be a positive number of SMs, got {sm_count}")
    _forced_sm_count.append(int(sm_count))
    try:
        yield
    finally:
        _forced_sm_count.pop()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int | None:
    """The SM count to plan a launch on ``device`` for: the forced one
    (:func:`planned_for_sm_count`), a CUDA device's own, or None (the interpreter's CPU)."""
    if _forced_sm_count:
        return _forced_sm_count[-1]
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return None


# ---------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------


def normalized_split(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(SPLIT_K, k_per_split) for a requested split of a reduction of K: each range a whole
    number of BLOCK_K steps, no range empty."""
    k_per_split = cdiv(cdiv(max(K, 1), max(split_k, 1)), block_k) * block_k
    return cdiv(max(K, 1), k_per_split), k_per_split


class PlannedLaunch:
    """What every planned GEMM-like launch answers (``ConvLaunch``, ``LinearLaunch``: the
    dataclasses give ``grid``, ``config`` and ``busy_programs``)."""

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def split_k(self) -> int:
        return self.config["SPLIT_K"]

    def waves(self, sm_count: int = H100_SM_COUNT) -> float:
        """Busy programs per ``sm_count`` SMs."""
        return self.busy_programs / sm_count


def planned_launch(calls: dict, kernel: str, *args, config_for=None, sm_count: int | None = None):
    """The launch a family's launcher ``kernel`` makes for ``args`` (its first planned
    launch), or None where it declines; runs nothing. ``calls`` maps each launcher's name to
    its plan function (``kernels/task_conv2d.py``, ``kernels/task_linear.py``)."""
    call = calls[kernel](*args, config_for=config_for, sm_count=sm_count)
    return None if call is None else call[0]


def busy_programs(batch: int, problems, N: int, block_m: int, block_n: int, k_per_split: int) -> int:
    """Programs with at least one K-step: per phase (M_p, K_p), its tiles times its K ranges."""
    return batch * sum(cdiv(m, block_m) * cdiv(N, block_n) * cdiv(k, k_per_split)
                       for m, k in problems if m > 0 and k > 0)


def k_steps(K: int, block_k: int, k_per_split: int) -> int:
    """BLOCK_K steps over a reduction of K cut into ranges of k_per_split (a multiple of
    BLOCK_K): the same as unsplit, ⌈K / BLOCK_K⌉."""
    return sum(cdiv(min(K, s + k_per_split) - s, block_k) for s in range(0, K, k_per_split))


# ---------------------------------------------------------------------------------------
# Shape classes and the table
# ---------------------------------------------------------------------------------------


def shape_class(kernel: str, batch: int, problems, N: int) -> str:
    """The table's key for a launch: the kernel, and batch, M, N, K (the largest phase's)
    each rounded up to a power of two; the phase count where there are several."""
    if kernel not in GEMM_KERNELS:
        raise ValueError(f"unknown GEMM kernel {kernel!r}; known: {', '.join(GEMM_KERNELS)}")
    M = max(m for m, _ in problems)
    K = max(k for _, k in problems)
    key = "/".join([kernel] + [f"{d}{next_power_of_2(max(int(v), 1))}"
                               for d, v in (("b", batch), ("m", M), ("n", N), ("k", K))])
    return key + (f"/p{len(problems)}" if len(problems) > 1 else "")


def check_table(table: dict) -> dict:
    """The table itself, or ValueError naming what is wrong with it."""
    if table.get("schema") != TABLE_SCHEMA:
        raise ValueError(f"a tile table has schema {TABLE_SCHEMA!r}, not {table.get('schema')!r}")
    sm_count = table.get("sm_count")
    if not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"the tile table's sm_count must be a positive integer, got {sm_count!r}")
    for key, entry in table.get("entries", {}).items():
        if key.split("/")[0] not in GEMM_KERNELS:
            raise ValueError(f"tile table entry {key!r}: unknown kernel")
        if set(entry) - set(CONFIG_KEYS) - {"ms", "candidates"} or set(CONFIG_KEYS) - set(entry):
            raise ValueError(f"tile table entry {key!r} must hold {', '.join(CONFIG_KEYS)} (and ms, candidates)")
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = entry[name]
            if not isinstance(v, int) or v < MIN_TILE or v > 128 or v & (v - 1):
                raise ValueError(f"tile table entry {key!r}: {name} must be a power of two in [16, 128], got {v!r}")
        for name in ("SPLIT_K", "num_warps", "num_stages"):
            if not isinstance(entry[name], int) or entry[name] < 1:
                raise ValueError(f"tile table entry {key!r}: {name} must be a positive integer")
    for family, preference in table.get("preferences", {}).items():
        if not isinstance(preference, dict) or preference.get("backend") not in PREFERABLE_BACKENDS:
            raise ValueError(f"tile table preference {family!r}: backend must be one of {PREFERABLE_BACKENDS}, got "
                             f"{preference!r}")
        ms = preference.get("ms", {})
        if not isinstance(ms, dict) or preference["backend"] not in ms or not all(
                isinstance(v, (int, float)) and v > 0 for v in ms.values()):
            raise ValueError(f"tile table preference {family!r}: ms must give each timed backend's positive total, "
                             f"the preferred one's included, got {ms!r}")
    return table


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    return check_table(json.loads(Path(path).read_text()))


def load_table(path: Path | str | None = None) -> dict:
    """The committed table (kernels/tile_table.json), or the one at ``path``."""
    return _load_table(str(path or TABLE_PATH))


_table_override: list[dict] = []


@contextmanager
def using_table(table: dict):
    """Within: the plans read ``table`` (a table's format, checked) instead of the committed
    one. The tune step times candidates through it."""
    _table_override.append(check_table(table))
    gemm_config.cache_clear()
    try:
        yield
    finally:
        _table_override.pop()
        gemm_config.cache_clear()


def current_table() -> dict:
    return _table_override[-1] if _table_override else load_table()


def preferred_backend(family: str) -> str | None:
    """The backend the table's sweep measured fastest on CUDA for the op family's kernels
    (``preferences``, written by bench/tune_tiles.py), or None where it measured none: then
    ``auto`` keeps its fixed order (fastmeta.backends.AUTO_PREFERENCE)."""
    preference = current_table().get("preferences", {}).get(family)
    return None if preference is None else preference["backend"]


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------


def _side(size: int) -> int:
    return max(MIN_TILE, min(MAX_TILE, next_power_of_2(max(size, 1))))


def warps_for(block_m: int, block_n: int) -> int:
    return max(1, min(4, block_m * block_n // 512))


def split_for(batch, problems, N, block_m, block_n, block_k, sm_count, can_split=True) -> tuple[int, int, int]:
    """(SPLIT_K, k_per_split, busy programs): the fewest K ranges of at least
    MIN_K_STEPS_PER_SPLIT steps that reach TARGET_WAVES waves, or the most there can be."""
    K = max(k for _, k in problems)
    split, kps = normalized_split(K, block_k, 1)
    busy = busy_programs(batch, problems, N, block_m, block_n, kps)
    target = TARGET_WAVES * sm_count
    most = max(1, cdiv(K, block_k) // MIN_K_STEPS_PER_SPLIT) if can_split else 1
    # s ranges make at most s times the busy programs of one: fewer cannot reach the target.
    wanted = max(1, min(most, cdiv(target, max(busy, 1))) - 1)
    while busy < target and wanted < most:
        wanted += 1
        s, k = normalized_split(K, block_k, wanted)
        if s == split:  # the same ranges as the split before
            continue
        split, kps = s, k
        busy = busy_programs(batch, problems, N, block_m, block_n, kps)
    return split, kps, busy


@functools.lru_cache(maxsize=4096)
def gemm_config(kernel: str, batch: int, problems: tuple, N: int, sm_count: int = H100_SM_COUNT,
                can_split: bool = True) -> tuple:
    """The launch's configuration as sorted (key, value) pairs (cached; :func:`plan_config`
    gives it as a dict): BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, k_per_split, num_warps,
    num_stages, busy_programs, sm_count, shape_class, source ("table" or "rule")."""
    M = max(m for m, _ in problems)
    K = max(k for _, k in problems)
    key = shape_class(kernel, batch, problems, N)
    table = current_table()
    entry = table.get("entries", {}).get(key)
    block_k = 16 if K <= 16 else 32
    if entry is not None:
        bm, bn, block_k = entry["BLOCK_M"], entry["BLOCK_N"], entry["BLOCK_K"]
        if table["sm_count"] == sm_count or not can_split:
            split, kps = normalized_split(K, block_k, entry["SPLIT_K"] if can_split else 1)
            busy = busy_programs(batch, problems, N, bm, bn, kps)
        else:
            split, kps, busy = split_for(batch, problems, N, bm, bn, block_k, sm_count, can_split)
        chosen = (bm, bn, split, kps, busy, entry["num_warps"], entry["num_stages"], "table")
    else:
        bm, bn = _side(M), _side(N)
        best = None
        while True:
            split, kps, busy = split_for(batch, problems, N, bm, bn, block_k, sm_count, can_split)
            if best is None or busy > best[4]:
                best = (bm, bn, split, kps, busy, warps_for(bm, bn), DEFAULT_STAGES, "rule")
            if busy >= TARGET_WAVES * sm_count or max(bm, bn) == MIN_TILE:
                break
            if bm >= bn and bm > MIN_TILE:
                bm //= 2
            else:
                bn //= 2
        chosen = best
    bm, bn, split, kps, busy, warps, stages, source = chosen
    return tuple(sorted({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split, "k_per_split": kps,
                         "num_warps": warps, "num_stages": stages, "busy_programs": busy, "sm_count": sm_count,
                         "shape_class": key, "source": source}.items()))


def plan_config(kernel: str, batch: int, problems, N: int, sm_count: int | None = None,
                can_split: bool = True) -> dict:
    """:func:`gemm_config` as a fresh dict, at ``sm_count`` (default: an H100's)."""
    problems = tuple((int(m), int(k)) for m, k in problems)
    return dict(gemm_config(kernel, int(batch), problems, int(N), int(sm_count or H100_SM_COUNT), bool(can_split)))


def interpreter_config(M: int, N: int, K: int) -> dict:
    """The interpreter's tiles: one tile covers each dimension (BLOCK_K up to 64), no split,
    so that the interpreted programs are few."""
    return {"BLOCK_M": max(MIN_TILE, next_power_of_2(M)), "BLOCK_N": max(MIN_TILE, next_power_of_2(N)),
            "BLOCK_K": max(MIN_TILE, min(64, next_power_of_2(K))), "SPLIT_K": 1, "num_warps": 1,
            "num_stages": 1, "source": "interpreter"}


def launch_config(kernel: str, batch: int, problems, N: int, sm_count: int | None, can_split: bool = True) -> dict:
    """What a launcher runs: the plan at ``sm_count`` SMs, or where there is none (CPU
    tensors under the interpreter, no :func:`planned_for_sm_count`) the interpreter's."""
    if sm_count is None and _forced_sm_count:
        sm_count = _forced_sm_count[-1]
    if sm_count is None and interpreting():
        return interpreter_config(max(m for m, _ in problems), N, max(k for _, k in problems))
    return plan_config(kernel, batch, problems, N, sm_count, can_split)


def under_one_wave_share(launches, sm_count: int = H100_SM_COUNT) -> float:
    """The share of the launches' issued MACs that run in launches with fewer busy programs
    than ``sm_count`` (under one wave)."""
    issued = sum(l.issued_macs for l in launches)
    under = sum(l.issued_macs for l in launches if l.busy_programs < sm_count)
    return under / issued if issued else 0.0
