# ---------------------------------------------------------------------------------------
# Triton interpreter switch (owned by the triton backend tests, tests/kernels/test_triton_*.py).
# It must run before anything imports triton: Triton decides at @triton.jit time whether a
# kernel is compiled or interpreted. Without a GPU the triton backend's kernels then run on
# CPU tensors (~7 ms per program instance), which is what the CPU test tier uses.
# ---------------------------------------------------------------------------------------
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ---------------------------------------------------------------------------------------
# End of the triton interpreter switch.
# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# Data fixtures (fastmeta.data, the CLI tests). Owned by the data/CLI work; add other
# fixtures outside this block.
# ---------------------------------------------------------------------------------------
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The synthetic Omniglot: 5 alphabets of 16 characters (80 classes, so the MAML proportions
# give a 54 / 5 / 21 split and 5-way tasks work on every split), 6 drawings each.
SYNTHETIC_OMNIGLOT_LAYOUT = {
    "images_background": {"Alpha": 16, "Beta": 16, "Gamma": 16},
    "images_evaluation": {"Delta": 16, "Epsilon": 16},
}
SYNTHETIC_OMNIGLOT_DRAWINGS = 6
SYNTHETIC_OMNIGLOT_CHARACTERS = sum(sum(a.values()) for a in SYNTHETIC_OMNIGLOT_LAYOUT.values())


def synthetic_drawing(character_seed: int, drawing: int) -> Image.Image:
    """A 105x105 binary drawing like Omniglot's: white paper (1), black strokes (0).

    Each character is a few random strokes; each drawing jitters them, so drawings of one
    character resemble each other and differ from other characters'.
    """
    strokes = np.random.default_rng(character_seed).uniform(15, 90, size=(3, 4))
    jitter = np.random.default_rng(character_seed * 1000 + drawing + 1).normal(0, 2.0, size=strokes.shape)
    image = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in strokes + jitter:
        draw.line((x0, y0, x1, y1), fill=0, width=5)
    return image


def write_synthetic_omniglot(root: Path, *, as_zip: bool = True, drawings: int = SYNTHETIC_OMNIGLOT_DRAWINGS) -> Path:
    """Write the synthetic Omniglot under ``root`` in the official layout; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    character_seed = 0
    for archive, alphabets in SYNTHETIC_OMNIGLOT_LAYOUT.items():
        files = {}
        for alphabet, characters in alphabets.items():
            for character in range(1, characters + 1):
                character_seed += 1
                for drawing in range(1, drawings + 1):
                    buffer = io.BytesIO()
                    synthetic_drawing(character_seed, drawing).save(buffer, format="PNG")
                    name = f"{archive}/{alphabet}/character{character:02d}/{character_seed:04d}_{drawing:02d}.png"
                    files[name] = buffer.getvalue()
        if as_zip:
            with zipfile.ZipFile(root / f"{archive}.zip", "w") as archive_file:
                for name, data in files.items():
                    archive_file.writestr(name, data)
        else:
            for name, data in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="session")
def synthetic_omniglot(tmp_path_factory) -> Path:
    """A folder with images_background.zip and images_evaluation.zip of the synthetic Omniglot."""
    return write_synthetic_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache_in_tmp(tmp_path_factory):
    """Keep the decoded-dataset cache of the tests out of the user's ~/.cache."""
    previous = os.environ.get("FASTMETA_CACHE_DIR")
    os.environ["FASTMETA_CACHE_DIR"] = str(tmp_path_factory.mktemp("fastmeta-cache"))
    yield
    if previous is None:
        os.environ.pop("FASTMETA_CACHE_DIR", None)
    else:
        os.environ["FASTMETA_CACHE_DIR"] = previous


# The full Omniglot (the official images_background.zip and images_evaluation.zip), for
# @pytest.mark.slow tests: the folder named by FASTMETA_OMNIGLOT, skipped without it.
REAL_OMNIGLOT = Path(os.environ.get("FASTMETA_OMNIGLOT", "/nonexistent-omniglot"))
# ---------------------------------------------------------------------------------------
# End of the data fixtures.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# The gradcheck helper (every op's tests use it, tests/ops/).
# ---------------------------------------------------------------------------------------


def check_gradients(op, args, *, backend: str = "torch", fast_mode: bool = False) -> None:
    """``torch.library.opcheck`` of ``op`` on ``args``, then gradcheck and gradgradcheck in
    float64 with respect to every argument that requires grad, on ``backend``.

    On the reference backend opcheck runs all its tests; on another, all but the
    AOT-dispatch test, which compiles with dynamo (~5 s per case on 2 cores) and exercises
    torch, not the kernel. fast_mode: gradcheck's random projections of the Jacobian (still
    fails on a wrong gradient), for ops with many inputs.
    """
    from torch.library import opcheck

    import fastmeta as fm

    # opcheck tests the dispatcher's operator (``op.default``: what torch.compile and fake
    # tensors see); the gradchecks run the public op itself, the eager path a user calls.
    dispatcher_op = getattr(op, "default", op)
    with fm.use_backend(backend):
        if backend == "torch":
            opcheck(dispatcher_op, args)
        else:
            opcheck(dispatcher_op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        _gradchecks(op, args, fast_mode)


def _gradchecks(op, args, fast_mode: bool) -> None:
    from torch.autograd import gradcheck, gradgradcheck

    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    assert idx, "check_gradients needs at least one argument that requires grad"

    def f(*xs):
        full = list(args)
        for i, x in zip(idx, xs):
            full[i] = x
        return op(*full)

    inputs = [args[i] for i in idx]
    assert all(x.dtype == torch.float64 for x in inputs), "gradcheck needs float64 inputs"
    assert gradcheck(f, inputs, fast_mode=fast_mode)
    assert gradgradcheck(f, inputs, fast_mode=fast_mode)


@pytest.fixture
def gradchecks():
    """The gradcheck helper, :func:`check_gradients`."""
    return check_gradients


# Every test compares against references in true fp32: TF32 off in cuBLAS and cuDNN.
@pytest.fixture(autouse=True)
def _fp32_reference():
    """The reference in true fp32: TF32 off in cuBLAS and cuDNN (docs/benchmarks.md)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
