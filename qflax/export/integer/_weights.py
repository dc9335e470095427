"""The integer form of a quantized layer's weight codes, per weight lowering
(:class:`~qflax.export.integer._plan.WeightLowering`): uniform codes (a zero point folded in or
carried as an input-sum term), power-of-two codes as ternary masks combined by shifts, dead-zone
(CoDeQ) codes as two planes. :func:`lower_weights` is the one entry point; numpy, on the
:class:`~qflax.export.QArray` of the layer's kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qflax.export.integer._arith import INT32_MAX, code_dtype, offset_fraction_bits
from qflax.export.integer._plan import Step
from qflax.quantizers import WeightLowering


@dataclasses.dataclass(frozen=True)
class LoweredWeights:
    """``acc = Σ_j c_j·(op(x, kernel[j]) << shifts[j]) + input_sum·Σx`` at the real unit
    ``s_in·scale[c]`` per output channel; ``worst`` bounds ``|acc|`` (before any bias)."""

    kernel: jax.Array
    scale: np.ndarray  # float64 (out,)
    worst: float
    shifts: tuple[int, ...] = ()
    coefficients: tuple[int, ...] = ()
    input_sum: jax.Array | None = None


def lower_weights(
    step: Step, lowering: WeightLowering, q: Any, act_max: int, shifts: bool
) -> LoweredWeights:
    """The integer kernel of a uniform / pow2 / codeq layer from its weight codes ``q`` (an
    unpacked QArray); ``act_max`` bounds the input codes' magnitude; ``shifts``: pow2 weights
    as one ternary mask per exponent (True) or one integer kernel ``±2^(K−k)`` (False)."""
    out_channels = q.shape[-1]
    s_w = np.broadcast_to(np.asarray(q.scale, np.float64).reshape(-1), (out_channels,))
    fan_in = math.prod(q.shape[:-1])
    if lowering.kind == "pow2":
        exponent, sign, top = _pow2_integer_kernel(q)
        magnitude = np.where(sign != 0, np.exp2(top - np.maximum(exponent, 0)), 0.0)
        worst = float(act_max * magnitude.reshape(fan_in, out_channels).sum(0).max())
        if worst > INT32_MAX:
            raise ValueError(
                f"layer {step.path!r} (recipe {str(step.layer.recipe)!r}): its power-of-two "
                f"weights span 2^{top} (exponents 0..{top} in use), so the int32 accumulator "
                f"can overflow ({worst:.3g} > 2^31 − 1); allowed: fewer weight bits (pow2 with "
                "<= 4 bits always fits fan-ins up to 2^17)"
            )
        s_w = s_w * 2.0**-top
        if shifts:
            masks, plane_shifts = _pow2_planes(exponent, sign, top)
            return LoweredWeights(jnp.asarray(masks), s_w, worst, shifts=plane_shifts)
        w = (sign * np.exp2(top - np.maximum(exponent, 0))).astype(np.int64)
        kernel = jnp.asarray(w.astype(code_dtype(int(w.min()), int(w.max()))))
        return LoweredWeights(kernel, s_w, worst)
    if lowering.kind == "codeq":
        kernel, coefficients, s_w, worst = _codeq_planes(q, s_w, act_max, fan_in)
        return LoweredWeights(kernel, s_w, worst, coefficients=coefficients)
    if _has_zero_point(q) and not _half_integer_zero_point(q):
        kernel, coefficients, input_sum, s_w, worst = _zero_point_planes(q, s_w, act_max, fan_in)
        return LoweredWeights(kernel, s_w, worst, coefficients=coefficients, input_sum=input_sum)
    values = np.asarray(q.values)
    if _has_zero_point(q):  # zp a multiple of ½ (DoReFa: n/2): codes 2·(v − zp) at s/2
        values = np.round(2.0 * (values.astype(np.float64) - _zero_points(q, out_channels)))
        values = values.astype(np.int64)
        s_w = s_w / 2.0
    kernel = jnp.asarray(values.astype(code_dtype(int(values.min()), int(values.max()))))
    w_max = lowering.code_max
    if w_max is None:
        w_max = int(np.abs(values.astype(np.int64)).max(initial=0))
    return LoweredWeights(kernel, s_w, float(fan_in * act_max * w_max))


def _pow2_integer_kernel(q: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """The codes of a pow2 QArray as integers: ``(exponent, sign, K)``.

    ``exponent[i]`` is ``k`` of the level ``±s·2^−k`` (−1 for the zero code), ``sign[i]`` is
    ±1 (0 for zero), ``K`` the largest exponent in use (0 for an all-zero kernel): the integer
    weight is ``sign·2^(K − k)`` at the scale ``s·2^−K``.
    """
    v = np.asarray(q.values).astype(np.int64)
    half = 2 ** (q.bits - 1)
    k = v & (half - 1)
    zero = (k == half - 1) if q.pow2_zero else np.zeros(v.shape, bool)
    sign = np.where(zero, 0, np.where((v & half) != 0, -1, 1))
    exponent = np.where(zero, -1, k)
    return exponent, sign, int(exponent.max(initial=0))


def _pow2_planes(exponent: np.ndarray, sign: np.ndarray, top: int):
    """One ternary int8 mask per exponent in use and its left shift ``K − k`` (largest first)."""
    used = sorted(int(k) for k in np.unique(exponent) if k >= 0) or [top]
    masks = np.stack([np.where(exponent == k, sign, 0) for k in used]).astype(np.int8)
    return masks, tuple(top - k for k in used)


def _codeq_planes(q: Any, s_w: np.ndarray, act_max: int, fan_in: int):
    """The integer planes of a dead-zone (CoDeQ) kernel ``ŵ = s·v + z·sign(v)``.

    ``x·ŵ = s·(x·v) + z·(x·sign v)``: two int8 products combined in int32 at the unit
    ``s·2^−k``: ``acc = 2^k·(x·v) + R·(x·sign v)`` with ``R = round(z/s·2^k)``, ``k`` (≤ 30)
    as large as keeps the worst-case accumulator within 2^29 (the unit is 2^k times finer for
    the bias too; the bias shift takes what is left). The rounding of ``R`` is the one
    approximation: each nonzero weight's dead-zone offset is off by at most ``2^−(k+1)`` of a
    step ``s``. At 2 bits (``|v| ≤ 1``: ``v = sign v``) the levels are ``±(s + z)`` and the
    layer is exact: one plane ``v`` at the float32 scale ``s + z`` (the reference's own level).

    Returns:
      ``(planes, coefficients, weight scale per channel, worst-case |acc|)``.
    """
    v = np.asarray(q.values).astype(np.int64)
    sign = np.sign(v)
    z = float(np.asarray(q.zero_point, np.float64).reshape(-1)[0])
    s = float(np.asarray(q.scale, np.float64).reshape(-1)[0])
    out_channels = v.shape[-1]
    signs = np.abs(sign).reshape(fan_in, out_channels).sum(0)
    if np.abs(v).max(initial=0) <= 1:
        level = float(np.float32(s) + np.float32(z))  # fl(s·1 + z·1), as the quantizer computes
        planes = jnp.asarray(v[None].astype(np.int8))
        return planes, (1,), np.full(out_channels, level), act_max * float(signs.max(initial=0))
    ratio = z / s if s > 0 else 0.0
    per_channel = np.abs(v).reshape(fan_in, out_channels).sum(0)
    k, worst = offset_fraction_bits(per_channel, signs, np.float64(ratio), act_max)
    planes = jnp.asarray(np.stack([v, sign]).astype(np.int8))
    return planes, (2**k, int(np.round(ratio * 2.0**k))), s_w * 2.0**-k, worst


def _has_zero_point(q: Any) -> bool:
    return q.zero_point is not None and bool(np.any(np.asarray(q.zero_point) != 0))


def _zero_points(q: Any, out_channels: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(q.zero_point, np.float64).reshape(-1), (out_channels,))


def _half_integer_zero_point(q: Any) -> bool:
    """Whether ``2·zp`` is an integer: ``s·(v − zp) = (s/2)·(2v − 2zp)`` on integer codes."""
    twice = 2.0 * np.asarray(q.zero_point, np.float64)
    return bool(np.all(twice == np.round(twice)))


def _zero_point_planes(q: Any, s_w: np.ndarray, act_max: int, fan_in: int):
    """The integer form of uniform weights with a zero point: ``ŵ = s·(v − zp)``.

    ``zp`` per output channel (or per tensor) need not be an integer (GDNSQ: ``zp = −min w/s``).
    With ``zi = round(zp)`` and ``zf = zp − zi`` (``|zf| ≤ ½``): ``x·ŵ = s·(x·(v − zi)) −
    s·zf·Σx``; in int32 at the unit ``s·2^−k``: ``acc = 2^k·(x·(v − zi)) + R·Σx`` with
    ``R_c = round(−zf_c·2^k)`` and ``Σx`` the input codes summed over the output's window (a
    product with a ones kernel; padded taps are 0, as in the float model), ``k`` (≤ 30) as
    large as keeps the worst-case accumulator within 2^29. The rounding of ``R`` is the one
    approximation (none when ``zf·2^k`` is an integer): every weight is off by at most
    ``2^−(k+1)`` of a step ``s``, as the bias's rounding.

    Returns:
      ``(planes (1, ...), (2^k,), R (int32, per channel), weight scale per channel, worst)``.
    """
    out_channels = q.shape[-1]
    zp = _zero_points(q, out_channels)
    zi = np.round(zp)
    zf = zp - zi
    v = np.asarray(q.values).astype(np.int64) - zi.astype(np.int64)
    per_channel = np.abs(v).reshape(fan_in, out_channels).sum(0)
    k, worst = offset_fraction_bits(per_channel, fan_in, zf, act_max)
    planes = jnp.asarray(v[None].astype(code_dtype(int(v.min()), int(v.max()))))
    r = jnp.asarray(np.round(-zf * 2.0**k).astype(np.int32))
    return planes, (2**k,), r, s_w * 2.0**-k, worst
