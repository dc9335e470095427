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

    With ``f = x - floor(x)`` and ``u ~ U[0, 1)``, the result is ``floor(x) + 1[u < f]``:
    ``ceil(x)`` with probability ``f`` and ``floor(x)`` otherwise, so the rounding is unbiased
    (up to the 2^-23 resolution of ``u`` and the rounding of ``f``). ``u`` is drawn in float32
    (in ``x``'s dtype when that is wider), so bfloat16 inputs are not biased by a coarse ``u``.
    Integers are returned unchanged, at every magnitude. The key is explicit: the same key gives
    the same rounding.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"stochastic_round expects a floating array, got dtype {x.dtype}")
    # Not ``floor(x + u)``: the sum is rounded to x's precision before the floor, which moves
    # integers >= 2 (e.g. 2^22 -> 2^22 + 1 a quarter of the time) and biases large values.
    u_dtype = x.dtype if jnp.finfo(x.dtype).bits > 32 else jnp.float32
    lower = jnp.floor(x)
    frac = (x - lower).astype(u_dtype)
    u = jax.random.uniform(key, x.shape, dtype=u_dtype)
    return lower + (u < frac).astype(x.dtype)
