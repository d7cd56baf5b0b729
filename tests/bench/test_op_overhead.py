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
