"""Range estimators for uniform affine quantization (Jacob et al. 2018, Sec. 2.1 and 3.2).

Every estimator returns ``(scale, zero_point)``, two float32 arrays of the same shape that
broadcast against the granularity view ``grouped(x, granularity, axis, group_size)`` of
``qflax/quantizers/_base.py`` (shape ``(1,) * x.ndim`` per tensor, ``x``'s shape with every
other axis set to 1 per channel, the grouped view with the ``group_size`` axis set to 1 per
group). The convention, shared by every quantizer of qflax, is

    q = clip(round(x / s) + z, qmin, qmax),    x_hat = s * (q - z),

with ``(qmin, qmax) = qflax.numerics.int_range(bits, signed, narrow_range)`` and round =
round-half-to-even. Symmetric estimators return ``z = 0``; asymmetric ones return an integer-valued
``z`` in ``[qmin, qmax]``, so that ``x = 0`` is reconstructed exactly. Every scale is at least
``MIN_SCALE`` (an all-zero slice gives that tiny positive scale, never 0 or NaN).

Symmetric estimators need a positive code: signed 1-bit codes are ``{-1, 0}``, which no ``z = 0``
grid can make symmetric, so they raise; use ``signed=False`` or an asymmetric estimator.

All functions are pure and work under ``jax.jit`` (with the keyword arguments static).

Data that cannot give a range is refused with a one-line ValueError naming the function: an
empty ``x`` (always: shapes are static), and, when ``x`` is concrete (not traced by ``jit``),
an ``x`` holding NaN or ±inf (one ``inf`` makes an infinite scale, and the tensor quantized with
it NaN), with the count of such values. A traced ``x`` is not checked: its non-finite values give
a non-finite scale.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import check_bits, check_finite, check_nonempty, int_range
from qflax.quantizers import affine_params as _affine_params
from qflax.quantizers import check_granularity, grouped, reduce_axes, reduce_stat
from qflax.quantizers import symmetric_params as _symmetric_params

__all__ = [
    "MIN_SCALE",
    "EmaRange",
    "absmax",
    "ema_init",
    "ema_scale",
    "ema_update",
    "minmax",
    "mse",
    "percentile",
]

# The smallest scale an estimator returns: the smallest normal float32 (not a subnormal, which
# accelerators flush to zero).
MIN_SCALE = float(np.finfo(np.float32).tiny)

# Elements (candidates x tensor elements) the MSE search evaluates in one vectorised batch; larger
# searches run in chunks of candidates (``jax.lax.map(..., batch_size=...)``) to bound memory.
_MSE_BATCH_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------- validation


def _check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is not a bool; allowed: True, False")
    return bool(value)


def _check_common(
    bits: Any, signed: Any, narrow_range: Any, granularity: Any, axis: Any, group_size: Any
) -> tuple[int, int]:
    """Validates the common keyword arguments and returns ``(qmin, qmax)``."""
    bits = check_bits(bits)
    _check_bool(signed, "signed")
    _check_bool(narrow_range, "narrow_range")
    check_granularity(granularity, axis, group_size)
    return int_range(bits, signed, narrow_range)


def _check_symmetric_qmax(bits: int, signed: bool, qmax: int) -> None:
    if qmax < 1:
        raise ValueError(
            f"bits={bits} with signed={signed} has no positive code (codes {{-1, 0}}), so a "
            "symmetric scale is undefined; allowed: bits >= 2, signed=False, or an asymmetric "
            "estimator (minmax, symmetric=False)"
        )


def _check_number(value: Any, field: str, lo: float, hi: float, lo_open: bool, hi_open: bool):
    allowed = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{field}={value!r} is not a real number; allowed: a number in {allowed}")
    v = float(value)
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if not math.isfinite(v) or below or above:
        raise ValueError(f"{field}={value!r} is out of range; allowed: a number in {allowed}")
    return v


# -------------------------------------------------------------------------- scale / zero point


def _checked_float32(x: ArrayLike, where: str) -> jax.Array:
    """``x`` as float32, refusing an empty ``x`` and (when concrete) NaN or ±inf."""
    x = jnp.asarray(x)
    check_nonempty(x, where)
    check_finite(x, where)
    return x.astype(jnp.float32)


def _fake_quant(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    qmin: int | jax.Array,
    qmax: int | jax.Array,
) -> jax.Array:
    """``s * (clip(round(x / s) + z, qmin, qmax) - z)``: the convention of this module."""
    q = jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)
    return scale * (q - zero_point)


def _symmetric_amax(view: jax.Array, axes: tuple[int, ...], signed: bool) -> jax.Array:
    """The symmetric clip bound: ``max|x|`` (signed) or ``max(x)`` (unsigned)."""
    return jnp.max(jnp.abs(view) if signed else view, axis=axes, keepdims=True)


# ------------------------------------------------------------------------------- estimators


def absmax(
    x: ArrayLike,
    *,
    bits: int,
    signed: bool = True,
    narrow_range: bool = False,
    granularity: str = "tensor",
    axis: int = -1,
    group_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Symmetric range from the largest magnitude: ``s = max|x| / qmax``, ``z = 0``.

    Unsigned: ``s = max(x) / qmax`` (negative values fall below the range and clip to 0).

    Args:
      x: the tensor to calibrate.
      bits: bit-width, 1..32 (signed needs bits >= 2: a symmetric grid needs a positive code).
      signed: signed codes ``[-2^(b-1), 2^(b-1) - 1]`` or unsigned ``[0, 2^b - 1]``.
      narrow_range: drop the most negative signed code (the top unsigned code).
      granularity: "tensor", "channel" or "group" (see ``qflax/quantizers/_base.py``).
      axis: the channel axis ("channel") or the grouped axis ("group").
      group_size: elements per group ("group" only).

    Returns:
      ``(scale, zero_point)``, float32, broadcasting against the granularity view of ``x``.

    Raises:
      ValueError: for an empty ``x``, or a concrete ``x`` holding NaN or ±inf (the count is
        named); likewise every estimator of this module.

    >>> s, z = absmax(jnp.array([-1.0, 0.5, 3.0]), bits=8)
    >>> round(float(s[0]) * 127, 6), float(z[0])
    (3.0, 0.0)
    """
    qmin, qmax = _check_common(bits, signed, narrow_range, granularity, axis, group_size)
    _check_symmetric_qmax(bits, signed, qmax)
    x = _checked_float32(x, "absmax")
    view = grouped(x, granularity, axis, group_size)
    amax = _symmetric_amax(view, reduce_axes(x.ndim, granularity, axis), signed)
    return _symmetric_params(amax, qmax)


def minmax(
    x: ArrayLike,
    *,
    bits: int,
    signed: bool = True,
    narrow_range: bool = False,
    granularity: str = "tensor",
    axis: int = -1,
    group_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Asymmetric range ``[min(x, 0), max(x, 0)]`` mapped onto ``[qmin, qmax]``.

    ``s = (max - min) / (qmax - qmin)``, ``z = qmin - round(min / s)``: ``min`` and ``max`` land
    within half a step of ``qmin`` and ``qmax`` and ``x = 0`` lands exactly on the code ``z``.
    Arguments and returns as in :func:`absmax` (every bit-width 1..32 is allowed).

    >>> s, z = minmax(jnp.array([-3.0, 2.0]), bits=4)
    >>> round(float(s[0]), 6), float(z[0])
    (0.333333, 1.0)
    """
    qmin, qmax = _check_common(bits, signed, narrow_range, granularity, axis, group_size)
    x = _checked_float32(x, "minmax")
    lo = reduce_stat(jnp.min, x, granularity, axis, group_size)
    hi = reduce_stat(jnp.max, x, granularity, axis, group_size)
    return _affine_params(lo, hi, qmin, qmax)


def percentile(
    x: ArrayLike,
    *,
    percentile: float = 99.9,
    symmetric: bool = True,
    bits: int,
    signed: bool = True,
    narrow_range: bool = False,
    granularity: str = "tensor",
    axis: int = -1,
    group_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Clips at a percentile of each granularity slice (linear interpolation, as ``np.percentile``).

    Symmetric: the clip bound is the ``percentile``-th percentile of ``|x|`` (of ``x`` when
    unsigned), then as :func:`absmax`. Asymmetric: the range is the ``(100 - percentile)``-th to
    ``percentile``-th percentiles of ``x``, then as :func:`minmax`. ``percentile=100`` gives
    exactly :func:`absmax` / :func:`minmax`.

    Args:
      x: the tensor to calibrate.
      percentile: in (0, 100] when symmetric, in [50, 100] when asymmetric.
      symmetric: ``z = 0`` and a bound on ``|x|``, or an affine range with a zero point.
      bits, signed, narrow_range, granularity, axis, group_size: as in :func:`absmax`.

    Returns:
      ``(scale, zero_point)`` as in :func:`absmax`.
    """
    _check_bool(symmetric, "symmetric")
    if symmetric:
        p = _check_number(percentile, "percentile", 0.0, 100.0, lo_open=True, hi_open=False)
    else:
        p = _check_number(percentile, "percentile", 50.0, 100.0, lo_open=False, hi_open=False)
    qmin, qmax = _check_common(bits, signed, narrow_range, granularity, axis, group_size)
    x = _checked_float32(x, "percentile")
    view = grouped(x, granularity, axis, group_size)
    axes = reduce_axes(x.ndim, granularity, axis)

    def quantile(values, q):  # q = 0 / 100 exactly as min / max (interpolation may be 1 ulp off)
        if q == 100.0:
            return jnp.max(values, axis=axes, keepdims=True)
        if q == 0.0:
            return jnp.min(values, axis=axes, keepdims=True)
        return jnp.percentile(values, q, axis=axes, keepdims=True)

    if symmetric:
        _check_symmetric_qmax(bits, signed, qmax)
        return _symmetric_params(quantile(jnp.abs(view) if signed else view, p), qmax)
    return _affine_params(quantile(view, 100.0 - p), quantile(view, p), qmin, qmax)


def mse(
    x: ArrayLike,
    *,
    symmetric: bool = True,
    num_candidates: int = 64,
    min_ratio: float = 0.05,
    bits: int,
    signed: bool = True,
    narrow_range: bool = False,
    granularity: str = "tensor",
    axis: int = -1,
    group_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The clip ratio minimising the mean squared quantization error, per granularity slice.

    The candidates are ``r`` in ``linspace(1, min_ratio, num_candidates)``; candidate ``r`` uses
    the range ``r * max|x|`` (symmetric, as :func:`absmax`) or ``r * [min(x, 0), max(x, 0)]``
    (asymmetric, as :func:`minmax`). Each slice keeps the ``r`` with the smallest
    ``mean((x_hat - x)^2)`` over its elements; ties go to the larger ``r``, so ``r = 1`` (plain
    absmax / minmax) wins whenever nothing beats it and the error is never larger than theirs.
    The search is vectorised over candidates and slices (``jax.lax.map`` in batches of
    candidates, to bound memory on large tensors) and traces once under ``jit``.

    Args:
      x: the tensor to calibrate.
      symmetric: search around :func:`absmax` (``z = 0``) or around :func:`minmax`.
      num_candidates: number of clip ratios, >= 2.
      min_ratio: the smallest clip ratio, in (0, 1].
      bits, signed, narrow_range, granularity, axis, group_size: as in :func:`absmax`.

    Returns:
      ``(scale, zero_point)`` as in :func:`absmax`.
    """
    _check_bool(symmetric, "symmetric")
    if (
        isinstance(num_candidates, bool)
        or not isinstance(num_candidates, (int, np.integer))
        or num_candidates < 2
    ):
        raise ValueError(
            f"num_candidates={num_candidates!r} is not allowed; allowed: integers >= 2"
        )
    min_ratio = _check_number(min_ratio, "min_ratio", 0.0, 1.0, lo_open=True, hi_open=False)
    qmin, qmax = _check_common(bits, signed, narrow_range, granularity, axis, group_size)
    if symmetric:
        _check_symmetric_qmax(bits, signed, qmax)
    return _mse_search(
        _checked_float32(x, "mse"),
        jnp.float32(qmin),
        jnp.float32(qmax),
        jnp.float32(min_ratio),
        symmetric=bool(symmetric),
        num_candidates=int(num_candidates),
        signed=bool(signed),
        granularity=granularity,
        axis=axis,
        group_size=group_size,
    )


@functools.partial(
    jax.jit,
    static_argnames=("symmetric", "num_candidates", "signed", "granularity", "axis", "group_size"),
)
def _mse_search(
    x: jax.Array,
    qmin: jax.Array,
    qmax: jax.Array,
    min_ratio: jax.Array,
    *,
    symmetric: bool,
    num_candidates: int,
    signed: bool,
    granularity: str,
    axis: int,
    group_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    # Jitted so that eager calibration (layer after layer) compiles the search once per shape
    # and granularity; the integer range and min_ratio are traced, so bit-widths share it.
    view = grouped(x, granularity, axis, group_size)
    axes = reduce_axes(x.ndim, granularity, axis)

    if symmetric:
        amax = _symmetric_amax(view, axes, signed)

        def params(ratio):
            return _symmetric_params(ratio * amax, qmax)
    else:
        lo = jnp.min(view, axis=axes, keepdims=True)
        hi = jnp.max(view, axis=axes, keepdims=True)

        def params(ratio):
            return _affine_params(ratio * lo, ratio * hi, qmin, qmax)

    def error(ratio):
        scale, zero_point = params(ratio)
        x_hat = _fake_quant(view, scale, zero_point, qmin, qmax)
        return jnp.mean(jnp.square(x_hat - view), axis=axes, keepdims=True)

    ratios = 1.0 - (1.0 - min_ratio) * jnp.linspace(0.0, 1.0, num_candidates, dtype=jnp.float32)
    batch = max(1, min(num_candidates, _MSE_BATCH_ELEMENTS // max(1, x.size)))
    errors = jax.lax.map(error, ratios, batch_size=batch)  # (num_candidates, *stat_shape)
    best = jnp.argmin(errors, axis=0)  # first minimum = largest ratio on ties
    return params(ratios[best])


# ------------------------------------------------------------------------------------- EMA


class EmaRange(NamedTuple):
    """Running range of a tensor, per granularity slice (a pytree; carry it in training state).

    ``min`` and ``max`` have the shape of the statistics of the granularity view (as the scales
    of :func:`absmax`); the granularity is read back from that shape by :func:`ema_update`.
    """

    min: jax.Array  # float32, running minimum per slice (0 before the first update)
    max: jax.Array  # float32, running maximum per slice (0 before the first update)
    count: jax.Array  # int32 scalar, number of updates so far


def ema_init(
    x: ArrayLike | jax.ShapeDtypeStruct,
    *,
    granularity: str = "tensor",
    axis: int = -1,
    group_size: int | None = None,
) -> EmaRange:
    """An empty running range for tensors shaped like ``x`` (only its shape is used).

    >>> ema_init(jnp.zeros((2, 3)), granularity="channel", axis=0).min.shape
    (2, 1)
    """
    check_granularity(granularity, axis, group_size)
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    check_nonempty(spec, "ema_init")  # no range of nothing
    stat = jax.eval_shape(lambda v: reduce_stat(jnp.max, v, granularity, axis, group_size), spec)
    zeros = jnp.zeros(stat.shape, jnp.float32)
    return EmaRange(min=zeros, max=zeros, count=jnp.zeros((), jnp.int32))


def _reduce_to_state(fn, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reduces ``x`` (or its grouped view) with ``fn`` to the keepdims ``shape`` of a state."""
    error = ValueError(
        f"x.shape={x.shape} does not match an EmaRange of shape {shape}; allowed: a tensor "
        "with the granularity given to ema_init (the axes kept by the state must match)"
    )
    if len(shape) == x.ndim:
        if any(s not in (1, n) for s, n in zip(shape, x.shape, strict=True)):
            raise error
        axes = tuple(i for i, s in enumerate(shape) if s == 1)
        return fn(x, axis=axes, keepdims=True)
    if len(shape) == x.ndim + 1:  # "group": shape = x.shape[:a] + (n_groups, 1) + x.shape[a+1:]
        for a in range(x.ndim):
            if (
                shape[:a] == x.shape[:a]
                and shape[a + 2 :] == x.shape[a + 1 :]
                and shape[a + 1] == 1
                and shape[a] >= 1
                and x.shape[a] % shape[a] == 0
            ):
                split = (shape[a], x.shape[a] // shape[a])
                view = x.reshape(x.shape[:a] + split + x.shape[a + 1 :])
                return fn(view, axis=(a + 1,), keepdims=True)
    raise error


def ema_update(state: EmaRange, x: ArrayLike, *, decay: float = 0.99) -> EmaRange:
    """Folds the range of a batch into the running range.

    ``min <- decay * min + (1 - decay) * min(x)`` (likewise ``max``), per granularity slice. The
    first update (``count == 0``) takes the batch range exactly, so there is no zero-initialisation
    bias and no debiasing is applied (as TensorFlow's moving-average quantization ranges). The
    granularity is read from the state's shape; ``x`` may differ from the ``ema_init`` tensor
    along reduced axes (e.g. the batch size).

    Args:
      state: from :func:`ema_init` or a previous update.
      x: the batch.
      decay: in [0, 1); 0 keeps only the latest batch.

    Returns:
      The updated state.

    Raises:
      ValueError: for an empty ``x``, or a concrete ``x`` holding NaN or ±inf (as the
        estimators; a traced ``x`` inside a jitted step is not checked).
    """
    decay = _check_number(decay, "decay", 0.0, 1.0, lo_open=False, hi_open=True)
    x = _checked_float32(x, "ema_update")
    shape = tuple(state.min.shape)
    batch_min = _reduce_to_state(jnp.min, x, shape)
    batch_max = _reduce_to_state(jnp.max, x, shape)
    first = state.count == 0
    new_min = jnp.where(first, batch_min, decay * state.min + (1.0 - decay) * batch_min)
    new_max = jnp.where(first, batch_max, decay * state.max + (1.0 - decay) * batch_max)
    return EmaRange(min=new_min, max=new_max, count=state.count + 1)


def ema_scale(
    state: EmaRange,
    *,
    bits: int,
    signed: bool = True,
    narrow_range: bool = False,
    symmetric: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point)`` of a running range.

    Symmetric: as :func:`absmax` with ``max|x| = max(-min, max)`` (signed) or ``max`` (unsigned).
    Asymmetric: as :func:`minmax` on ``[min, max]``. A state never updated gives ``MIN_SCALE``.
    """
    bits = check_bits(bits)
    _check_bool(signed, "signed")
    _check_bool(narrow_range, "narrow_range")
    _check_bool(symmetric, "symmetric")
    qmin, qmax = int_range(bits, signed, narrow_range)
    if symmetric:
        _check_symmetric_qmax(bits, signed, qmax)
        amax = jnp.maximum(-state.min, state.max) if signed else state.max
        return _symmetric_params(amax, qmax)
    return _affine_params(state.min, state.max, qmin, qmax)
