"""ProxConnect++ decomposition check (Lu, Yu, Li, Partovi Nia, NeurIPS 2023; METHODS.md §4).

The paper's guarantee [inferred from the abstract and follow-up work, not from the full text]:
a forward/backward pair ``(F, B)`` behaves like a proximal method when ``F = P∘B`` for some
monotone (non-decreasing) quantizer ``P``. This module checks that condition numerically on a
grid of inputs. The criterion as coded here is OUR reading of the paper, not its statement:
replace this module if the paper's exact condition differs.

On the grid points ``x_i``, let ``b_i = B(x_i)`` and ``f_i = F(x_i)``. A ``P`` with
``f_i = P(b_i)`` that is non-decreasing exists on the grid iff

1. ``F`` is constant wherever ``B`` is: points with equal ``b`` (within ``b_tol``) have equal
   ``f`` — the *spread* ``max f − min f`` over such a group is 0; and
2. ``F`` is non-decreasing in ``B``: along increasing ``b``, ``f`` never decreases — the
   *decrease* ``max_{b_i < b_j} (f_i − f_j)`` is ≤ 0.

The violation is the larger of the two (0 when both hold), and the pair is ``consistent`` when
the violation is ``≤ tol``. The grid is a sample: a pair consistent on it may still violate the
criterion between grid points or outside its range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CRITERION_CONDITIONS", "check_catalogue", "decomposition_violation", "pair_criterion"]

_GRID = (-3.0, 3.0, 2001)  # the default grid: jnp.linspace(-3, 3, 2001)


def _default_grid() -> jax.Array:
    return jnp.linspace(*_GRID[:2], _GRID[2], dtype=jnp.float32)


def _evaluate(fn: Callable[..., Any], x: jax.Array, kwargs: Mapping[str, Any] | None, field: str):
    if not callable(fn):
        raise ValueError(f"{field}={fn!r} is not callable; allowed: an elementwise function")
    y = np.asarray(fn(x, **dict(kwargs or {})), np.float64)
    if y.shape != x.shape:
        raise ValueError(
            f"{field} returned shape {y.shape} for a grid of shape {x.shape}; allowed: an "
            "elementwise function"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{field} returned non-finite values on the grid; allowed: finite values")
    return y


def decomposition_violation(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    *,
    grid: jax.typing.ArrayLike | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    backward_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-6,
    b_tol: float = 0.0,
) -> dict[str, Any]:
    """How far ``F`` is from ``P∘B`` with a non-decreasing ``P``, on a grid (module docstring).

    This is OUR reading of ProxConnect++'s decomposition criterion (METHODS.md §4, [inferred]):
    a numerical check on sample points, not a proof.

    Args:
      forward: ``F``, elementwise, called as ``forward(x, **forward_kwargs)``.
      backward: ``B``, elementwise, called as ``backward(x, **backward_kwargs)``.
      grid: 1-D sample points; default ``jnp.linspace(-3, 3, 2001)`` (float32).
      forward_kwargs: keyword arguments of ``forward``.
      backward_kwargs: keyword arguments of ``backward``.
      tol: the largest violation still called consistent.
      b_tol: points whose ``B`` values differ by at most this (chained along sorted ``b``) count
        as equal ``B``; 0 means exact equality.

    Returns:
      A dict with ``violation`` (float ≥ 0, the worse of the two below), ``consistent``
      (``violation ≤ tol``), ``max_decrease`` and ``max_spread`` (floats ≥ 0), ``kind``
      (``"decrease"``, ``"spread"`` or ``None`` when the violation is 0), the witnesses ``x``,
      ``b`` and ``f`` (pairs ``(first, second)`` of grid points with ``b_first ≤ b_second`` and
      ``f_first − f_second = violation``, or ``None``), ``witnesses`` (the worst witness of
      each kind, ``{"decrease": {"x", "b", "f"} | None, "spread": ...}``), ``tol`` and
      ``num_points``.

    >>> from qflax.quantizers import sign, identity
    >>> decomposition_violation(sign, identity)["consistent"]
    True
    >>> r = decomposition_violation(lambda x: -sign(x), identity)
    >>> r["violation"], r["kind"], [round(v, 3) for v in r["x"]]
    (2.0, 'decrease', [-3.0, 0.0])
    """
    x = _default_grid() if grid is None else jnp.asarray(grid)
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(f"grid has shape {x.shape}; allowed: a non-empty 1-D array")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    f = _evaluate(forward, x, forward_kwargs, "forward")
    b = _evaluate(backward, x, backward_kwargs, "backward")
    xs = np.asarray(x, np.float64)

    order = np.argsort(b, kind="stable")
    xs, f, b = xs[order], f[order], b[order]
    group = np.cumsum(np.concatenate([[True], np.diff(b) > b_tol])) - 1  # equal-B groups
    order = np.lexsort((xs, f, group))  # within a group by f (its min first), then x
    xs, f, b, group = xs[order], f[order], b[order], group[order]
    starts = np.flatnonzero(np.concatenate([[True], np.diff(group) > 0]))
    ends = np.concatenate([starts[1:], [len(b)]]) - 1
    # Within a group, f is sorted ascending: its min is at `starts`, its max at `ends`.
    spreads = f[ends] - f[starts]
    # Largest f over all earlier groups (running max over group maxima), with its position.
    group_max = f[ends]
    run_max = np.maximum.accumulate(group_max)
    run_arg = np.zeros(len(starts), dtype=np.int64)
    for g in range(1, len(starts)):  # positions of the first group reaching the running max
        run_arg[g] = run_arg[g - 1] if group_max[g] <= run_max[g - 1] else g
    decreases = np.full(len(starts), -np.inf)
    decreases[1:] = run_max[:-1] - f[starts[1:]]

    max_spread = float(max(np.max(spreads), 0.0))
    max_decrease = float(max(np.max(decreases), 0.0))
    violation = max(max_spread, max_decrease)
    pairs = {"decrease": None, "spread": None}  # the worst witness of each kind
    if max_decrease > 0:
        g = int(np.argmax(decreases))
        pairs["decrease"] = (int(ends[run_arg[g - 1]]), int(starts[g]))
    if max_spread > 0:
        g = int(np.argmax(spreads))
        pairs["spread"] = (int(ends[g]), int(starts[g]))
    kind = None
    if violation > 0:
        kind = "decrease" if max_decrease >= max_spread else "spread"
    pair = None if kind is None else pairs[kind]

    def witness(values: np.ndarray, which=None):
        which = pair if which is None else which
        return None if which is None else (float(values[which[0]]), float(values[which[1]]))

    witnesses = {
        k: None if p is None else {"x": witness(xs, p), "b": witness(b, p), "f": witness(f, p)}
        for k, p in pairs.items()
    }

    return {
        "violation": float(violation),
        "consistent": bool(violation <= tol),
        "max_decrease": max_decrease,
        "max_spread": max_spread,
        "kind": kind,
        "x": witness(xs),
        "b": witness(b),
        "f": witness(f),
        "witnesses": witnesses,
        "tol": float(tol),
        "num_points": int(len(xs)),
    }


def check_catalogue(
    catalogue: Mapping[str, Callable[[], Any]] | None = None,
    *,
    grid: jax.typing.ArrayLike | None = None,
    tol: float = 1e-6,
) -> dict[str, dict[str, Any]]:
    """Runs :func:`decomposition_violation` on every pair of a catalogue (default ``PAIRS``).

    Each entry is a factory called with no arguments (its default hyperparameters) that returns
    a :class:`qflax.quantizers.QuantizerPair`; its ``forward``/``backward`` functions and their
    kwargs are checked. Returns ``{name: result}`` in the catalogue's order.

    >>> {k: r["consistent"] for k, r in check_catalogue().items()}["bnn"]
    True
    """
    if catalogue is None:
        from qflax.quantizers import PAIRS

        catalogue = PAIRS
    results = {}
    for name, factory in catalogue.items():
        pair = factory()
        results[name] = decomposition_violation(
            pair.forward,
            pair.backward,
            grid=grid,
            forward_kwargs=pair.forward_kwargs,
            backward_kwargs=pair.backward_kwargs,
            tol=tol,
        )
    return results


# ------------------------------------------------------------------------------------ criterion

# The conditions a (F, B) pair is checked against, with where each comes from: [paper] is
# stated in the ProxConnect++ abstract (a decomposition criterion F = P∘B with P a proximal
# quantizer); [inferred] is our reading of what that needs on the real line, not a quotation.
CRITERION_CONDITIONS = (
    ("f_function_of_b", "[paper]", "F = P∘B: F is constant wherever B is (F a function of B)"),
    ("p_non_decreasing", "[inferred]", "P non-decreasing (a proximal map on ℝ is monotone)"),
    ("b_passes_gradient", "[inferred]", "B′ ≠ 0 somewhere on the grid: gradients reach θ"),
)


def pair_criterion(
    pair: Any = None,
    *,
    forward: Callable[..., Any] | None = None,
    backward: Callable[..., Any] | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    backward_kwargs: Mapping[str, Any] | None = None,
    grid: jax.typing.ArrayLike | None = None,
    tol: float = 1e-6,
) -> dict[str, Any]:
    """Which conditions of the ProxConnect++ construction a pair meets, and where it fails.

    Give a :class:`~qflax.quantizers.QuantizerPair` (catalogue, composed or the user's own: its
    forward, backward and their kwargs are used), or ``forward``/``backward`` functions. Each
    of :data:`CRITERION_CONDITIONS` is checked on the grid (default ``linspace(-3, 3, 2001)``):

    * ``f_function_of_b`` [paper]: points with equal ``B`` have equal ``F`` (the spread of
      :func:`decomposition_violation`);
    * ``p_non_decreasing`` [inferred]: ``F`` never decreases along increasing ``B``;
    * ``b_passes_gradient`` [inferred]: ``B′`` is non-zero at some grid point (``B = sign``
      passes no gradient at all).

    Returns:
      A JSON-ready dict: ``holds`` (all conditions), ``failed`` (names), ``conditions``
      (``{name: {"holds", "source", "statement", "violation", "where"}}``; ``where`` gives the
      witness ``x`` values, and ``b``/``f`` there), ``num_points`` and ``tol``; and, for
      information only, ``b_monotone`` (whether ``B`` is non-decreasing on the grid: SignSwish,
      the backward of BNN+ and BNN++, overshoots and is not, and the paper counts both pairs
      in the construction, so monotone ``B`` is not required) with ``b_max_drop``.

    >>> from qflax.quantizers import PAIRS, pair, sign, identity
    >>> pair_criterion(PAIRS["bnn"]())["holds"]
    True
    >>> r = pair_criterion(pair(sign, lambda x: -x))
    >>> r["failed"]  # a backward that flips the gradient's sign
    ['p_non_decreasing']
    """
    if pair is not None:
        if forward is not None or backward is not None:
            raise ValueError("pair and forward/backward given; allowed: one of the two")
        forward, backward = pair.forward, pair.backward
        forward_kwargs, backward_kwargs = pair.forward_kwargs, pair.backward_kwargs
    if forward is None or backward is None:
        raise ValueError("forward/backward missing; allowed: a pair, or both functions")
    x = _default_grid() if grid is None else jnp.asarray(grid, jnp.float32)
    fk, bk = dict(forward_kwargs or {}), dict(backward_kwargs or {})
    base = decomposition_violation(
        forward, backward, grid=x, forward_kwargs=fk, backward_kwargs=bk, tol=tol
    )
    xs = np.sort(np.asarray(x, np.float64))
    b = _evaluate(backward, jnp.asarray(xs, x.dtype), bk, "backward")
    f = _evaluate(forward, jnp.asarray(xs, x.dtype), fk, "forward")
    drops = b[:-1] - b[1:]  # B decreasing between neighbours
    b_drop = float(max(np.max(drops), 0.0)) if len(drops) else 0.0
    slope = jax.vmap(jax.grad(lambda v: jnp.asarray(backward(v, **bk), jnp.float32)))(
        jnp.asarray(xs, jnp.float32)
    )
    slope = np.asarray(slope, np.float64)
    max_slope = float(np.max(np.abs(slope))) if slope.size else 0.0

    def where(kind: str) -> dict[str, Any] | None:
        return base["witnesses"][kind]

    values = {
        "f_function_of_b": (base["max_spread"], where("spread")),
        "p_non_decreasing": (base["max_decrease"], where("decrease")),
        "b_passes_gradient": (
            0.0 if max_slope > tol else 1.0,
            None if max_slope > tol else {"x": (float(xs[0]), float(xs[-1])), "max_abs_db": 0.0},
        ),
    }
    del f
    conditions = {}
    for name, source, statement in CRITERION_CONDITIONS:
        violation, witness = values[name]
        conditions[name] = {
            "holds": bool(violation <= tol),
            "source": source,
            "statement": statement,
            "violation": float(violation),
            "where": witness,
        }
    failed = [name for name, c in conditions.items() if not c["holds"]]
    return {
        "holds": not failed,
        "failed": failed,
        "conditions": conditions,
        "b_monotone": bool(b_drop <= tol),
        "b_max_drop": b_drop,
        "num_points": int(len(xs)),
        "tol": float(tol),
    }
