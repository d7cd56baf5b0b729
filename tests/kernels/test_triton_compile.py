"""Every triton kernel compiles for a real GPU (sm_90 PTX and cubin), even on a CPU-only
machine.

The interpreter (TRITON_INTERPRET=1, the CPU tier) executes kernels as numpy and never
runs Triton's compiler, so it cannot see compile-only errors: a value whose type differs
between the branches of an ``if``, a loop-carried variable that changes type, a dot whose
tile is below 16, an API missing from the compiler. This test compiles each kernel ahead
of time for ``GPUTarget("cuda", 90, 32)`` (H100/H200) with the constexpr combinations the
launchers use. It needs no GPU, only Triton's bundled ptxas; it runs in a subprocess
because the test session has the interpreter switched on, which turns every
``@triton.jit`` function into an interpreted one at import.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

# ---------------------------------------------------------------------------------------
# What to compile: kernel → (argument types that are not fp32 pointers / i32, constexpr
# combinations). Pointers named in INT64_POINTERS hold int64; scalars in FLOAT_SCALARS are
# fp32; every other non-constexpr scalar is i32 (strides, sizes).
# ---------------------------------------------------------------------------------------

INT64_POINTERS = {"segments_ptr", "target_ptr", "indices_ptr"}
INT32_POINTERS = {"counters_ptr", "dx_counters_ptr", "dw_counters_ptr"}  # split-K's tile counters (kernels/split_k.py)
FLOAT_SCALARS = {"eps", "negative_slope", "grad_scale"}


def _grid(**options):
    """Every combination of the given constexpr values, as dicts."""
    names = list(options)
    return [dict(zip(names, values)) for values in itertools.product(*options.values())]


def compile_plan():
    from fastmeta.kernels import activation, inner_step, max_pool2d, task_batch_norm, task_conv2d, task_linear, task_loss

    # Every matmul precision (fastmeta.backends.precision): tf32x3 and tf32 lower to tensor-core MMAs.
    precisions = ["ieee", "tf32x3", "tf32"]
    gemm = dict(BLOCK_M=[64], BLOCK_N=[64], BLOCK_K=[32], INPUT_PRECISION=precisions)
    return [
        (inner_step.inner_step_kernel, _grid(LR_MODE=[0, 1, 2], HAS_MASK=[True], HAS_PRECOND=[True],
                                             BLOCK_P=[1024], TASKS_PER_PROGRAM=[4])),
        (inner_step.inner_step_backward_kernel,
         _grid(LR_MODE=[0, 1, 2], HAS_MASK=[True], HAS_PRECOND=[True], THETA_SHARED=[False, True],
               NEED_THETA=[True], NEED_GRAD=[True], NEED_LR=[True], NEED_MASK=[True], NEED_PRECOND=[True],
               NEED_OUTER=[True], BLOCK_P=[512])),
        (activation.activation_grad_kernel, _grid(ACT=[0, 1, 2, 3, 4], BLOCK=[4096])),
        # The smallest tile (16 on every side: tl.dot's minimum) and the largest.
        # ONE_PASS: split-K summed in the launch's own epilogue (kernels/split_k.py).
        (task_linear.task_matmul_kernel,
         _grid(HAS_BIAS=[False, True], ACT=[0, 3], BLOCK_M=[16, 64], BLOCK_N=[16, 64], BLOCK_K=[16, 32],
               INPUT_PRECISION=precisions, ONE_PASS=[False, True], HAS_ADDEND=[False, True])[::3]),
        # A_ONES: the bias's gradient, 1ᵀ·grad_out (a one-row tile of ones, never loaded).
        (task_linear.task_matmul_kernel,
         _grid(HAS_BIAS=[False], ACT=[0], BLOCK_M=[16], BLOCK_N=[16, 64], BLOCK_K=[16, 32],
               INPUT_PRECISION=precisions, ONE_PASS=[False, True], A_ONES=[True])),
        (task_conv2d.conv2d_forward_kernel, _grid(KH=[3], KW=[3], HAS_BIAS=[False, True], ONE_PASS=[False, True],
                                                  TWO_TERMS=[False, True], **gemm)),
        (task_conv2d.conv2d_input_grad_kernel, _grid(KH=[3], KW=[3], ONE_PASS=[False, True], **gemm)),
        (task_conv2d.conv2d_weight_grad_kernel, _grid(KH=[3], KW=[3], ONE_PASS=[False, True], **gemm)),
        # The backward's launches in one (two or three GEMMs, each with its own tiles): the
        # parts' tiles differ, as the plans make them; every subset of parts a call makes.
        (task_conv2d.conv2d_grads_kernel,
         [dict(c, FWD_BLOCK_M=32, FWD_BLOCK_N=64, FWD_BLOCK_K=32, DX_BLOCK_M=64, DX_BLOCK_N=32, DX_BLOCK_K=32,
               DW_BLOCK_M=32, DW_BLOCK_N=128, DW_BLOCK_K=64, HAS_FORWARD=parts != "dx+dw",
               HAS_INPUT_GRAD=parts != "fwd+dw", HAS_WEIGHT_GRAD=parts != "fwd+dx", TWO_TERMS=parts == "all")
          for parts in ("dx+dw", "all", "fwd+dx", "fwd+dw")
          for c in _grid(KH=[3], KW=[3], INPUT_PRECISION=precisions, DX_ADDEND=[parts == "dx+dw"],
                         DW_ADDEND=[parts == "dx+dw"], FWD_ONE_PASS=[True], DX_ONE_PASS=[False, True],
                         DW_ONE_PASS=[True])[::2]]),
        # POOL: task_batch_norm_max_pool2d's max pooling in the forward's write pass
        # (kernels/task_batch_norm_max_pool2d.py), and the pooled gradient gathered below.
        (task_batch_norm.task_batch_norm_kernel,
         _grid(HAS_GAMMA=[False, True], HAS_BETA=[True], ACT=[0, 3], BLOCK=[2048])
         + _grid(HAS_GAMMA=[True], HAS_BETA=[True], ACT=[0, 1], BLOCK=[2048], POOL=[2, 3])[::3]),
        # Without y (act none), and with relu's / leaky_relu's mask fused (HAS_Y).
        (task_batch_norm.task_batch_norm_backward_kernel,
         [dict(c, HAS_Y=act != 0, ACT=act) for c in _grid(HAS_GAMMA=[False, True], NEED_X=[True], NEED_GAMMA=[True],
                                                         NEED_BETA=[True], BLOCK=[2048]) for act in (0, 1, 2)]
         + [dict(HAS_GAMMA=True, NEED_X=True, NEED_GAMMA=True, NEED_BETA=True, BLOCK=2048, HAS_Y=act != 0, ACT=act,
                 HAS_DX_ADDEND=True, HAS_DGAMMA_ADDEND=True, POOL=2) for act in (0, 1)]),
        (task_batch_norm.task_batch_norm_double_backward_kernel,
         [dict(c, HAS_Y=act != 0, ACT=act) for c in _grid(
             HAS_GAMMA=[True], HAS_UP_X=[False, True], HAS_UP_GAMMA=[True], HAS_UP_BETA=[True], NEED_GRAD_Z=[True],
             NEED_X=[True], NEED_GAMMA=[True], GRAD_SUMS=[True], WRITE=[True], BLOCK=[2048]) for act in (0, 1, 2)]
         + [dict(HAS_GAMMA=True, HAS_UP_X=True, HAS_UP_GAMMA=True, HAS_UP_BETA=True, NEED_GRAD_Z=True, NEED_X=True,
                 NEED_GAMMA=True, GRAD_SUMS=True, WRITE=True, BLOCK=2048, HAS_Y=act != 0, ACT=act, POOL=2)
            for act in (0, 1)]),
        # HAS_SCALE: task_loss_grad's per-task scale (task_loss's upstream, from its backward).
        # WRITE_ACCURACY: task_loss_and_accuracy (the query's loss and accuracy in one launch).
        (task_loss.cross_entropy_kernel,
         _grid(WRITE_LOSS=[True, False], WRITE_GRAD=[True, False], HAS_SCALE=[False], WRITE_ACCURACY=[False],
               BLOCK_N=[64], BLOCK_K=[32])[:3]
         + [dict(WRITE_LOSS=False, WRITE_GRAD=True, HAS_SCALE=True, WRITE_ACCURACY=False, BLOCK_N=64, BLOCK_K=32),
            dict(WRITE_LOSS=True, WRITE_GRAD=False, HAS_SCALE=False, WRITE_ACCURACY=True, BLOCK_N=64, BLOCK_K=32)]),
        (task_loss.mse_kernel, _grid(WRITE_LOSS=[True, False], WRITE_GRAD=[False, True], HAS_SCALE=[False],
                                     BLOCK=[4096])[1:3]
         + [dict(WRITE_LOSS=False, WRITE_GRAD=True, HAS_SCALE=True, BLOCK=4096)]),
        (task_loss.accuracy_kernel, _grid(BLOCK_N=[1, 64], BLOCK_K=[16, 32])),
        (max_pool2d.max_pool2d_kernel, _grid(KH=[2, 3], KW=[2, 3], BLOCK=[1024])[::3]),
        (max_pool2d.max_pool2d_backward_kernel, [dict(KH=2, KW=2, COVER_H=1, COVER_W=1, BLOCK=1024),
                                                 dict(KH=3, KW=3, COVER_H=2, COVER_W=2, BLOCK=1024)]),
        (max_pool2d.max_pool2d_double_backward_kernel, [dict(BLOCK=1024)]),
    ]


def _signature(kernel, constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INT64_POINTERS else "*i32" if name in INT32_POINTERS else "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def check_one_pass_ptx(name: str, ptx: str) -> None:
    """Split-K in one pass lowers as kernels/split_k.py needs it: the ticket an atomic add
    with acquire-release semantics at GPU scope, after a CTA barrier; the partial tiles
    read back with L1 bypassed (``.cg``); the counter reset by an atomic exchange."""
    atomics = [line for line in ptx.splitlines() if "atom." in line]
    assert any(all(part in line for part in (".global", ".gpu", ".acq_rel", ".add")) for line in atomics), \
        f"{name}: no acquire-release GPU-scope atomic add: {atomics}"
    assert any(".exch" in line for line in atomics), f"{name}: no atomic exchange: {atomics}"
    assert "bar.sync" in ptx, f"{name}: no barrier"
    assert "ld.global.cg" in ptx, f"{name}: the partial tiles are not loaded with .cg"


def compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    compiled = 0
    for kernel, combos in compile_plan():
        for constexprs in combos:
            # A constexpr left out takes its default, as a launch that does not pass it.
            constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default},
                          **constexprs}
            source = ASTSource(fn=kernel, signature=_signature(kernel, constexprs), constexprs=constexprs)
            try:
                binary = triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 3})
            except Exception as exc:
                raise SystemExit(f"{kernel.fn.__name__} {constexprs}: {type(exc).__name__}: {exc}")
            assert binary.asm["cubin"], kernel.fn.__name__
            if any(constexprs.get(name) for name in ("ONE_PASS", "FWD_ONE_PASS", "DX_ONE_PASS", "DW_ONE_PASS")):
                check_one_pass_ptx(kernel.fn.__name__, binary.asm["ptx"])
            compiled += 1
    check_group_shared_memory(target)
    print(f"compiled {compiled} kernel variants for sm_90")
    return compiled


def check_group_shared_memory(target) -> None:
    """The backward's launches in one (conv2d_grads_kernel) need no more shared memory than
    the largest of its parts at the same tiles and stages: the compiler reuses one part's
    buffers for the next's (one part's code runs in a program), so a group never fails to
    launch where its parts would not (kernels/task_conv2d.py, ConvLaunchGroup: stages the
    fewest of the parts')."""
    import triton
    from triton.compiler import ASTSource

    from fastmeta.kernels import task_conv2d

    def shared(kernel, constexprs):
        source = ASTSource(fn=kernel, signature=_signature(kernel, constexprs), constexprs=constexprs)
        return triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 3}).metadata.shared

    fwd_tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    dx_tiles, dw_tiles = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)
    common = dict(KH=3, KW=3, INPUT_PRECISION="ieee", ONE_PASS=True)
    parts = max(shared(task_conv2d.conv2d_forward_kernel, {**common, **fwd_tiles, "HAS_BIAS": False, "TWO_TERMS": True}),
                shared(task_conv2d.conv2d_input_grad_kernel, {**common, **dx_tiles, "HAS_ADDEND": False}),
                shared(task_conv2d.conv2d_weight_grad_kernel, {**common, **dw_tiles, "HAS_ADDEND": False}))
    group = shared(task_conv2d.conv2d_grads_kernel, dict(
        KH=3, KW=3, INPUT_PRECISION="ieee", HAS_FORWARD=True, HAS_INPUT_GRAD=True, HAS_WEIGHT_GRAD=True,
        TWO_TERMS=True, DX_ADDEND=False, DW_ADDEND=False, FWD_ONE_PASS=True, DX_ONE_PASS=True, DW_ONE_PASS=True,
        **{f"{prefix}_{k}": v for prefix, tiles in (("FWD", fwd_tiles), ("DX", dx_tiles), ("DW", dw_tiles))
           for k, v in tiles.items()}))
    assert 0 < group <= parts, f"conv2d_grads_kernel takes {group} B of shared memory, its parts at most {parts} B"
    # A group takes the most warps of its parts: a part with the smallest tiles runs with the
    # warps of one with the largest, at every precision (the tensor-core ones included).
    for precision in ("ieee", "tf32x3", "tf32"):
        constexprs = dict(
            KH=3, KW=3, INPUT_PRECISION=precision, HAS_FORWARD=True, HAS_INPUT_GRAD=True, HAS_WEIGHT_GRAD=True,
            TWO_TERMS=True, DX_ADDEND=False, DW_ADDEND=False, FWD_ONE_PASS=True, DX_ONE_PASS=True, DW_ONE_PASS=True,
            FWD_BLOCK_M=16, FWD_BLOCK_N=16, FWD_BLOCK_K=16, DX_BLOCK_M=128, DX_BLOCK_N=128, DX_BLOCK_K=32,
            DW_BLOCK_M=16, DW_BLOCK_N=64, DW_BLOCK_K=64)
        source = ASTSource(fn=task_conv2d.conv2d_grads_kernel,
                           signature=_signature(task_conv2d.conv2d_grads_kernel, constexprs), constexprs=constexprs)
        assert triton.compile(source, target=target, options={"num_warps": 8, "num_stages": 2}).asm["cubin"]


def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in (proc.stderr + proc.stdout) and "not found" in (proc.stderr + proc.stdout):
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled" in proc.stdout


if __name__ == "__main__":
    compile_all()
