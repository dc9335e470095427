"""Statistical gradient quantizers — Chen et al. 2020, "A Statistical Framework for Low-bitwidth
Training of Deep Neural Networks" (NeurIPS 2020; code cjf00000/StatQuant, MIT), §4: PTQ, PSQ and
BHQ of the output cotangent ∇Y; METHODS.md §7.

Differs from the reference: ranges are the exact ``[min, max]`` (no ``±1e-8``); the noise comes
from an explicit PRNG key; BHQ subtracts each row's minimum before the transform (the per-row
quantizer is shift-equivariant, so this only makes constant rows exact) and scales the small rows
by ``1/t`` instead of both by the reference's normalised pair (the same ratio ``t``; the
quantizer is scale-invariant); a matrix of fewer than 3 rows is not grouped (the reference's loop
reads out of bounds there).

Every quantizer here is an unbiased estimator, ``E[Q(g)] = g``, built from keyed stochastic
rounding (:func:`qflax.numerics.stochastic_round`) onto ``B + 1`` levels, ``B = 2^bits − 1``:

* :func:`ptq_gradient` — one range ``[min g, max g]`` per tensor;
  ``E‖Q(g) − g‖² ≤ N·D·R²/(4B²)`` (:func:`ptq_variance_bound`).
* :func:`psq_gradient` — one range per row (``rows="sample"``: the leading axis, the paper's
  per-sample; ``"token"``: every axis but the last); ``≤ D·Σ R_i²/(4B²)``
  (:func:`psq_variance_bound`).
* :func:`bhq_gradient` — block Householder: rows grouped (:func:`bhq_groups`), each group
  transformed by ``T = H·diag(s)``, quantized per row, transformed back with ``T⁻¹``; bound
  :func:`bhq_variance_bound` (derived there).

The DoReFa gradient quantizer (Zhou et al. 2016, eq. 12) is the family ``"dorefa_grad"`` here,
on :func:`qflax.quantizers.dorefa_quantize_gradient`.

Numerics: computed in float32 (in the input's dtype when wider) and cast back, so bfloat16
results are rounded to the nearest bfloat16 (a bias below half a bfloat16 ulp). Ranges are taken
on ``g·2^−e`` (``2^e`` the power of two of the row's, or tensor's, largest magnitude; exact), so
ranges of ``±3e38`` neither overflow nor meet XLA's flushed reciprocals. A row (PSQ) or tensor
(PTQ, BHQ) holding NaN or ±inf comes back all NaN; zeros, and rows of one value, come back exact.
Subnormals are flushed to zero by XLA on CPU (they quantize as zeros there); in BHQ, whose groups
mix rows under one power of two, a tensor whose largest magnitude is beyond ``2^±64`` is rescaled
to ``2^±64``, flushing values ``2^190`` times smaller than it (far below a step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import NOISE_SOURCES, check_bits, check_choice, stochastic_round, times_pow2
from qflax.quantizers._dorefa import dorefa_quantize_gradient
from qflax.quantizers._family import QuantizerFamily, register_family

__all__ = [
    "GRADIENT_ROWS",
    "BHQGroups",
    "StatGradConfig",
    "bhq_gradient",
    "bhq_groups",
    "bhq_variance_bound",
    "dorefa_gradient_variance_bound",
    "householder_uniform",
    "psq_gradient",
    "psq_variance_bound",
    "ptq_gradient",
    "ptq_variance_bound",
]

# The rows that share a range: "sample" (the leading axis; the rest flattened, as the reference's
# x.view(N, -1)) or "token" (every axis but the last: one row per position of a sequence).
GRADIENT_ROWS = ("sample", "token")
MIN_GRAD_BITS = 2
MAX_GRAD_BITS = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatGradConfig:
    """A statistical gradient quantizer (``ptq``, ``psq``, ``bhq``, ``dorefa_grad``).

    >>> StatGradConfig(bits=5, rows="token").levels
    31
    """

    # Bits of the codes: B = 2^bits − 1 steps between a range's min and max; 2..16.
    bits: int = 8
    # Rows sharing a range (psq, bhq; dorefa_grad's max): "sample" or "token". ptq: unused.
    rows: str = "sample"
    # The rounding's uniform variates (qflax.numerics.NOISE_SOURCES): "hash" (a counter hash of
    # two words drawn from the key; exactly uniform per element, fused, ~8x cheaper on CPU) or
    # "threefry" (jax.random.uniform). dorefa_grad: unused (its noise is DoReFa's own).
    noise: str = "hash"

    def __post_init__(self):
        check_bits(self.bits, "bits", MIN_GRAD_BITS, MAX_GRAD_BITS)
        check_choice(self.rows, "rows", GRADIENT_ROWS)
        check_choice(self.noise, "noise", NOISE_SOURCES)

    @property
    def levels(self) -> int:
        """``B = 2^bits − 1``: the number of steps (bins) of a range."""
        return 2**self.bits - 1


# ---------------------------------------------------------------------------------- helpers


def _check(g: ArrayLike, bits, rows: str | None = None) -> jax.Array:
    check_bits(bits, "bits", MIN_GRAD_BITS, MAX_GRAD_BITS)
    if rows is not None:
        check_choice(rows, "rows", GRADIENT_ROWS)
    g = jnp.asarray(g)
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"g must be a floating array, got dtype {g.dtype}")
    return g


def _compute_dtype(dtype) -> np.dtype:
    return np.dtype(dtype) if jnp.finfo(dtype).bits > 32 else np.dtype(np.float32)


def _as_rows(g: jax.Array, rows: str) -> jax.Array:
    """``g`` as an ``(N, D)`` matrix of rows (a tensor of rank <= 1 is one row)."""
    if g.ndim <= 1:
        return g.reshape(1, -1)
    if rows == "sample":
        return g.reshape(g.shape[0], -1)
    return g.reshape(-1, g.shape[-1])


def _pow2_exponent(m: jax.Array) -> jax.Array:
    """``e`` with ``m·2^−e`` in ``[½, 1)`` for finite ``m > 0``; 0 otherwise."""
    ok = (m > 0) & jnp.isfinite(m)
    _, e = jnp.frexp(jnp.where(ok, m, jnp.ones_like(m)))
    return jnp.where(ok, e, jnp.zeros_like(e))


def _quantize_rows(x: jax.Array, levels: int, key: jax.Array, noise: str) -> jax.Array:
    """Stochastic rounding of each row of ``x`` (``(N, D)``) onto ``lo + k·(hi − lo)/B``,
    ``k = 0..B``: unbiased; rows of zeros or of one value exact; rows with NaN/inf all NaN.

    Each row is rescaled by the power of two ``2^−e`` that brings its largest magnitude into
    ``[½, 1)`` (exact: :func:`~qflax.numerics.times_pow2`), so ranges near the float limits
    neither overflow nor lose their small steps."""
    lo = jnp.min(x, axis=1, keepdims=True)
    hi = jnp.max(x, axis=1, keepdims=True)
    finite = jnp.isfinite(lo) & jnp.isfinite(hi)
    e = _pow2_exponent(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    xs, los, his = times_pow2(x, -e), times_pow2(lo, -e), times_pow2(hi, -e)
    step = (his - los) / levels
    safe = jnp.where(step > 0, step, jnp.ones_like(step))
    t = jnp.clip((xs - los) / safe, 0.0, float(levels))
    k = stochastic_round(t, key, noise=noise)
    y = times_pow2(jnp.clip(los + k * step, los, his), e)
    return jnp.where(finite, y, jnp.full_like(y, jnp.nan))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _rows_quantized(g: jax.Array, key: jax.Array, bits: int, rows: str, noise: str) -> jax.Array:
    """PTQ (``rows="all"``) or PSQ of ``g``, compiled once per shape (eager calls too)."""
    x = g.astype(_compute_dtype(g.dtype))
    x = x.reshape(1, -1) if rows == "all" else _as_rows(x, rows)
    return _quantize_rows(x, 2**bits - 1, key, noise).reshape(g.shape).astype(g.dtype)


def _stochastic(g: ArrayLike, bits, key, rows, name: str, noise: str = "hash") -> jax.Array:
    g = _check(g, bits, rows)
    check_choice(noise, "noise", NOISE_SOURCES)
    if key is None:
        raise ValueError(f"key=None is not allowed for {name}; allowed: a PRNG key")
    return g


# ---------------------------------------------------------------------------------- PTQ, PSQ


def ptq_gradient(g: ArrayLike, *, bits: int, key: jax.Array, noise: str = "hash") -> jax.Array:
    """Per-tensor quantization (PTQ): stochastic rounding onto ``B + 1`` levels of
    ``[min g, max g]``, ``B = 2^bits − 1``; unbiased.

    Args:
      g: a floating array (a cotangent).
      bits: 2..16.
      key: PRNG key of the rounding (the same key gives the same result).
      noise: the rounding's variates, ``"hash"`` or ``"threefry"``
        (:func:`~qflax.numerics.stochastic_round`).

    Returns:
      ``ĝ`` with the shape and dtype of ``g``: ``ĝ = min + k·Δ``, ``k ∈ {0..B}``, ``Δ = R/B``.

    >>> ptq_gradient(jnp.array([0.0, 1.0, 3.0]), bits=2, key=jax.random.key(0)).tolist()
    [0.0, 1.0, 3.0]
    """
    g = _stochastic(g, bits, key, None, "ptq_gradient", noise)
    return _rows_quantized(g, key, int(bits), "all", noise)


def psq_gradient(
    g: ArrayLike, *, bits: int, key: jax.Array, rows: str = "sample", noise: str = "hash"
) -> jax.Array:
    """Per-sample quantization (PSQ): :func:`ptq_gradient` with one range per row; unbiased.

    Args:
      g: a floating array (a cotangent).
      bits: 2..16.
      key: PRNG key of the rounding.
      rows: ``"sample"`` (one range per index of the leading axis) or ``"token"`` (per index of
        every axis but the last); a tensor of rank <= 1 is one row.
      noise: as in :func:`ptq_gradient`.

    Returns:
      ``ĝ`` with the shape and dtype of ``g``; a row of zeros stays zeros.

    >>> g = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    >>> psq_gradient(g, bits=4, key=jax.random.key(0))[0].tolist()
    [0.0, 0.0, 0.0]
    """
    g = _stochastic(g, bits, key, rows, "psq_gradient", noise)
    return _rows_quantized(g, key, int(bits), rows, noise)


def _bound_dtype(g: jax.Array) -> np.dtype:
    return _compute_dtype(g.dtype)


def ptq_variance_bound(g: ArrayLike, *, bits: int) -> jax.Array:
    """``N·D·R²/(4B²)``: the bound of ``E‖ptq(g) − g‖²`` (each element's stochastic rounding
    has variance ``≤ Δ²/4``, ``Δ = R/B``, ``R = max g − min g``) [code, paper]."""
    g = _check(g, bits)
    x = g.astype(_bound_dtype(g))
    r = jnp.max(x) - jnp.min(x)
    return x.size * r**2 / (4.0 * (2**bits - 1) ** 2)


def psq_variance_bound(g: ArrayLike, *, bits: int, rows: str = "sample") -> jax.Array:
    """``D·Σ R_i²/(4B²)``: the bound of ``E‖psq(g) − g‖²`` (``R_i`` the range of row ``i``,
    ``D`` the row length) [code, paper]."""
    g = _check(g, bits, rows)
    x = _as_rows(g.astype(_bound_dtype(g)), rows)
    r = jnp.max(x, axis=1) - jnp.min(x, axis=1)
    return x.shape[1] * jnp.sum(r**2) / (4.0 * (2**bits - 1) ** 2)


def dorefa_gradient_variance_bound(g: ArrayLike, *, bits: int, rows: str = "sample") -> jax.Array:
    """``D·Σ m_i²/B²``: the bound of ``E‖Q(g) − g‖²`` of the DoReFa gradient quantizer
    (``m_i = max|g|`` of row ``i``; its grid of ``[−m_i, m_i]`` has the step ``2m_i/B``, so each
    element's variance is ``≤ (2m_i/B)²/4``)."""
    g = _check(g, bits, rows)
    x = _as_rows(g.astype(_bound_dtype(g)), rows)
    m = jnp.max(jnp.abs(x), axis=1)
    return x.shape[1] * jnp.sum(m**2) / float((2**bits - 1) ** 2)


# ---------------------------------------------------------------------------------- BHQ


def householder_uniform(n: int) -> jax.Array:
    """The ``n×n`` reflection ``H = I − 2vvᵀ``, ``v = (e₁ − u)/‖e₁ − u‖``, ``u = 𝟙/√n``: the
    symmetric orthogonal matrix sending ``e₁`` to ``u`` (``H = I`` for ``n = 1``).

    Its entries: ``H_{0j} = H_{j0} = 1/√n``; for ``i, j >= 1``: ``H_{ii} = 1 − a``,
    ``H_{ij} = −a``, ``a = 1/(n − √n)``.

    >>> h = householder_uniform(3)
    >>> bool(jnp.allclose(h @ h.T, jnp.eye(3), atol=1e-6)), h[:, 0].round(3).tolist()
    (True, [0.5770000219345093, 0.5770000219345093, 0.5770000219345093])
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} is not allowed; allowed: an integer >= 1")
    n = int(n)
    if n == 1:
        return jnp.ones((1, 1), jnp.float32)
    v = -np.ones(n) / math.sqrt(n)
    v[0] += 1.0
    v /= np.linalg.norm(v)
    return jnp.asarray(np.eye(n) - 2.0 * np.outer(v, v), jnp.float32)


def _householder_max(n: jax.Array) -> jax.Array:
    """``max|H|`` of :func:`householder_uniform` for group sizes ``n`` (float, ``n >= 2``)."""
    rn = jnp.sqrt(n)
    a = 1.0 / jnp.maximum(n - rn, 1e-30)
    off = jnp.where(n >= 3, a, jnp.zeros_like(a))
    return jnp.maximum(jnp.maximum(1.0 / rn, jnp.abs(1.0 - a)), off)


class BHQGroups(NamedTuple):
    """The grouping of BHQ, per row (original order): ``group`` (int32, the group's id),
    ``leader`` (bool: the group's large-range row), ``size`` (float32, rows in the group) and
    ``ratio`` (float32, ``t = s₁/s₂`` of the group: its small rows are scaled by ``1/t``;
    1 for a group of one row; 0 when the small rows are all constant)."""

    group: jax.Array
    leader: jax.Array
    size: jax.Array
    ratio: jax.Array


def bhq_groups(ranges: ArrayLike) -> BHQGroups:
    """Groups rows by their ranges ``λ`` as the reference's C++ extension does
    (cjf00000/StatQuant ``quantizers/quantizers.cpp``, ``get_transform``; the Python
    ``BlockwiseHouseholderPreconditioner.get_transform`` is not what runs).

    1. Sort ``λ`` descending: ``λ₍₀₎ >= λ₍₁₎ >= ...``.
    2. The number of small rows ``k`` is the least ``k`` in ``1..N−1`` with
       ``k·λ₍N−k−1₎ > Σ_{i<N−k} λ₍i₎`` — the first ``k`` at which the smallest of the ``L = N − k``
       large rows would receive more than one small row when the ``k`` small rows are shared in
       proportion to the large rows' ranges. None (or ``N < 3``): ``k = 0``, no grouping.
    3. Large row ``i`` (``i < L``, largest first) receives the next ``c_i − c_{i−1}`` small rows in
       sorted order (the largest small rows go to the largest large row), with
       ``c_i = ⌊k·Σ_{j<=i} λ₍j₎ / Σ_{j<L} λ₍j₎ + ½⌋`` (the reference's ``roundf`` of the
       cumulative share; ``c_{L−1} = k``). Each group has ``n >= 2`` rows.
    4. Within a group, with ``λ₁`` the large row's range and ``λ₂`` the largest small range,
       ``w₁ = λ₁/√n``, ``w₂ = λ₂·max|H|``, the reference's scales ``s₁ = w₁^(−1/3)``,
       ``s₂ = (w₂/(n−1))^(−1/3)`` have the ratio ``t = s₁/s₂ = (w₂/((n−1)·w₁))^(1/3)``, which
       minimises ``(w₁s₁ + w₂s₂)²·(1/s₁² + (n−1)/s₂²)``, the variance of the group (a row's range
       times the squared norms of ``T⁻¹``'s columns) when ``w₂`` bounds a small row's share.

    Args:
      ranges: ``(N,)`` row ranges ``max − min`` (>= 0, finite).

    Returns:
      :class:`BHQGroups` (traceable: works under ``jit``; shapes depend only on ``N``).
    """
    lam = jnp.asarray(ranges, jnp.float32)
    if lam.ndim != 1:
        raise ValueError(f"ranges has shape {lam.shape}; allowed: a vector (N,)")
    return _bhq_groups(lam)


@jax.jit
def _bhq_groups(lam: jax.Array) -> BHQGroups:
    n_rows = lam.shape[0]
    order = jnp.argsort(-lam, stable=True)
    ls = lam[order]
    prefix = jnp.cumsum(ls)
    if n_rows >= 3:
        ks = jnp.arange(1, n_rows)
        cond = ks.astype(jnp.float32) * ls[n_rows - ks - 1] > prefix[n_rows - ks - 1]
        k = jnp.where(jnp.any(cond), ks[jnp.argmax(cond)], 0)
    else:
        k = jnp.zeros((), jnp.int32)
    large = n_rows - k
    total = prefix[large - 1]
    total = jnp.where(total > 0, total, jnp.ones_like(total))
    pos = jnp.arange(n_rows)
    share = jnp.floor(k.astype(jnp.float32) * prefix / total + 0.5).astype(jnp.int32)
    # c_i for the large rows, then N (> every small index) so the array stays sorted.
    cum = jnp.where(pos < large, jnp.minimum(share, k), n_rows)
    prev = jnp.concatenate([jnp.zeros((1,), jnp.int32), cum[:-1]])
    small_group = jnp.searchsorted(cum, pos - large, side="right").astype(jnp.int32)
    is_leader = pos < large
    group_sorted = jnp.where(is_leader, pos, small_group)
    size = jnp.where(is_leader, 1 + cum - prev, 1).astype(jnp.float32)  # per group id
    first_small = jnp.clip(large + prev, 0, n_rows - 1)
    lam1 = ls
    lam2 = jnp.where(size >= 2, ls[first_small], 0.0)
    w1 = lam1 / jnp.sqrt(size)
    w2 = lam2 * _householder_max(jnp.maximum(size, 2.0))
    grouped = (size >= 2) & (w1 > 0)
    # (cube roots taken apart: the quotient of a tiny λ₂ by a large λ₁ would flush to zero)
    denom = jnp.where(grouped, (size - 1.0) * w1, jnp.ones_like(w1))
    ratio = jnp.where(grouped, jnp.cbrt(w2) / jnp.cbrt(denom), jnp.ones_like(w1))
    # Back to the original row order.
    group = jnp.zeros((n_rows,), jnp.int32).at[order].set(group_sorted)
    leader = jnp.zeros((n_rows,), bool).at[order].set(is_leader)
    return BHQGroups(group, leader, size[group], ratio[group])


# Up to this many rows, the reflections are one dense (N, N) matrix product (faster on CPU than
# the scatter of segment_sum: ~26 vs ~38 ms for 128 rows of 65,536); beyond, segment sums.
_DENSE_REFLECT_ROWS = 1024


def _reflect(x: jax.Array, groups: BHQGroups) -> jax.Array:
    """``H x`` group by group (``H`` of :func:`householder_uniform` with the leader first):
    ``x_r − 2·v_r·Σ_{s in r's group} v_s·x_s``."""
    n = groups.size
    rn = jnp.sqrt(n)
    norm = jnp.sqrt(jnp.maximum(2.0 - 2.0 / rn, 0.0))
    safe = jnp.where(n >= 2, norm, jnp.ones_like(norm))
    v = jnp.where(groups.leader, 1.0 - 1.0 / rn, -1.0 / rn) / safe
    v = jnp.where(n >= 2, v, jnp.zeros_like(v))[:, None].astype(x.dtype)
    if x.shape[0] <= _DENSE_REFLECT_ROWS:
        same = groups.group[:, None] == groups.group[None, :]
        eye = jnp.eye(x.shape[0], dtype=x.dtype)
        a = eye - 2.0 * jnp.where(same, v * v.T, jnp.zeros_like(eye))
        return jnp.dot(a, x, precision=jax.lax.Precision.HIGHEST)
    proj = jax.ops.segment_sum(v * x, groups.group, num_segments=x.shape[0])
    return x - 2.0 * v * proj[groups.group]


def _bhq_matrix(x: jax.Array, levels: int, key: jax.Array, noise: str) -> jax.Array:
    """BHQ of an ``(N, D)`` matrix of finite values, ``|x| <= 2^64``."""
    offset = jnp.min(x, axis=1, keepdims=True)
    shifted = x - offset  # >= 0, min 0: constant rows are exact zeros
    ranges = jnp.max(shifted, axis=1)
    groups = _bhq_groups(ranges)
    t = groups.ratio[:, None].astype(x.dtype)
    # T = H·diag(s) with s = 1 on leaders, 1/t on small rows (t = 0: the small rows are zero).
    positive = t > 0
    forward = jnp.where(
        groups.leader[:, None], 1.0, jnp.where(positive, 1.0 / jnp.where(positive, t, 1.0), 0.0)
    )
    inverse = jnp.where(groups.leader[:, None], 1.0, t)
    y = _reflect(shifted * forward, groups)
    q = _quantize_rows(y, levels, key, noise)
    # A row of one value is known exactly from its offset and zero range (as in PSQ): returned
    # as is rather than with the noise its group leaves on it (E = 0 either way).
    back = _reflect(q, groups) * inverse
    return jnp.where(ranges[:, None] > 0, back, jnp.zeros_like(back)) + offset


def bhq_gradient(
    g: ArrayLike, *, bits: int, key: jax.Array, rows: str = "sample", noise: str = "hash"
) -> jax.Array:
    """Block Householder quantization (BHQ); unbiased.

    The rows (``rows`` as in :func:`psq_gradient`) are shifted to a minimum of 0 (``o`` per row)
    and grouped by :func:`bhq_groups` — a large-range row with smaller rows. Within a group
    (leader first) ``T = H·diag(s)``, ``H`` of :func:`householder_uniform` (``H e₁ = 𝟙/√n``:
    the leader's values are spread evenly over the group's rows), ``s = (1, 1/t, ..., 1/t)``.
    ``T(g − o)`` is quantized per row as :func:`psq_gradient` does and mapped back:
    ``ĝ = T⁻¹·Q(T(g − o)) + o`` with ``T⁻¹ = diag(1/s)·H``. ``T`` is invertible and ``Q``
    unbiased, so ``E ĝ = g``. The leader's error is ``(1/√n)·Σ_j ε_j`` over the ``n``
    transformed rows, each of range about ``λ₁/√n``: about ``λ₁²/n`` against PSQ's ``λ₁²``,
    the gain when one row dominates; the small rows pay ``t²`` times the rows' errors. Rows of
    one value (zeros included) come back exactly, as in PSQ (their value is known from ``o``).

    Args:
      g: a floating array (a cotangent).
      bits: 2..16.
      key: PRNG key of the rounding.
      rows: ``"sample"`` or ``"token"`` (the rows grouped and mixed; rank <= 1: one row).
      noise: as in :func:`ptq_gradient`.

    Returns:
      ``ĝ`` with the shape and dtype of ``g``; all NaN when ``g`` holds NaN or ±inf; clipped
      to the dtype's finite range (an estimate of a value within a step of the largest float
      can exceed it).
    """
    g = _stochastic(g, bits, key, rows, "bhq_gradient", noise)
    return _bhq(g, key, int(bits), rows, noise)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _bhq(g: jax.Array, key: jax.Array, bits: int, rows: str, noise: str) -> jax.Array:
    dtype = _compute_dtype(g.dtype)
    x = _as_rows(g.astype(dtype), rows)
    m = jnp.max(jnp.abs(x))
    finite = jnp.isfinite(m)
    # Rescaled (exactly) only when the largest magnitude is beyond 2^±64: the groups mix rows,
    # so one power of two serves the tensor, and a smaller rescale flushes fewer small values.
    e = _pow2_exponent(m)
    e = e - jnp.clip(e, -64, 64)
    scaled = times_pow2(jnp.where(finite, x, 0.0), -e)
    y = times_pow2(_bhq_matrix(scaled, 2**bits - 1, key, noise), e)
    top = float(jnp.finfo(g.dtype).max)
    y = jnp.where(finite, jnp.clip(y, -top, top), jnp.full_like(y, jnp.nan))
    return y.reshape(g.shape).astype(g.dtype)


def bhq_variance_bound(g: ArrayLike, *, bits: int, rows: str = "sample") -> jax.Array:
    """A bound of ``E‖bhq(g) − g‖²`` from the row ranges ``λ`` (derived here [inferred]).

    The error is ``T⁻¹ε``, ``ε`` the independent, zero-mean rounding errors of the transformed
    rows, ``Var ε_jd <= (R_j/B)²/4``. So ``E‖T⁻¹ε‖² <= D/(4B²)·Σ_j R_j²·‖T⁻¹e_j‖²``. In a
    group of ``n`` rows, ``T⁻¹ = diag(1, t, ..., t)·H`` and ``H_{0j} = 1/√n`` give
    ``‖T⁻¹e_j‖² = (1 + (n − 1)t²)/n`` for every row ``j``; the range of a transformed row is at
    most ``R_j <= Σ_r |T_jr|·λ_r = λ₁/√n + (1/t)·Σ_{r>=1} |H_jr|·λ_r`` (the range of a sum is at
    most the sum of the ranges). Hence::

        E‖bhq(g) − g‖² <= D/(4B²) · Σ_groups (1 + (n−1)t²)/n · Σ_{j in group} R_j²

    The paper's objective, whose minimiser gives ``t`` (:func:`bhq_groups`), is this bound with
    ``Σ_{r>=1} |H_jr|·λ_r`` replaced by ``max|H|·λ₂``. A row alone (``n = 1``) gives PSQ's term
    ``λ²``; a row with ``n − 1`` constant rows gives ``λ₁²/n``.
    """
    g = _check(g, bits, rows)
    return _bhq_bound(g, jnp.float32(4.0 * (2**bits - 1) ** 2), rows)


@functools.partial(jax.jit, static_argnums=(2,))
def _bhq_bound(g: jax.Array, denominator: jax.Array, rows: str) -> jax.Array:
    x = _as_rows(g.astype(_bound_dtype(g)), rows)
    lam = (jnp.max(x, axis=1) - jnp.min(x, axis=1)).astype(jnp.float32)
    groups = _bhq_groups(lam)
    n, t = groups.size, groups.ratio
    a = jnp.where(n >= 2, 1.0 / jnp.maximum(n - jnp.sqrt(n), 1e-30), 0.0)
    small = jnp.where(groups.leader, 0.0, lam)
    total_small = jax.ops.segment_sum(small, groups.group, num_segments=lam.shape[0])[groups.group]
    lead = jax.ops.segment_sum(
        jnp.where(groups.leader, lam, 0.0), groups.group, num_segments=lam.shape[0]
    )[groups.group]
    mix = jnp.where(
        groups.leader,
        total_small / jnp.sqrt(n),
        jnp.abs(1.0 - a) * lam + a * (total_small - lam),
    )
    spread = jnp.where(mix > 0, mix / jnp.where(t > 0, t, 1.0), 0.0)
    r = lead / jnp.sqrt(n) + spread
    factor = (1.0 + (n - 1.0) * t**2) / n
    return x.shape[1] * jnp.sum(factor * r**2) / denominator.astype(x.dtype)


# ---------------------------------------------------------------------------------- families


class _StatGradFamily(QuantizerFamily):
    """Shared by the gradient families: a :class:`StatGradConfig`, the role ``"grad"``, a key,
    nothing at rest; :meth:`grad_slots` is the default (two keys: ∇Y quantized twice)."""

    config_types = (StatGradConfig,)

    def roles(self, spec):
        return ("grad",)

    def needs_key(self, spec) -> bool:
        return True

    def granularity(self, spec) -> str:
        return "none"

    def describe(self, spec) -> str:
        suffix = "/token" if spec.config.rows == "token" and self.name != "ptq" else ""
        if spec.config.noise != "hash" and self.name != "dorefa_grad":
            suffix += f"/{spec.config.noise}"
        return f"{self.name}{spec.config.bits}{suffix}"

    def apply(self, spec, x, params, *, key=None, stats=None):
        if params:
            raise ValueError(
                f"params={sorted(params)!r} is not allowed for kind={self.name!r}; allowed: {{}}"
            )
        return self._quantize(spec.config, x, key)


class PTQFamily(_StatGradFamily):
    """``"ptq"``: :func:`ptq_gradient` (one range per tensor)."""

    name = "ptq"

    def _quantize(self, config, g, key):
        return ptq_gradient(g, bits=config.bits, key=key, noise=config.noise)

    def variance_bound(self, spec, g):
        return ptq_variance_bound(g, bits=spec.config.bits)


class PSQFamily(_StatGradFamily):
    """``"psq"``: :func:`psq_gradient` (one range per row)."""

    name = "psq"

    def _quantize(self, config, g, key):
        return psq_gradient(g, bits=config.bits, key=key, rows=config.rows, noise=config.noise)

    def variance_bound(self, spec, g):
        return psq_variance_bound(g, bits=spec.config.bits, rows=spec.config.rows)


class BHQFamily(_StatGradFamily):
    """``"bhq"``: :func:`bhq_gradient` (block Householder)."""

    name = "bhq"

    def _quantize(self, config, g, key):
        return bhq_gradient(g, bits=config.bits, key=key, rows=config.rows, noise=config.noise)

    def variance_bound(self, spec, g):
        return bhq_variance_bound(g, bits=spec.config.bits, rows=spec.config.rows)


class DoReFaGradFamily(_StatGradFamily):
    """``"dorefa_grad"``: :func:`~qflax.quantizers.dorefa_quantize_gradient` (DoReFa eq. 12,
    ``2^bits`` levels of ``[−m, m]``, ``m = max|g|`` per row of ``config.rows``)."""

    name = "dorefa_grad"

    def _quantize(self, config, g, key):
        g = _stochastic(g, config.bits, key, config.rows, "dorefa_grad")
        return _dorefa_rows(g, key, config.bits, config.rows)

    def variance_bound(self, spec, g):
        return dorefa_gradient_variance_bound(g, bits=spec.config.bits, rows=spec.config.rows)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dorefa_rows(g: jax.Array, key: jax.Array, bits: int, rows: str) -> jax.Array:
    x = _as_rows(g.astype(_compute_dtype(g.dtype)), rows)
    out = dorefa_quantize_gradient(x, bits=bits, key=key)
    return out.reshape(g.shape).astype(g.dtype)


register_family(PTQFamily())
register_family(PSQFamily())
register_family(BHQFamily())
register_family(DoReFaGradFamily())
