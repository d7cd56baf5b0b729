"""The C++/CUDA extension's build: it builds (CUDA sources included where nvcc is), it is
found from the package, and without a compiler fastmeta falls back with one warning line.

Also the helpers the other extension test files import (build once, call a kernel
directly, compare).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# ---------------------------------------------------------------------------------------
# Helpers for tests/test_extension_build.py and tests/ops/
# ---------------------------------------------------------------------------------------


def build_or_skip():
    """Build (or load) the extension: skip without a C++ compiler, fail if a build breaks."""
    from fastmeta.backends import extension

    ok, reason = extension.build()
    if not ok:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {reason}")
        pytest.fail(f"the C++ extension failed to build: {reason}")
    return extension


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extension():
    return build_or_skip()


def test_the_extension_builds_and_defines_every_kernel_of_the_table(extension):
    from fastmeta.backends.table import TABLE

    for name, spec in TABLE.items():
        assert str(getattr(torch.ops.fastmeta_ext, name).default._schema) == (
            f"fastmeta_ext::{name}{spec.schema.replace('SymInt', 'int')}")
    info = extension.build_info()
    assert info["ok"] and Path(info["path"]).is_file()
    assert extension.kernels("cpu"), "no CPU kernel registered"


def test_cuda_sources_are_compiled_whenever_torch_is_a_cuda_build_and_nvcc_is_present(extension):
    nvcc = extension._find_nvcc()
    expect_cuda = torch.version.cuda is not None and nvcc is not None and os.environ.get("FASTMETA_BUILD_CUDA") != "0"
    assert extension.build_info()["with_cuda"] == expect_cuda
    ok, reason = extension.availability("cuda")
    if not torch.cuda.is_available():
        assert not ok and reason  # built (or not), but never "available" without a GPU


def test_cpu_backend_is_available_and_cuda_kernels_dispatch_by_device(extension):
    import fastmeta as fm

    rows = {row["name"]: row for row in fm.backends()}
    assert rows["cpu"]["available"], rows["cpu"]["reason"]
    # The CPU tensors go to the CPU implementations through the dispatcher.
    x = torch.randn(2, 3, 4)
    w = torch.randn(5, 4)
    y = torch.ops.fastmeta_ext.task_linear(x, w, None, "none", 0.0)
    torch.testing.assert_close(y, x @ w.t())


def test_cpp_entry_points_reject_bad_layouts_instead_of_reading_out_of_bounds(extension):
    x = torch.randn(2, 3, 4).transpose(1, 2)  # not contiguous
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastmeta_ext.task_linear(x, torch.randn(5, 3), None, "none", 0.0)
    with pytest.raises(RuntimeError, match="input features"):
        torch.ops.fastmeta_ext.task_linear(torch.randn(2, 3, 4), torch.randn(5, 3), None, "none", 0.0)
    with pytest.raises(RuntimeError, match="not in"):
        torch.ops.fastmeta_ext.task_loss(torch.randn(2, 3, 4), torch.full((2, 3), 4), "cross_entropy")
    seg = torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="segments"):
        torch.ops.fastmeta_ext.inner_step(torch.randn(2), torch.randn(3, 2), torch.randn(2), None, None, seg)


def test_sources_are_found_from_the_package(extension):
    src = extension.csrc_dir()
    assert src is not None and (src / "common.h").is_file()
    sources = extension.sources(src, with_cuda=True)
    assert any(s.endswith(".cu") for s in sources) and any("/cpu/" in s for s in sources)
    assert all(Path(s).is_file() for s in sources)


def test_without_a_compiler_fastmeta_falls_back_with_one_warning_line(tmp_path):
    # A fresh process: the build state is per process. An empty extensions dir, so that no
    # cached build could hide the missing compiler.
    script = textwrap.dedent(
        """
        import torch, fastmeta as fm
        from fastmeta import ops
        rows = {r["name"]: r for r in fm.backends()}
        assert not rows["cpu"]["available"], rows["cpu"]
        assert "compiler" in rows["cpu"]["reason"], rows["cpu"]["reason"]
        assert not rows["cuda"]["available"]
        x, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
        y = ops.task_linear(x, w, None, "relu", 0.0)          # auto: the reference
        assert torch.allclose(y, torch.relu(torch.bmm(x, w.transpose(1, 2))))
        try:
            fm.use_backend("cpu")
        except RuntimeError as exc:
            assert "compiler" in str(exc)
        else:
            raise AssertionError("use_backend('cpu') accepted an unavailable backend")
        print("FALLBACK-OK")
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("FASTMETA_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FALLBACK-OK" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "fastmeta" in ln]
    assert len(lines) == 1, proc.stderr
    assert "using the other backends" in lines[0]
