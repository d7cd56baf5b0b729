"""bench/bench_l2l_vision.py smoke-run: each contender's meta-gradient is judged against the
plain loop run in float64, with the fp32 loop's own error as the scale. The timings are
not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import build_or_skip, load_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_l2l_vision.py"


def test_the_vision_bench_checks_its_contenders_against_the_float64_loop(tmp_path):
    build_or_skip()
    bench = load_script(SCRIPT, "bench_l2l_vision")
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "vision.json"
        assert bench.main(["--shapes", "OmniglotFC,OmniglotCNN", "--tasks", "2", "--samples", "1",
                           "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())["results"]
    assert [r["shape"] for r in results] == ["OmniglotFC", "OmniglotCNN"]
    for r in results:
        assert r["gflop_per_iteration"] > 0  # counted from the loop's convolutions and products
        rows = {row["contender"]: row for row in r["rows"]}
        assert list(rows) == ["loop", "clone/adapt", "meta_batch"]
        loop = rows["loop"]["meta_gradient_error_vs_float64_loop"]
        assert 0 < loop < 1e-3  # fp32 rounding, measured: never exactly the float64 result
        for row in rows.values():
            assert row["tolerance"] == max(1e-4, 10 * loop)
            assert row["matches"] and row["meta_gradient_error_vs_float64_loop"] <= row["tolerance"]
            assert row["median_ms"] > 0
            assert row["gflop_per_s_cpu"] == pytest.approx(r["gflop_per_iteration"] * 1e3 / row["median_cpu_ms"])
