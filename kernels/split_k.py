"""Split-K in one launch: the last K range of each tile to finish sums the partial tiles.

A launch that splits K (kernels/tiles.py: fewer busy programs than two waves of the SMs)
computes each output tile as ``SPLIT_K`` partial tiles, one per K range. Until now the
partial tiles went to a buffer ``[SPLIT_K, *out]`` and a second launch (``torch.sum`` over
the split dimension) added them: one more kernel per split launch, 19 of a captured W2
iteration's and 119 of W4's (``python -m fastmeta.tools.launches --as-verified``).

In one pass (``ONE_PASS``) every program still stores its partial tile, then takes a
ticket from its tile's counter (an atomic add, acquire-release at GPU scope, after a
barrier so that every thread's stores precede it). The program that draws the last ticket
reads the ``SPLIT_K`` partial tiles **in split order** (0, 1, …; L1 bypassed), writes their
sum to the output and sets the counter back to zero. The sum's order does not depend on
which program came last, so the result is deterministic, as the second pass was (and
unlike an atomic accumulation of floats).

The counters (:func:`tile_counters`) are one int32 per (tile, batch entry, phase) of the
launch, from a zeroed buffer kept per device and stream (two streams never share one, so
concurrent launches cannot mix their tickets). Every launch leaves its counters at zero,
so the buffer is zeroed once, when it is made: on the first split launch of a stream (in
a CUDA graph capture, that zeroing is one node of the graph). A launch that needs more
counters than the buffer has (:data:`COUNTERS`) takes the two-pass route.

Where it runs: on CUDA only once the GPU check has verified it (the verification record's
kernel :data:`ONE_PASS_KERNEL` for the ``triton`` backend: a protocol of
kernels/verified_protocols.py), so an unverified memory-ordering protocol never runs on a
user's GPU; under the interpreter (the tests, where programs run one after another) always,
unless a test chooses with :func:`one_pass_split_k`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmeta.kernels import verified_protocols

ONE_PASS_KERNEL = "split_k_one_pass"  # its name in the verification record (backend "triton", device "cuda")
COUNTERS = 1 << 16  # tile counters per device and stream (256 KiB): W4's largest split launch needs ~300

_counters: dict[tuple, torch.Tensor] = {}


def one_pass_split_k(enabled: bool):
    """Within: every split launch takes one pass (True) or two (False), on any device. For
    tests of both routes."""
    return verified_protocols.forced(ONE_PASS_KERNEL, enabled)


def one_pass(device: torch.device) -> bool:
    """Whether a split launch on ``device`` sums its partial tiles in its own epilogue."""
    return verified_protocols.in_force(ONE_PASS_KERNEL, device)


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device(),
                torch.cuda.current_stream(device).cuda_stream)
    return (device.type, device.index, 0)


def tile_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The zeroed counters of ``device``'s current stream (made, and zeroed, on first use;
    never freed: a captured graph keeps their address), or None where a launch needs more
    than :data:`COUNTERS` (it then takes two passes)."""
    if needed > COUNTERS:
        return None
    key = _stream_key(device)
    counters = _counters.get(key)
    if counters is None:
        counters = _counters[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return counters


def forget_counters() -> None:
    """Drop the cached counters (the launch recorder: each recorded step is counted as a
    first capture, which makes and zeroes its stream's counters)."""
    _counters.clear()


def split_reduction(device: torch.device, split_k: int, tiles: int):
    """The launch's route for its partial tiles: (one_pass, counters). one_pass is False
    (counters None) for an unsplit launch, where one pass is not in force, or where the
    launch has more tiles (counters) than the buffer."""
    (one, *_), (counters, *_) = split_reductions(device, [(split_k, tiles)])
    return one, counters


def split_reductions(device: torch.device, parts):
    """:func:`split_reduction` for the parts of one launch (each ``(split_k, tiles)``: the
    GEMMs of a grouped launch, which run at the same time): (one_pass per part, counters per
    part). The parts that split take disjoint ranges of the buffer (views starting at their
    first counter); all take one pass, or none does (too many counters in all)."""
    needed = [tiles if split_k > 1 else 0 for split_k, tiles in parts]
    none = [False] * len(needed), [None] * len(needed)
    if not any(needed) or not one_pass(device):
        return none
    counters = tile_counters(device, sum(needed))
    if counters is None:
        return none
    offsets = [sum(needed[:i]) for i in range(len(needed))]
    return [n > 0 for n in needed], [counters[o:] if n else None for n, o in zip(needed, offsets)]


@triton.jit
def store_reduced_tile(acc, partial_ptr, partial_offsets, split_stride, out_ptr, out_offsets, mask,
                       split, splits, counter_ptr):
    """This program's partial tile ``acc`` stored at ``partial_ptr + split · split_stride +
    partial_offsets``; the program that arrives last at its tile's counter (``counter_ptr``)
    writes the sum of the ``splits`` partial tiles, in split order, at ``out_ptr +
    out_offsets`` and resets the counter (module docstring)."""
    tl.store(partial_ptr + split.to(tl.int64) * split_stride + partial_offsets, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial stored before the ticket is taken
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == splits - 1:
        total = tl.zeros(acc.shape, dtype=tl.float32)
        partials = partial_ptr + partial_offsets  # advanced by split_stride: no product to overflow
        for _ in range(0, splits):
            total += tl.load(partials, mask=mask, other=0.0, cache_modifier=".cg")
            partials += split_stride
        tl.store(out_ptr + out_offsets, total, mask=mask)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def store_tile(acc, out_ptr, offsets, split_stride, final_ptr, mask, split, splits, counter_ptr,
               ONE_PASS: tl.constexpr):
    """A GEMM tile's store where the partial tiles share the output's layout (the conv
    kernels): partial tile ``split`` at ``out_ptr + split · split_stride + offsets`` (the
    output itself when the launch does not split); with ``ONE_PASS``, also the sum by the
    last K range at ``final_ptr + offsets`` (:func:`store_reduced_tile`)."""
    if ONE_PASS:
        store_reduced_tile(acc, out_ptr, offsets, split_stride, final_ptr, offsets, mask, split, splits, counter_ptr)
    else:
        tl.store(out_ptr + split.to(tl.int64) * split_stride + offsets, acc, mask=mask)
