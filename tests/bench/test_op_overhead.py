"""bench/bench_op_overhead.py smoke-run: every public op of the table gets a row, the native
kernels its backward runs are found, and the table is written. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

from helpers import build_or_skip, load_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_op_overhead.py"


def load_overhead_script():
    return load_script(SCRIPT, "bench_op_overhead")


def test_every_public_op_of_the_table_gets_a_row(tmp_path):
    build_or_skip()
    script = load_overhead_script()
    import fastmeta.ops as ops
    from fastmeta.backends.table import TABLE

    assert script.public_ops() == [n for n in ops.__all__ if n in TABLE]
    out = tmp_path / "overhead.md"
    assert script.main(["--repeats", "2", "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for name in script.public_ops():
        assert f"| {name} |" in text
    assert "median over ops: forward overhead" in text


def test_the_backward_runs_its_native_kernels():
    build_or_skip()
    script = load_overhead_script()
    import fastmeta as fm

    with fm.use_backend("cpu"):
        linear = script.build_case("task_linear")
        update = script.build_case("mlp_meta_step_update")
    assert linear.native is not None and linear.backward is not None
    assert "task_linear_backward" in set(linear.native_backward_kernels)  # the pair, one op
    assert update.backward is None and "mutates" in update.note


def test_torchs_floor_is_a_row_of_its_own_and_not_in_the_medians():
    script = load_overhead_script()
    floor = script.floor_case()
    assert floor.native_backward_kernels == ["aten::mul"]
    floor.backward()  # autograd.grad through x.mul(2) on a graph kept for repeats
    floor.backward()
    timings = {floor.name: {"public": 3.0, "native": 3.0, "backward": 30.0, "native_backward": 4.0},
               "op": {"public": 10.0, "native": 4.0, "backward": 50.0, "native_backward": 10.0}}
    op = script.OpCase(name="op", public=lambda: None, native=lambda: None)
    rows = script.overhead_rows([op, floor], timings)
    assert [r.name for r in rows] == ["op", script.FLOOR_NAME]
    assert rows[1].backward_overhead_us == 26.0
    assert script.medians(rows) == (6.0, 40.0)  # the op's alone
    assert f"| {script.FLOOR_NAME} |" in script.format_table(rows, "# header")
