"""Quantized values at rest: the :class:`QArray` pytree, quantize/dequantize, bit packing.

Jacob et al. 2018 (CVPR), eq. (1) ``r = S·(q − Z)`` for the uniform kind (METHODS.md §1); the
other kinds store the codes of the qflax quantizers (power-of-two, binary, ternary, CoDeQ) with
the scales that decode them, so that ``dequantize`` reproduces each quantizer's output exactly.
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
from qflax.numerics import check_choice, pack_bits, packed_size, smallest_int_dtype, unpack_bits
from qflax.quantizers._base import grouped, ungrouped
from qflax.quantizers._codeq import _quant_params as _codeq_quant_params

__all__ = [
    "QARRAY_KINDS",
    "QArray",
    "container_bits",
    "dequantize",
    "nbytes",
    "pack",
    "quantize_binary",
    "quantize_codeq",
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
      ``qmin ≤ v ≤ qmax`` of :func:`qflax.numerics.int_range` ``(bits, signed)``.
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
    # Integer zero points (uniform, asymmetric), CoDeQ's float shift, or None (no zero point).
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
    return QArray(
        values=_codes(qz.binary_codes(x, {}, config, key=key), 1, False),
        scale=qz.binary_scale(x, config),
        zero_point=None,
        bits=1,
        signed=False,
        shape=x.shape,
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
