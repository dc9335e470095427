"""Latent quantizers with implicit codebooks — FSQ (Mentzer et al. 2023, arXiv:2309.15505, the
code of Appendix A.1) and Q2D2 (Shuster & Nachmani 2025, code tashQ/Q2D2; METHODS.md §8) — and
the code-utilisation measures shared with the vector quantizers (``_vq.py``).

Differs from the paper / upstream code (each also said where it applies):

* values are the grid points exactly (``q``), with the straight-through gradient of
  ``s + sg(q − s)`` taken through the bound and scale ``s(z)`` (one module-level ``custom_vjp``:
  value ``q``, VJP the identity to ``s``), so an index decodes to the very value the forward gave;
* Q2D2's gradient is that of ``s = z·(L − 1)(1 + ε)/2`` divided by ``⌊L/2⌋``; upstream applies
  the straight-through step to the unscaled ``z`` (a gradient ``1/⌊L/2⌋``);
* Q2D2's ``"hexagonal"`` lattice is a true hexagonal one (rows √3/2 apart, alternate rows offset
  by ½); upstream's (row spacing 1, rows offset by ±¼, ``L_y`` ignored) is the lattice
  ``"hexagonal_upstream"`` (which requires ``L_x = L_y``); the nearest grid point is found
  exactly on the finite grid (two rectangular cosets, each rounded per axis), not by a search;
  code indices number the points coset by coset (upstream's hexagonal grid numbers them row by
  row);
* Q2D2's ``bound=True`` applies the tanh the upstream model applies in its input projection;
* utilisation is the perplexity of the code *frequencies* (upstream counts the codes used).

Non-finite inputs: a NaN element quantizes to NaN (FSQ: that element; Q2D2: both elements of its
pair) and its vector's index is ``−1``; ``±inf`` saturates to the outer grid points (with
``bound=False``; tanh maps it to ±1 first otherwise), Q2D2 treating coordinates beyond ``±2^100``
as ``±2^100``. ``*_from_indices`` decodes an index outside ``[0, codebook size)`` to NaN.
Subnormal inputs behave as zeros (XLA:CPU flushes them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import check_choice
from qflax.quantizers._family import QuantizerFamily, register_family

__all__ = [
    "Q2D2_LATTICES",
    "FSQConfig",
    "Q2D2Config",
    "bits_per_vector",
    "code_perplexity",
    "code_utilisation",
    "fsq",
    "fsq_from_indices",
    "fsq_indices",
    "q2d2",
    "q2d2_from_indices",
    "q2d2_grid",
    "q2d2_indices",
]

# Q2D2's 2-D grids: see Q2D2Config.lattice.
Q2D2_LATTICES = ("rectangular", "hexagonal", "rhombic", "hexagonal_upstream")

_MAX_CODES = 2**31 - 1  # indices are int32
_FAR = 2.0**100  # Q2D2 coordinates beyond this (and ±inf) are treated as ±_FAR
_ROW = math.sqrt(3.0) / 2.0  # row spacing of the true hexagonal lattice (unit spacing in rows)


# ---------------------------------------------------------------------------------- checks


def _check_levels(levels: Any, field: str = "levels") -> tuple[int, ...]:
    if not isinstance(levels, (tuple, list)) or not levels:
        raise ValueError(
            f"{field}={levels!r} is not allowed; allowed: a non-empty tuple of integers >= 2"
        )
    for i, v in enumerate(levels):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
            raise ValueError(
                f"{field}={tuple(levels)!r} has {v!r} at position {i}; allowed: integers >= 2"
            )
    return tuple(int(v) for v in levels)


def _check_codes(size: int, field: str, value: Any) -> None:
    if size > _MAX_CODES:
        raise ValueError(
            f"{field}={value!r} gives {size} codes; allowed: at most 2^31 - 1 (int32 indices)"
        )


def _check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is not a bool; allowed: True, False")
    return bool(value)


def _check_unit(value: Any, field: str) -> float:
    """A float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{field}={value!r} is not a number; allowed: a float in [0, 1)")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{field}={value!r} is out of range; allowed: a float in [0, 1)")
    return float(value)


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.finfo(dtype).bits > 32 else jnp.float32


def _check_vectors(z: ArrayLike, dim: int, name: str, field: str) -> jax.Array:
    """``z`` as a floating array whose last axis has ``dim`` elements."""
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"{name}: z must be a floating array, got dtype {z.dtype}")
    if z.ndim == 0 or z.shape[-1] != dim:
        last = z.shape[-1] if z.ndim else None
        raise ValueError(
            f"{name}: z.shape={tuple(z.shape)} has last axis {last}; allowed: {dim} ({field})"
        )
    return z


def _check_indices(idx: ArrayLike, name: str) -> jax.Array:
    idx = jnp.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"{name}: indices must be an integer array, got dtype {idx.dtype}")
    return idx.astype(jnp.int32)


# ---------------------------------------------------------------------------------- STE


@jax.custom_vjp
def _straight_through(s: jax.Array, q: jax.Array) -> jax.Array:
    """The value ``q``; the VJP of ``s + sg(q − s)``: the identity to ``s``, nothing to ``q``."""
    return q


def _straight_through_fwd(s, q):
    return q, None


def _straight_through_bwd(_, g):
    return g, jnp.zeros_like(g)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def straight_through(s: jax.Array, q: jax.Array) -> jax.Array:
    """``q`` with the gradient of ``s`` (``s + sg(q − s)`` with the exact value ``q``)."""
    return _straight_through(s, jax.lax.stop_gradient(q))


def _mixed_radix(digits: jax.Array, basis: np.ndarray, valid: jax.Array) -> jax.Array:
    """``Σ digits·basis`` over the last axis (int32), ``−1`` where not ``valid``."""
    idx = jnp.sum(jnp.where(valid, digits, 0) * jnp.asarray(basis, jnp.int32), axis=-1)
    return jnp.where(jnp.all(valid, axis=-1), idx, -1).astype(jnp.int32)


def _basis(sizes: tuple[int, ...]) -> np.ndarray:
    """``[1, n_0, n_0·n_1, ...]``: the first digit is the least significant."""
    return np.cumprod((1,) + tuple(sizes[:-1]), dtype=np.int64)


# ---------------------------------------------------------------------------------- FSQ


@dataclasses.dataclass(frozen=True, kw_only=True)
class FSQConfig:
    """Finite scalar quantization of the last axis (hashable; validated at construction).

    >>> FSQConfig(levels=(8, 5, 5, 5)).codebook_size
    1000
    """

    # Levels L_i of each channel of the last axis (each >= 2; odd and even); the codebook is
    # their product (at most 2^31 - 1). The paper's 2^10-code choice is (8, 5, 5, 5).
    levels: tuple[int, ...] = (8, 5, 5, 5)
    # True: bound with tanh (the paper); False: the model already bounds z to [-1, 1] (e.g. a
    # tanh of its own): z is scaled without tanh and values beyond are clipped to the outer level.
    bound: bool = True
    # The paper's margin ε: the bound's half-width is (L - 1)(1 - ε)/2; 0 <= ε < 1.
    eps: float = 1e-3

    def __post_init__(self):
        levels = _check_levels(self.levels)
        _check_codes(math.prod(levels), "levels", levels)
        object.__setattr__(self, "levels", levels)
        _check_bool(self.bound, "bound")
        _check_unit(self.eps, "eps")

    @property
    def dim(self) -> int:
        """Channels per code vector: ``len(levels)``."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """``Π L_i``."""
        return math.prod(self.levels)


class _FSQConstants(NamedTuple):
    half_l: np.ndarray  # (L - 1)(1 - ε)/2
    offset: np.ndarray  # 0.5 for even L, else 0
    shift: np.ndarray  # tan(offset / half_l): z = 0 bounds to 0 (the paper's tan, not atanh)
    half_width: np.ndarray  # ⌊L/2⌋ (float)
    low: np.ndarray  # the lowest code, -⌊L/2⌋
    high: np.ndarray  # the highest code, L - 1 - ⌊L/2⌋
    levels: np.ndarray  # int
    basis: np.ndarray  # int


@functools.lru_cache(maxsize=256)
def _fsq_constants(config: FSQConfig) -> _FSQConstants:
    levels = np.asarray(config.levels, np.int64)
    L = levels.astype(np.float64)
    half_l = (L - 1) * (1 - config.eps) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    half_width = np.floor(L / 2)
    return _FSQConstants(
        half_l=half_l,
        offset=offset,
        shift=np.tan(offset / half_l),
        half_width=half_width,
        low=-half_width,
        high=L - 1 - half_width,
        levels=levels,
        basis=_basis(config.levels),
    )


# The array work of the public functions, compiled once per config and shape (the public
# functions validate, then call these).
_compiled = functools.partial(jax.jit, static_argnames="config")
_compiled_indices = functools.partial(jax.jit, static_argnames=("config", "quantized"))


def _fsq_bound(z: jax.Array, config: FSQConfig) -> jax.Array:
    """The paper's ``bound``: ``tanh(z + shift)·half_l − offset`` (``bound=False``: ``z·half_l −
    offset``, which maps [-1, 1] onto the same range)."""
    c, dt = _fsq_constants(config), z.dtype
    half_l, offset = jnp.asarray(c.half_l, dt), jnp.asarray(c.offset, dt)
    if config.bound:
        return jnp.tanh(z + jnp.asarray(c.shift, dt)) * half_l - offset
    return z * half_l - offset


def _fsq_round(b: jax.Array, config: FSQConfig) -> jax.Array:
    """Integer codes (as floats) in ``[−⌊L/2⌋, L − 1 − ⌊L/2⌋]``: round half to even, clipped."""
    c, dt = _fsq_constants(config), b.dtype
    return jnp.clip(jnp.round(b), jnp.asarray(c.low, dt), jnp.asarray(c.high, dt))


def fsq(z: ArrayLike, config: FSQConfig) -> jax.Array:
    """Finite scalar quantization of the last axis (Mentzer et al. 2023, Appendix A.1).

    ``b = tanh(z + shift)·(L − 1)(1 − ε)/2 − offset`` (offset ½ for even ``L``, so that ``L``
    levels fit; ``bound=False``: ``z·(L − 1)(1 − ε)/2 − offset``), rounded half to even, clipped
    to the ``L`` integer codes ``[−⌊L/2⌋, L − 1 − ⌊L/2⌋]`` and divided by ``⌊L/2⌋``: values in
    ``[−1, 1]`` (odd ``L``: symmetric; even ``L``: ``−1 .. 1 − 1/⌊L/2⌋``). Gradient: straight
    through the rounding, exact through the bound: ``∂/∂z = half_l·(1 − tanh²(z + shift))/⌊L/2⌋``.

    Args:
      z: a floating array whose last axis has ``len(config.levels)`` channels.
      config: the levels and the bound.

    Returns:
      The quantized ``z`` (shape and dtype kept; computed in float32, or float64 for float64).

    >>> fsq(jnp.array([[-9.0, 0.0, 0.3]]), FSQConfig(levels=(3, 5, 5)))
    Array([[-1. ,  0. ,  0.5]], dtype=float32)
    """
    z = _check_vectors(z, len(config.levels), "fsq", "len(config.levels)")
    return _fsq(z, config=config)


@_compiled
def _fsq(z: jax.Array, config: FSQConfig) -> jax.Array:
    dt = _compute_dtype(z.dtype)
    b = _fsq_bound(z.astype(dt), config)
    codes = _fsq_round(jax.lax.stop_gradient(b), config)
    half_width = jnp.asarray(_fsq_constants(config).half_width, dt)
    return (straight_through(b, codes) / half_width).astype(z.dtype)


def fsq_indices(z: ArrayLike, config: FSQConfig, *, quantized: bool = False) -> jax.Array:
    """The mixed-radix code of every vector of ``z``: ``Σ_i d_i·Π_{j<i} L_j`` (int32, shape
    ``z.shape[:-1]``) with digits ``d_i = code_i + ⌊L_i/2⌋`` in ``[0, L_i)``; ``−1`` for a
    vector holding NaN.

    Args:
      z: as for :func:`fsq`.
      config: the quantizer's config.
      quantized: False: quantize ``z`` first (``fsq``'s codes of ``z``); True: ``z`` already
        holds quantized values (outputs of :func:`fsq` or :func:`fsq_from_indices`), whose codes
        are read exactly (``round(z·⌊L/2⌋)``; quantizing them again would move them: the bound
        is not the identity on the grid).

    >>> int(fsq_indices(jnp.array([0.0, 0.0]), FSQConfig(levels=(3, 4))))
    7
    """
    z = _check_vectors(z, len(config.levels), "fsq_indices", "len(config.levels)")
    return _fsq_indices(z, config=config, quantized=bool(quantized))


@_compiled_indices
def _fsq_indices(z: jax.Array, config: FSQConfig, quantized: bool) -> jax.Array:
    dt = _compute_dtype(z.dtype)
    c = _fsq_constants(config)
    z = jax.lax.stop_gradient(z.astype(dt))
    if quantized:
        codes = _fsq_round(z * jnp.asarray(c.half_width, dt), config)
    else:
        codes = _fsq_round(_fsq_bound(z, config), config)
    valid = ~jnp.isnan(codes)
    digits = jnp.where(valid, codes + jnp.asarray(c.half_width, dt), 0).astype(jnp.int32)
    return _mixed_radix(digits, c.basis, valid)


def fsq_from_indices(idx: ArrayLike, config: FSQConfig) -> jax.Array:
    """The quantized vectors of codes ``idx`` (float32, shape ``idx.shape + (len(levels),)``):
    exactly the values :func:`fsq` gave; NaN for an index outside ``[0, Π L_i)``."""
    return _fsq_from_indices(_check_indices(idx, "fsq_from_indices"), config=config)


@_compiled
def _fsq_from_indices(idx: jax.Array, config: FSQConfig) -> jax.Array:
    c = _fsq_constants(config)
    valid = (idx >= 0) & (idx < config.codebook_size)
    digits = (idx[..., None] // jnp.asarray(c.basis, jnp.int32)) % jnp.asarray(c.levels, jnp.int32)
    codes = (digits - jnp.asarray(c.half_width, jnp.int32)).astype(jnp.float32)
    values = codes / jnp.asarray(c.half_width, jnp.float32)
    return jnp.where(valid[..., None], values, jnp.nan)


# ---------------------------------------------------------------------------------- Q2D2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Q2D2Config:
    """Two-dimensional quantization of channel pairs of the last axis (hashable; validated).

    Channels ``(2p, 2p + 1)`` form pair ``p`` with levels ``(L_x, L_y) = (levels[2p],
    levels[2p + 1])``. In lattice units (the input scaled by ``(L − 1)(1 + ε)/2`` per channel),
    with ``X = {i − (L_x − 1)/2 : i < L_x}`` (unit steps) and ``X' = {i − (L_x − 2)/2 : i <
    L_x − 1}`` (the midpoints between them), likewise ``Y``, ``Y'``, a pair's finite grid is:

    * ``"rectangular"``: ``X × Y`` (``L_x·L_y`` points; FSQ on the pair);
    * ``"rhombic"``: ``X × Y`` and the cell centres ``X' × Y'`` (``L_x·L_y + (L_x − 1)(L_y −
      1)`` points);
    * ``"hexagonal"`` (true hexagonal): ``R = ⌊(L_y − 1)/(√3/2)⌋ + 1`` rows ``y_r = (r − (R −
      1)/2)·√3/2`` (the most that fit in ``Y``'s range); row ``r`` holds ``X`` when ``r −
      ⌊(R − 1)/2⌋`` is even (the centre row, for odd ``R``: odd ``L_x`` then has the origin),
      ``X'`` (offset by ½) otherwise: ``L_x`` points per ``X`` row, ``L_x − 1`` per ``X'`` row;
    * ``"hexagonal_upstream"`` (tashQ/Q2D2's ``"hexagon"``; ``L_x = L_y = L`` required, as
      upstream reads only ``L_x``): ``L`` rows one apart at ``Y``, row ``r`` holding ``X + ¼``
      (even ``r``) or ``X − ¼`` (odd ``r``): ``L²`` points.

    Every grid is the union of one or two rectangular cosets (``rectangular``: one; the others:
    the first set above, then the second); a pair's points are numbered coset by coset, ``x``
    major (:func:`q2d2_grid` lists them in that order).

    >>> Q2D2Config(levels=(5, 5), lattice="hexagonal").grid_sizes
    (23,)
    """

    # Levels per channel (each >= 2), an even number of them: (L_x, L_y) per pair.
    levels: tuple[int, ...] = (5, 5)
    # The 2-D grid of every pair: "rectangular", "hexagonal", "rhombic", "hexagonal_upstream".
    lattice: str = "rectangular"
    # Upstream's margin: inputs are scaled by (L - 1)(1 + ε)/2; 0 <= ε < 1.
    eps: float = 1e-3
    # True: z = tanh(z) first (upstream's input projection ends in a tanh); False: z already
    # bounded to [-1, 1] by the model (values beyond snap to the nearest edge point).
    bound: bool = True

    def __post_init__(self):
        levels = _check_levels(self.levels)
        if len(levels) % 2:
            raise ValueError(
                f"levels={levels!r} has an odd number of channels ({len(levels)}); allowed: an "
                "even number (channel pairs)"
            )
        object.__setattr__(self, "levels", levels)
        check_choice(self.lattice, "lattice", Q2D2_LATTICES)
        if self.lattice == "hexagonal_upstream":
            for p in range(len(levels) // 2):
                if levels[2 * p] != levels[2 * p + 1]:
                    raise ValueError(
                        f"levels={levels!r} has pair {p} = {levels[2 * p : 2 * p + 2]!r}; "
                        "allowed with lattice='hexagonal_upstream': L_x == L_y in every pair"
                    )
        _check_unit(self.eps, "eps")
        _check_bool(self.bound, "bound")
        _check_codes(math.prod(self.grid_sizes), "levels", levels)

    @property
    def dim(self) -> int:
        """Channels per code vector: ``len(levels)``."""
        return len(self.levels)

    @property
    def pairs(self) -> int:
        """Channel pairs: ``len(levels) // 2``."""
        return len(self.levels) // 2

    @property
    def grid_sizes(self) -> tuple[int, ...]:
        """Points of each pair's finite grid."""
        return tuple(
            sum(len(xs) * len(ys) for xs, ys in _pair_cosets(self, p)) for p in range(self.pairs)
        )

    @property
    def codebook_size(self) -> int:
        """The implicit codebook: the product of the pairs' grid sizes."""
        return math.prod(self.grid_sizes)


def _centred(n: int, step: float = 1.0, start: float = 0.0) -> np.ndarray:
    """``n`` points ``step`` apart, centred on 0, plus ``start``."""
    return (np.arange(n, dtype=np.float64) - (n - 1) / 2) * step + start


@functools.lru_cache(maxsize=1024)
def _pair_cosets(config: Q2D2Config, p: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The rectangular cosets ``(xs, ys)`` of pair ``p``'s grid in lattice units (float64)."""
    lx, ly = config.levels[2 * p], config.levels[2 * p + 1]
    xs, ys = _centred(lx), _centred(ly)
    xm, ym = _centred(lx - 1), _centred(ly - 1)
    if config.lattice == "rectangular":
        return ((xs, ys),)
    if config.lattice == "rhombic":
        return ((xs, ys), (xm, ym))
    if config.lattice == "hexagonal":
        rows = int(np.floor((ly - 1) / _ROW + 1e-9)) + 1
        y = _centred(rows, _ROW)
        first = ((rows - 1) // 2) % 2  # the (lower) centre row holds X
        return ((xs, y[first::2]), (xm, y[1 - first :: 2]))
    y = _centred(ly)  # hexagonal_upstream: rows one apart, offsets ±1/4 (L_x == L_y)
    return ((xs + 0.25, y[0::2]), (xs - 0.25, y[1::2]))


class _Q2D2Tables(NamedTuple):
    """Per pair ``p`` and coset ``c``: the first coordinate and step of each axis, the point
    counts, the first local index and the coordinate tables (``coords[p, c, axis, k]``)."""

    start: np.ndarray  # (P, 2, 2) float: first x / y of each coset
    step: np.ndarray  # (P, 2, 2) float
    count: np.ndarray  # (P, 2, 2) int (0: no second coset)
    first: np.ndarray  # (P, 2) int: local index of the coset's first point
    coords: np.ndarray  # (P, 2, 2, M) float
    sizes: np.ndarray  # (P,) int
    basis: np.ndarray  # (P,) int
    scale: np.ndarray  # (C,) float: (L - 1)(1 + ε)/2
    half_width: np.ndarray  # (C,) float: ⌊L/2⌋


@functools.lru_cache(maxsize=256)
def _q2d2_tables(config: Q2D2Config) -> _Q2D2Tables:
    P = config.pairs
    cosets = [_pair_cosets(config, p) for p in range(P)]
    M = max(len(a) for cs in cosets for xy in cs for a in xy)
    start = np.zeros((P, 2, 2))
    step = np.ones((P, 2, 2))
    count = np.zeros((P, 2, 2), np.int64)
    first = np.zeros((P, 2), np.int64)
    coords = np.zeros((P, 2, 2, M))
    for p, cs in enumerate(cosets):
        n0 = 0
        for c, xy in enumerate(cs):
            first[p, c] = n0
            for a, v in enumerate(xy):
                start[p, c, a] = v[0]
                step[p, c, a] = v[1] - v[0] if len(v) > 1 else 1.0
                count[p, c, a] = len(v)
                coords[p, c, a, : len(v)] = v
            n0 += len(xy[0]) * len(xy[1])
    levels = np.asarray(config.levels, np.float64)
    return _Q2D2Tables(
        start=start,
        step=step,
        count=count,
        first=first,
        coords=coords,
        sizes=np.asarray(config.grid_sizes, np.int64),
        basis=_basis(config.grid_sizes),
        scale=(levels - 1) * (1 + config.eps) / 2,
        half_width=np.floor(levels / 2),
    )


def _coset_point(t: _Q2D2Tables, c: jax.Array | int, k: jax.Array, axis: int, dt) -> jax.Array:
    """The coordinate on ``axis`` of point ``k`` (int, ``[..., P]``) of coset ``c`` of every
    pair, the same float when snapping and decoding: ``start + k·step`` for steps 1 and 2
    (exact in any evaluation order: the starts are multiples of ¼), else read from the table
    (the true hexagonal rows, √3 apart)."""
    steps = t.step[:, :, axis]
    if np.all((steps == 1.0) | (steps == 2.0)):
        start, step = (jnp.asarray(v[:, :, axis], dt) for v in (t.start, t.step))
        if isinstance(c, int):
            return start[:, c] + k.astype(dt) * step[:, c]
        start = jnp.where(c == 1, start[:, 1], start[:, 0])
        return start + k.astype(dt) * jnp.where(c == 1, step[:, 1], step[:, 0])
    P, _, _, M = t.coords.shape
    flat = jnp.asarray(t.coords.reshape(-1), dt)
    pair = jnp.arange(P, dtype=jnp.int32)
    return jnp.take(flat, ((pair * 2 + c) * 2 + axis) * M + k, mode="clip")


def _q2d2_snap(s: jax.Array, config: Q2D2Config) -> tuple[jax.Array, jax.Array]:
    """The nearest grid point of every pair of ``s`` (lattice units, ``[..., P, 2]``) and its
    local index (``[..., P]``; −1 where the pair holds NaN, whose point is NaN).

    Exact on the finite grid: each coset is a product of two uniform 1-D grids, whose nearest
    point is the per-axis clipped rounding; the nearer of the two cosets wins (ties: the first),
    compared as ``(p1 − p0)·((s − p0) + (s − p1))`` summed over the axes (= ``d0² − d1²``
    without squaring huge coordinates).
    """
    t, dt = _q2d2_tables(config), s.dtype
    # Per-axis planes [..., P] throughout (XLA:CPU is slow on size-2 minor axes).
    axes = [jnp.clip(s[..., a], -_FAR, _FAR) for a in (0, 1)]
    bad = jnp.isnan(axes[0]) | jnp.isnan(axes[1])
    points, local = [], []
    cosets = 2 if np.all(t.count[:, 1, 0] > 0) else 1  # the lattice is the same for all pairs
    for c in range(cosets):
        pts, ks = [], []
        for a in (0, 1):
            n = jnp.asarray(np.maximum(t.count[:, c, a] - 1, 0), dt)
            k = (axes[a] - jnp.asarray(t.start[:, c, a], dt)) / jnp.asarray(t.step[:, c, a], dt)
            k = jnp.clip(jnp.round(k), 0, n)
            k = jnp.where(jnp.isnan(k), 0, k).astype(jnp.int32)
            pts.append(_coset_point(t, c, k, a, dt))
            ks.append(k)
        points.append(pts)
        ny = jnp.asarray(t.count[:, c, 1], jnp.int32)
        local.append(jnp.asarray(t.first[:, c], jnp.int32) + ks[0] * ny + ks[1])
    (px, py), index = points[0], local[0]
    if cosets == 2:
        (x1, y1), (x, y) = points[1], axes
        gap = (x1 - px) * ((x - px) + (x - x1)) + (y1 - py) * ((y - py) + (y - y1))  # d0² − d1²
        second = gap > 0
        px, py = jnp.where(second, x1, px), jnp.where(second, y1, py)
        index = jnp.where(second, local[1], index)
    px, py = jnp.where(bad, jnp.nan, px), jnp.where(bad, jnp.nan, py)
    return jnp.stack([px, py], axis=-1), jnp.where(bad, -1, index)


def _pairs_of(v: jax.Array) -> jax.Array:
    return v.reshape(v.shape[:-1] + (v.shape[-1] // 2, 2))


def q2d2(z: ArrayLike, config: Q2D2Config) -> jax.Array:
    """Q2D2: channel pairs snapped to the nearest point of their 2-D grid (METHODS.md §8).

    ``s = tanh(z)·(L − 1)(1 + ε)/2`` per channel (``bound=False``: without the tanh), each pair
    ``(s_2p, s_2p+1)`` replaced by the nearest point of its finite grid (:class:`Q2D2Config`,
    exact; a tie within a coset goes to the even grid position per axis — rounding half to
    even — and between the cosets to the first), divided by
    ``⌊L/2⌋`` per channel. Gradient: straight through the snapping, ``∂/∂z = (1 −
    tanh²z)·(L − 1)(1 + ε)/(2⌊L/2⌋)``. ``config.lattice`` names the grid a result used (the
    true hexagonal one, or upstream's ``"hexagonal_upstream"``).

    Args:
      z: a floating array whose last axis has ``len(config.levels)`` channels (even).
      config: the levels, the lattice and the bound.

    Returns:
      The quantized ``z`` (shape and dtype kept; computed in float32, or float64 for float64).

    >>> q2d2(jnp.array([0.3, -0.8]), Q2D2Config(levels=(3, 3), bound=False))
    Array([ 0., -1.], dtype=float32)
    """
    z = _check_vectors(z, len(config.levels), "q2d2", "len(config.levels)")
    return _q2d2(z, config=config)


@_compiled
def _q2d2(z: jax.Array, config: Q2D2Config) -> jax.Array:
    dt = _compute_dtype(z.dtype)
    t = _q2d2_tables(config)
    b = jnp.tanh(z.astype(dt)) if config.bound else z.astype(dt)
    s = b * jnp.asarray(t.scale, dt)
    point, _ = _q2d2_snap(_pairs_of(jax.lax.stop_gradient(s)), config)
    q = straight_through(s, point.reshape(s.shape))
    return (q / jnp.asarray(t.half_width, dt)).astype(z.dtype)


def q2d2_indices(z: ArrayLike, config: Q2D2Config, *, quantized: bool = False) -> jax.Array:
    """The code of every vector of ``z``: the mixed radix of the pairs' local indices
    (``Σ_p k_p·Π_{j<p} G_j``, ``G`` the grid sizes; int32, shape ``z.shape[:-1]``); ``−1``
    for a vector holding NaN.

    ``quantized=True``: ``z`` holds quantized values (outputs of :func:`q2d2` or
    :func:`q2d2_from_indices`), whose grid points are read exactly (``z·⌊L/2⌋`` snapped), not
    quantized again through the bound and scale.
    """
    z = _check_vectors(z, len(config.levels), "q2d2_indices", "len(config.levels)")
    return _q2d2_indices(z, config=config, quantized=bool(quantized))


@_compiled_indices
def _q2d2_indices(z: jax.Array, config: Q2D2Config, quantized: bool) -> jax.Array:
    dt = _compute_dtype(z.dtype)
    t = _q2d2_tables(config)
    z = jax.lax.stop_gradient(z.astype(dt))
    if quantized:
        s = z * jnp.asarray(t.half_width, dt)
    else:
        s = (jnp.tanh(z) if config.bound else z) * jnp.asarray(t.scale, dt)
    _, local = _q2d2_snap(_pairs_of(s), config)
    return _mixed_radix(local, t.basis, local >= 0)


def q2d2_from_indices(idx: ArrayLike, config: Q2D2Config) -> jax.Array:
    """The quantized vectors of codes ``idx`` (float32, shape ``idx.shape + (len(levels),)``):
    exactly the values :func:`q2d2` gave; NaN for an index outside ``[0, codebook_size)``."""
    return _q2d2_from_indices(_check_indices(idx, "q2d2_from_indices"), config=config)


@_compiled
def _q2d2_from_indices(idx: jax.Array, config: Q2D2Config) -> jax.Array:
    t = _q2d2_tables(config)
    valid = (idx >= 0) & (idx < config.codebook_size)
    local = (idx[..., None] // jnp.asarray(t.basis, jnp.int32)) % jnp.asarray(t.sizes, jnp.int32)
    second = local >= jnp.asarray(t.first[:, 1], jnp.int32)
    second = second & jnp.asarray(t.count[:, 1, 0] > 0)
    c = second.astype(jnp.int32)
    within = local - jnp.where(second, jnp.asarray(t.first[:, 1], jnp.int32), 0)
    ny = jnp.where(
        second, jnp.asarray(t.count[:, 1, 1], jnp.int32), jnp.asarray(t.count[:, 0, 1], jnp.int32)
    )
    ny = jnp.maximum(ny, 1)
    point = jnp.stack(
        [
            _coset_point(t, c, within // ny, 0, jnp.float32),
            _coset_point(t, c, within % ny, 1, jnp.float32),
        ],
        axis=-1,
    )
    values = point.reshape(idx.shape + (config.dim,)) / jnp.asarray(t.half_width, jnp.float32)
    return jnp.where(valid[..., None], values, jnp.nan)


def q2d2_grid(config: Q2D2Config, pair: int = 0, *, normalized: bool = False) -> np.ndarray:
    """The finite grid of pair ``pair`` (float64 ``[G, 2]``; row ``k``: the point of local
    index ``k``), in lattice units (where nearest points are measured); ``normalized=True``:
    divided by ``⌊L/2⌋`` per axis, as :func:`q2d2` outputs them. For plots and brute-force
    checks.

    >>> q2d2_grid(Q2D2Config(levels=(2, 2), lattice="rhombic")).tolist()
    [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5], [0.0, 0.0]]
    """
    if isinstance(pair, bool) or not isinstance(pair, (int, np.integer)):
        raise ValueError(f"pair={pair!r} is not an integer; allowed: 0..{config.pairs - 1}")
    if not 0 <= pair < config.pairs:
        raise ValueError(f"pair={pair!r} is out of range; allowed: 0..{config.pairs - 1}")
    points = [
        np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
        for xs, ys in _pair_cosets(config, int(pair))
    ]
    grid = np.concatenate(points, axis=0)
    if normalized:
        grid = grid / np.floor(np.asarray(config.levels[2 * pair : 2 * pair + 2]) / 2)
    return grid


# ---------------------------------------------------------------------------------- utilisation


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size={size!r} is not allowed; allowed: a positive int (codebook size)")
    return int(size)


def code_perplexity(indices: ArrayLike, size: int) -> jax.Array:
    """``exp(H)`` of the code frequencies: ``H = −Σ_k p_k log p_k``, ``p_k`` the share of
    ``indices`` equal to ``k`` (float32 scalar; traceable). ``size`` codes used equally give
    ``size``, one code gives 1. Indices outside ``[0, size)`` (``−1``: a NaN vector) are not
    counted; none left gives 0. For a residual quantizer pass one stage (``idx[..., s]``).

    >>> float(code_perplexity(jnp.array([0, 1, 2, 3]), 8))
    4.0
    """
    return _perplexity(_check_indices(indices, "code_perplexity"), _check_size(size))


@functools.partial(jax.jit, static_argnums=1)
def _perplexity(idx: jax.Array, size: int) -> jax.Array:
    idx = idx.reshape(-1)
    valid = (idx >= 0) & (idx < size)
    counts = (
        jnp.zeros((size,), jnp.float32).at[jnp.where(valid, idx, 0)].add(valid.astype(jnp.float32))
    )
    total = jnp.sum(counts)
    p = counts / jnp.maximum(total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def code_utilisation(indices: ArrayLike, size: int) -> jax.Array:
    """:func:`code_perplexity` divided by ``size``: 1 when every code is used equally often."""
    return code_perplexity(indices, size) / _check_size(size)


def bits_per_vector(config: Any) -> float:
    """Bits of one code vector: ``log2`` of the codebook size, times the stages of a residual
    quantizer (FSQ: ``Σ log2 L_i``; Q2D2: ``Σ log2`` of the grid sizes).

    >>> bits_per_vector(FSQConfig(levels=(8, 8)))
    6.0
    """
    size = getattr(config, "codebook_size", None)
    if not isinstance(size, int):
        raise ValueError(
            f"config={config!r} is not allowed; allowed: an FSQConfig, Q2D2Config, VQConfig or "
            "RVQConfig"
        )
    return float(getattr(config, "stages", 1) * math.log2(size))


def element_bits(config: Any) -> int:
    """The per-element rate rounded up (``⌈bits_per_vector / dim⌉``, at least 1): the ``bits``
    a latent family reports to the layer summaries (``act_bits``)."""
    return max(1, math.ceil(bits_per_vector(config) / config.dim - 1e-9))


# ---------------------------------------------------------------------------------- families


class LatentFamily(QuantizerFamily):
    """Shared description of the latent (vector) quantizer families: activations only, no
    scales; ``bits`` is :func:`element_bits` (the per-element rate rounded up), the exact
    rate per vector is :func:`bits_per_vector`."""

    def roles(self, spec):
        return ("act",)

    def bits(self, spec) -> int:
        return element_bits(spec.config)

    def granularity(self, spec) -> str:
        return "none"

    def describe(self, spec) -> str:
        return f"{self.name}{self.codebook_size(spec)}/d{self.vector_dim(spec)}"

    def codebook_size(self, spec) -> int:
        return int(spec.config.codebook_size)

    def vector_dim(self, spec) -> int:
        return int(spec.config.dim)


class FSQFamily(LatentFamily):
    """``"fsq"``: :func:`fsq` (no params, no state); codes :func:`fsq_indices`."""

    name = "fsq"
    config_types = (FSQConfig,)

    def apply(self, spec, x, params, *, key=None, stats=None):
        return fsq(x, spec.config)

    def indices(self, spec, x, params, stats):
        return fsq_indices(x, spec.config)

    def from_indices(self, spec, idx, params, stats):
        return fsq_from_indices(idx, spec.config)


class Q2D2Family(LatentFamily):
    """``"q2d2"``: :func:`q2d2` (no params, no state); codes :func:`q2d2_indices`."""

    name = "q2d2"
    config_types = (Q2D2Config,)

    def describe(self, spec) -> str:
        return f"q2d2-{spec.config.lattice}{spec.config.codebook_size}/d{spec.config.dim}"

    def apply(self, spec, x, params, *, key=None, stats=None):
        return q2d2(x, spec.config)

    def indices(self, spec, x, params, stats):
        return q2d2_indices(x, spec.config)

    def from_indices(self, spec, idx, params, stats):
        return q2d2_from_indices(idx, spec.config)


register_family(FSQFamily())
register_family(Q2D2Family())
