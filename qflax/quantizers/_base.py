"""Shared pieces of the quantizers: granularity (which elements share a scale) and gradient sums.

Granularity names the axes a statistic is reduced over:

* ``"tensor"``: one value for the whole tensor; params have shape ``(1,) * x.ndim``.
* ``"channel"``: one value per index of ``axis`` (the output channel); params have ``x``'s shape
  with every other axis set to 1.
* ``"group"``: the ``axis`` is cut into contiguous groups of ``group_size`` elements and each group
  has its own value, separately for every index of the other axes. ``x`` is viewed as
  ``x.shape[:axis] + (n_groups, group_size) + x.shape[axis+1:]`` and params have that shape with
  the ``group_size`` axis set to 1.

Params always broadcast against ``x`` (or against its grouped view), so a quantizer is elementwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qflax.numerics import check_choice

__all__ = [
    "GRANULARITIES",
    "check_granularity",
    "grouped",
    "ungrouped",
    "reduce_axes",
    "sum_to_shape",
    "sums_to_shape",
    "fused_sum",
    "fused_sums",
    "kept_small",
    "reduce_stat",
    "view_shape",
    "param_shape",
]

GRANULARITIES = ("tensor", "channel", "group")


def check_granularity(granularity: str, axis: int, group_size: int | None) -> None:
    """Validates the granularity fields of a config (shape-free checks)."""
    check_choice(granularity, "granularity", GRANULARITIES)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"axis={axis!r} is not an integer; allowed: an int axis of the tensor")
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"group_size={group_size!r} is not allowed for granularity='group'; "
                "allowed: a positive int"
            )
    elif group_size is not None:
        raise ValueError(
            f"group_size={group_size!r} is only used with granularity='group'; "
            f"allowed for granularity={granularity!r}: None"
        )


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} is out of range for a tensor of rank {ndim}; allowed: {-ndim}..{ndim - 1}"
        )
    return axis % ndim


def grouped(x: jax.Array, granularity: str, axis: int, group_size: int | None) -> jax.Array:
    """Returns ``x`` viewed so that params broadcast against it (reshaped for ``"group"``)."""
    if granularity == "tensor":
        return x
    a = _norm_axis(axis, x.ndim)
    if granularity == "channel":
        return x
    n = x.shape[a]
    if n % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide axis {axis} of length {n}; "
            f"allowed: a divisor of {n}"
        )
    return x.reshape(x.shape[:a] + (n // group_size, group_size) + x.shape[a + 1 :])


def ungrouped(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`grouped`."""
    return y.reshape(shape)


def reduce_axes(ndim: int, granularity: str, axis: int) -> tuple[int, ...]:
    """Axes of the (grouped) view that a statistic is reduced over.

    For ``"group"``, ``ndim`` is the rank of the original tensor and the grouped view has rank
    ``ndim + 1``; the reduced axis is the ``group_size`` axis.
    """
    if granularity == "tensor":
        return tuple(range(ndim))
    a = _norm_axis(axis, ndim)
    if granularity == "channel":
        return tuple(i for i in range(ndim) if i != a)
    return (a + 1,)


def reduce_stat(fn, x: jax.Array, granularity: str, axis: int, group_size: int | None):
    """Applies a reduction ``fn(view, axis=..., keepdims=True)`` at the given granularity.

    The result broadcasts against ``grouped(x, ...)``.
    """
    view = grouped(x, granularity, axis, group_size)
    return fn(view, axis=reduce_axes(x.ndim, granularity, axis), keepdims=True)


def view_shape(
    shape: tuple[int, ...], granularity: str, axis: int, group_size: int | None
) -> tuple[int, ...]:
    """The shape of ``grouped(x, ...)`` for ``x`` of ``shape``; raises ValueError for a bad axis
    or a group size that does not divide the axis."""
    axes = reduce_axes(len(shape), granularity, axis)  # validates the axis
    if granularity != "group":
        return tuple(shape)
    a = axes[0] - 1
    n = shape[a]
    if n % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide axis={axis} of length {n} "
            f"(tensor shape {tuple(shape)}); allowed: a divisor of {n}"
        )
    return tuple(shape[:a]) + (n // group_size, group_size) + tuple(shape[a + 1 :])


def param_shape(
    shape: tuple[int, ...], granularity: str, axis: int, group_size: int | None
) -> tuple[int, ...]:
    """The shape of a per-granularity parameter (scale, step) for ``x`` of ``shape``: the view
    shape with every reduced axis set to 1."""
    view = view_shape(shape, granularity, axis, group_size)
    axes = reduce_axes(len(shape), granularity, axis)
    return tuple(1 if i in axes else d for i, d in enumerate(view))


# A sum of a full-size elementwise expression should be one pass over its operands. XLA:CPU
# hands every `reduce` whose reducer is exactly `add(p0, p1)` to its YNNPACK fusion, which
# takes only the ops YNNPACK has (no compare, select, clamp or pred/int32 converts) and leaves
# the rest of the expression as a separate loop fusion that writes a full-size temporary (a
# fresh buffer: one page fault per 4 KiB). XLA's own reduction emitter fuses any elementwise
# producer, but only into small windows: its tree-reduction rewriter splits longer reduced
# axes into an unfused reduce-window chain, and windows above ~16 elements run slowly. So a
# large sum is taken in two steps: windows of `_SUM_WINDOW` elements of the last reduced axis
# by XLA's emitter (fused with the producer; a 1/8-size result), then the rest by a plain sum.
_SUM_WINDOW = 8
_SUM_FUSED_MIN_ELEMENTS = 1 << 16


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b`` (exactly, up to the sign of a zero sum), spelled so that XLA:CPU's YNNPACK
    fusion does not take the reduction (its reducer must be one `add`)."""
    return -(-a - b)


def _add_each(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(_add(p, q) for p, q in zip(a, b, strict=True))


def fused_sums(xs: tuple[jax.Array, ...], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """``jnp.sum(x, axis=axes)`` of each of ``xs`` (one shape and dtype) that XLA:CPU computes
    in one pass, fused with the arrays' producers (one multi-output reduction).

    Same values as ``jnp.sum`` up to the order of the additions (float32/float64 arrays of at
    least 2^16 elements; anything else is ``jnp.sum``).
    """
    xs = tuple(xs)
    x = xs[0]
    axes = tuple(sorted(a % x.ndim for a in axes))
    if not axes:
        return xs
    last = axes[-1]
    n = x.shape[last]
    window = math.gcd(n, _SUM_WINDOW)
    if x.size < _SUM_FUSED_MIN_ELEMENTS or x.dtype not in (jnp.float32, jnp.float64) or window < 2:
        return tuple(jnp.sum(a, axis=axes) for a in xs)
    shape = x.shape[:last] + (n // window, window) + x.shape[last + 1 :]
    zeros = tuple(jnp.zeros((), x.dtype) for _ in xs)
    partials = jax.lax.reduce(tuple(a.reshape(shape) for a in xs), zeros, _add_each, (last + 1,))
    return tuple(jnp.sum(p, axis=axes) for p in partials)


def fused_sum(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``jnp.sum(x, axis=axes)`` that XLA:CPU computes in one pass fused with ``x``'s producer
    (see :func:`fused_sums`)."""
    return fused_sums((x,), axes)[0]


def kept_small(stat: jax.Array) -> jax.Array:
    """``stat`` unchanged (NaN stays NaN), as an op YNNPACK does not have (compare, select).

    For a small statistic of a large tensor (a per-channel minimum) that elementwise code then
    broadcasts back: XLA:CPU's YNNPACK fusion otherwise takes the broadcast into the reduction
    and writes the statistic out at the tensor's full size (a full-size temporary).
    """
    return jnp.where(stat == stat, stat, jnp.nan)


def sums_to_shape(gs: tuple[jax.Array, ...], shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Sums broadcast gradients (one shape) back to the shape of the parameters they belong to,
    in one fused pass over their producers on XLA:CPU (see :func:`fused_sums`)."""
    gs = tuple(gs)
    g = gs[0]
    if g.shape == tuple(shape):
        return gs
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i
        for i, (s, t) in enumerate(zip(shape, g.shape[lead:], strict=True))
        if s == 1 and t != 1
    )
    outs = fused_sums(gs, axes) if axes else gs
    return tuple(out.reshape(shape) for out in outs)


def sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast gradient back to the shape of the parameter it belongs to (one fused
    pass over ``g``'s producer on XLA:CPU, see :func:`fused_sums`)."""
    return sums_to_shape((g,), shape)[0]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
