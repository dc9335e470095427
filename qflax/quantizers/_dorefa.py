"""DoReFa-Net — Zhou et al. 2016 (arXiv:1606.06160), eqs. (5), (7), (9), (11), (12); METHODS.md §2.

Differs from the paper: 1-bit weights use ``sign(0) = +1``; the clip of the activations passes
the gradient on both bounds (``0 ≤ x ≤ 1``); the gradient quantizer draws its noise from an
explicit PRNG key; its maximum ``m`` is taken per sample (over every axis but the first), as the
paper's §2.6 ("maxi over all axes except the mini-batch axis").

* ``q_k(r) = round((2^k − 1)·r) / (2^k − 1)`` with a straight-through gradient (eq. 5).
* :func:`dorefa_weights` (eqs. 7, 9): ``k = 1``: ``sign(w)·sg(mean|w|)`` with the identity
  gradient to ``w`` (the paper's backward ``∂c/∂r_i = ∂c/∂r_o``); ``k > 1``:
  ``2·q_k(t) − 1`` with ``t = tanh(w)/(2·max|tanh w|) + ½`` (:func:`dorefa_weight_transform`),
  differentiated through ``t`` normally (the max too) and straight through ``q_k``.
* :func:`dorefa_activations` (eq. 11): ``q_k(clip(x, 0, 1))``, gradient ``g·1[0 ≤ x ≤ 1]``.
* :func:`dorefa_gradients` (eq. 12): identity forward; the backward replaces the cotangent ``g``
  by ``2m·[q_k(clip(g/(2m) + ½ + N, 0, 1)) − ½]`` with ``N ~ U(−½, ½)/(2^k − 1)`` and
  ``m = max|g|`` per sample (a sample whose cotangent is all zero stays zero; one holding NaN
  or ±inf comes back NaN): :func:`dorefa_quantize_gradient`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import check_bits, check_choice
from qflax.quantizers._family import (
    InputLowering,
    NotExportable,
    QuantizerFamily,
    WeightLowering,
    register_family,
)

__all__ = [
    "DOREFA_ROLES",
    "DoReFaConfig",
    "dorefa",
    "dorefa_activations",
    "dorefa_gradients",
    "dorefa_quantize_gradient",
    "dorefa_quantize_k",
    "dorefa_weight_transform",
    "dorefa_weights",
]

MAX_BITS = 24  # (2^k − 1)·r is exact in float32 up to here.


def _check(x: ArrayLike, bits, name: str) -> jax.Array:
    check_bits(bits, "bits", 1, MAX_BITS)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


def _round_k(bits: int, x: jax.Array) -> jax.Array:
    n = float(2**bits - 1)
    return jnp.round(x * n) / n


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quantize_k(bits: int, x: jax.Array) -> jax.Array:
    return _round_k(bits, x)


def _quantize_k_fwd(bits, x):
    return _round_k(bits, x), None


def _quantize_k_bwd(bits, residuals, g):
    del bits, residuals
    return (g,)


_quantize_k.defvjp(_quantize_k_fwd, _quantize_k_bwd)


def dorefa_quantize_k(x: ArrayLike, *, bits: int) -> jax.Array:
    """``q_k(x) = round((2^k − 1)·x)/(2^k − 1)``, straight-through gradient (eq. 5).

    >>> dorefa_quantize_k(jnp.array([0.1, 0.5, 0.9]), bits=2).tolist()
    [0.0, 0.6666666865348816, 1.0]
    """
    x = _check(x, bits, "x")
    return _quantize_k(int(bits), x)


@jax.custom_vjp
def _binary_weights(w: jax.Array) -> jax.Array:
    scale = jnp.mean(jnp.abs(w))
    return jnp.where(w >= 0, scale, -scale)


def _binary_weights_fwd(w):
    return _binary_weights(w), None


def _binary_weights_bwd(residuals, g):
    del residuals
    return (g,)


_binary_weights.defvjp(_binary_weights_fwd, _binary_weights_bwd)


def dorefa_weight_transform(w: ArrayLike) -> jax.Array:
    """The smooth part of eq. (9): ``tanh(w)/(2·max|tanh w|) + ½``, in ``[0, 1]``.

    An all-zero ``w`` maps to ½ (the max is floored at the smallest normal float).
    """
    t = jnp.tanh(jnp.asarray(w))
    top = jnp.maximum(jnp.max(jnp.abs(t)), jnp.finfo(t.dtype).tiny)
    return t / (2.0 * top) + 0.5


def dorefa_weights(w: ArrayLike, *, bits: int) -> jax.Array:
    """DoReFa weight quantizer: values in ``[−1, 1]`` on ``2^k`` levels (``k = 1``: ``±mean|w|``).

    Args:
      w: a floating array (the whole layer shares ``max|tanh w|`` and ``mean|w|``).
      bits: ``k``, 1..24.

    Returns:
      The quantized weights, shape and dtype of ``w``.

    >>> dorefa_weights(jnp.array([-2.0, 0.0, 1.0]), bits=1).tolist()
    [-1.0, 1.0, 1.0]
    """
    w = _check(w, bits, "w")
    if bits == 1:
        return _binary_weights(w)
    return 2.0 * _quantize_k(int(bits), dorefa_weight_transform(w)) - 1.0


def dorefa_activations(x: ArrayLike, *, bits: int) -> jax.Array:
    """``q_k(clip(x, 0, 1))`` with gradient ``g·1[0 ≤ x ≤ 1]`` (eq. 11).

    >>> dorefa_activations(jnp.array([-1.0, 0.2, 0.5, 2.0]), bits=1).tolist()
    [0.0, 0.0, 0.0, 1.0]
    """
    x = _check(x, bits, "x")
    inside = (x >= 0) & (x <= 1)
    # Explicit mask: the clip passes the gradient inside (bounds included) and stops it outside.
    clipped = jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, 0.0, 1.0)))
    return _quantize_k(int(bits), clipped)


def _sample_max(g: jax.Array) -> jax.Array:
    axes = tuple(range(1, g.ndim))
    return jnp.max(jnp.abs(g), axis=axes, keepdims=True) if g.ndim else jnp.abs(g)


@functools.partial(jax.jit, static_argnums=(0,))
def _quantize_gradient(bits: int, g: jax.Array, key: jax.Array) -> jax.Array:
    n = float(2**bits - 1)
    m = _sample_max(g)
    # Computed on g·2^−e with 2^e the power of two of m (exact): dividing by an m near the
    # largest float goes through a reciprocal that XLA flushes to zero, and 2m overflows.
    positive = (m > 0) & jnp.isfinite(m)
    _, e = jnp.frexp(jnp.where(positive, m, jnp.ones_like(m)))
    e = jnp.where(positive, e, jnp.zeros_like(e))
    scaled = jnp.ldexp(g, -e)
    top = jnp.where(positive, jnp.ldexp(m, -e), jnp.ones_like(m))
    noise = jax.random.uniform(key, g.shape, g.dtype, -0.5, 0.5) / n
    r = jnp.clip(scaled / top / 2.0 + 0.5 + noise, 0.0, 1.0)
    # (clipped to [−m, m]: under jit q_k's division by 2^k − 1 can land an ulp above 1)
    out = jnp.ldexp(jnp.clip(2.0 * (top * (_round_k(bits, r) - 0.5)), -top, top), e)
    # A sample of zeros stays zero; one holding NaN or ±inf (m not finite) comes back NaN.
    out = jnp.where(m > 0, out, jnp.zeros_like(out))
    return jnp.where(jnp.isfinite(m), out, jnp.full_like(out, jnp.nan))


def dorefa_quantize_gradient(g: ArrayLike, *, bits: int, key: jax.Array) -> jax.Array:
    """The cotangent quantizer of eq. (12): ``2m·[q_k(clip(g/(2m) + ½ + N, 0, 1)) − ½]``.

    ``N ~ U(−½, ½)/(2^k − 1)`` drawn from ``key``; ``m = max|g|`` per sample (over every axis
    but the first). Unbiased (``E = g``): the noise before ``round`` is stochastic rounding on
    the grid of ``2^k`` levels of ``[−m, m]`` (step ``2m/(2^k − 1)``). A sample of zeros stays
    zero; a sample holding NaN or ±inf comes back all NaN. This is what the backward of
    :func:`dorefa_gradients` applies.

    >>> dorefa_quantize_gradient(jnp.array([[0.0, -1.0, 1.0]]), bits=2, key=jax.random.key(0))
    Array([[ 0.33333337, -1.        ,  1.        ]], dtype=float32)
    """
    g = _check(g, bits, "g")
    if key is None:
        raise ValueError(
            "key=None is not allowed for dorefa_quantize_gradient; allowed: a PRNG key"
        )
    return _quantize_gradient(int(bits), g, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dorefa_gradients(bits: int, x: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return x


def _dorefa_gradients_fwd(bits, x, key):
    return x, key


def _dorefa_gradients_bwd(bits, key, g):
    return _quantize_gradient(bits, g, key), None


_dorefa_gradients.defvjp(_dorefa_gradients_fwd, _dorefa_gradients_bwd)


def dorefa_gradients(x: ArrayLike, *, bits: int, key: jax.Array) -> jax.Array:
    """Identity in the forward pass; quantizes the cotangent with ``bits`` bits (eq. 12).

    Args:
      x: a floating array; its first axis indexes samples (``m`` is per sample).
      bits: ``k``, 1..24.
      key: PRNG key of the rounding noise (the same key gives the same quantized gradient).

    Returns:
      ``x`` unchanged; the gradient flowing back through it is quantized.

    Raises:
      ValueError: if ``key`` is None or ``bits`` is out of range.
    """
    x = _check(x, bits, "x")
    if key is None:
        raise ValueError("key=None is not allowed for dorefa_gradients; allowed: a PRNG key")
    return _dorefa_gradients(int(bits), x, key)


DOREFA_ROLES = ("weight", "act")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoReFaConfig:
    """DoReFa as one quantizer with the shared signature (hashable; validated at construction).

    >>> DoReFaConfig(bits=2, role="act").role
    'act'
    """

    # k: the bit-width, 1..24.
    bits: int = 4
    # "weight": dorefa_weights (values in [-1, 1]); "act": dorefa_activations (clip to [0, 1]).
    role: str = "weight"

    def __post_init__(self):
        check_bits(self.bits, "bits", 1, 24)
        check_choice(self.role, "role", DOREFA_ROLES)


def dorefa(
    x: ArrayLike,
    params: Mapping[str, ArrayLike] | None,
    config: DoReFaConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """:func:`dorefa_weights` or :func:`dorefa_activations` per ``config.role`` (no params).

    >>> dorefa(jnp.array([-1.0, 0.4, 2.0]), {}, DoReFaConfig(bits=1, role="act")).tolist()
    [0.0, 0.0, 1.0]
    """
    del key
    if params:
        raise ValueError(f"params={sorted(params)!r} is not allowed for dorefa; allowed: {{}}")
    if config.role == "weight":
        return dorefa_weights(x, bits=config.bits)
    return dorefa_activations(x, bits=config.bits)


# ---------------------------------------------------------------------------------- family


class DoReFaFamily(QuantizerFamily):
    """``"dorefa"``: :func:`dorefa` (weights or activations per ``config.role``; no params)."""

    name = "dorefa"
    config_types = (DoReFaConfig,)

    def roles(self, spec):
        return (spec.config.role,)

    def scale_count(self, spec, shape) -> int:
        # Codes of [-1, 1] need no scale, except sign·mean|w| at k = 1.
        return 1 if spec.config.bits == 1 and spec.config.role == "weight" else 0

    def apply(self, spec, x, params, *, key=None, stats=None):
        return dorefa(x, params, spec.config)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_dorefa

        return quantize_dorefa(x, spec.config)

    def import_kernel(self, spec, q):
        """A latent kernel whose DoReFa codes (``k > 1``) are ``q``'s:
        ``w = atanh((2c/n − 1)·m)``.

        DoReFa takes ``t = tanh(w)/(2·max|tanh w|) + ½`` and the codes ``round(n·t)``. With
        ``tanh(w) = (2c/n − 1)·m`` (``m = tanh 1``) and a code 0 or ``n`` present (the exported
        tensor's largest ``|tanh w|`` gives one), ``max|tanh w| = m`` and ``t = c/n`` up to
        float rounding, far inside the rounding interval. Without such a code (an all-zero
        kernel), and for ``k = 1`` (``sign·mean|w|`` is its own fixed point): ``ŵ``.
        """
        from qflax.quantizers._qarray import dequantize, unpack

        if spec.config.bits == 1:
            return dequantize(q)
        q = unpack(q)
        codes = np.asarray(q.values).astype(np.float64)
        n = 2.0**q.bits - 1.0
        if not (np.any(codes == 0) or np.any(codes == n)):
            return dequantize(q)
        m = np.tanh(1.0)
        return jnp.asarray(np.arctanh((2.0 * codes / n - 1.0) * m), jnp.float32)

    def weight_lowering(self, spec, params, stats):
        return WeightLowering("uniform")

    def input_lowering(self, spec, params, stats):
        # q_k(clip(x, 0, 1)): codes round(clip(x, 0, 1)·n), n = 2^k − 1
        n = 2**spec.config.bits - 1
        return InputLowering("codes", 0, n, 1.0 / n)

    def check_int8(self, spec) -> None:
        cfg = spec.config
        if cfg.bits > 7 and not (cfg.bits == 1 and cfg.role == "weight"):
            raise NotExportable(
                f"dorefa {cfg.role}s with bits={cfg.bits}: an int8 operand needs codes within "
                "[-127, 127] (bits <= 7)"
            )

    def int8_scale(self, spec, x, params, stats):
        cfg = spec.config
        if cfg.role == "weight" and cfg.bits == 1:  # sign(w)·mean|w|: signs at mean|w|
            m = jnp.mean(jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)))
            return m.reshape((1,) * x.ndim)
        # weights 2·c/n − 1 = (2c − n)/n, activations c/n: codes at the scale 1/n
        return jnp.float32(1.0 / (2**cfg.bits - 1))


register_family(DoReFaFamily())
