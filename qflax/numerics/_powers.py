"""Powers of two built from exponent bits: exact at integer exponents on every backend.

XLA:CPU computes ``exp2`` with a polynomial that is not exact at integer arguments (e.g.
``exp2(13.0) = 8192.0005``), so a step ``2^ℓ`` built with ``jnp.exp2`` puts grid points and
bounds off the powers of two they stand for. These functions write the power of two directly
into the exponent field of the float instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

__all__ = ["exp2", "pow2_int", "times_pow2"]


def _float_dtype(x: jax.Array) -> np.dtype:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"expects a floating array of exponents, got dtype {x.dtype}")
    return np.dtype(x.dtype)


def pow2_int(e: ArrayLike) -> jax.Array:
    """``2^e`` for integer-valued floats ``e``, exact, built from the exponent bits (no gradient).

    The result has ``e``'s floating dtype. Below the smallest normal (``e < −126`` in float32) it
    is 0 (XLA flushes subnormals to zero on CPU anyway); above the largest finite power it is
    ``+inf``. ``e`` must hold integers (a fraction is truncated toward zero); NaN gives NaN.

    >>> pow2_int(jnp.array([-13.0, 0.0, 13.0, 127.0, 128.0, -200.0])).tolist()
    [0.0001220703125, 1.0, 8192.0, 1.7014118346046923e+38, inf, 0.0]
    """
    e = jnp.asarray(e)
    info = jnp.finfo(_float_dtype(e))
    nmant, bias = int(info.nmant), int(info.maxexp) - 1
    uint = jnp.dtype(f"uint{info.bits}")
    # The biased field, clipped to [0, 2·bias + 1]: 0 is +0.0, 2·bias + 1 (all ones) with a zero
    # mantissa is +inf. Clipping in float first keeps the integer conversion in range.
    field = jnp.clip(e + bias, 0, 2 * bias + 1).astype(uint)
    y = lax.bitcast_convert_type(field << nmant, e.dtype)
    return jnp.where(jnp.isnan(e), e, y)


def exp2(x: ArrayLike) -> jax.Array:
    """``2^x``, exact at integer ``x``, with the derivative ``ln2·2^x`` (differentiable).

    Written ``2^x = 2^⌊x⌋ · 2^(x − ⌊x⌋)``: the integer power from the exponent bits
    (:func:`pow2_int`, exact), ``jnp.exp2`` only on the fraction in ``[0, 1)`` (``exp2(0) = 1``
    exactly), so integer ``x`` gives the exact power of two and other ``x`` are as accurate as
    ``jnp.exp2``. Autodiff sees ``⌊x⌋`` as a constant, so ``d/dx = 2^⌊x⌋ · ln2 · 2^(x − ⌊x⌋)``,
    ``ln2·2^x`` at every ``x``. ``±inf`` and NaN give what ``jnp.exp2`` gives (``inf``, 0, NaN).

    >>> float(exp2(13.0)), float(exp2(-13.0)), float(jax.grad(exp2)(3.0))
    (8192.0, 0.0001220703125, 5.545177459716797)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    finite = jnp.isfinite(x)
    safe = jnp.where(finite, x, jnp.zeros_like(x))  # no NaN in the unused branch's gradient
    whole = lax.stop_gradient(jnp.floor(safe))
    y = pow2_int(whole) * jnp.exp2(safe - whole)
    return jnp.where(finite, y, jnp.exp2(x))


def times_pow2(x: ArrayLike, e: ArrayLike) -> jax.Array:
    """``x·2^e`` for integer ``e`` (broadcast against ``x``): ``jnp.ldexp`` by two multiplies.

    The power is applied as two factors ``2^⌊e/2⌋·2^(e − ⌊e/2⌋)`` built from exponent bits
    (:func:`pow2_int`), each a normal float for every ``|e|`` up to twice the largest exponent
    (float32: ``|e| <= 252``), so the result is exact wherever it is a normal float: the
    intermediate lies between ``x`` and the result, so nothing underflows that the result
    would not. Where the result is subnormal it is rounded (and flushed on XLA:CPU) as the
    product is; ``jnp.ldexp`` gets the same values there on CPU. Several times cheaper than
    ``jnp.ldexp`` on large tensors with a per-row ``e`` (the factors are computed per row).

    >>> times_pow2(jnp.array([2.0**100, 3.0, -1.5]), jnp.array([-130, -127, 127])).tolist()
    [9.313225746154785e-10, 1.7632415262334313e-38, -2.5521177519070385e+38]
    """
    x = jnp.asarray(x)
    e = jnp.asarray(e)
    half = jnp.floor_divide(e, 2)
    a = pow2_int(half.astype(x.dtype))
    b = pow2_int((e - half).astype(x.dtype))
    return x * a * b
