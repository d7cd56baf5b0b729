"""``fastmeta bench`` and ``fastmeta profile`` on the CPU, in a tiny configuration.

W1 with 2 tasks: fastmeta's torch backend, the loop and vmap peers, and a deliberately
wrong contender that the meta-gradient check must catch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmeta.tools import bench, profiling
from fastmeta.data import TaskBatch
from fastmeta.tools.bench_peers import Contender, LoopPeer, Problem
from fastmeta.tools.bench import BenchmarkSettings, check_status, run_benchmark, run_interleaved, time_steps
from fastmeta.tools.workloads import WORKLOADS
from helpers import build_or_skip

TINY = ["--workloads", "W1", "--tasks", "2", "--iterations", "3", "--warmup", "1",
        "--backends", "torch", "--peers", "loop,vmap,graph", "--device", "cpu"]


class LossOffByOnePercent(LoopPeer):
    """The loop peer with its query loss scaled by 1.01: a meta-gradient 1% off."""

    name = "loop-off-by-1%"

    def step(self) -> None:
        w = self.problem.workload
        sx, sy, qx, qy = self.problem.batch
        T = sx.size(0)
        params = dict(self.model.named_parameters())
        self.optimizer.zero_grad(set_to_none=True)
        from fastmeta.testing.reference_loop import constant_coefficient, task_query_loss

        coefficient = constant_coefficient(self.model, w.inner_lr)
        for t in range(T):
            loss = task_query_loss(self.model, params, sx[t], sy[t], qx[t], qy[t], w.steps, False, coefficient)
            (1.01 * loss / T).backward()
        self.optimizer.step()


def tiny_settings(**changes) -> BenchmarkSettings:
    values = dict(workloads=["W1"], tasks=2, iterations=3, warmup=1, device="cpu", backends=["torch"],
                  peers=["loop", "vmap"], min_sample_ms=0.0)
    values.update(changes)
    return BenchmarkSettings(**values)


def test_tiny_cpu_bench_checks_times_and_compares():
    [result] = run_benchmark(tiny_settings(), extra_contenders=[("loop-off-by-1%", LossOffByOnePercent)])
    rows = {r.name: r for r in result.contenders}
    assert list(rows) == ["fastmeta[torch]", "loop", "vmap", "loop-off-by-1%"]
    for name in ("fastmeta[torch]", "loop", "vmap"):
        assert rows[name].status == "ok", rows[name]
        assert rows[name].relative_error < 1e-5
        assert rows[name].samples == 3 and rows[name].median_ms > 0 and rows[name].min_ms <= rows[name].median_ms
        assert rows[name].tasks_per_second == pytest.approx(2 / (rows[name].median_ms * 1e-3))
    wrong = rows["loop-off-by-1%"]
    assert wrong.status == "WRONG"
    assert wrong.relative_error == pytest.approx(0.01, rel=1e-3)  # the check measures the real error
    assert wrong.timed and not wrong.counts_as_peer  # timed, but never the best peer
    fm_row = rows["fastmeta[torch]"]
    assert fm_row.best_peer in ("loop", "vmap")
    assert set(fm_row.speedup_vs) == {"loop", "vmap"}
    assert fm_row.speedup_vs_best_peer == pytest.approx(
        min(rows["loop"].median_ms, rows["vmap"].median_ms) / fm_row.median_ms
    )
    table = bench.format_table(result)
    assert "fastmeta[torch]" in table and "WRONG" in table and "vs loop" in table


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(TINY + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "fastmeta[torch]" in out and "vmap" in out
    report = json.loads(path.read_text())
    assert report["schema"] == bench.SCHEMA
    assert report["device"]["type"] == "cpu" and report["device"]["torch"] == torch.__version__
    assert report["device"]["name"]
    [row] = report["workloads"]
    assert row["workload"]["name"] == "W1" and row["workload"]["tasks"] == 2 and row["order"] == "second"
    by_name = {c["name"]: c for c in row["contenders"]}
    assert by_name["loop"]["status"] == "ok" and by_name["loop"]["median_ms"] > 0
    assert by_name["graph"]["status"] == "skipped" and "CUDA" in by_name["graph"]["note"]


def test_fastmeta_cli_has_bench_and_profile(tmp_path, capsys):
    cli = pytest.importorskip("fastmeta.tools.cli")
    assert cli.main(["bench"] + TINY + ["--first-order"]) == 0
    assert "first order" in capsys.readouterr().out
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "W1", "--tasks", "2", "--iterations", "1", "--warmup", "1",
                     "--device", "cpu", "--backend", "torch", "--out", str(trace)]) == 0
    assert trace.exists()


def test_a_wrong_fastmeta_contender_fails_the_command():
    wrong = bench.ContenderResult(name="fastmeta[x]", family="fastmeta", status="WRONG", note="1e-2")
    peer_wrong = bench.ContenderResult(name="loop", family="peer", status="WRONG", note="1e-2")
    result = bench.WorkloadResult(WORKLOADS["W1"], False, "cpu", [wrong, peer_wrong])
    assert bench.failures([result]) == ["W1 fastmeta[x]: WRONG (1e-2)"]


def test_only_torch_func_second_order_through_batch_norm_is_known_wrong():
    class TorchFunc(Contender):
        torch_func = True

    def problem(workload, first_order):
        return Problem(workload, torch.device("cpu"), first_order, {}, (TaskBatch(*[torch.zeros(1)] * 4),))

    conv = WORKLOADS["W2"]
    assert check_status(TorchFunc(problem(conv, False)), problem(conv, False), 1e-2, 1e-3)[0] == "known-wrong"
    assert check_status(TorchFunc(problem(conv, True)), problem(conv, True), 1e-2, 1e-3)[0] == "WRONG"
    assert check_status(Contender(problem(conv, False)), problem(conv, False), 1e-2, 1e-3)[0] == "WRONG"
    mlp = WORKLOADS["W1"]
    assert check_status(TorchFunc(problem(mlp, False)), problem(mlp, False), 1e-2, 1e-3)[0] == "WRONG"
    assert check_status(TorchFunc(problem(mlp, False)), problem(mlp, False), float("nan"), 1e-3)[0] == "WRONG"
    assert check_status(Contender(problem(mlp, False)), problem(mlp, False), 1e-4, 1e-3)[0] == "ok"


def test_timing_covers_every_step_it_reports(monkeypatch):
    """A sample is R whole steps between synchronizations: never less work than it claims.

    A fake clock that only a step advances (1 ms each) makes the arithmetic exact.
    """
    clock = {"now": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])

    class OneMillisecondStep(Contender):
        def __init__(self):
            self.steps = self.unsynchronized = 0

        def step(self):
            clock["now"] += 1e-3
            self.steps += 1
            self.unsynchronized += 1

        def synchronize(self):
            self.unsynchronized = 0

    contender = OneMillisecondStep()
    samples, per_sample = time_steps(contender, iterations=4, warmup=2, min_sample_ms=5.0)
    assert per_sample == 5
    assert samples == pytest.approx([1e-3] * 4)
    # warm-up, one calibration step, then 4 samples of 5 steps, all synchronized
    assert contender.steps == 2 + 1 + 4 * 5 and contender.unsynchronized == 0


def test_interleaved_rows_take_their_samples_in_turns(monkeypatch):
    """--interleave: every row built, checked and calibrated first, then one sample of each
    per round, the round's first row rotating; each row keeps its own iterations per sample,
    and a row that fails while timed becomes an error row without stopping the others. A fake
    clock that only steps advance makes every figure exact."""
    clock = {"now": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    steps: list[str] = []
    synchronized: list[str] = []  # one entry per synchronize: the end of a warm-up, calibration or sample

    def contender_taking(name: str, ms: float, fail_on_step: int | None = None):
        class Fixed(Contender):
            def __init__(self, problem):
                super().__init__(problem)
                self.steps = 0

            def step(self):
                self.steps += 1
                if fail_on_step is not None and self.steps == fail_on_step:
                    raise RuntimeError(f"{name} broke")
                clock["now"] += ms * 1e-3
                steps.append(name)

            def synchronize(self):
                synchronized.append(name)

        Fixed.name = name
        return Fixed

    problem = bench.build_problem(WORKLOADS["W1"].replace(tasks=2), tiny_settings(), torch.device("cpu"))
    settings = tiny_settings(iterations=4, warmup=1, min_sample_ms=3.0)
    # a: 1 ms a step (3 per sample); b: 2 ms (2 per sample); c: 5 ms (1 per sample), which
    # breaks on its 5th step: after its warm-up and calibration steps, its 3rd sample.
    rows = [("a", contender_taking("a", 1.0)), ("b", contender_taking("b", 2.0)),
            ("c", contender_taking("c", 5.0, fail_on_step=5))]
    a, b, c = run_interleaved(rows, problem, None, settings)
    # Each row warmed up and calibrated in row order (two synchronizations each), then the
    # rounds, starting at a, b, c, a; c's third sample (first in round 3) fails.
    assert synchronized == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["a", "b"] + ["a", "b"]
    assert steps.count("a") == 2 + 4 * 3 and steps.count("b") == 2 + 4 * 2 and steps.count("c") == 2 + 2
    assert a.samples == 4 and a.iterations_per_sample == 3 and a.median_ms == pytest.approx(1.0)
    assert b.samples == 4 and b.iterations_per_sample == 2 and b.median_ms == pytest.approx(2.0)
    assert a.details["interleaved"] and b.details["interleaved"]
    assert c.status == "error" and "c broke" in c.note and not c.timed


def test_interleaved_bench_run_checks_and_times_every_row():
    """A whole --interleave run (W1, 2 tasks): the same rows, checks and comparisons as the
    sequential run, each row timed in turns; a row named jax is timed alone after them."""

    class JaxNamed(LoopPeer):
        name = "jax"

    [result] = run_benchmark(tiny_settings(interleave=True), extra_contenders=[("jax", JaxNamed)])
    rows = {r.name: r for r in result.contenders}
    assert list(rows) == ["fastmeta[torch]", "loop", "vmap", "jax"]
    for name in ("fastmeta[torch]", "loop", "vmap"):
        assert rows[name].status == "ok" and rows[name].samples == 3, rows[name]
        assert rows[name].details["interleaved"]
    assert rows["jax"].status == "ok" and "interleaved" not in rows["jax"].details
    assert set(rows["fastmeta[torch]"].speedup_vs) == {"loop", "vmap", "jax"}
    assert "samples taken in turns: fastmeta[torch], loop, vmap" in bench.format_table(result)


def test_interleave_is_a_flag_of_the_command():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.settings_from_args(parser.parse_args([*TINY, "--interleave"])).interleave
    assert not bench.settings_from_args(parser.parse_args(TINY)).interleave


def test_workloads_match_benchmarks_md():
    w = {k: (v.tasks, v.support, v.query, v.steps, v.inner_lr, v.loss) for k, v in WORKLOADS.items()}
    assert w == {
        "W1": (25, 10, 10, 1, 0.01, "mse"),
        "W2": (32, 5, 5, 1, 0.4, "cross_entropy"),
        "W3": (16, 20, 20, 5, 0.1, "cross_entropy"),
        "W4": (4, 5, 75, 5, 0.01, "cross_entropy"),
    }
    params = {k: sum(p.numel() for p in v.build_model().parameters()) for k, v in WORKLOADS.items()}
    assert params["W1"] == (40 + 40) + (1600 + 40) + (40 + 1)
    assert WORKLOADS["W2"].build_model()[-1].in_features == 256
    assert WORKLOADS["W4"].build_model()[-1].in_features == 800
    batch = WORKLOADS["W4"].make_batch("cpu")
    assert batch.query_x.shape == (4, 75, 3, 84, 84) and batch.query_y.flatten().bincount().tolist() == [60] * 5


def test_profile_writes_a_chrome_trace_with_the_ranges(tmp_path):
    trace = tmp_path / "trace.json"
    result = profiling.profile_meta_iterations(
        WORKLOADS["W1"].replace(tasks=2), device="cpu", backend="torch", iterations=2, warmup=1, out=trace
    )
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"fastmeta.meta_iteration", "fastmeta.meta_backward", "fastmeta.optimizer_step"} <= names
    ranges = {name: calls for name, calls, _, _ in result.ranges}
    assert ranges["fastmeta.meta_iteration"] == 2
    assert "Self CPU" in result.top_kernels


def test_profile_resolves_presets():
    assert profiling.resolve_workload("omniglot-20w1s") == (WORKLOADS["W3"], False)
    workload, first_order = profiling.resolve_workload("omniglot-5w1s-fo")
    assert first_order and (workload.tasks, workload.support, workload.query, workload.steps) == (32, 5, 5, 1)
    with pytest.raises(ValueError, match="unknown workload or preset"):
        profiling.resolve_workload("W9")


def test_summary_marks_targets_met_or_not():
    def contender(name, family, status, median, peak=None):
        return {"name": name, "family": family, "status": status, "median_ms": median, "peak_mib": peak}

    def report(device_type, name, contenders):
        return {"date": "2026-11-26T00:00:00+00:00", "device": {"type": device_type, "name": "X"},
                "workloads": [{"workload": {"name": name, "title": "t"}, "order": "second", "contenders": contenders}]}

    gpu_w2 = report("cuda", "W2", [
        contender("fastmeta[auto]", "fastmeta", "ok", 0.5, 100),
        contender("fastmeta[triton]", "fastmeta", "WRONG", 0.1, 50),  # wrong rows never count
        contender("graph", "peer", "ok", 6.5, 300),
        contender("vmap", "peer", "known-wrong", 23.9, 241),
    ])
    cpu_w1 = report("cpu", "W1", [
        contender("fastmeta[cpu]", "fastmeta", "ok", 0.30),
        contender("vmap", "peer", "ok", 1.66),
        contender("jax", "peer", "ok", 0.294),
    ])
    table = bench.summary_table([gpu_w2, cpu_w1])
    w2_row, w1_row = [line for line in table.splitlines() if line.startswith("| W")]
    assert "fastmeta[auto] 0.5" in w2_row and "graph 6.5" in w2_row and "13x" in w2_row
    assert "| met |" in w2_row and "100 / 241 (ok)" in w2_row
    assert "jax 0.294" in w1_row and "| not met |" in w1_row  # 0.98x: not faster than JAX


def test_profile_on_the_cpu_prints_no_profiler_noise(tmp_path):
    # Kineto prints its lines from C++ when the profiler first starts: a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastmeta", "profile", "W1", "--tasks", "2", "--iterations", "1", "--warmup", "1",
         "--device", "cpu", "--backend", "torch", "--top", "3", "--out", str(tmp_path / "trace.json")],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fastmeta.meta_iteration" in proc.stdout
    assert proc.stderr == ""  # neither "gpuGetDeviceCount failed" nor Kineto's USDT lines
    # The dispatch counter profiles too.
    proc = subprocess.run(
        [sys.executable, "-m", "fastmeta", "profile", "W1", "--count", "--backend", "torch"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "dispatches" in proc.stdout and proc.stderr == "", proc.stderr


def test_fastmeta_row_is_the_user_loop_fed_new_batches(monkeypatch):
    """fastmeta[<backend>] runs what a user runs: the learner's defaults (validation on),
    torch's Adam with its defaults, a different batch (same shapes) every iteration; the
    check's step runs on the pool's first batch."""
    from fastmeta.tools.bench_peers import FastmetaContender

    settings = tiny_settings()
    problem = bench.build_problem(WORKLOADS["W1"].replace(tasks=2), settings, torch.device("cpu"))
    assert len(problem.batches) == settings.distinct_batches == 4
    assert problem.batch is problem.batches[0]
    assert len({b.support_x.data_ptr() for b in problem.batches}) == 4
    assert not torch.equal(problem.batches[0].support_x, problem.batches[1].support_x)
    contender = FastmetaContender(problem, "torch")
    with contender.active():
        contender.prepare()
        assert contender.learner.validate is True
        group = contender.optimizer.param_groups[0]
        defaults = torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults
        assert {k: group[k] for k in defaults} == defaults
        seen = []
        meta_batch = contender.learner.meta_batch
        monkeypatch.setattr(contender.learner, "meta_batch", lambda *b: seen.append(b[0]) or meta_batch(*b))
        for _ in range(5):
            contender.step()
        contender.reset_parameters()
        contender.step()
    assert [next(i for i, b in enumerate(problem.batches) if b.support_x is x) for x in seen] == [0, 1, 2, 3, 0, 0]


@pytest.mark.parametrize("workload", ["W2S", "W4S", "OFC"])
def test_host_cost_workload_rows_run_against_vmap_and_the_loop(workload):
    [result] = run_benchmark(tiny_settings(workloads=[workload], tasks=2, iterations=1, warmup=0,
                                           backends=["auto"], fastmeta_graph=False))
    rows = {r.name: r for r in result.contenders}
    assert list(rows) == ["fastmeta[auto]", "loop", "vmap"]
    assert rows["fastmeta[auto]"].status == "ok" and rows["loop"].status == "ok", rows
    assert rows["vmap"].status in ("ok", "known-wrong")  # torch.func's second order through BatchNorm
    assert all(r.timed for r in rows.values()) and set(rows["fastmeta[auto]"].speedup_vs) == {"loop", "vmap"}


def test_host_cost_workloads_are_the_issue_23_shapes():
    from fastmeta.tools.workloads import HOST_COST_WORKLOADS, find_workload

    w2s, w4s, ofc, r12 = (find_workload(n) for n in ("W2S", "w4-structure", "omniglot-fc", "resnet12-32"))
    assert set(HOST_COST_WORKLOADS) == {"W2S", "W4S", "OFC", "R12"}
    assert (w2s.tasks, w2s.support, w2s.query, w2s.ways) == (2, 5, 5, 5)
    assert [m.out_channels for m in w2s.build_model() if isinstance(m, torch.nn.Conv2d)] == [8] * 4
    assert (w4s.tasks, w4s.support, w4s.query, w4s.ways) == (2, 5, 5, 5)
    pooled = w4s.build_model()
    assert [m.out_channels for m in pooled if isinstance(m, torch.nn.Conv2d)] == [8] * 4
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in pooled.modules()) == 4
    fc = ofc.build_model()
    assert [m.out_features for m in fc.modules() if isinstance(m, torch.nn.Linear)] == [256, 128, 64, 64, 5]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in fc.modules()) == 4
    assert (r12.tasks, r12.input_shape) == (16, (3, 32, 32))
    resnet = r12.build_model().to("meta")
    assert resnet(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 5)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in resnet.modules()) == 12


def test_profile_of_the_captured_step_gives_each_kernel_its_share(tmp_path):
    build_or_skip()  # the CPU whole step is the extension's fused kernel
    result = profiling.profile_meta_iterations(
        WORKLOADS["W1"].replace(tasks=2), device="cpu", backend="cpu", iterations=2, warmup=1, out=None,
        captured=True)
    ranges = {name: calls for name, calls, _, _ in result.ranges}
    assert ranges == {"fastmeta.captured_step": 2}
    names = [k.name for k in result.kernels]
    assert "fastmeta_ext::mlp_meta_step_update" in names and not any(n.startswith("fastmeta.") for n in names)
    assert sum(k.share for k in result.kernels) == pytest.approx(1.0)
    assert [k.us for k in result.kernels] == sorted((k.us for k in result.kernels), reverse=True)
    assert result.source == "CPU self time" and result.to_json()["total_us"] == pytest.approx(
        sum(k.us for k in result.kernels))
    # A model the CPU has no whole step for: the learner's reason, not a profile of something else.
    with pytest.raises(ValueError, match="whole-step execution on the CPU runs a plain MLP"):
        profiling.profile_meta_iterations(WORKLOADS["W2"].replace(tasks=1), device="cpu", iterations=1, warmup=0,
                                          out=None, captured=True)
