"""Quantized values at rest: the :class:`QArray` pytree, quantize/dequantize, bit packing.

Jacob et al. 2018 (CVPR), eq. (1) ``r = S·(q − Z)`` for the uniform kind (METHODS.md §1); the
other kinds store the codes of the qflax quantizers (power-of-two, binary, ternary, CoDeQ) with
the scales that decode them, so that ``dequantize`` reproduces each quantizer's output exactly.
LSQ, DoReFa, PACT, GDNSQ and DBSSQ are stored in these kinds too: exactly, or (DoReFa ``k > 1``,
PACT, GDNSQ, whose forward is not a QArray formula) within a few float32 ulps stated by each
``quantize_*`` function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax import quantizers as qz
from qflax.numerics import (
    check_choice,
    exp2,
    pack_bits,
    packed_size,
    smallest_int_dtype,
    unpack_bits,
)
from qflax.quantizers._base import grouped, ungrouped
from qflax.quantizers._codeq import _quant_params as _codeq_quant_params
from qflax.quantizers._dbssq import _SIGMA_MULTIPLE as _DBSSQ_SIGMA_MULTIPLE
from qflax.quantizers._gdnsq import _floor_act_range as _gdnsq_floor_act_range
from qflax.quantizers._gdnsq import _floor_weight_step as _gdnsq_floor_weight_step
from qflax.quantizers._gdnsq import _weight_axes as _gdnsq_weight_axes

__all__ = [
    "QARRAY_KINDS",
    "QArray",
    "container_bits",
    "dequantize",
    "nbytes",
    "pack",
    "quantize_binary",
    "quantize_codeq",
    "quantize_dbssq_act",
    "quantize_dbssq_weight",
    "quantize_dorefa",
    "quantize_gdnsq_act",
    "quantize_gdnsq_weight",
    "quantize_lsq",
    "quantize_pact",
    "quantize_pow2",
    "quantize_ternary",
    "quantize_uniform",
    "unpack",
]

QARRAY_KINDS = ("uniform", "pow2", "binary", "ternary", "codeq")

# Widths codes are stored in when packed: several codes per byte up to 8 bits, then whole words.
_CONTAINERS = (1, 2, 4, 8, 16, 32)


def container_bits(bits: int) -> int:
    """The storage width of a ``bits``-bit code: the next of 1, 2, 4, 8, 16, 32.

    >>> container_bits(3), container_bits(1), container_bits(5), container_bits(12)
    (4, 1, 8, 16)
    """
    return next(w for w in _CONTAINERS if w >= bits)


@dataclasses.dataclass(frozen=True)
class QArray:
    """An integer-coded tensor with the scales that decode it (a pytree).

    Data (pytree leaves): ``values``, ``scale``, ``zero_point``. Everything else is static
    (part of the tree structure, so a jitted function recompiles when it changes).

    Invariants, elementwise over ``x̂ = dequantize(q)`` (shape ``q.shape``), with ``v`` the
    unpacked codes, ``s`` and ``z`` broadcast against ``v`` (for ``granularity="group"`` against
    the grouped view ``grouped(v, "group", axis, group_size)``):

    * ``kind="uniform"``:  ``x̂ = s·(v − z)``, ``z = 0`` when ``zero_point is None`` (symmetric);
      ``qmin ≤ v ≤ qmax`` of :func:`qflax.numerics.int_range` ``(bits, signed)``. ``z`` is an
      int32 zero point, or float32 for grids that do not contain 0 (DoReFa weights, GDNSQ:
      see :func:`quantize_dorefa`, :func:`quantize_gdnsq_weight`).
    * ``kind="pow2"``:     ``x̂ = (−1)^⌊v / 2^(b−1)⌋ · s · 2^−(v mod 2^(b−1))``, and ``x̂ = 0``
      where ``pow2_zero`` and ``v mod 2^(b−1) = 2^(b−1) − 1`` (the codes of
      :func:`qflax.quantizers.pow2_codes`); ``0 ≤ v < 2^b``, ``zero_point is None``.
    * ``kind="binary"``:   ``x̂ = s·(2v − 1)``, ``v ∈ {0, 1}``, ``bits = 1``, unsigned.
    * ``kind="ternary"``:  ``x̂ = s·v``, ``v ∈ {−1, 0, 1}``, ``bits = 2``, signed.
    * ``kind="codeq"``:    ``x̂ = s·v + z·sign(v)`` (``z`` is CoDeQ's shift), ``|v| ≤ 2^(b−1) − 1``.

    Storage: unpacked, ``values`` has ``shape`` and dtype ``smallest_int_dtype(bits, signed)``
    (int8/uint8 up to 8 bits). Packed (``packed=True``), codes of up to 8 bits are stored by
    :func:`qflax.numerics.pack_bits` at ``container_bits(bits)`` bits each (int4: two per byte,
    binary: eight per byte, ternary: four per byte) as a flat uint8 array of
    ``packed_size(prod(shape), container_bits(bits))`` bytes; wider codes keep their integer
    dtype. ``unpack(pack(q)) == q`` exactly (values, dtype and every other field).
    ``nbytes(q) = values.nbytes + scale.nbytes + zero_point.nbytes``.
    """

    # The integer codes (unpacked: `shape`, int8/uint8/int16/int32) or the packed bytes (uint8).
    values: jax.Array
    # Float32 scales, broadcastable against the (grouped) codes.
    scale: jax.Array
    # Zero points (uniform: int32, or float32 for DoReFa / GDNSQ grids), CoDeQ's float shift,
    # or None (no zero point).
    zero_point: jax.Array | None
    # Bits per code (the range of the codes; packing uses container_bits(bits)).
    bits: int
    # Whether the codes are signed (two's complement when packed).
    signed: bool
    # The shape of the quantized tensor.
    shape: tuple[int, ...]
    # Whether `values` holds packed bytes.
    packed: bool
    # How codes decode: one of QARRAY_KINDS (see the invariants above).
    kind: str
    # Which elements share a scale: "tensor", "channel", "group" (uniform, pow2), else "tensor".
    granularity: str = "tensor"
    # The channel axis, or the axis cut into groups.
    axis: int = -1
    # Elements per group for granularity="group"; None otherwise.
    group_size: int | None = None
    # pow2 only: whether the all-ones magnitude code means 0 (PowerOfTwoConfig.zero).
    pow2_zero: bool = True

    def __post_init__(self):
        # Only static fields are checked: the leaves may be tracers or placeholders in transforms.
        check_choice(self.kind, "kind", QARRAY_KINDS)
        if not 1 <= int(self.bits) <= 32:
            raise ValueError(f"bits={self.bits!r} is out of range; allowed: integers 1..32")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def size(self) -> int:
        """Number of elements of the quantized tensor."""
        return math.prod(self.shape)


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["values", "scale", "zero_point"],
    meta_fields=[
        "bits",
        "signed",
        "shape",
        "packed",
        "kind",
        "granularity",
        "axis",
        "group_size",
        "pow2_zero",
    ],
)


# ---------------------------------------------------------------------------------- packing


def pack(q: QArray) -> QArray:
    """Packs sub-byte codes into bytes (int4 two per byte, binary eight, ternary/2-bit four).

    Codes of 3, 5, 6, 7 bits go in the next packable width (4 or 8 bits); codes wider than 8
    bits keep their integer dtype. A packed QArray is returned unchanged.
    """
    if q.packed:
        return q
    width = container_bits(q.bits)
    values = jnp.asarray(q.values)
    if width <= 8:
        values = pack_bits(values, width)
    else:
        values = values.astype(smallest_int_dtype(q.bits, q.signed))
    return dataclasses.replace(q, values=values, packed=True)


def unpack(q: QArray) -> QArray:
    """Inverse of :func:`pack`: codes of ``q.shape`` in ``smallest_int_dtype(bits, signed)``."""
    if not q.packed:
        return q
    width = container_bits(q.bits)
    values = jnp.asarray(q.values)
    if width <= 8:
        values = unpack_bits(values, width, q.shape, q.signed)
    return dataclasses.replace(q, values=values, packed=False)


def nbytes(q: QArray) -> int:
    """Bytes at rest: values (packed or not, as stored) plus scales plus zero points."""
    total = int(np.dtype(q.values.dtype).itemsize) * math.prod(jnp.shape(q.values))
    for leaf in (q.scale, q.zero_point):
        if leaf is not None:
            total += int(np.dtype(leaf.dtype).itemsize) * math.prod(jnp.shape(leaf))
    return total


def packed_nbytes(shape: tuple[int, ...], bits: int) -> int:
    """Bytes of the packed codes of a tensor of ``shape`` (without scales)."""
    width = container_bits(bits)
    n = math.prod(shape)
    return packed_size(n, width) if width <= 8 else n * width // 8


# ---------------------------------------------------------------------------------- quantize


def _codes(v: jax.Array, bits: int, signed: bool) -> jax.Array:
    return jnp.asarray(v).astype(smallest_int_dtype(bits, signed))


def quantize_uniform(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.UniformConfig
) -> QArray:
    """The codes of :func:`qflax.quantizers.uniform` at rest (unpacked).

    ``dequantize(quantize_uniform(x, p, c)) == uniform(x, p, c)`` exactly (float32 ``x``).
    Symmetric configs store no zero point; asymmetric ones store ``round(z)`` as int32.
    """
    x = jnp.asarray(x)
    codes = qz.uniform_codes(x, params, config)
    scale = jnp.asarray(params["scale"], jnp.float32)
    zero_point = None
    if not config.symmetric:
        zero_point = jnp.round(jnp.asarray(params["zero_point"], jnp.float32)).astype(jnp.int32)
    return QArray(
        values=_codes(codes, config.bits, config.signed),
        scale=scale,
        zero_point=zero_point,
        bits=config.bits,
        signed=config.signed,
        shape=x.shape,
        packed=False,
        kind="uniform",
        granularity=config.granularity,
        axis=config.axis,
        group_size=config.group_size,
    )


def quantize_pow2(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.PowerOfTwoConfig
) -> QArray:
    """The codes of :func:`qflax.quantizers.pow2` (sign-magnitude, unsigned ``bits``-bit)."""
    x = jnp.asarray(x)
    codes = qz.pow2_codes(x, params, config)
    return QArray(
        values=_codes(codes, config.bits, False),
        scale=jnp.asarray(params["scale"], jnp.float32),
        zero_point=None,
        bits=config.bits,
        signed=False,
        shape=x.shape,
        packed=False,
        kind="pow2",
        granularity=config.granularity,
        axis=config.axis,
        group_size=config.group_size,
        pow2_zero=config.zero,
    )


def quantize_binary(
    x: ArrayLike, config: qz.BinaryConfig, *, key: jax.Array | None = None
) -> QArray:
    """The codes ``{0, 1}`` of :func:`qflax.quantizers.binary` and its scale ``α`` (1 bit)."""
    x = jnp.asarray(x)
    return _binary_qarray(qz.binary_codes(x, {}, config, key=key), qz.binary_scale(x, config))


def _binary_qarray(plus: jax.Array, scale: ArrayLike) -> QArray:
    """A binary QArray: ``x̂ = s·(2v − 1)`` with ``v = plus`` (``{0, 1}`` or bool)."""
    return QArray(
        values=_codes(plus, 1, False),
        scale=jnp.asarray(scale, jnp.float32),
        zero_point=None,
        bits=1,
        signed=False,
        shape=plus.shape,
        packed=False,
        kind="binary",
    )


def quantize_ternary(x: ArrayLike, config: qz.TernaryConfig) -> QArray:
    """The codes ``{−1, 0, 1}`` of :func:`qflax.quantizers.ternary` and its scale (2 bits)."""
    x = jnp.asarray(x)
    return QArray(
        values=_codes(qz.ternary_codes(x, {}, config), 2, True),
        scale=qz.ternary_scale(x, config),
        zero_point=None,
        bits=2,
        signed=True,
        shape=x.shape,
        packed=False,
        kind="ternary",
    )


def quantize_codeq(x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.CoDeQConfig) -> QArray:
    """The codes of :func:`qflax.quantizers.codeq` with its step (scale) and shift (zero_point).

    Eager only: the bit-width ``B`` (a static field) is read from the params.
    """
    x = jnp.asarray(x)
    bits = int(qz.codeq_bits(params, config))
    step, shift, _ = _codeq_quant_params(x.astype(jnp.float32), params, config)
    return QArray(
        values=_codes(qz.codeq_codes(x, params, config), bits, True),
        scale=jax.lax.stop_gradient(step),
        zero_point=jax.lax.stop_gradient(shift),
        bits=bits,
        signed=True,
        shape=x.shape,
        packed=False,
        kind="codeq",
    )


def _uniform_qarray(
    codes: jax.Array,
    scale: ArrayLike,
    zero_point: jax.Array | None,
    bits: int,
    signed: bool,
    granularity: str = "tensor",
    axis: int = -1,
    group_size: int | None = None,
) -> QArray:
    return QArray(
        values=_codes(codes, bits, signed),
        scale=jnp.asarray(scale, jnp.float32),
        zero_point=zero_point,
        bits=bits,
        signed=signed,
        shape=codes.shape,
        packed=False,
        kind="uniform",
        granularity=granularity,
        axis=axis,
        group_size=group_size,
    )


def quantize_lsq(x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.LSQConfig) -> QArray:
    """The codes ``round(clip(x/s, −QN, QP))`` of :func:`qflax.quantizers.lsq` (kind uniform,
    the step ``s`` as scale, no zero point).

    ``dequantize(quantize_lsq(x, p, c)) == lsq(x, p, c)`` exactly (float32 ``x``): both are
    ``s·round(clip(x/s, −QN, QP))``. ``params``: ``{"step": s}`` of the params shape.
    """
    x = jnp.asarray(x)
    qz.lsq(x, params, config)  # validates params and shapes (cheap, elementwise)
    step = jax.lax.stop_gradient(jnp.asarray(params["step"], jnp.float32))
    view = grouped(
        jax.lax.stop_gradient(x).astype(jnp.float32),
        config.granularity,
        config.axis,
        config.group_size,
    )
    codes = jnp.round(jnp.clip(view / step, -float(config.qn), float(config.qp)))
    return _uniform_qarray(
        ungrouped(codes, x.shape),
        step,
        None,
        config.bits,
        config.signed,
        config.granularity,
        config.axis,
        config.group_size,
    )


def quantize_dorefa(x: ArrayLike, config: qz.DoReFaConfig) -> QArray:
    """The codes of :func:`qflax.quantizers.dorefa` (weights or activations), ``k = bits``.

    * weights, ``k = 1``: kind binary, ``v = [w ≥ 0]``, scale ``mean|w|`` — exact.
    * weights, ``k > 1``: kind uniform, unsigned ``k``-bit codes ``c = round((2^k − 1)·t)``
      (``t`` of :func:`~qflax.quantizers.dorefa_weight_transform`), scale ``s = 2/(2^k − 1)``
      (correctly rounded) and the float32 half-integer zero point ``z = (2^k − 1)/2``:
      ``x̂ = s·(c − z)`` against DoReFa's ``2·(c/(2^k − 1)) − 1``. The two float32 formulas
      round differently: they differ by at most ``2^−23`` (one ulp of 1): ``2^−24`` with a
      correctly rounded division, ``2^−23`` with XLA:CPU's (which multiplies by the rounded
      reciprocal); checked for every code of every ``k`` in 2..24. About half the codes agree
      exactly.
    * activations: kind uniform, unsigned codes ``c = round((2^k − 1)·clip(x, 0, 1))``, scale
      ``1/(2^k − 1)`` (correctly rounded), no zero point: ``s·c`` against ``c/(2^k − 1)``, at
      most ``2^−24`` apart (equal on XLA:CPU, and for ``k = 1``).
    """
    x = jnp.asarray(x)
    k = int(config.bits)
    n = float(2**k - 1)
    xs = jax.lax.stop_gradient(x)
    if config.role == "weight" and k == 1:
        return _binary_qarray(xs >= 0, jnp.mean(jnp.abs(xs)))
    if config.role == "weight":
        codes = jnp.round(qz.dorefa_weight_transform(xs) * n)
        scale = np.float32(2.0 / n)
        zero_point = jnp.asarray(n / 2.0, jnp.float32)  # (2^k − 1)/2, exact in float32
        return _uniform_qarray(codes, scale, zero_point, k, False)
    inside = jnp.clip(xs, 0.0, 1.0)
    codes = jnp.round(inside * n)
    return _uniform_qarray(codes, np.float32(1.0 / n), None, k, False)


def quantize_pact(x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.PACTConfig) -> QArray:
    """The codes ``round(clip(x, 0, α)·n/α)`` of :func:`qflax.quantizers.pact` (``n = 2^b − 1``):
    kind uniform, unsigned ``b``-bit, scale ``α/n``, no zero point.

    PACT's forward is ``c·α/n`` (multiply, then divide), the QArray's ``(α/n)·c`` (``α/n``
    correctly rounded): the two float32 results differ by at most ``2^−21·α`` (at most three
    roundings on each side, each within ``2^−24·α``; measured up to ``2^−22·α`` on XLA:CPU),
    and are equal for ``b = 1``.
    """
    x = jnp.asarray(x)
    qz.pact(x, params, config)  # validates params
    n = float(config.levels)
    alpha = jax.lax.stop_gradient(jnp.asarray(params["alpha"], jnp.float32))
    y = jnp.clip(jax.lax.stop_gradient(x).astype(jnp.float32), 0.0, alpha)
    codes = jnp.round(y * n / alpha)
    scale = np.float32(np.float64(alpha) / n)
    return _uniform_qarray(codes, scale, None, config.bits, False)


def _off_grid_zero_point(lowest: jax.Array, step: jax.Array) -> jax.Array:
    """``−lowest/step`` correctly rounded to float32 (float64 division; eager)."""
    ratio = -np.asarray(lowest, np.float64) / np.asarray(step, np.float64)
    return jnp.asarray(ratio.astype(np.float32))


def quantize_gdnsq_weight(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.GDNSQWeightConfig
) -> QArray:
    """The codes of :func:`qflax.quantizers.gdnsq_weight`: kind uniform, unsigned.

    GDNSQ's forward is ``ŵ = s·c + z`` with ``c = round((w − z)/s)`` (:func:`~qflax.quantizers.
    gdnsq_weight_codes`), ``z = min w_c`` and ``s = 2^ℓ_c`` (capped by ``min_bits``) per output
    channel (or per tensor). Stored: the codes, scale ``s`` and the float32 zero point
    ``−z/s`` (correctly rounded), i.e. ``x̂ = s·(c + z/s)``; ``s·c + z`` itself is no QArray
    formula (``z`` is off the grid), so ``x̂`` differs from ``ŵ`` by at most ``2^−21·max|ŵ_c|``
    per channel (``z`` is a level of the channel and ``s·c ≤ 2·max|ŵ_c|``: the roundings add up
    to at most ``6·2^−24·max|ŵ_c|`` to first order; measured up to about ``2^−23·max|ŵ_c|``).

    Eager only: the bit-width (a static field) is that of the largest code present,
    ``ceil(log2(max c + 1))`` (at least 1), as :meth:`qflax.layers.TensorQuant.used_bits`.
    """
    x = jnp.asarray(x)
    codes = qz.gdnsq_weight_codes(x, params, config)  # validates params
    wc = jax.lax.stop_gradient(x).astype(jnp.float32)
    log_step = jax.lax.stop_gradient(jnp.asarray(params["log_step"], jnp.float32))
    step = exp2(_gdnsq_floor_weight_step(wc, log_step, config))
    lowest = jnp.min(wc, axis=_gdnsq_weight_axes(x.ndim, config), keepdims=True)
    bits = max(1, int(jnp.max(codes)).bit_length())
    zero_point = _off_grid_zero_point(lowest, step)
    return _uniform_qarray(codes, step, zero_point, bits, False, config.granularity, config.axis)


def quantize_gdnsq_act(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: qz.GDNSQActConfig
) -> QArray:
    """The codes of :func:`qflax.quantizers.gdnsq_act`: kind uniform, unsigned, per tensor.

    GDNSQ's forward is ``x̂ = s·c + β`` (``c`` of :func:`~qflax.quantizers.gdnsq_act_codes`,
    ``s = 2^ℓ_s``). With ``β = 0`` (unsigned activations) the QArray stores no zero point and
    ``s·c`` is exact; otherwise the float32 zero point ``−β/s``, within
    ``2^−21·max(|β|, max|x̂|)`` of the forward (as :func:`quantize_gdnsq_weight`).

    Eager only: the bit-width covers every code of the clip range,
    ``ceil(log2(round(2^(ℓ_q − ℓ_s))))`` (``ℓ_q`` raised by ``min_bits``), and the codes present.
    """
    x = jnp.asarray(x)
    codes = qz.gdnsq_act_codes(x, params, config)  # validates params
    p = {k: jax.lax.stop_gradient(jnp.asarray(params[k], jnp.float32)) for k in params}
    log_range = _gdnsq_floor_act_range(p["log_step"], p["log_range"], config)
    step = exp2(p["log_step"])
    top = max(int(jnp.round(exp2(log_range - p["log_step"]))) - 1, int(jnp.max(codes)))
    bits = max(1, top.bit_length())
    lower = p["lower"]
    zero_point = None if float(lower) == 0.0 else _off_grid_zero_point(lower, step)
    return _uniform_qarray(codes, step, zero_point, bits, False)


def _dbssq_qarray(
    y: jax.Array, scale: jax.Array, config: qz.DBSSQConfig, granularity: str, axis: int = -1
) -> QArray:
    """Codes of DBSSQ's exact output ``y = scale·Q`` (``Q`` on the shift / uniform levels),
    read back from ``y`` (the forward itself, so the codes are those of ``apply``)."""
    scale = jnp.asarray(scale, jnp.float32)
    negative = jnp.signbit(y)  # Q ≤ 0 gives a negative level (also −0.0 where scale = 0)
    b = int(config.bits)
    if (config.levels == "shift" and b == 0) or (config.levels == "uniform" and b == 1):
        # one magnitude: ±scale, a binary tensor (s·(2v − 1) keeps the sign of zero)
        return _binary_qarray(~negative, scale)
    if config.levels == "shift":
        # |Q| = 2^−k, k = 0..2^b − 1: sign-magnitude pow2 codes in b + 1 bits, no zero level.
        # y = scale·2^−k exactly, so k is the difference of the binary exponents (no division,
        # which XLA does not round correctly).
        last = 2**b - 1
        k = jnp.frexp(scale)[1] - jnp.frexp(jnp.abs(y))[1]
        # scale = 0 (a constant pretrained channel), or y flushed to 0 (subnormal): any level
        # gives ±0, the smallest one too
        k = jnp.where((scale > 0) & (y != 0), jnp.clip(k, 0, last), last)
        codes = jnp.where(negative, k + 2**b, k)
        return QArray(
            values=_codes(codes, b + 1, False),
            scale=scale,
            zero_point=None,
            bits=b + 1,
            signed=False,
            shape=y.shape,
            packed=False,
            kind="pow2",
            granularity=granularity,
            axis=axis,
            pow2_zero=False,
        )
    # uniform levels ±m/n, m = 1..n, n = 2^(b−1): no zero level, so b + 1 signed bits.
    n = float(2 ** (b - 1))
    safe = jnp.where(scale > 0, scale, 1.0)
    m = jnp.clip(jnp.round(jnp.abs(y) * n / safe), 1.0, n)  # |y|·n/scale = m up to rounding
    codes = jnp.where(negative, -m, m)
    return _uniform_qarray(codes, scale / n, None, b + 1, True, granularity, axis)


def quantize_dbssq_weight(
    x: ArrayLike, sigma: ArrayLike, config: qz.DBSSQConfig, *, axis: int = -1
) -> QArray:
    """The codes of :func:`qflax.quantizers.dbssq_weight` at ``ε = 0`` (the exact model):
    ``3σ_c·Q(ŵ/3)`` per output channel ``c``, ``σ`` as that function takes it (keepdims).

    Exact (float32): ``"shift"`` levels ``±3σ_c·2^−k`` are kind pow2 (``b + 1`` bits, scale
    ``3σ_c``, no zero level); ``"uniform"`` levels ``±3σ_c·m/2^(b−1)`` kind uniform with
    ``b + 1`` signed bits (the ``2^b`` levels have no zero, so they are not a ``b``-bit grid;
    scale ``3σ_c/2^(b−1)``); a single magnitude (shift ``b = 0``, uniform ``b = 1``) is binary
    with scale ``3σ_c``. ``ε > 0`` (the relaxed blend) has no integer codes: see
    :func:`qflax.export.quantize_tensor`.
    """
    x = jnp.asarray(x)
    y = qz.dbssq_weight(jax.lax.stop_gradient(x), 0.0, sigma, config, axis=axis)
    scale = _DBSSQ_SIGMA_MULTIPLE * jnp.asarray(sigma).astype(jnp.float32)
    return _dbssq_qarray(y.astype(jnp.float32), scale, config, "channel", axis)


def quantize_dbssq_act(
    x: ArrayLike, config: qz.DBSSQConfig, *, running: tuple[ArrayLike, ArrayLike] | None = None
) -> QArray:
    """The codes of :func:`qflax.quantizers.dbssq_act` at ``ε = 0``: ``3·Q(x̂/3)`` with ``x̂``
    ``x`` batch-normalised (``running``: the running ``(mean, var)``; None: this batch's
    statistics); the encodings of :func:`quantize_dbssq_weight` with the scale 3 per tensor.
    Exact (float32)."""
    x = jnp.asarray(x)
    y = qz.dbssq_act(jax.lax.stop_gradient(x), 0.0, config, running=running)
    scale = jnp.full((1,) * x.ndim, _DBSSQ_SIGMA_MULTIPLE, jnp.float32)
    return _dbssq_qarray(y.astype(jnp.float32), scale, config, "tensor")


# ---------------------------------------------------------------------------------- dequantize


def dequantize(q: QArray, dtype: Any = jnp.float32) -> jax.Array:
    """The float tensor ``x̂`` the codes stand for (the invariants of :class:`QArray`)."""
    q = unpack(q)
    v = jnp.asarray(q.values)
    s = jnp.asarray(q.scale, jnp.float32)
    if q.kind == "uniform":
        view = grouped(v.astype(jnp.float32), q.granularity, q.axis, q.group_size)
        z = 0.0 if q.zero_point is None else jnp.asarray(q.zero_point).astype(jnp.float32)
        out = ungrouped(s * (view - z), q.shape)
    elif q.kind == "pow2":
        config = qz.PowerOfTwoConfig(
            bits=q.bits,
            zero=q.pow2_zero,
            granularity=q.granularity,
            axis=q.axis,
            group_size=q.group_size,
        )
        out = qz.pow2_dequantize(v, {"scale": s}, config)
    elif q.kind == "binary":
        out = s * (2.0 * v.astype(jnp.float32) - 1.0)
    elif q.kind == "ternary":
        out = s * v.astype(jnp.float32)
    else:  # codeq
        vf = v.astype(jnp.float32)
        shift = jnp.asarray(q.zero_point, jnp.float32)
        out = jnp.where(vf == 0, 0.0, s * vf + shift * jnp.sign(vf))
    return out.astype(dtype)
