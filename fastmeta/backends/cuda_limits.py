"""What the ``cuda`` backend's fused MLP meta-step kernel takes: its shared-memory sizing.

One CTA per task keeps θ_s, g_s and the activations of every inner step in shared memory:
the limit is that memory (227 KiB per block on H100/H200), not a layer count; the
kernel-parameter struct also caps the depth. Both facts live in the CUDA sources
(csrc/cuda/mlp_meta_step.cuh, whose host checks them again); this module asks the built
extension for them (``mlp_meta_step_workspace_floats``, ``mlp_meta_step_max_layers``), so
that each is written once. Asking builds the extension on first use; without its CUDA
sources the kernel takes nothing.
"""

from __future__ import annotations

import functools

import torch

from fastmeta.backends import extension

# The device's opt-in shared memory per block when torch cannot say (H100/H200: 227 KiB).
CUDA_DEFAULT_SMEM_BYTES = 227 * 1024


def _cuda_ops():
    ok, reason = extension.build()
    if not ok or not hasattr(torch.ops.fastmeta_ext, "mlp_meta_step_workspace_floats"):
        raise RuntimeError(f"the CUDA sources of the extension are not built: {reason or 'built without CUDA'}")
    return torch.ops.fastmeta_ext


@functools.lru_cache(maxsize=1)
def cuda_max_layers() -> int:
    """The fused CUDA kernel's depth cap (``kMaxLayers``), asked of the extension."""
    return int(_cuda_ops().mlp_meta_step_max_layers())


def cuda_workspace_floats(layer_sizes: list[int], K: int, Q: int, steps: int) -> int:
    """Shared-memory floats per task of the CUDA kernel: asked of the extension, whose
    csrc/cuda/mlp_meta_step.cuh holds the one formula (the kernel's layout of θ_s, g_s and
    every inner step's activations)."""
    return _workspace_floats(tuple(int(n) for n in layer_sizes), int(K), int(Q), int(steps))


@functools.lru_cache(maxsize=1024)
def _workspace_floats(layer_sizes: tuple[int, ...], K: int, Q: int, steps: int) -> int:
    return int(_cuda_ops().mlp_meta_step_workspace_floats(list(layer_sizes), K, Q, steps))


def cuda_smem_limit(device=None) -> int:
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", CUDA_DEFAULT_SMEM_BYTES))


def cuda_fits(layer_sizes: list[int], K: int, Q: int, steps: int, smem_bytes: int | None = None) -> bool:
    """Whether the fused CUDA kernel takes this MLP and meta-batch shape."""
    limit = smem_bytes if smem_bytes is not None else (
        cuda_smem_limit() if torch.cuda.is_available() else CUDA_DEFAULT_SMEM_BYTES)
    try:
        if len(layer_sizes) - 1 > cuda_max_layers():
            return False
        return 4 * cuda_workspace_floats(layer_sizes, K, Q, steps) <= limit
    except RuntimeError:  # no CUDA kernel was built: it takes nothing
        return False
