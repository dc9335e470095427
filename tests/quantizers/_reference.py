"""Numpy references of the granularity views, written independently of ``qflax.quantizers._base``
so that the quantizer tests do not check the library against itself."""

from __future__ import annotations

import numpy as np


def view(a: np.ndarray, config) -> np.ndarray:
    """The grouped view of ``a`` for a config with ``granularity``, ``axis``, ``group_size``."""
    if config.granularity != "group":
        return a
    ax = config.axis % a.ndim
    n = a.shape[ax]
    return a.reshape(a.shape[:ax] + (n // config.group_size, config.group_size) + a.shape[ax + 1 :])


def reduce_axes(config, ndim: int) -> tuple[int, ...]:
    """The axes of the view that one parameter's statistic is taken over."""
    if config.granularity == "tensor":
        return tuple(range(ndim))
    ax = config.axis % ndim
    if config.granularity == "channel":
        return tuple(i for i in range(ndim) if i != ax)
    return (ax + 1,)
