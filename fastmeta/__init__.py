"""fastmeta: a meta-learning engine for PyTorch whose hot path runs in fused kernels."""

from fastmeta import ops
from fastmeta.backends import backends, current_backend, use_backend

__version__ = "0.1.0"
