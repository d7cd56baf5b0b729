"""Triton kernels of the ``triton`` backend, one module per op family: the backend loads the
function named after each kernel of the table from its family's module
(``fastmeta/backends/optional_backends.py``)."""
