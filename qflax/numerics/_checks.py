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
    """Raises ValueError naming ``where`` and the shape if ``x`` has no elements (static)."""
    shape = tuple(np.shape(x))
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
    """Raises ValueError if a concrete ``x`` holds a value ``<= 0``, NaN or ±inf (not traced)."""
    if not is_concrete(x):
        return
    x = jnp.asarray(x)
    if x.size == 0:
        return
    ok = jnp.isfinite(x) & (x > 0)
    bad = int(x.size - jnp.count_nonzero(ok))
    if bad:
        host = np.asarray(x)
        index = _first_index(~(np.isfinite(host) & (host > 0)))
        value = host[index] if isinstance(index, tuple) else host.reshape(-1)[index]
        raise ValueError(
            f"{where}: {name} holds {bad} value(s) <= 0 or non-finite, the first {float(value)!r} "
            f"at index {index}; allowed: finite values > 0"
        )
