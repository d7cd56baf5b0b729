"""The C++/CUDA extension's build: it builds (CUDA sources included where nvcc is), it is
found from the package, and without a compiler fastmeta falls back with one warning line.

Also the helpers the other extension test files import (build once, call a kernel
directly, compare).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import build_or_skip

# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


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
    # Each check raises the Python type of its kind (tests/backends/test_native_errors.py has more).
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.fastmeta_ext.task_linear(x, torch.randn(5, 3), None, "none", 0.0)
    with pytest.raises(ValueError, match="input features"):
        torch.ops.fastmeta_ext.task_linear(torch.randn(2, 3, 4), torch.randn(5, 3), None, "none", 0.0)
    with pytest.raises(ValueError, match="not in"):
        torch.ops.fastmeta_ext.task_loss(torch.randn(2, 3, 4), torch.full((2, 3), 4), "cross_entropy")
    seg = torch.tensor([0, 5])
    with pytest.raises(IndexError, match="segments"):
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


# ---------------------------------------------------------------------------------------
# The build cache: one folder per set of build inputs
# ---------------------------------------------------------------------------------------


def copy_sources(destination: Path) -> Path:
    from fastmeta.backends import extension

    shutil.copytree(extension.csrc_dir(), destination)
    return destination


def test_the_cache_key_follows_the_sources_content_torch_and_flags(tmp_path, monkeypatch):
    from fastmeta.backends import extension

    first, second = copy_sources(tmp_path / "a" / "csrc"), copy_sources(tmp_path / "b" / "csrc")
    plan = extension.BuildPlan(first, False, ("-O3",), ("-O3",), ("-fopenmp",), native=False)
    key = extension.build_key(plan)
    # The same content elsewhere: the same build (it is compiled from a staged copy).
    assert extension.build_key(dataclasses.replace(plan, sources=second)) == key
    # Any byte of any file under csrc/, headers included.
    header = sorted(second.rglob("*.h"))[0]
    header.write_bytes(header.read_bytes() + b"\n")
    assert extension.build_key(dataclasses.replace(plan, sources=second)) != key
    # The variant and every flag.
    for changed in (
        dataclasses.replace(plan, with_cuda=True),
        dataclasses.replace(plan, cflags=("-O2",)),
        dataclasses.replace(plan, cuda_flags=("-O3", "-G")),
        dataclasses.replace(plan, ldflags=()),
        dataclasses.replace(plan, native=True),
    ):
        assert extension.build_key(changed) != key, changed
    # torch's version, its C++ ABI and its location.
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert extension.build_key(plan) != key
    monkeypatch.undo()
    monkeypatch.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI)
    assert extension.build_key(plan) != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "elsewhere" / "torch" / "__init__.py"))
    assert extension.build_key(plan) != key
    monkeypatch.undo()
    assert extension.build_key(plan) == key
    assert extension.build_name(plan) == f"fastmeta_ext_cpu_{key}"


def test_the_build_key_reads_no_test_code():
    """Test code stays out of the product: editing a test harness (the CUDA emulation under
    tests/ops/cuda_emulation/) must not rebuild anyone's extension, nor ship in the wheel."""
    from fastmeta.backends import extension

    inputs = [p.relative_to(extension.csrc_dir()) for p in extension._source_files(extension.csrc_dir())]
    assert inputs, "the build key reads no sources"
    suspect = [p.as_posix() for p in inputs
               if {"tests", "emulation", "testing"} & set(p.parts) or "harness" in p.name or "emulat" in p.name]
    assert not suspect, f"test code among the build key's inputs: {suspect}"
    # The package data ships csrc/ only; no glob of it reaches a test folder.
    pyproject = (REPO / "pyproject.toml").read_text()
    shipped = pyproject.split('"fastmeta.csrc" = [', 1)[1].split("]", 1)[0]
    assert "emulation" not in shipped and "tests" not in shipped, shipped


def test_staged_sources_are_copied_once_and_replaced_when_they_differ(tmp_path):
    from fastmeta.backends import extension

    src = copy_sources(tmp_path / "csrc")
    staged = extension.stage_sources(src, tmp_path / "build")
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(staged) for p in staged.rglob("*") if p.is_file())
    for rel in files:
        assert (staged / rel).read_bytes() == (src / rel).read_bytes()
    untouched = sorted(staged.rglob("*.cpp"))[0]
    os.utime(untouched, ns=(1_000_000_000, 1_000_000_000))
    damaged = sorted(staged.rglob("*.h"))[0]
    damaged.write_text("half a file")
    extension.stage_sources(src, tmp_path / "build")
    assert untouched.stat().st_mtime_ns == 1_000_000_000  # ninja's view of it is unchanged
    assert damaged.read_bytes() == (src / damaged.relative_to(staged)).read_bytes()
    assert not list(staged.rglob("*.tmp"))


def test_loading_a_finished_build_prints_nothing(extension):
    # The extension fixture built it (or found it); a new process only loads it: no notice,
    # and not torch's "No CUDA runtime is found" either.
    script = "from fastmeta.backends import extension; ok, detail = extension.build(); assert ok, detail"
    env = {k: v for k, v in os.environ.items() if k != "FASTMETA_BUILD_VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


_BUILD_FROM = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fastmeta.backends import extension
    extension.csrc_dir = lambda: Path(sys.argv[1])   # this source tree instead of the installed one
    ok, detail = extension.build()
    assert ok, detail
    print(detail)
    """
)


@pytest.mark.slow
def test_two_source_trees_share_one_cache_without_rebuilding_each_other(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), FASTMETA_BUILD_CUDA="0")
    env.pop("FASTMETA_BUILD_VERBOSE", None)
    tree_a = copy_sources(tmp_path / "checkout-a" / "csrc")
    tree_a_elsewhere = copy_sources(tmp_path / "checkout-c" / "csrc")  # a second clone of the same commit
    tree_b = copy_sources(tmp_path / "checkout-b" / "csrc")
    source = sorted(tree_b.rglob("*.cpp"))[0]
    source.write_text(source.read_text() + "\n// another version of the sources\n")

    def build_from(tree: Path) -> tuple[Path, str]:
        proc = subprocess.run([sys.executable, "-c", _BUILD_FROM, str(tree)], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=1200)
        assert proc.returncode == 0, proc.stderr
        return Path(proc.stdout.strip()), proc.stderr

    library_a, said = build_from(tree_a)
    assert "building the C++ extension (CPU kernels) once for this install" in said
    assert re.search(r"built the C\+\+ extension in \d+ s", said)
    built_a = library_a.stat().st_mtime_ns
    library_b, said = build_from(tree_b)
    assert "building the C++ extension" in said
    assert library_b != library_a and library_b.parent.parent == library_a.parent.parent
    built_b = library_b.stat().st_mtime_ns
    # Back and forth: each finds its own build; nothing is compiled and nothing printed.
    for tree, library, built in ((tree_a, library_a, built_a), (tree_b, library_b, built_b),
                                 (tree_a_elsewhere, library_a, built_a)):
        again, said = build_from(tree)
        assert again == library and said == "", said
        assert library.stat().st_mtime_ns == built
