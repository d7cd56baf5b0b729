"""Issued ÷ useful conv MACs of one second-order meta-iteration (issue 24, "Stride-2
convolutions without zero MACs"), counted from the launches the engine makes.

A conv launch's **issued** MACs are the multiply-adds its grid's programs execute: BLOCK_M ×
BLOCK_N × BLOCK_K per K-step of each program, tile padding and masked taps included. Its
**useful** MACs are the convolution's own, T·N·O·H'·W'·C·kh·kw, the same for the forward,
the input gradient and the weight gradient. Both come from
``fastmeta.kernels.task_conv2d.conv_launch_plan``, the function the launchers take their
grid and tiles from, with the tiles a GPU launch gets (``gpu_conv_config``).

The recorder runs one iteration on the CPU through the triton backend's kernel table: each
conv kernel call is planned and recorded and its value taken from the reference (so the
flow, shapes and strides are the engine's own); every other kernel declines, and its
reference runs. Counts are deterministic: pinned.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import fastmeta as fm
from fastmeta.backends import get_backend
from fastmeta.backends.table import TABLE
from fastmeta.tools.workloads import WORKLOADS

CONV_KERNELS = ("task_conv2d", "task_conv2d_input_grad", "task_conv2d_weight_grad")


@contextmanager
def recorded_conv_launches():
    """The triton backend's table with each conv kernel replaced by a recorder (plan the
    launch, keep it, return the reference's value) and every other kernel declining."""
    from fastmeta.kernels.task_conv2d import conv_launch_plan, gpu_conv_config

    backend = get_backend("triton")
    if not backend.available()[0] or "cpu" not in backend.device_types():
        pytest.skip("the triton backend needs TRITON_INTERPRET=1 to take CPU tensors")
    backend.kernel("inner_step")  # loads the backend's table
    original = dict(backend.kernels)
    launches = []

    def recorder(name):
        def run(*args):
            launch = conv_launch_plan(name, *args, config_for=gpu_conv_config)
            if launch is None:
                return NotImplemented
            launches.append(launch)
            return TABLE[name].reference(*args)

        return run

    backend.kernels.update({name: (recorder(name) if name in CONV_KERNELS else (lambda *a: NotImplemented))
                            for name in original})
    try:
        with fm.use_backend("triton"):
            yield launches
    finally:
        backend.kernels.clear()
        backend.kernels.update(original)


def iteration_launches(workload_name: str, tasks: int | None = None):
    """The conv launches of one second-order meta-iteration of the workload (its own shapes)."""
    workload = WORKLOADS[workload_name]
    if tasks is not None:
        workload = workload.replace(tasks=tasks)
    torch.manual_seed(0)
    meta = fm.MAML(workload.build_model(), lr=workload.inner_lr, first_order=False, steps=workload.steps,
                   loss=workload.loss)
    batch = workload.make_batch("cpu", 0)
    with recorded_conv_launches() as launches:
        meta.meta_batch(*batch).loss.backward()
    return list(launches)


def summary(launches):
    issued = sum(l.issued_macs for l in launches)
    useful = sum(l.useful_macs for l in launches)
    by_kernel = {}
    for l in launches:
        n, i, u = by_kernel.get(l.kernel, (0, 0, 0))
        by_kernel[l.kernel] = (n + 1, i + l.issued_macs, u + l.useful_macs)
    return issued, useful, by_kernel


if __name__ == "__main__":
    import os
    import sys
    import time

    os.environ.setdefault("TRITON_INTERPRET", "1")
    for name in sys.argv[1:] or ["W2", "W4"]:
        start = time.perf_counter()
        issued, useful, by_kernel = summary(iteration_launches(name))
        print(f"{name}: {sum(n for n, _, _ in by_kernel.values())} conv launches, issued {issued / 1e9:.3f} G, "
              f"useful {useful / 1e9:.3f} G MACs, issued/useful {issued / useful:.4f} "
              f"({time.perf_counter() - start:.1f} s)")
        for kernel, (n, i, u) in sorted(by_kernel.items()):
            print(f"  {kernel:<12} {n:>3} launches  issued {i / 1e9:8.3f} G  useful {u / 1e9:8.3f} G  ratio {i / u:.3f}")
