"""Rounding: round-half-to-even and unbiased stochastic rounding with an explicit PRNG key."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from qflax.numerics._ranges import check_choice

__all__ = [
    "NOISE_SOURCES",
    "hash_uniform",
    "round_nearest_even",
    "stochastic_round",
    "uniform_noise",
]

# Where the uniform variates of stochastic rounding come from: "threefry" (jax.random.uniform
# with the key's own generator) or "hash" (:func:`hash_uniform`: two 32-bit words drawn from the
# key, then a counter hash per element — ~8x cheaper on CPU, fused into the rounding).
NOISE_SOURCES = ("threefry", "hash")

_GOLDEN = 0x9E3779B9  # odd: idx -> idx·_GOLDEN is a bijection of uint32


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``U[0, 1)`` float32 variates on the grid ``k·2^−24`` from a key and a counter hash.

    Two 32-bit words ``s₀, s₁`` are drawn from ``key`` (``jax.random.bits``); element ``i``
    (row-major index) gets ``h = fmix32(fmix32(i·φ ⊕ s₀) + s₁)`` (MurmurHash3's finaliser,
    ``φ = 0x9E3779B9``) and ``u = ⌊h/2^8⌋·2^−24``. For a fixed ``i``, ``fmix32(·) + s₁`` is
    uniform over uint32 when ``s₁`` is, and ``fmix32`` is a bijection: so each element's ``u``
    is EXACTLY uniform on its grid over the key — what makes stochastic rounding unbiased.
    Independence between elements rests on the hash's avalanche (not a cryptographic
    generator: neighbouring ``u`` have correlation ~1e−3 or less, measured in the tests).
    Elementwise integer arithmetic on an iota: XLA fuses it into the consumer, so nothing of
    the tensor's size is drawn or stored (``jax.random.uniform`` costs ~8x more on CPU).

    Raises:
      ValueError: ``shape`` has ``2^32`` elements or more (the counter would wrap).

    >>> u = hash_uniform(jax.random.key(0), (4,))
    >>> u.dtype, bool(jnp.all((u >= 0) & (u < 1)))
    (dtype('float32'), True)
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(
            f"shape={shape} has {size} elements; allowed: fewer than 2^32 for noise='hash'"
        )
    words = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    h = _fmix32(_fmix32((index * jnp.uint32(_GOLDEN)) ^ words[0]) + words[1])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def uniform_noise(
    key: jax.Array, shape: tuple[int, ...], noise: str, dtype: jax.typing.DTypeLike = jnp.float32
) -> jax.Array:
    """``U[0, 1)`` variates of ``shape`` from one of :data:`NOISE_SOURCES`: ``"threefry"``
    (``jax.random.uniform(key, shape, dtype)``) or ``"hash"`` (:func:`hash_uniform`, float32
    on a ``2^−24`` grid, cast to ``dtype``).

    >>> uniform_noise(jax.random.key(0), (3,), "hash").shape
    (3,)
    """
    check_choice(noise, "noise", NOISE_SOURCES)
    if noise == "hash":
        return hash_uniform(key, shape).astype(dtype)
    return jax.random.uniform(key, shape, dtype=dtype)


def round_nearest_even(x: ArrayLike) -> jax.Array:
    """Rounds to the nearest integer, ties to even (IEEE 754 default).

    >>> round_nearest_even(jnp.array([0.5, 1.5, 2.5, -0.5])).tolist()
    [0.0, 2.0, 2.0, -0.0]
    """
    return jnp.round(x)


def stochastic_round(x: ArrayLike, key: jax.Array, *, noise: str = "threefry") -> jax.Array:
    """Rounds down or up at random so that ``E[stochastic_round(x)] = x``.

    With ``f = x - floor(x)`` and ``u ~ U[0, 1)``, the result is ``floor(x) + 1[u < f]``:
    ``ceil(x)`` with probability ``f`` and ``floor(x)`` otherwise, so the rounding is unbiased
    (up to the 2^-23 resolution of ``u`` and the rounding of ``f``). ``u`` is drawn in float32
    (in ``x``'s dtype when that is wider), so bfloat16 inputs are not biased by a coarse ``u``.
    Integers are returned unchanged, at every magnitude. The key is explicit: the same key gives
    the same rounding.

    ``noise``: one of :data:`NOISE_SOURCES`: ``"threefry"`` draws ``u`` with
    ``jax.random.uniform``; ``"hash"`` with :func:`hash_uniform` (exactly uniform per element on
    a ``2^−24`` grid, so the rounding is unbiased up to ``2^−24`` of a step; float32 ``u`` for
    every dtype), several times faster on CPU.
    """
    check_choice(noise, "noise", NOISE_SOURCES)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"stochastic_round expects a floating array, got dtype {x.dtype}")
    # Not ``floor(x + u)``: the sum is rounded to x's precision before the floor, which moves
    # integers >= 2 (e.g. 2^22 -> 2^22 + 1 a quarter of the time) and biases large values.
    u_dtype = x.dtype if jnp.finfo(x.dtype).bits > 32 else jnp.float32
    lower = jnp.floor(x)
    frac = (x - lower).astype(u_dtype)
    u = uniform_noise(key, x.shape, noise, u_dtype)
    return lower + (u < frac).astype(x.dtype)
