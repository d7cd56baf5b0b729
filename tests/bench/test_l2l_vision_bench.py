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


@pytest.mark.parametrize("device, says", [("meta", "--device: cpu or cuda, got 'meta'"), ("tpu", "--device: Expected one of"),
                                          pytest.param("cuda", "torch sees no CUDA device here",
                                                       marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                                reason="a GPU is here"))])
def test_the_vision_bench_refuses_a_device_it_cannot_run_on(device, says, capsys):
    bench = load_script(SCRIPT, "bench_l2l_vision")
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--shapes", "OmniglotFC", "--device", device])
    assert stopped.value.code == 2 and says in capsys.readouterr().err


def test_the_vision_bench_writes_its_json_after_every_shape(tmp_path, monkeypatch):
    """A run stopped by a time box keeps the shapes it finished: the JSON is rewritten
    (atomically) after each one."""
    bench = load_script(SCRIPT, "bench_l2l_vision")
    out, seen = tmp_path / "vision.json", []

    def fake_run_shape(shape, spec, tasks, samples, device):
        if out.exists():
            seen.append([r["shape"] for r in json.loads(out.read_text())["results"]])
        row = {"contender": "loop", "median_ms": 2.0, "speedup_vs_loop": 1.0, "matches": True, "tolerance": 1e-4,
               "meta_gradient_error_vs_float64_loop": 1e-6, "median_cpu_ms": 2.0, "gflop_per_s_cpu": 1.0,
               "cpu_speedup_vs_loop": 1.0}
        return {"shape": shape, "image": spec["size"], "parameters": 1, "tasks": tasks, "gflop_per_iteration": 0.002,
                "device": "cpu", "rows": [row]}

    monkeypatch.setattr(bench, "run_shape", fake_run_shape)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--shapes", "OmniglotFC,OmniglotCNN,CNN4", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [["OmniglotFC"], ["OmniglotFC", "OmniglotCNN"]]
    assert [r["shape"] for r in json.loads(out.read_text())["results"]] == ["OmniglotFC", "OmniglotCNN", "CNN4"]
    assert not list(tmp_path.glob("*.tmp"))
