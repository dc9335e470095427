"""The integer arithmetic of integer inference: the requantization multiplier and its exact
rounding shift (:func:`quantize_multiplier`, :func:`requantize`), the fixed-point bits of the
accumulator (:func:`_auto_shift`, :func:`_offset_fraction_bits`), the code dtypes, max-pool, and
the binary layers' bit packing, im2col, XNOR/popcount product and folded thresholds. Depends on
nothing else of integer inference (module docstring of :mod:`qflax.export.integer`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INT32_MAX = 2**31 - 1
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def code_dtype(lo: int, hi: int) -> str:
    """The narrowest of int8 / int16 / int32 that holds the codes ``[lo, hi]``."""
    for name in ("int8", "int16", "int32"):
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    raise ValueError(f"codes [{lo}, {hi}] do not fit int32")


def max_pool(x: jax.Array) -> jax.Array:
    """2x2/stride-2 max-pool of an NHWC tensor (integer or float).

    A ``reduce_window``, which XLA:CPU runs as a YNNPACK fusion (on the codes an integer
    product reads next it measured faster than :func:`max_pool_elementwise`; before a threshold
    or sign, that one)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        init = jnp.array(jnp.iinfo(x.dtype).min, x.dtype)
    else:
        init = jnp.array(-jnp.inf, x.dtype)
    return lax.reduce_window(x, init, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def max_pool_elementwise(x: jax.Array) -> jax.Array:
    """:func:`max_pool` as the maximum of four strided slices (VALID: an odd last row or
    column is dropped): elementwise, so XLA:CPU fuses it with its producer and an elementwise
    consumer (the thresholds and signs before a binary layer) into one pass, where a
    ``reduce_window`` before them is a pass of its own (2–6× slower at the CNN's shapes)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    rows = jnp.maximum(x[:, 0:h:2], x[:, 1:h:2])
    return jnp.maximum(rows[:, :, 0:w:2], rows[:, :, 1:w:2])


# ---------------------------------------------------------------------------------- requantize


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Writes real multipliers ``M > 0`` as ``M ≈ M0·2^−t`` with an int32 ``M0`` in [2^30, 2^31).

    (``M0/2^31`` is the paper's ``M0`` in [0.5, 1); ``t = 31 + n``.) Computed in float64 numpy.
    Multipliers below ``2^−31`` give ``M0 = 0`` (the output is 0).

    Returns:
      ``(M0, t)``, int32 arrays of ``m``'s shape, ``1 ≤ t ≤ 62``.
    """
    m = np.asarray(m, np.float64)
    if np.any(~np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"multipliers must be finite and >= 0; got {m}")
    frac, exp = np.frexp(m)  # m = frac·2^exp, frac in [0.5, 1)
    m0 = np.round(frac * 2.0**31).astype(np.int64)
    carry = m0 == 2**31
    m0 = np.where(carry, 2**30, m0)
    exp = exp + carry
    t = 31 - exp
    tiny = (t > 62) | (m == 0)
    m0 = np.where(tiny, 0, m0)
    t = np.where(tiny, 31, t)
    if np.any(t < 1):
        raise ValueError(f"multipliers >= 2^30 are not supported; got max {m.max()}")
    return m0.astype(np.int32), t.astype(np.int32)


def requantize(acc: jax.Array, m0: jax.Array, t: jax.Array) -> jax.Array:
    """``round(acc·M0 / 2^t)`` exactly, rounding half to even, in 32-bit integer arithmetic.

    ``acc`` int32 (``|acc| < 2^31``), ``m0`` int32 in [0, 2^31), ``t`` int32 in [1, 62], both
    broadcast against ``acc``. The 62-bit product ``P = |acc|·M0`` is formed from 16-bit halves
    in uint32 (no int64, which JAX disables by default; both factors are below 2^31, so the
    middle sum has no carry), the half ``2^(t−1)`` is added to it, and ``q = (P + 2^(t−1)) >>
    t`` rounds half up; a tie (the low ``t`` bits of the sum all 0) is rounded to even by
    clearing the last bit of ``q``. Results beyond int32 saturate.
    """
    acc = jnp.asarray(acc, jnp.int32)
    neg = acc < 0
    a = jnp.abs(jnp.maximum(acc, -INT32_MAX)).astype(jnp.uint32)
    m = jnp.asarray(m0, jnp.int32).astype(jnp.uint32)
    t = jnp.asarray(t, jnp.int32).astype(jnp.uint32)
    one, zero, low16 = jnp.uint32(1), jnp.uint32(0), jnp.uint32(0xFFFF)
    ah, al = a >> 16, a & low16  # ah, mh < 2^15
    mh, ml = m >> 16, m & low16
    mid = ah * ml + al * mh  # < 2^32
    lo = al * ml
    lo2 = lo + (mid << 16)
    hi = ah * mh + (mid >> 16) + (lo2 < lo).astype(jnp.uint32)  # P = hi·2^32 + lo2 < 2^62
    # P + 2^(t−1) (< 2^63): the half in the low word when t ≤ 32, in the high word otherwise
    low_half = t <= 32
    lo = lo2 + jnp.where(low_half, one << (t - one), zero)
    hi = hi + jnp.where(low_half, zero, one << (jnp.maximum(t, 33) - 33))
    hi = hi + (lo < lo2).astype(jnp.uint32)
    big = t >= 32
    ts = jnp.minimum(t, 31)  # t < 32: q = (hi << (32 − t)) | (lo >> t); over 32 bits: saturate
    tb = jnp.maximum(t, 32) - 32  # t ≥ 32: q = hi >> (t − 32)
    q = jnp.where(big, hi >> tb, (hi << (32 - ts)) | (lo >> ts))
    overflow = ~big & ((hi >> ts) != zero)
    tie = jnp.where(
        big,
        (lo == zero) & ((hi & ((one << tb) - one)) == zero),
        (lo & ((one << ts) - one)) == zero,
    )
    q = jnp.where(tie, q & ~one, q)  # P = (q − ½)·2^t exactly: half to even
    q = jnp.where(overflow | (q >= jnp.uint32(INT32_MAX)), jnp.uint32(INT32_MAX), q)
    q = q.astype(jnp.int32)
    return jnp.where(neg, -q, q)


def auto_shift(worst: float, bias_units: float) -> int:
    """The largest ``k ≤ 16`` with ``(worst + bias_units)·2^k ≤ 2^30`` (0 when none)."""
    total = max(worst + bias_units, 1.0)
    return int(max(0, min(16, math.floor(30 - math.log2(total)))))


def offset_fraction_bits(
    per_channel: np.ndarray, count: Any, fraction: Any, act_max: int
) -> tuple[int, float]:
    """The fraction bits ``k`` of ``acc = 2^k·(x·v) + round(fraction·2^k)·(x·m)`` (``m`` a
    plane of ``count`` ±1/1 entries per output channel): the largest ``k ≤ 30`` that keeps the
    worst case ``act_max·(Σ|v|·2^k + count·|R|)`` within 2^29, and that worst case.

    Raises:
      ValueError: even ``k = 0`` overflows the int32 accumulator.
    """

    def worst(k: int) -> float:
        r = np.abs(np.round(fraction * 2.0**k))
        return act_max * float((per_channel * 2**k + count * r).max(initial=0))

    k = next((k for k in range(30, 0, -1) if worst(k) <= 2.0**29), 0)
    if worst(k) > INT32_MAX:
        raise ValueError(
            f"weight codes summing to {int(per_channel.max(initial=0))} per channel overflow "
            "the int32 accumulator; allowed: narrower codes or a smaller fan-in"
        )
    return k, worst(k)


# ---------------------------------------------------------------------------------- bit packing


def pack_words(bits: jax.Array) -> jax.Array:
    """Packs ``{0, 1}`` values along the last axis into uint32 words, 32 per word.

    Bit ``j`` (least significant first) of word ``i`` is ``bits[..., 32·i + j]``; the last word
    is padded with 0 bits. ``(..., n) → (..., ceil(n/32))``.
    """
    n = bits.shape[-1]
    words = -(-n // 32)
    b = jnp.asarray(bits).astype(jnp.uint32)
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, 32 * words - n)])
    b = b.reshape(*b.shape[:-1], words, 32)
    # distinct bits: the sum is their OR
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_words(words: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_words`: the first ``n`` bits as uint8 ``{0, 1}``."""
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.astype(jnp.uint8).reshape(*words.shape[:-1], -1)[..., :n]


def _conv_pads(shape: tuple[int, ...], window: tuple[int, ...], strides, padding) -> list:
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(shape, window, strides, padding)]
    return [tuple(int(v) for v in p) for p in padding]


def im2col(x: jax.Array, window: tuple[int, int], strides, padding) -> jax.Array:
    """The patches of an NHWC tensor, ``(B, H_out, W_out, kh·kw·C)`` in the HWIO kernel's
    ``(kh, kw, c)`` order (row-major), padded with 0 as ``lax.conv_general_dilated`` pads."""
    kh, kw = window
    sh, sw = tuple(strides) or (1, 1)
    pads = _conv_pads(x.shape[1:3], window, (sh, sw), padding)
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    cols = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


def padded_columns(out: int) -> int:
    """The columns a packed binary kernel ``(words, out)`` is stored with: ``out + 16`` when
    its rows span a multiple of 1 KiB (``out`` a multiple of 256), else ``out``.

    XLA:CPU computes ``Σ_i popcount(x[i] XOR w[i, :])`` vectorized along the columns, reading
    one row per word; rows a multiple of 4 KiB apart all map to the same L1 cache sets, which
    evicts them before their reuse (measured: 1024 columns, 32 words, batch 256: 0.68 ms, with
    1040 columns 0.35 ms)."""
    return out + 16 if out % 256 == 0 else out


def _popcount_sum(words: jax.Array, axis: int) -> jax.Array:
    return jnp.sum(lax.population_count(words).astype(jnp.int32), axis=axis)


def xnor_dot(
    bits: jax.Array,
    kernel: jax.Array,
    kernel_shape: tuple[int, ...],
    op: str = "dense",
    strides: tuple[int, ...] = (),
    padding: Any = "SAME",
) -> jax.Array:
    """The ±1 product ``Σ a·w`` of binary inputs and weights by XNOR/popcount (int32).

    Args:
      bits: the input signs as ``{0, 1}`` (1 ↔ +1), ``(B, features)`` or NHWC.
      kernel: the packed weight signs, uint32 ``(words, out)`` (:func:`pack_words` of the
        kernel reshaped to ``(n, out)`` and transposed), or with more columns than ``out``
        (:func:`padded_columns`), which are dropped from the result.
      kernel_shape: the float kernel's shape (``(n, out)`` or HWIO).
      op, strides, padding: the layer's ("dense" or "conv").

    Returns:
      ``n − 2·popcount(x XOR w)`` for dense layers. Convolutions: padded taps are 0 in the float
      model (neither sign); they get the bit 0, so ``popcount(x XOR w)`` counts the weight bits
      there, and ``dot = n_valid + 2·popcount(w AND NOT valid) − 2·popcount(x XOR w)`` (module
      docstring) with ``valid`` the packed mask of the image taps at each output position —
      batch-independent, computed once per call. When the input channels are a multiple of 32,
      every tap is whole words: each pixel's channels are packed first and the patches are
      taken of the words (32 times less data than patches of bits).
    """
    out = kernel_shape[-1]
    if op == "dense":
        x = pack_words(bits)
        dot = math.prod(kernel_shape[:-1]) - 2 * _popcount_sum(x[..., :, None] ^ kernel, -2)
        return dot[..., :out]
    window = tuple(kernel_shape[:2])
    if kernel_shape[2] % 32 == 0:  # the patches of packed pixels: the same words
        x = im2col(pack_words(bits), window, strides, padding)  # (B, H_out, W_out, words)
    else:
        x = pack_words(im2col(bits, window, strides, padding))
    ones = jnp.ones((1, *bits.shape[1:]), jnp.uint8)
    valid = pack_words(im2col(ones, window, strides, padding))[0]  # (H_out, W_out, words)
    n_valid = _popcount_sum(valid, -1)[..., None]
    offset = n_valid + 2 * _popcount_sum(kernel & ~valid[..., :, None], -2)  # (H_out, W_out, C)
    return (offset - 2 * _popcount_sum(x[..., :, None] ^ kernel, -2))[..., :out]


def threshold_bits(
    dot: jax.Array, direction: jax.Array, threshold: jax.Array, pool: bool
) -> jax.Array:
    """The next binary layer's input bits ``sign(pool(act(BN(α·dot + b))))`` from ``dot``.

    Per channel the float chain ``f(dot) = [act(BN(α·dot + b)) ≥ 0]`` is monotone in ``dot`` (every
    op is monotone, increasing or decreasing with the sign of the folded factor ``α·γ``), so
    ``f(dot) = [d·dot ≥ T]`` with ``d = ±1`` (``_binary_thresholds`` of the lowering). Max-pool: the
    float model takes ``sign(max_i h_i)`` over a window; ``sign`` is monotone nondecreasing, so
    ``sign(max_i h_i) = max_i sign(h_i)``, i.e. ``OR_i f(dot_i) = OR_i [d·dot_i ≥ T] = [max_i
    (d·dot_i) ≥ T]``. So the pool runs on ``z = d·dot`` BEFORE the threshold: on channels with ``d =
    −1`` (a negative BatchNorm γ) that is a MIN-pool of ``dot``, not a max-pool (which would be
    wrong there), and one comparison per pooled value remains.
    """
    z = dot * direction
    if pool:
        z = max_pool_elementwise(z)
    return (z >= threshold).astype(jnp.uint8)
