"""Power-of-two (logarithmic) quantizer: ``x̂ = sign(x)·s·2^−k``, k rounded in the log domain.

Logarithmic quantization in the style of Miyashita, Lee & Murmann (2016), "Convolutional Neural
Networks using Logarithmic Data Representation" (``LogQuant(x) = sign(x)·2^round(log2|x|)``, with
the full-scale range given here by a power-of-two scale ``s``). What differs: an optional exact
zero level with a linear dead zone (below), and no ceiling rule (DBSSQ, METHODS.md §5, rounds
``|x|`` *up* to the next power of two; this module rounds to the nearest power in the log domain).

Levels, with ``b = bits`` and ``K = 2^(b−1) − (1 if zero else 0)`` magnitudes::

    ±s·2^−k,  k = 0, …, K−1        (plus 0 when zero=True)

so one bit holds the sign and ``b − 1`` bits the exponent index ``k`` (with ``zero=True`` one of
the ``2^(b−1)`` exponent codes is spent on 0). The quantizer maps ``v = |x|/s`` to

* ``v ≥ 1`` (including ``inf``): the top level ``s`` (saturation);
* ``2^−(K−1) ≤ v < 1``: ``s·2^round(log2 v)``, rounding in the log domain, i.e. the boundary
  between ``2^−k`` and ``2^−(k+1)`` lies at ``2^−(k+½)`` (no float is exactly on it);
* ``v < 2^−(K−1)`` (below the smallest level ``L = s·2^−(K−1)``):

  - ``zero=True``: ``|x| < L/2`` gives exactly 0 (the zero rule: the boundary between 0 and
    ``L`` is their arithmetic midpoint, ``|x| = L/2`` itself goes to ``L``); ``L/2 ≤ |x| < L``
    gives ``±L``;
  - ``zero=False``: ``±L`` (there is no zero level), and ``x = 0`` (also ``−0.0``) gives ``+L``.

NaN stays NaN. The output keeps the shape and dtype of ``x``; it is computed in float32 (float64
for float64 inputs) and cast back, so float16 inputs can lose levels outside float16's range.
Levels are built from the exponent bits of ``|x|·(1/s)`` with integer operations (no ``log2`` or
``2**``), which is exact: for a power-of-two ``s`` the output equals the real-number definition
above. ``s`` must be positive; :func:`pow2_init` gives a power of two, and another positive ``s``
still gives the levels ``s·2^−k`` (the thresholds are then applied to the rounded ``|x|·(1/s)``).

Subnormals: where the platform flushes subnormal floats (XLA:CPU does: inputs below ``2^−126``
in magnitude read as 0, results below it are written as 0), a subnormal ``x`` is quantized as
``x = 0`` and levels ``s·2^−k < 2^−126`` (only reachable with ``bits=8`` or a tiny scale) come
out as 0. The rounding decisions are otherwise exact down to the smallest level: ``|x|·2^a/s`` is
formed with a power-of-two pre-scale ``2^a`` that keeps it normal there.

Gradients (``config.gradient``): ``"ste"`` passes ``g`` through unchanged, ``"clipped_ste"`` passes
``g·1[|x| ≤ s]`` (zero outside the range of the levels, bounds included), ``"true"`` gives zero (the
true derivative of a step function almost everywhere). The scale is not learnable here: its
gradient is zero (set it with :func:`pow2_init` or a calibration routine).

Codes (:func:`pow2_codes`, :func:`pow2_dequantize`) are sign-magnitude in ``b`` bits::

    code = sign·2^(b−1) + k,    sign = 1 for negative levels, k = exponent index (level s·2^−k)

and with ``zero=True`` the magnitude field ``k = 2^(b−1) − 1`` (all ones, i.e. ``k = K``) encodes 0,
always with sign 0, so the code of zero is ``2^(b−1) − 1``. Codes lie in ``[0, 2^b − 1]`` (int32),
ready for :func:`qflax.numerics.pack_bits` (unsigned; 3-, 5-, 6- and 7-bit codes go in the next
packable width). A shift-and-negate unit decodes them: ``±(s >> k)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from qflax.numerics import check_bits, check_choice, check_nonempty
from qflax.quantizers._base import check_granularity, grouped, reduce_axes, ungrouped
from qflax.quantizers._family import QuantizerFamily, WeightLowering, register_family

__all__ = [
    "POW2_GRADIENTS",
    "PowerOfTwoConfig",
    "pow2",
    "pow2_codes",
    "pow2_dequantize",
    "pow2_init",
    "pow2_levels",
]

POW2_GRADIENTS = ("ste", "clipped_ste", "true")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PowerOfTwoConfig:
    """Configuration of the power-of-two quantizer (see the module docstring for the levels)."""

    # Total bits per code: one sign bit plus bits-1 exponent bits; 2..8.
    bits: int = 4
    # Spend one exponent code on an exact zero level (|x| below half the smallest level -> 0).
    zero: bool = True
    # Which elements share a scale: "tensor", "channel" or "group" (see quantizers/_base.py).
    granularity: str = "tensor"
    # The channel axis ("channel") or the axis cut into groups ("group").
    axis: int = -1
    # Group length along `axis` for granularity="group", else None.
    group_size: int | None = None
    # Gradient wrt x: "ste" (identity), "clipped_ste" (zero outside [-s, s]) or "true" (zero).
    gradient: str = "ste"

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits, "bits", 2, 8))  # np ints -> int
        if not isinstance(self.zero, (bool, np.bool_)):
            raise ValueError(f"zero={self.zero!r} is not a bool; allowed: True, False")
        object.__setattr__(self, "zero", bool(self.zero))
        check_granularity(self.granularity, self.axis, self.group_size)
        check_choice(self.gradient, "gradient", POW2_GRADIENTS)

    @property
    def num_magnitudes(self) -> int:
        """``K``: the number of nonzero magnitudes ``s·2^−k``, k = 0..K−1."""
        return 2 ** (self.bits - 1) - (1 if self.zero else 0)


# ----------------------------------------------------------------------------------------------
# Float layouts: the levels are built from exponent bits with integer operations.


@dataclasses.dataclass(frozen=True)
class _Layout:
    float_dtype: Any
    uint_dtype: Any
    nmant: int  # explicit mantissa bits
    bias: int  # exponent bias
    round_add: int  # adding this to the bits carries into the exponent iff mantissa > sqrt(2)


def _make_layout(float_dtype, uint_dtype) -> _Layout:
    info = np.finfo(float_dtype)
    nmant, bias = int(info.nmant), int(info.maxexp) - 1
    # Largest mantissa field m with 1 + m/2^nmant < sqrt(2): floor((sqrt(2) - 1)·2^nmant), exact.
    m_sqrt2 = math.isqrt(2 ** (2 * nmant + 1)) - 2**nmant
    return _Layout(float_dtype, uint_dtype, nmant, bias, 2**nmant - 1 - m_sqrt2)


_F32 = _make_layout(np.float32, np.uint32)
_F64 = _make_layout(np.float64, np.uint64)


def _layout(dtype) -> _Layout:
    return _F64 if dtype == jnp.float64 else _F32


def _check_float(x: jax.Array, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} expects a floating array, got dtype {x.dtype}")


def _offset(config: PowerOfTwoConfig, lay: _Layout) -> int:
    """Power-of-two pre-scale ``a`` keeping ``|x|·2^a/s`` normal down to the zero threshold."""
    return max(0, config.num_magnitudes - (lay.bias - 1))


def _round_log2_field(y: jax.Array, lay: _Layout) -> tuple[jax.Array, jax.Array]:
    """Biased exponent field of ``2^round(log2 y)`` (log-domain rounding) for normal ``y ≥ 0``.

    Also returns the bits of ``y``. Adding ``round_add`` carries into the exponent exactly when
    the mantissa ``1.m`` exceeds ``sqrt(2)``, i.e. when ``log2 y`` is above ``floor(log2 y) + ½``.
    """
    bits = lax.bitcast_convert_type(y, lay.uint_dtype)
    return (bits + lay.round_add) >> lay.nmant, bits


def _pow2_field(xc: jax.Array, s: jax.Array, config: PowerOfTwoConfig, lay: _Layout):
    """Returns the clipped exponent field of the level, the bits of ``|x|·2^a/s`` and ``a``."""
    a = _offset(config, lay)
    k_max = config.num_magnitudes - 1
    inv = jnp.asarray(2.0**a, lay.float_dtype) / s  # param-sized; |x|·inv is exact for pow-2 s
    field, ybits = _round_log2_field(jnp.abs(xc) * inv, lay)
    field = jnp.clip(field, lay.bias + a - k_max, lay.bias + a)
    return field, ybits, a


def _zero_mask(ybits: jax.Array, config: PowerOfTwoConfig, lay: _Layout, a: int) -> jax.Array:
    """``|x|/s < 2^−K`` (half the smallest level), compared on the bits of ``|x|·2^a/s``."""
    return ybits < ((lay.bias + a - config.num_magnitudes) << lay.nmant)


def _magnitude(field: jax.Array, s: jax.Array, lay: _Layout, a: int) -> jax.Array:
    """``s·2^(field − bias − a)``, the power of two built from its exponent bits."""
    pow2 = lax.bitcast_convert_type(field << lay.nmant, lay.float_dtype)
    return (s * 2.0**-a) * pow2


def _pow2_value(xg: jax.Array, scale: jax.Array, config: PowerOfTwoConfig) -> jax.Array:
    lay = _layout(xg.dtype)
    xc = xg.astype(lay.float_dtype)
    s = scale.astype(lay.float_dtype)
    field, ybits, a = _pow2_field(xc, s, config, lay)
    mag = _magnitude(field, s, lay, a)
    out = jnp.where(xc < 0, -mag, mag)
    if config.zero:
        out = jnp.where(_zero_mask(ybits, config, lay, a), 0.0, out)
    out = jnp.where(jnp.isnan(xc), xc, out)
    return out.astype(xg.dtype)


# ----------------------------------------------------------------------------------------------
# The custom VJP (defined once, at module level).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pow2_q(xg: jax.Array, scale: jax.Array, config: PowerOfTwoConfig) -> jax.Array:
    return _pow2_value(xg, scale, config)


def _pow2_fwd(xg, scale, config):
    x_res = xg if config.gradient == "clipped_ste" else None
    return _pow2_value(xg, scale, config), (x_res, scale)


def _pow2_bwd(config, res, g):
    xg, scale = res
    if config.gradient == "ste":
        dx = g
    elif config.gradient == "clipped_ste":
        inside = jnp.abs(xg) <= scale.astype(xg.dtype)
        dx = jnp.where(inside, g, jnp.zeros_like(g))
    else:  # "true"
        dx = jnp.zeros_like(g)
    return dx, jnp.zeros_like(scale)  # the scale is not learnable in this quantizer


_pow2_q.defvjp(_pow2_fwd, _pow2_bwd)


# ----------------------------------------------------------------------------------------------
# Public functions.


def _param_shape(view_shape: tuple[int, ...], ndim: int, config: PowerOfTwoConfig):
    axes = reduce_axes(ndim, config.granularity, config.axis)
    return tuple(1 if i in axes else d for i, d in enumerate(view_shape))


def _check_scale(params: Any, view_shape, ndim: int, config: PowerOfTwoConfig) -> jax.Array:
    if not isinstance(params, Mapping) or set(params) != {"scale"}:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params={keys!r} is not allowed; allowed: a dict with the key 'scale'")
    scale = jnp.asarray(params["scale"])
    want = _param_shape(view_shape, ndim, config)
    if scale.shape != want:
        raise ValueError(
            f"params['scale'] has shape {scale.shape}; allowed for x of shape {view_shape} "
            f"(grouped view) at granularity={config.granularity!r}: {want}"
        )
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise TypeError(f"params['scale'] must be floating, got dtype {scale.dtype}")
    return scale


def pow2_init(x: ArrayLike, config: PowerOfTwoConfig) -> dict[str, jax.Array]:
    """Returns ``{"scale": 2^round(log2 max|x|)}`` (float32) at the config's granularity.

    The rounding is the quantizer's own log-domain rounding, so the largest element maps to the
    top level ``s`` without saturating. All-zero (or non-finite) slices get scale 1. The scale
    broadcasts against ``grouped(x)`` (shape ``(1,)*x.ndim`` per tensor). An empty ``x`` raises
    ValueError naming its shape (the largest of nothing is undefined).

    >>> pow2_init(jnp.array([0.3, -1.3, 0.5]), PowerOfTwoConfig())["scale"].tolist()
    [1.0]
    """
    x = jnp.asarray(x)
    _check_float(x, "pow2_init")
    check_nonempty(x, "pow2_init")
    ax = jnp.abs(x).astype(jnp.float32)
    view = grouped(ax, config.granularity, config.axis, config.group_size)
    absmax = jnp.max(view, axis=reduce_axes(x.ndim, config.granularity, config.axis), keepdims=True)
    field, _ = _round_log2_field(absmax, _F32)
    field = jnp.clip(field, 1, 2 * _F32.bias)
    scale = lax.bitcast_convert_type(field << _F32.nmant, jnp.float32)
    scale = jnp.where((absmax > 0) & jnp.isfinite(absmax), scale, 1.0)
    return {"scale": lax.stop_gradient(scale)}


def pow2(
    x: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: PowerOfTwoConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantizes ``x`` to ``±s·2^−k`` (and 0), rounding in the log domain.

    Args:
      x: floating array.
      params: ``{"scale": s}``, ``s > 0`` of the shape :func:`pow2_init` returns.
      config: the quantizer's configuration.
      key: unused (the quantizer is deterministic); accepted for a uniform signature.

    Returns:
      The quantized array, same shape and dtype as ``x``.

    >>> cfg = PowerOfTwoConfig(bits=3)  # levels ±1, ±1/2, ±1/4 and 0
    >>> x = jnp.array([0.9, 0.7, 0.36, 0.124, 0.126, -3.0])
    >>> pow2(x, {"scale": jnp.ones((1,))}, cfg).tolist()
    [1.0, 0.5, 0.5, 0.0, 0.25, -1.0]
    """
    del key
    x = jnp.asarray(x)
    _check_float(x, "pow2")
    xg = grouped(x, config.granularity, config.axis, config.group_size)
    scale = _check_scale(params, xg.shape, x.ndim, config)
    return ungrouped(_pow2_q(xg, scale, config), x.shape)


def pow2_codes(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: PowerOfTwoConfig
) -> jax.Array:
    """Int32 codes of ``pow2(x, params, config)``: ``sign·2^(bits−1) + k`` (module docstring).

    Zero (``zero=True``) has the code ``2^(bits−1) − 1``. NaN has no code (its code is
    unspecified). ``pow2_dequantize(pow2_codes(x, p, c), p, c) == pow2(x, p, c)`` exactly.

    >>> cfg, params = PowerOfTwoConfig(bits=3), {"scale": jnp.ones((1,))}
    >>> pow2_codes(jnp.array([1.0, 0.5, 0.25, 0.0, -1.0, -0.25]), params, cfg).tolist()
    [0, 1, 2, 3, 4, 6]
    """
    x = jnp.asarray(x)
    _check_float(x, "pow2_codes")
    xg = grouped(x, config.granularity, config.axis, config.group_size)
    scale = lax.stop_gradient(_check_scale(params, xg.shape, x.ndim, config))
    lay = _layout(xg.dtype)
    xc = lax.stop_gradient(xg).astype(lay.float_dtype)
    field, ybits, a = _pow2_field(xc, scale.astype(lay.float_dtype), config, lay)
    k = (lay.bias + a - field).astype(jnp.int32)
    codes = jnp.where(xc < 0, k + 2 ** (config.bits - 1), k)
    if config.zero:
        codes = jnp.where(_zero_mask(ybits, config, lay, a), config.num_magnitudes, codes)
    return ungrouped(codes, x.shape)


def pow2_dequantize(
    codes: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: PowerOfTwoConfig,
    *,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Values of :func:`pow2_codes` codes: ``(−1)^sign·s·2^−k``, or 0 for the zero code.

    Only the low ``bits`` bits of each code are read.

    Args:
      codes: integer array of the shape of the quantized tensor.
      params: the same ``{"scale": s}`` the codes were made with.
      config: the same config.
      dtype: floating dtype of the result.
    """
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"pow2_dequantize expects integer codes, got dtype {codes.dtype}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"pow2_dequantize: dtype={dtype!r} is not a floating dtype")
    cg = grouped(codes.astype(jnp.int32), config.granularity, config.axis, config.group_size)
    scale = _check_scale(params, cg.shape, codes.ndim, config)
    lay = _layout(jnp.dtype(dtype))
    s = scale.astype(lay.float_dtype)
    a = _offset(config, lay)
    half = 2 ** (config.bits - 1)
    k = cg & (half - 1)
    negative = (cg & half) != 0
    if not config.zero:  # every magnitude field is a level
        field = (lay.bias + a - k).astype(lay.uint_dtype)
    else:  # the all-ones field k = K is zero; keep its exponent in range, it is replaced below
        field = (lay.bias + a - jnp.minimum(k, config.num_magnitudes - 1)).astype(lay.uint_dtype)
    mag = _magnitude(field, s, lay, a)
    out = jnp.where(negative, -mag, mag)
    if config.zero:
        out = jnp.where(k == config.num_magnitudes, 0.0, out)
    return ungrouped(out, codes.shape).astype(dtype)


def pow2_levels(scale: float, config: PowerOfTwoConfig) -> np.ndarray:
    """All the values the quantizer can output for a scalar scale, sorted (float64, numpy).

    ``2·K`` levels, plus 0 when ``config.zero``: ``2^bits`` levels without zero, ``2^bits − 1``
    with it. Real-number values (no float32 underflow).
    """
    k = np.arange(config.num_magnitudes, dtype=np.float64)
    mags = float(scale) * np.exp2(-k)
    levels = np.concatenate([-mags, mags, [0.0] if config.zero else []])
    return np.sort(levels)


# ---------------------------------------------------------------------------------- family


class Pow2Family(QuantizerFamily):
    """``"pow2"``: :func:`pow2` with the power-of-two scale recomputed from the tensor on every
    call (:func:`pow2_init`); no learnable params."""

    name = "pow2"
    config_types = (PowerOfTwoConfig,)

    def roles(self, spec):
        return ("weight", "act", "grad")

    def apply(self, spec, x, params, *, key=None, stats=None):
        return pow2(x, pow2_init(jax.lax.stop_gradient(x), spec.config), spec.config)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_pow2

        return quantize_pow2(x, pow2_init(x, spec.config), spec.config)

    def weight_lowering(self, spec, params, stats):
        return WeightLowering("pow2", granularity=spec.config.granularity, axis=spec.config.axis)


register_family(Pow2Family())
