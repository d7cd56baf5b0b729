"""Triton kernels of the ``triton`` backend, one module per op family (see registry.py)."""
