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


def sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast gradient back to the shape of the parameter it belongs to."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i
        for i, (s, t) in enumerate(zip(shape, g.shape[lead:], strict=True))
        if s == 1 and t != 1
    )
    out = jnp.sum(g, axis=axes, keepdims=False) if axes else g
    return out.reshape(shape)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
