"""``fastmeta info`` and ``fastmeta build``."""

from fastmeta.tools import cli


def test_info_lists_every_backend_and_the_extension(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cpu", "cuda"):
        assert f"  {name} " in out
    assert "C++/CUDA extension:" in out and "with_cuda:" in out


def test_build_reports_the_extension(capsys):
    code = cli.main(["build"])
    captured = capsys.readouterr()
    # Either it built (and says where) or it says why not: never silent.
    assert (code == 0 and "built the C++ extension" in captured.out) or (
        code == 1 and "fastmeta build:" in captured.err
    )
