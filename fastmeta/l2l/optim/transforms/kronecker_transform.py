"""KroneckerTransform: Kronecker-factored gradient transforms (Arnold et al. 2019)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .module_transform import ReshapedTransform


def kronecker_dims(param: Tensor) -> tuple[int, int]:
    """(n, m) of the factorisation: ``(out, in)`` for a weight, ``(size, 1)`` for a bias,
    ``(in channels, kh·kw)`` for a convolution kernel."""
    shape = tuple(param.shape)
    if len(shape) == 2:
        return shape
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 4:
        return shape[1], shape[2] * shape[3]
    raise ValueError(f"KroneckerTransform: parameters of {len(shape)} dims ({list(shape)}) are not supported")


class KroneckerTransform:
    """``KroneckerTransform(kronecker_cls, bias=False, psd=True)``; ``transform(param)`` is
    ``kronecker_cls(n=n, m=m, bias=bias, psd=psd)`` (see :func:`kronecker_dims`) on the
    gradient viewed as ``(-1, n, m)``."""

    def __init__(self, kronecker_cls: Callable, bias: bool = False, psd: bool = True):
        if not callable(kronecker_cls):
            raise TypeError(f"kronecker_cls must be callable, got {type(kronecker_cls).__name__}")
        self.kronecker_cls = kronecker_cls
        self.bias = bias
        self.psd = psd

    def __call__(self, param: Tensor) -> ReshapedTransform:
        n, m = kronecker_dims(param)
        transform = self.kronecker_cls(n=n, m=m, bias=self.bias, psd=self.psd)
        return ReshapedTransform(transform, (-1, n, m))
