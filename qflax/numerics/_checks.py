"""Checks of array values at the library's entry points: empty, non-finite and non-positive input.

A check of values can only run on a concrete array (eagerly, or a constant under ``jit``); on a
traced array (inside ``jit``, ``vmap`` or ``grad``) there is no value to look at, so the
value checks do nothing there and each caller documents what its traced computation gives. Shape
checks run always (shapes are static).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_finite", "check_nonempty", "check_positive", "is_concrete"]


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has values to inspect (not a tracer of ``jit``, ``vmap`` or ``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_nonempty(x: Any, where: str, name: str = "x") -> None:
    """Raises ValueError naming ``where`` and the shape if ``x`` (an array, or anything with a
    ``shape``) has no elements; shapes are static, so this runs under ``jit`` too."""
    shape = tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))
    if int(np.prod(shape, dtype=np.int64)) == 0:
        raise ValueError(
            f"{where}: {name} has shape {shape} with no elements; allowed: a non-empty array"
        )


def _first_index(mask: np.ndarray) -> tuple[int, ...] | int:
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
    return index if len(index) != 1 else index[0]


def check_finite(x: Any, where: str, name: str = "x") -> None:
    """Raises ValueError if a concrete floating ``x`` holds NaN or ±inf (nothing when traced).

    The message names ``where``, the count of non-finite values, the size and the first index.
    One scalar comes back from the device when all values are finite.
    """
    if not is_concrete(x):
        return
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:
        return
    bad = int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
    if bad:
        mask = ~np.isfinite(np.asarray(x))
        raise ValueError(
            f"{where}: {name} holds {bad} non-finite value(s) (NaN or ±inf) of {x.size}, the "
            f"first at index {_first_index(mask)}; allowed: finite values"
        )


def check_positive(x: Any, where: str, name: str = "scale") -> None:
    """Raises ValueError if a concrete ``x`` holds a value that is not a positive normal float.

    Refused: ``<= 0``, NaN, ±inf, and positive subnormals (below the smallest normal of ``x``'s
    float dtype, float32 for other dtypes), which XLA:CPU flushes to 0 in arithmetic, so that
    they would divide by zero. Nothing is checked when ``x`` is traced.
    """
    if not is_concrete(x):
        return
    host = np.asarray(x)
    if host.size == 0:
        return
    dtype = host.dtype if np.issubdtype(host.dtype, np.floating) else np.dtype(np.float32)
    tiny = float(np.finfo(dtype).tiny)
    ok = np.isfinite(host) & (host >= tiny)
    if not ok.all():
        index = _first_index(~ok)
        value = host[index] if isinstance(index, tuple) else host.reshape(-1)[index]
        raise ValueError(
            f"{where}: {name} holds {int((~ok).sum())} value(s) that are not positive normal "
            f"floats, the first {float(value)!r} at index {index}; allowed: finite values "
            f">= {tiny!r} (smaller ones are 0 to XLA)"
        )
