"""The CUDA kernels' logic, checked on the CPU: csrc/cuda/*.cu compiled by the host
compiler against a CPU stand-in for the CUDA runtime (tests/ops/cuda_emulation/), each CTA's
threads run as OS threads with barriers for __syncthreads.

This catches indexing, layout and algorithm errors in the CUDA sources on every CI run;
races, occupancy and the real toolchain are the GPU run's job (tests/ops/, -m gpu
and bench/gpu_check.py with compute-sanitizer). Compared with: the CPU kernels
(fused meta-step, per-task gradients) and the op modules' references (everything else).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastmeta.ops.inner_step import reference_inner_step, reference_inner_step_backward
from fastmeta.ops.task_linear import (
    reference_task_linear,
    reference_task_linear_input_grad,
    reference_task_linear_weight_grad,
)
from fastmeta.ops.task_loss import (
    reference_task_accuracy,
    reference_task_loss,
    reference_task_loss_grad,
    reference_task_loss_grad_backward,
)
from helpers import CASES, IDS, build_or_skip, make_problem

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# Test code, kept out of csrc/ so that it is neither shipped nor part of the build key.
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
L, F = ctypes.c_long, ctypes.c_float


def _split_top(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _emulated_source(path: Path) -> str:
    src = path.read_text()
    src = re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = emu_dynamic_smem;", src)

    def launch(m):
        grid, block = _split_top(m.group(2))[:2]
        return f"emu_launch(dim3({grid}), dim3({block}), [=] {{ {m.group(1)}({m.group(3)}); }});"

    return re.sub(r"(\w+)<<<(.*?)>>>\((.*?)\);", launch, src, flags=re.S)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("cuda_emulation")
    sources = [EMULATION / "harness.cpp"]
    for source in sorted((CSRC / "cuda").glob("*.cu")):  # every kernel file, one per op family
        dst = out / (source.stem + "_emulated.cpp")
        dst.write_text(_emulated_source(source))
        sources.append(dst)
    so = out / "libfastmeta_cuda_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-D__CUDACC__", "-shared", "-fPIC", f"-I{EMULATION}",
           f"-I{CSRC / 'cuda'}", f"-I{CSRC}", *map(str, sources), "-o", str(so), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(so))


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


ACT = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_emulated_cuda_meta_step_equals_cpu_kernel(lib, case):
    build_or_skip()
    sizes, act, loss, kind, steps, K, first_order = case
    T = 3
    theta, sx, sy, qx, qy, lr, _ = make_problem(sizes, act, loss, kind, steps, K, T=T)
    Q, O, P = qx.size(1), sizes[-1], theta.numel()
    losses, preds = torch.empty(T), torch.empty(T, Q, O)
    g_theta, g_lr = torch.empty(T, P), torch.empty((T, *lr.shape))
    rc = lib.run_mlp((L * len(sizes))(*sizes), len(sizes), ptr(theta), ptr(sx), ptr(sy), ptr(qx), ptr(qy), ptr(lr),
                     {"step": 0, "tensor": 1, "param": 2}[kind], steps, T, K, Q, ACT[act], int(loss == "mse"), F(0.1),
                     int(first_order), ptr(losses), ptr(preds), ptr(g_theta), ptr(g_lr), lr.numel())
    assert rc == 0
    want = torch.ops.fastmeta_ext.mlp_meta_step_with_task_gradients([theta], sizes, act, 0.1, sx, sy, qx, qy, loss, lr,
                                                                    steps, first_order, True, False)[1:5]
    for name, a, b in zip(("losses", "preds", "grad theta", "grad lr"), (losses, preds, g_theta, g_lr), want):
        assert rel(a, b) <= 2e-6, name


@pytest.mark.parametrize("kind", ["segments", "scalar", "param"])
def test_emulated_cuda_inner_step_and_backward(lib, kind):
    T, P = 3, 11
    g = torch.Generator().manual_seed(1)
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1])
    theta, lr, mask, pc, sg = {
        "segments": (torch.randn(P, generator=g), torch.rand(3, generator=g), torch.rand(P, generator=g),
                     torch.rand(P, generator=g), seg),
        "scalar": (torch.randn(T, P, generator=g), torch.rand((), generator=g), None, None, None),
        "param": (torch.randn(T, P, generator=g), torch.rand(P, generator=g), None, torch.rand(P, generator=g), None),
    }[kind]
    grad, go = torch.randn(T, P, generator=g), torch.randn(T, P, generator=g)
    out = torch.empty(T, P)
    scalar, shared = int(lr.dim() == 0), theta.dim() == 1
    lib.run_inner_step(ptr(theta), int(shared), ptr(grad), ptr(lr), ptr(sg), ptr(mask), ptr(pc), scalar, L(T), L(P),
                       ptr(out))
    assert rel(out, reference_inner_step(theta, grad, lr, mask, pc, sg)) <= 1e-6
    needs = [True, True, True, mask is not None, pc is not None]
    outs = [torch.empty(P) if shared else torch.empty(T, P), torch.empty(T, P), torch.zeros(lr.shape),
            torch.empty(P) if needs[3] else None, torch.empty(P) if needs[4] else None]
    S = 1 if scalar else lr.size(0)
    lib.run_inner_step_backward(ptr(go), ptr(grad), ptr(lr), ptr(sg), ptr(mask), ptr(pc), scalar, L(T), L(P), L(S),
                                int(shared), *map(ptr, outs), int(scalar or sg is not None))
    for o, r, n in zip(outs, reference_inner_step_backward(go, grad, lr, mask, pc, sg, shared, needs), needs):
        if n:
            assert rel(o, r) <= 1e-6


@pytest.mark.parametrize("act", list(ACT))
def test_emulated_cuda_task_linear_family(lib, act):
    T, N, I, O = 3, 7, 19, 37  # tails of the 32×32 tiles and the 8-deep K slices
    g = torch.Generator().manual_seed(2)
    x, go = torch.randn(T, N, I, generator=g), torch.randn(T, N, O, generator=g)
    for shared in (False, True):
        w = torch.randn(O, I, generator=g) if shared else torch.randn(T, O, I, generator=g)
        b = torch.randn(T, O, generator=g)
        y = torch.empty(T, N, O)
        lib.run_gemm(L(T), L(N), L(O), L(I), ptr(x), L(N * I), L(I), L(1), ptr(w), L(0 if shared else O * I), L(1),
                     L(I), ptr(y), ptr(b), L(O), ACT[act], F(0.1))
        assert rel(y, reference_task_linear(x, w, b, act, 0.1)) <= 1e-6
        dx = torch.empty(T, N, I)
        lib.run_gemm(L(T), L(N), L(I), L(O), ptr(go), L(N * O), L(O), L(1), ptr(w), L(0 if shared else O * I), L(I),
                     L(1), ptr(dx), ptr(None), L(0), 0, F(0))
        assert rel(dx, reference_task_linear_input_grad(go, w)) <= 1e-6
    dw = torch.empty(T, O, I)
    lib.run_gemm(L(T), L(O), L(I), L(N), ptr(go), L(N * O), L(1), L(O), ptr(x), L(N * I), L(I), L(1), ptr(dw),
                 ptr(None), L(0), 0, F(0))
    assert rel(dw, reference_task_linear_weight_grad(go, x, False)) <= 1e-6
    dws = torch.empty(O, I)
    lib.run_gemm(L(1), L(O), L(I), L(T * N), ptr(go), L(0), L(1), L(O), ptr(x), L(0), L(I), L(1), ptr(dws), ptr(None),
                 L(0), 0, F(0))
    assert rel(dws, reference_task_linear_weight_grad(go, x, True)) <= 1e-6
    # The double backward's d grad_out = g_dx·wᵀ + x·g_dwᵀ as one GEMM of two terms (K2),
    # with d x = grad_out·g_dw and d w = grad_outᵀ·g_dx in the same launch (grid z: the
    # three GEMMs' batches in turn).
    w, g_dx, g_dw = torch.randn(T, O, I, generator=g), torch.randn(T, N, I, generator=g), torch.randn(O, I, generator=g)
    d_go, d_x, d_w = torch.empty(T, N, O), torch.empty(T, N, I), torch.empty(O, I)
    expected = reference_task_linear(g_dx, w, None, "none", 0.0) + reference_task_linear(x, g_dw, None, "none", 0.0)
    group = [  # (spec, pointers) per GEMM: run_gemm_group's layout
        ((T, N, O, I, N * I, I, 1, O * I, 1, I, I, N * I, I, 1, 0, 1, I), (g_dx, w, d_go, None, x, g_dw)),
        ((T, N, I, O, N * O, O, 1, 0, I, 1, 0, 0, 0, 0, 0, 0, 0), (go, g_dw, d_x, None, None, None)),
        ((1, O, I, T * N, 0, 1, O, 0, I, 1, 0, 0, 0, 0, 0, 0, 0), (go, g_dx, d_w, None, None, None)),
    ]
    for count in (1, 3):  # d grad_out alone, and the three together
        d_go.fill_(float("nan"))
        run_gemm_group(lib, group[:count])
        assert rel(d_go, expected) <= 1e-6
    assert rel(d_x, reference_task_linear_input_grad(go, g_dw)) <= 1e-6
    assert rel(d_w, reference_task_linear_weight_grad(go, g_dx, True)) <= 1e-6
    # The backward's addends, read in the epilogue: dx + dx_addend, dw + dw_addend (per task
    # and shared), with no add of their own.
    add_x, add_w, add_ws = torch.randn(T, N, I, generator=g), torch.randn(T, O, I, generator=g), torch.randn(O, I, generator=g)
    dx = torch.empty(T, N, I)
    lib.run_gemm_with_addend(L(T), L(N), L(I), L(O), ptr(go), L(N * O), L(O), L(1), ptr(w), L(O * I), L(I), L(1),
                             ptr(dx), ptr(add_x))
    assert rel(dx, reference_task_linear_input_grad(go, w) + add_x) <= 1e-6
    dw = torch.empty(T, O, I)
    lib.run_gemm_with_addend(L(T), L(O), L(I), L(N), ptr(go), L(N * O), L(1), L(O), ptr(x), L(N * I), L(I), L(1),
                             ptr(dw), ptr(add_w))
    assert rel(dw, reference_task_linear_weight_grad(go, x, False) + add_w) <= 1e-6
    dws = torch.empty(O, I)
    lib.run_gemm_with_addend(L(1), L(O), L(I), L(T * N), ptr(go), L(0), L(1), L(O), ptr(x), L(0), L(I), L(1), ptr(dws),
                             ptr(add_ws))
    assert rel(dws, reference_task_linear_weight_grad(go, x, True) + add_ws) <= 1e-6
    # The backward's dx and dw in one launch: grid z the first's batches, then the second's
    # (per-task dw), or one batch (shared dw: the tasks merged into K); x and y the larger.
    for shared in (False, True):
        dx, dw = torch.empty(T, N, I), torch.empty(O, I) if shared else torch.empty(T, O, I)
        dw_spec = ((1, O, I, T * N, 0, 1, O, 0, I, 1) if shared else (T, O, I, N, N * O, 1, O, N * I, I, 1))
        run_gemm_group(lib, [
            ((T, N, I, O, N * O, O, 1, O * I, I, 1) + (0,) * 7, (go, w, dx, add_x, None, None)),
            (dw_spec + (0,) * 7, (go, x, dw, add_ws if shared else add_w, None, None))])
        assert rel(dx, reference_task_linear_input_grad(go, w) + add_x) <= 1e-6
        assert rel(dw, reference_task_linear_weight_grad(go, x, shared) + (add_ws if shared else add_w)) <= 1e-6


def run_gemm_group(lib, gemms):
    """The harness's run_gemm_group: ``gemms`` a list of (17 sizes and strides, 6 tensors or
    None), as harness.cpp lays them out, in one launch."""
    spec = (ctypes.c_long * (17 * len(gemms)))(*[v for s, _ in gemms for v in s])
    pointers = (ctypes.c_void_p * (6 * len(gemms)))(*[ptr(t) for _, ts in gemms for t in ts])
    lib.run_gemm_group(len(gemms), spec, pointers)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_emulated_cuda_task_loss_and_grad(lib, kind):
    T, N, C = 3, 7, 5
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(T, N, C, generator=g) * 3
    target = torch.randint(0, C, (T, N), generator=g) if kind == "cross_entropy" else torch.randn(T, N, C, generator=g)
    code, classes = (0, C) if kind == "cross_entropy" else (1, 1)
    out = torch.empty(T)
    lib.run_loss(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(out), 0)
    assert rel(out, reference_task_loss(pred, target, kind)) <= 1e-6
    grad = torch.empty(T, N, C)
    lib.run_loss(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(grad), 1)
    assert rel(grad, reference_task_loss_grad(pred, target, kind)) <= 1e-6
    # Each task's gradient times its scale (task_loss's upstream, handed to the kernel by its
    # backward): a [T] at stride 1, and an expanded scalar at stride 0.
    for scale, stride in ((torch.randn(T, generator=g), 1), (torch.full((1,), -0.25), 0)):
        scaled = torch.empty(T, N, C)
        lib.run_loss_grad_scaled(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(scale),
                                 L(stride), ptr(scaled))
        assert rel(scaled, reference_task_loss_grad(pred, target, kind, scale.expand(T))) <= 1e-6
    upstream = torch.randn(T, N, C, generator=g)
    d_pred = torch.empty(T, N, C)
    lib.run_loss_grad_backward(ptr(upstream), ptr(pred), code, L(T), L(N), L(classes), L(N * C), ptr(d_pred))
    assert rel(d_pred, reference_task_loss_grad_backward(upstream, pred, target, kind)) <= 1e-6


def test_emulated_cuda_task_linear_bias_gradient(lib):
    """The bias's gradient as a GEMM with a null A (read as ones): db = 1ᵀ·grad_out per task
    (M = 1, K = N) and shared (one batch, K = T·N); in the pair's launch beside dx and dw.
    The double backward's g_db as d grad_out's epilogue bias: with both product terms, and
    alone (K = 0), per task at a task stride wider than O, and shared."""
    T, N, I, O = 3, 7, 19, 37
    g = torch.Generator().manual_seed(4)
    x, go, w = torch.randn(T, N, I, generator=g), torch.randn(T, N, O, generator=g), torch.randn(T, O, I, generator=g)
    db, dbs = torch.empty(T, O), torch.empty(O)
    lib.run_gemm(L(T), L(1), L(O), L(N), ptr(None), L(0), L(0), L(0), ptr(go), L(N * O), L(O), L(1), ptr(db),
                 ptr(None), L(0), 0, F(0))
    assert rel(db, go.sum(1)) <= 1e-6
    lib.run_gemm(L(1), L(1), L(O), L(T * N), ptr(None), L(0), L(0), L(0), ptr(go), L(0), L(O), L(1), ptr(dbs),
                 ptr(None), L(0), 0, F(0))
    assert rel(dbs, go.sum((0, 1))) <= 1e-6
    dx, dw = torch.empty(T, N, I), torch.empty(T, O, I)
    db.fill_(float("nan"))
    run_gemm_group(lib, [
        ((T, N, I, O, N * O, O, 1, O * I, I, 1) + (0,) * 7, (go, w, dx, None, None, None)),
        ((T, O, I, N, N * O, 1, O, N * I, I, 1) + (0,) * 7, (go, x, dw, None, None, None)),
        ((T, 1, O, N, 0, 0, 0, N * O, O, 1) + (0,) * 7, (None, go, db, None, None, None))])
    assert rel(dx, reference_task_linear_input_grad(go, w)) <= 1e-6
    assert rel(dw, reference_task_linear_weight_grad(go, x, False)) <= 1e-6
    assert rel(db, go.sum(1)) <= 1e-6
    g_dx, g_dw = torch.randn(T, N, I, generator=g), torch.randn(T, O, I, generator=g)
    flat = torch.randn(T, O + 5, generator=g)
    for g_db, bias_b in ((flat[:, 2:2 + O], O + 5), (torch.randn(O, generator=g), 0)):
        bias = g_db if g_db.dim() == 1 else g_db.unsqueeze(1)
        products = reference_task_linear(g_dx, w, None, "none", 0.0) + reference_task_linear(x, g_dw, None, "none", 0.0)
        d_go = torch.full((T, N, O), float("nan"))
        spec = (ctypes.c_long * 17)(T, N, O, I, N * I, I, 1, O * I, 1, I, I, N * I, I, 1, O * I, 1, I)
        pointers = (ctypes.c_void_p * 6)(*[ptr(t) for t in (g_dx, w, d_go, None, x, g_dw)])
        lib.run_gemm_two_terms_with_bias(spec, pointers, ctypes.c_void_p(g_db.data_ptr()), L(bias_b))
        assert rel(d_go, products + bias) <= 1e-6
        d_go.fill_(float("nan"))
        spec = (ctypes.c_long * 17)(T, N, O, 0, *(0,) * 13)
        pointers = (ctypes.c_void_p * 6)(*[ptr(t) for t in (None, go, d_go, None, None, None)])
        lib.run_gemm_two_terms_with_bias(spec, pointers, ctypes.c_void_p(g_db.data_ptr()), L(bias_b))
        assert torch.equal(d_go, bias.expand(T, N, O))


def test_emulated_cuda_task_accuracy(lib):
    """One block per task: the first largest logit (a NaN the largest), a hit at the label;
    ties, NaN and ±inf rows, labels out of range; N above the block's 256 threads."""
    g = torch.Generator().manual_seed(5)
    for T, N, C in ((3, 7, 5), (2, 300, 3), (4, 9, 1)):
        pred = torch.randint(0, 3, (T, N, C), generator=g).float()  # many ties
        pred[0, 0, C - 1] = float("nan")
        pred[0, 1] = float("-inf")
        pred[T - 1, N - 1, 0] = float("inf")
        target = torch.randint(0, C, (T, N), generator=g)
        target[1, 0] = -1
        target[1, 1] = C
        out = torch.empty(T)
        lib.run_accuracy(ptr(pred), ptr(target), L(T), L(N), L(C), ptr(out))
        assert torch.equal(out, reference_task_accuracy(pred, target))


def test_emulated_cuda_task_loss_and_accuracy(lib):
    """task_loss_kernel writing the accuracy beside the loss (task_loss_and_accuracy): both
    equal the two kernels' own results bit for bit (the same sums in the same order), on
    ties, NaN and ±inf rows and N above the block's 256 threads."""
    g = torch.Generator().manual_seed(6)
    for T, N, C in ((3, 7, 5), (2, 300, 3), (4, 9, 1)):
        pred = torch.randint(0, 3, (T, N, C), generator=g).float() + torch.rand(T, N, C, generator=g) * (C > 1)
        pred[0, 0, C - 1] = float("nan")
        pred[T - 1, N - 1, 0] = float("inf")
        target = torch.randint(0, C, (T, N), generator=g)
        loss, accuracy, alone_loss, alone_accuracy = (torch.empty(T) for _ in range(4))
        lib.run_loss_and_accuracy(ptr(pred), ptr(target), L(T), L(N), L(C), ptr(loss), ptr(accuracy))
        lib.run_loss(ptr(pred), ptr(target), 0, L(T), L(N), L(C), L(N * C), ptr(alone_loss), 0)
        lib.run_accuracy(ptr(pred), ptr(target), L(T), L(N), L(C), ptr(alone_accuracy))
        assert torch.equal(accuracy, alone_accuracy) and torch.equal(accuracy, reference_task_accuracy(pred, target))
        assert torch.equal(loss.isnan(), alone_loss.isnan()) and torch.equal(loss.nan_to_num(), alone_loss.nan_to_num())
        finite = torch.isfinite(reference_task_loss(pred, target, "cross_entropy"))
        assert rel(loss[finite], reference_task_loss(pred, target, "cross_entropy")[finite]) <= 1e-6


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_emulated_cuda_task_loss_and_grad_in_one_launch(lib, kind):
    """task_loss_and_grad_kernel: the loss as task_loss_kernel sums it and the gradient as
    task_loss_grad_kernel writes it, bit for bit; a label out of range: NaN loss and row."""
    g = torch.Generator().manual_seed(7)
    for T, N, C in ((3, 7, 5), (2, 300, 3)):
        pred = torch.randn(T, N, C, generator=g) * 3
        if kind == "cross_entropy":
            target = torch.randint(0, C, (T, N), generator=g)
            code, classes = 0, C
        else:
            target = torch.randn(T, N, C, generator=g)
            code, classes = 1, 1
        loss, grad = torch.empty(T), torch.empty(T, N, C)
        alone_loss, alone_grad = torch.empty(T), torch.empty(T, N, C)
        lib.run_loss_and_grad(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(loss), ptr(grad))
        lib.run_loss(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(alone_loss), 0)
        lib.run_loss(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(alone_grad), 1)
        assert torch.equal(loss, alone_loss) and torch.equal(grad, alone_grad)
        assert rel(loss, reference_task_loss(pred, target, kind)) <= 1e-6
        assert rel(grad, reference_task_loss_grad(pred, target, kind)) <= 1e-6
    if kind == "cross_entropy":
        target[1, 2] = C
        lib.run_loss_and_grad(ptr(pred), ptr(target), code, L(T), L(N), L(classes), L(N * C), ptr(loss), ptr(grad))
        assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and torch.isnan(grad[1, 2]).all()
        assert torch.isfinite(grad[1, 3]).all()
