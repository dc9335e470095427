"""Rounding: round-half-to-even and unbiased stochastic rounding with an explicit PRNG key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["round_nearest_even", "stochastic_round"]


def round_nearest_even(x: ArrayLike) -> jax.Array:
    """Rounds to the nearest integer, ties to even (IEEE 754 default).

    >>> round_nearest_even(jnp.array([0.5, 1.5, 2.5, -0.5])).tolist()
    [0.0, 2.0, 2.0, -0.0]
    """
    return jnp.round(x)


def stochastic_round(x: ArrayLike, key: jax.Array) -> jax.Array:
    """Rounds down or up at random so that ``E[stochastic_round(x)] = x``.

    ``floor(x + u)`` with ``u ~ U[0, 1)``: the result is ``ceil(x)`` with probability
    ``x - floor(x)`` and ``floor(x)`` otherwise, so the rounding is unbiased. Integers are
    returned unchanged. The key is explicit: the same key gives the same rounding.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"stochastic_round expects a floating array, got dtype {x.dtype}")
    u = jax.random.uniform(key, x.shape, dtype=x.dtype)
    return jnp.floor(x + u)
