"""Vector quantization with explicit codebooks — VQ-VAE (van den Oord et al. 2017, eq. 3), its
EMA codebook (VQ-VAE-2, Razavi et al. 2019; Sonnet's ``VectorQuantizerEMA``), LBG / k-means
codebooks (Linde, Buzo & Gray 1980; k-means++ seeding, Arthur & Vassilvitskii 2007) and residual
VQ (SoundStream, Zeghidour et al. 2021); METHODS.md §8, the classical rate–distortion reference.

Differs from the references: the value is the codeword exactly, with the straight-through
gradient of ``z + sg(q − z)`` (identity to ``z``, nothing to the codebook); the losses are means
over all elements (as Sonnet's); the EMA state starts with unit cluster sizes and sums equal to
the codebook (so an unused code keeps its place instead of the zero-initialised sums shrinking
it), without zero-debiasing; k-means re-seeds an empty cluster with the point farthest from its
centre (as scikit-learn); dead codes restart from random vectors of the batch (Jukebox /
``vector-quantize-pytorch``'s ``threshold_ema_dead_code``, here relative to the mean usage).

Shapes: ``z`` is ``[..., D]``; a codebook ``[K, D]`` (residual: ``[S, K, D]``, stage by stage);
indices are int32 ``z.shape[:-1]`` (residual: ``z.shape[:-1] + (S,)``). Distances are
``‖e‖² − 2 z·e`` at full float32 precision; ties go to the lower index. A vector holding NaN or
±inf quantizes to NaN and gets index ``−1`` (there is no nearest codeword of an infinite
vector); ``*_from_indices`` decodes an index outside ``[0, K)`` to NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import check_choice
from qflax.quantizers._family import register_family
from qflax.quantizers._latent import (
    LatentFamily,
    _check_bool,
    _check_indices,
    _check_unit,
    _check_vectors,
    _compute_dtype,
    straight_through,
)

__all__ = [
    "KMEANS_INITS",
    "RVQConfig",
    "VQConfig",
    "kmeans_codebook",
    "rvq",
    "rvq_ema_update",
    "rvq_from_indices",
    "rvq_indices",
    "rvq_losses",
    "rvq_restart_dead",
    "vq",
    "vq_ema_init",
    "vq_ema_update",
    "vq_from_indices",
    "vq_indices",
    "vq_losses",
    "vq_restart_dead",
]

# k-means seeding: "kmeans++" (D² sampling) or "random" (distinct random data vectors).
KMEANS_INITS = ("kmeans++", "random")

_HIGHEST = jax.lax.Precision.HIGHEST
_EMA_KEYS = ("codebook", "cluster_size", "embed_sum")


def _check_int(value: Any, field: str, lo: int, hi: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field}={value!r} is not an integer; allowed: integers {lo}..{hi}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{field}={value!r} is out of range; allowed: integers {lo}..{hi}")
    return int(value)


def _check_nonneg(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{field}={value!r} is not a number; allowed: a float >= 0")
    if not float(value) >= 0 or not math.isfinite(float(value)):
        raise ValueError(f"{field}={value!r} is out of range; allowed: a finite float >= 0")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CodebookFields:
    # Codewords per codebook K (2..2^31 - 1).
    codebook_size: int
    # Elements per vector D (the last axis of z).
    dim: int
    # Weight β of the commitment loss β·mean((z − sg(q))²).
    beta: float = 0.25
    # True: the codebook is state, updated by EMA (vq_ema_update) and dead-code restarts; False:
    # a learnable param trained by the codebook loss mean((sg(z) − q)²).
    ema: bool = True
    # EMA decay γ of the cluster sizes and sums (0 <= γ < 1).
    decay: float = 0.99
    # Laplace smoothing ε of the EMA cluster sizes (> 0 keeps unused codes finite).
    epsilon: float = 1e-5
    # A code is dead (re-seeded by *_restart_dead) when its EMA cluster size is below
    # restart_threshold × the mean cluster size; 0: never.
    restart_threshold: float = 0.01
    # Lloyd iterations of the k-means codebook a layer fits to its first batch (0: k-means++
    # seeds only).
    kmeans_iters: int = 10

    def __post_init__(self):
        _check_int(self.codebook_size, "codebook_size", 2)
        _check_int(self.dim, "dim", 1)
        _check_nonneg(self.beta, "beta")
        _check_bool(self.ema, "ema")
        _check_unit(self.decay, "decay")
        if _check_nonneg(self.epsilon, "epsilon") <= 0:
            raise ValueError(f"epsilon={self.epsilon!r} is not allowed; allowed: a float > 0")
        _check_nonneg(self.restart_threshold, "restart_threshold")
        _check_int(self.kmeans_iters, "kmeans_iters", 0, 10_000)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQConfig(_CodebookFields):
    """A vector quantizer with one codebook of ``codebook_size`` codewords of ``dim`` elements
    (hashable; validated at construction).

    >>> VQConfig(codebook_size=512, dim=64).beta
    0.25
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class RVQConfig(_CodebookFields):
    """A residual vector quantizer: ``stages`` codebooks, each quantizing the residual the
    stages before it left (hashable; validated at construction).

    >>> RVQConfig(stages=4, codebook_size=256, dim=8).stages
    4
    """

    # Codebooks applied in turn to the residual (1..64).
    stages: int = 4

    def __post_init__(self):
        super().__post_init__()
        _check_int(self.stages, "stages", 1, 64)


# ---------------------------------------------------------------------------------- core


def _check_codebooks(codebooks: ArrayLike, config: Any, name: str, stages: int | None):
    """Float array of shape ``[S, K, D]`` (``stages=None``: a single ``[K, D]`` codebook)."""
    cb = jnp.asarray(codebooks)
    want = (config.codebook_size, config.dim)
    if stages is not None:
        want = (stages,) + want
    if tuple(cb.shape) != want or not jnp.issubdtype(cb.dtype, jnp.floating):
        raise ValueError(
            f"{name}: codebook of shape {tuple(cb.shape)} and dtype {cb.dtype} does not fit the "
            f"config; allowed: a float array of shape {want}"
        )
    return cb if stages is not None else cb[None]


def _flat(z: jax.Array) -> jax.Array:
    return z.reshape(-1, z.shape[-1])


def _nearest(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """The index of the nearest codeword of every row of ``x`` (``[N, D]``, ``[K, D]``)."""
    e2 = jnp.sum(codebook * codebook, axis=-1)
    dots = jnp.matmul(x, codebook.T, precision=_HIGHEST)
    return jnp.argmin(e2 - 2 * dots, axis=-1).astype(jnp.int32)


def _take(codebook: jax.Array, idx: jax.Array) -> jax.Array:
    """``codebook[idx]`` (differentiable in the codebook), NaN rows for ``idx`` outside."""
    idx = jnp.where(idx < 0, codebook.shape[0], idx)  # take would wrap negative indices
    return jnp.take(codebook, idx, axis=0, mode="fill", fill_value=jnp.nan)


@jax.jit
def _encode(x: jax.Array, codebooks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy residual encoding of rows ``x`` (``[N, D]``) with ``[S, K, D]`` codebooks:
    ``(indices [N, S], values [N, D])``; the value is ``Σ_s e_s`` summed in stage order (as
    :func:`_decode` sums it), NaN / −1 for a non-finite row."""
    valid = jnp.all(jnp.isfinite(x), axis=-1)
    r = jnp.where(valid[:, None], x, 0)
    idx, q = [], None
    for s in range(codebooks.shape[0]):
        i = _nearest(r, codebooks[s])
        e = codebooks[s][i]
        q = e if q is None else q + e
        r = r - e
        idx.append(i)
    idx = jnp.where(valid[:, None], jnp.stack(idx, axis=-1), -1)
    return idx, jnp.where(valid[:, None], q, jnp.nan)


@jax.jit
def _decode(idx: jax.Array, codebooks: jax.Array) -> jax.Array:
    """``Σ_s codebooks[s, idx[..., s]]`` in stage order; NaN where an index is outside."""
    q = None
    for s in range(codebooks.shape[0]):
        e = _take(codebooks[s], idx[..., s])
        q = e if q is None else q + e
    return q


def _quantize(z, codebooks, config, name):
    z = _check_vectors(z, config.dim, name, "config.dim")
    dt = _compute_dtype(z.dtype)
    x = z.astype(dt)
    idx, q = _encode(_flat(jax.lax.stop_gradient(x)), jax.lax.stop_gradient(codebooks.astype(dt)))
    return (
        z,
        straight_through(x, q.reshape(x.shape)).astype(z.dtype),
        idx.reshape(z.shape[:-1] + (codebooks.shape[0],)),
    )


# ---------------------------------------------------------------------------------- VQ


def vq(z: ArrayLike, codebook: ArrayLike, config: VQConfig) -> jax.Array:
    """The nearest codeword (squared distance over the last axis) of every vector of ``z``.

    Value: ``e_k``, ``k = argmin_j ‖z − e_j‖²`` (ties: the lower ``j``); gradient: straight
    through to ``z`` (``z + sg(q − z)``), none to the codebook, which learns from the codebook
    loss (:func:`vq_losses`) or its EMA (:func:`vq_ema_update`).

    Args:
      z: a floating array ``[..., D]``, ``D = config.dim``.
      codebook: ``[K, D]``, ``K = config.codebook_size``.
      config: the quantizer's config.

    Returns:
      The quantized ``z`` (shape and dtype kept).

    >>> vq(jnp.array([[0.9, 0.2]]), jnp.array([[0.0, 0.0], [1.0, 0.0]]),
    ...    VQConfig(codebook_size=2, dim=2))
    Array([[1., 0.]], dtype=float32)
    """
    cb = _check_codebooks(codebook, config, "vq", None)
    return _quantize(z, cb, config, "vq")[1]


def vq_indices(z: ArrayLike, codebook: ArrayLike, config: VQConfig) -> jax.Array:
    """The index of the nearest codeword of every vector (int32, ``z.shape[:-1]``; −1 for a
    non-finite vector). Idempotent: a codeword's index is its own (distinct codewords)."""
    cb = _check_codebooks(codebook, config, "vq_indices", None)
    return _quantize(z, cb, config, "vq_indices")[2][..., 0]


def vq_from_indices(idx: ArrayLike, codebook: ArrayLike, config: VQConfig) -> jax.Array:
    """``codebook[idx]`` (shape ``idx.shape + (D,)``): exactly :func:`vq`'s values; NaN for an
    index outside ``[0, K)``."""
    cb = _check_codebooks(codebook, config, "vq_from_indices", None)
    return _take(cb[0], _check_indices(idx, "vq_from_indices"))


def vq_losses(z: ArrayLike, q: ArrayLike, *, beta: float = 0.25) -> tuple[jax.Array, jax.Array]:
    """VQ-VAE's two auxiliary losses (means over all elements, as Sonnet's):

    ``codebook = mean((sg(z) − q)²)`` (moves the codewords; unused with an EMA codebook) and
    ``commitment = β·mean((z − sg(q))²)`` (keeps the encoder near its codes). ``q`` must be the
    codewords gathered from the codebook (``codebook[idx]``, differentiable in the codebook), not
    :func:`vq`'s output (which passes no gradient to the codebook).
    """
    z, q = jnp.asarray(z), jnp.asarray(q)
    if z.shape != q.shape:
        raise ValueError(
            f"vq_losses: z.shape={tuple(z.shape)} and q.shape={tuple(q.shape)} differ; allowed: "
            "equal shapes"
        )
    sg = jax.lax.stop_gradient
    codebook = jnp.mean(jnp.square(sg(z) - q))
    commitment = _check_nonneg(beta, "beta") * jnp.mean(jnp.square(z - sg(q)))
    return codebook, commitment


# ---------------------------------------------------------------------------------- k-means


def _sq_dist(x: jax.Array, c: jax.Array) -> jax.Array:
    """``‖x_n − c_k‖²`` (``[N, K]``, clipped at 0)."""
    x2 = jnp.sum(x * x, axis=-1, keepdims=True)
    c2 = jnp.sum(c * c, axis=-1)
    return jnp.maximum(x2 - 2 * jnp.matmul(x, c.T, precision=_HIGHEST) + c2, 0.0)


def _kmeans_pp(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeds: the first uniformly, each next with probability ∝ its squared distance
    to the nearest seed so far (uniformly when every point is a seed already)."""
    n = x.shape[0]
    first_key, key = jax.random.split(key)
    first = x[jax.random.randint(first_key, (), 0, n)]
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum(jnp.square(x - first), axis=-1)

    def body(i, carry):
        centres, d2 = carry
        total = jnp.sum(d2)
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 0.0) / jnp.maximum(total, 1e-30)), 0)
        pick = jax.random.categorical(jax.random.fold_in(key, i), logits)
        c = x[pick]
        return centres.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=-1))

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, d2))
    return centres


def kmeans_codebook(
    x: ArrayLike, k: int, *, key: jax.Array, iters: int = 10, init: str = "kmeans++"
) -> jax.Array:
    """A ``[k, D]`` codebook fitted to the vectors ``x`` (``[..., D]``) by k-means (LBG).

    Seeds by k-means++ (``init="random"``: ``k`` random data vectors, distinct when there are
    enough), then ``iters`` Lloyd iterations (assign to the nearest centre, move each centre to
    its cluster's mean); an empty cluster is re-seeded with the point farthest from its centre
    (the farthest points go to the empty clusters in turn). Traceable (``k``, ``iters`` and
    ``init`` static). ``x`` must be finite; with fewer distinct vectors than ``k`` some
    codewords coincide.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise TypeError(f"kmeans_codebook: x must be a floating array, got dtype {x.dtype}")
    k = _check_int(k, "k", 1)
    iters = _check_int(iters, "iters", 0, 10_000)
    check_choice(init, "init", KMEANS_INITS)
    x = _flat(jax.lax.stop_gradient(x)).astype(_compute_dtype(x.dtype))
    if x.shape[0] == 0:
        raise ValueError("kmeans_codebook: x holds no vectors; allowed: at least one")
    return _kmeans(x, key, k=k, iters=iters, init=init)


@functools.partial(jax.jit, static_argnames=("k", "iters", "init"))
def _kmeans(x: jax.Array, key: jax.Array, k: int, iters: int, init: str) -> jax.Array:
    n = x.shape[0]
    seed_key, _ = jax.random.split(key)
    if init == "kmeans++":
        centres = _kmeans_pp(x, k, seed_key)
    else:
        centres = x[jax.random.choice(seed_key, n, (k,), replace=n < k)]

    def lloyd(_, centres):
        d2 = _sq_dist(x, centres)
        assign = jnp.argmin(d2, axis=-1)
        counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), assign, k)
        sums = jax.ops.segment_sum(x, assign, k)
        empty = counts == 0
        # Empty clusters take the points farthest from their centres, in turn.
        far = jnp.take_along_axis(d2, assign[:, None], axis=-1)[:, 0]
        _, order = jax.lax.top_k(far, min(k, n))
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, None) % min(k, n)
        reseed = x[order[rank]]
        means = sums / jnp.maximum(counts, 1)[:, None]
        return jnp.where(empty[:, None], reseed, means)

    return jax.lax.fori_loop(0, iters, lloyd, centres)


def _kmeans_stages(x: jax.Array, config: Any, stages: int, key: jax.Array) -> jax.Array:
    """``[S, K, D]`` codebooks fitted stage by stage to the residuals of the ones before."""
    x = _flat(jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)))
    books = []
    for s in range(stages):
        cb = kmeans_codebook(
            x, config.codebook_size, key=jax.random.fold_in(key, s), iters=config.kmeans_iters
        )
        x = x - cb[_nearest(x, cb)]
        books.append(cb)
    return jnp.stack(books)


# ---------------------------------------------------------------------------------- EMA


def vq_ema_init(codebook: ArrayLike) -> dict[str, jax.Array]:
    """The EMA state of a codebook (``[K, D]``, or ``[S, K, D]`` per stage): ``{"codebook",
    "cluster_size": 1 per code, "embed_sum": the codebook}`` (float32), so that ``codebook =
    embed_sum / cluster_size`` from the start."""
    cb = jnp.asarray(codebook, jnp.float32)
    return {"codebook": cb, "cluster_size": jnp.ones(cb.shape[:-1], jnp.float32), "embed_sum": cb}


def _check_state(state: Any, config: Any, name: str, stages: int | None) -> dict[str, jax.Array]:
    if not isinstance(state, dict) or set(state) != set(_EMA_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{name}: state={got!r} is not allowed; allowed: a dict with keys "
            f"{', '.join(_EMA_KEYS)} (see vq_ema_init)"
        )
    cb = _check_codebooks(state["codebook"], config, name, stages)
    lead = cb.shape[:-1]
    return {
        "codebook": cb,
        "cluster_size": jnp.asarray(state["cluster_size"], jnp.float32).reshape(lead),
        "embed_sum": jnp.asarray(state["embed_sum"], jnp.float32).reshape(cb.shape),
    }


def _unstack(state: dict[str, jax.Array], stages: int | None) -> dict[str, jax.Array]:
    return state if stages is not None else {k: v[0] for k, v in state.items()}


def _stage_inputs(x: jax.Array, idx: jax.Array, codebooks: jax.Array) -> jax.Array:
    """The residual each stage quantized (``[S, N, D]``) given the indices (``[N, S]``)."""
    inputs, r = [], x
    for s in range(codebooks.shape[0]):
        inputs.append(r)
        r = r - _take(codebooks[s], idx[:, s])
    return jnp.stack(inputs)


def _ema_stage(codebook, cluster_size, embed_sum, x, idx, decay, epsilon):
    k = codebook.shape[0]
    valid = (idx >= 0) & (idx < k) & jnp.all(jnp.isfinite(x), axis=-1)
    seg = jnp.where(valid, idx, 0)
    counts = jax.ops.segment_sum(valid.astype(jnp.float32), seg, k)
    sums = jax.ops.segment_sum(jnp.where(valid[:, None], x, 0.0), seg, k)
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (n + k * epsilon) * n
    codebook = embed_sum / jnp.maximum(smoothed, jnp.finfo(jnp.float32).tiny)[:, None]
    return codebook, cluster_size, embed_sum


def _ema_update(state, z, indices, config, name, stages):
    st = _check_state(state, config, name, stages)
    S = st["codebook"].shape[0]
    z = _check_vectors(z, config.dim, name, "config.dim")
    x = _flat(jax.lax.stop_gradient(z)).astype(jnp.float32)
    idx = _check_indices(indices, name).reshape(x.shape[0], S)
    return _unstack(_ema_stages(st, x, idx, config.decay, config.epsilon), stages)


@jax.jit
def _ema_stages(st, x, idx, decay, epsilon):
    inputs = _stage_inputs(x, idx, st["codebook"])
    cb, cs, es = jax.vmap(_ema_stage, in_axes=(0, 0, 0, 0, 1, None, None))(
        st["codebook"], st["cluster_size"], st["embed_sum"], inputs, idx, decay, epsilon
    )
    return {"codebook": cb, "cluster_size": cs, "embed_sum": es}


def vq_ema_update(
    state: dict[str, jax.Array], z: ArrayLike, indices: ArrayLike, config: VQConfig
) -> dict[str, jax.Array]:
    """One EMA step of the codebook (VQ-VAE-2; Sonnet's ``VectorQuantizerEMA``), no gradient.

    With ``n_k`` the vectors of ``z`` assigned to code ``k`` by ``indices`` and ``s_k`` their
    sum: ``N_k ← γ·N_k + (1 − γ)·n_k``, ``m_k ← γ·m_k + (1 − γ)·s_k``, Laplace smoothing
    ``Ñ_k = (N_k + ε)/(Σ N + K·ε)·Σ N``, and ``e_k = m_k / Ñ_k``. Indices −1 (non-finite
    vectors) are not counted.

    Args:
      state: ``{"codebook" [K, D], "cluster_size" [K], "embed_sum" [K, D]}`` (:func:`vq_ema_init`).
      z: the batch ``[..., D]``.
      indices: its codes under ``state["codebook"]`` (``z.shape[:-1]``, :func:`vq_indices`).
      config: ``decay`` γ and ``epsilon`` ε.

    Returns:
      The new state (float32).
    """
    return _ema_update(state, z, indices, config, "vq_ema_update", None)


def _restart_stage(codebook, cluster_size, embed_sum, x, key, threshold):
    k, n = codebook.shape[0], x.shape[0]
    mean = jnp.mean(cluster_size)
    finite = jnp.all(jnp.isfinite(x), axis=-1)
    dead = (cluster_size < threshold * mean) & jnp.any(finite)
    m = min(k, n)
    score = jnp.where(finite, jax.random.uniform(key, (n,)), -1.0)
    _, rows = jax.lax.top_k(score, m)  # random distinct vectors, finite ones first
    rank = jnp.clip(jnp.cumsum(dead) - 1, 0, None) % m
    new = x[rows[rank]]
    return (
        jnp.where(dead[:, None], new, codebook),
        jnp.where(dead, mean, cluster_size),
        jnp.where(dead[:, None], new * mean, embed_sum),
    )


def _restart(state, z, key, config, name, stages):
    st = _check_state(state, config, name, stages)
    S = st["codebook"].shape[0]
    z = _check_vectors(z, config.dim, name, "config.dim")
    x = _flat(jax.lax.stop_gradient(z)).astype(jnp.float32)
    if x.shape[0] == 0 or config.restart_threshold == 0:
        return _unstack(st, stages)
    keys = jax.random.split(key, S)
    return _unstack(_restart_stages(st, x, keys, config.restart_threshold), stages)


@jax.jit
def _restart_stages(st, x, keys, threshold):
    idx, _ = _encode(x, st["codebook"])
    inputs = _stage_inputs(x, idx, st["codebook"])
    cb, cs, es = jax.vmap(_restart_stage, in_axes=(0, 0, 0, 0, 0, None))(
        st["codebook"], st["cluster_size"], st["embed_sum"], inputs, keys, threshold
    )
    return {"codebook": cb, "cluster_size": cs, "embed_sum": es}


def vq_restart_dead(
    state: dict[str, jax.Array], z: ArrayLike, key: jax.Array, config: VQConfig
) -> dict[str, jax.Array]:
    """Re-seeds dead codes: every code whose EMA cluster size is below ``restart_threshold ×``
    the mean cluster size becomes a random vector of ``z`` (distinct vectors while there are
    enough; finite ones first), with the mean cluster size and a matching ``embed_sum``. Live
    codes are unchanged; ``restart_threshold=0`` changes nothing."""
    return _restart(state, z, key, config, "vq_restart_dead", None)


# ---------------------------------------------------------------------------------- RVQ


def rvq(z: ArrayLike, codebooks: ArrayLike, config: RVQConfig) -> jax.Array:
    """Residual VQ: stage ``s`` quantizes ``r_s = z − Σ_{t<s} q_t`` with codebook ``s``
    (nearest codeword, greedy); the value is ``Σ_s q_s``, the gradient straight through to ``z``.

    Args:
      z: a floating array ``[..., D]``.
      codebooks: ``[S, K, D]`` (``S = config.stages``).
      config: the quantizer's config.
    """
    cb = _check_codebooks(codebooks, config, "rvq", config.stages)
    return _quantize(z, cb, config, "rvq")[1]


def rvq_indices(z: ArrayLike, codebooks: ArrayLike, config: RVQConfig) -> jax.Array:
    """The stage codes of every vector (int32, ``z.shape[:-1] + (S,)``; −1 for a non-finite
    vector)."""
    cb = _check_codebooks(codebooks, config, "rvq_indices", config.stages)
    return _quantize(z, cb, config, "rvq_indices")[2]


def rvq_from_indices(idx: ArrayLike, codebooks: ArrayLike, config: RVQConfig) -> jax.Array:
    """``Σ_s codebooks[s, idx[..., s]]`` (``idx`` ``[..., S]``): exactly :func:`rvq`'s values;
    NaN where an index is outside ``[0, K)``."""
    cb = _check_codebooks(codebooks, config, "rvq_from_indices", config.stages)
    idx = _check_indices(idx, "rvq_from_indices")
    if idx.ndim == 0 or idx.shape[-1] != config.stages:
        raise ValueError(
            f"rvq_from_indices: indices of shape {tuple(idx.shape)}; allowed: a last axis of "
            f"{config.stages} (config.stages)"
        )
    return _decode(idx, cb)


def _losses(z, codebooks, config, name):
    """Codebook and commitment losses summed over the stages of ``[S, K, D]`` codebooks."""
    z = _check_vectors(z, config.dim, name, "config.dim")
    return _stage_losses(z.astype(_compute_dtype(z.dtype)), codebooks, beta=config.beta)


@functools.partial(jax.jit, static_argnames="beta")
def _stage_losses(x: jax.Array, codebooks: jax.Array, beta: float):
    idx, _ = _encode(_flat(jax.lax.stop_gradient(x)), jax.lax.stop_gradient(codebooks))
    codebook_loss = commitment = jnp.zeros((), x.dtype)
    r = _flat(x)
    for s in range(codebooks.shape[0]):
        q = _take(codebooks[s], idx[:, s])
        a, b = vq_losses(r, q, beta=beta)
        codebook_loss, commitment = codebook_loss + a, commitment + b
        r = r - jax.lax.stop_gradient(q)
    return codebook_loss, commitment


def rvq_losses(
    z: ArrayLike, codebooks: ArrayLike, config: RVQConfig
) -> tuple[jax.Array, jax.Array]:
    """``(codebook, commitment)`` losses of :func:`vq_losses` summed over the stages, stage
    ``s`` comparing its residual ``r_s = z − sg(Σ_{t<s} q_t)`` with its codewords (gradients to
    ``z`` and to every codebook)."""
    cb = _check_codebooks(codebooks, config, "rvq_losses", config.stages)
    return _losses(z, cb, config, "rvq_losses")


def rvq_ema_update(
    state: dict[str, jax.Array], z: ArrayLike, indices: ArrayLike, config: RVQConfig
) -> dict[str, jax.Array]:
    """:func:`vq_ema_update` of every stage (state ``[S, ...]``), stage ``s`` on the residuals
    its codes were chosen for (``indices``: :func:`rvq_indices` under ``state["codebook"]``)."""
    return _ema_update(state, z, indices, config, "rvq_ema_update", config.stages)


def rvq_restart_dead(
    state: dict[str, jax.Array], z: ArrayLike, key: jax.Array, config: RVQConfig
) -> dict[str, jax.Array]:
    """:func:`vq_restart_dead` of every stage, re-seeding from that stage's residuals."""
    return _restart(state, z, key, config, "rvq_restart_dead", config.stages)


# ---------------------------------------------------------------------------------- families


class VQFamily(LatentFamily):
    """``"vq"``: :func:`vq`. ``ema=True``: the codebook is state (``QuantStat`` s
    ``codebook``, ``cluster_size``, ``embed_sum``) fitted by k-means to the first batch
    (:meth:`calibrate_stats`) and updated by :meth:`update_stats` (EMA, dead-code restarts);
    losses: the commitment loss. ``ema=False``: the codebook is a learnable param (k-means of
    the first batch; a fixed-seed normal placeholder before), losses: codebook + commitment.
    k-means uses a fixed key (``jax.random.key(0)``): calibration is deterministic."""

    name = "vq"
    config_types = (VQConfig,)
    _stages: int | None = None  # None: one [K, D] codebook

    def default_config(self):
        raise ValueError(
            f"kind={self.name!r} has no default config; allowed: "
            f"{self.config_types[0].__name__}(codebook_size=K, dim=D, ...)"
        )

    def _shape(self, spec) -> tuple[int, ...]:
        c = spec.config
        lead = () if self._stages is None else (c.stages,)
        return lead + (c.codebook_size, c.dim)

    def _stacked(self, spec) -> int | None:
        return None if self._stages is None else spec.config.stages

    def _codebook(self, spec, params, stats) -> jax.Array:
        return params["codebook"] if not spec.config.ema else stats["codebook"]

    def _fit(self, spec, x) -> jax.Array:
        stages = 1 if self._stages is None else spec.config.stages
        books = _kmeans_stages(x, spec.config, stages, jax.random.key(0))
        return books if self._stages is not None else books[0]

    def _placeholder(self, spec) -> jax.Array:
        return jax.random.normal(jax.random.key(0), self._shape(spec), jnp.float32)

    def learnable(self, spec) -> bool:
        return not spec.config.ema

    def init(self, spec, x):
        return {"codebook": self._fit(spec, x)}

    def placeholder(self, spec, shape):
        return {} if spec.config.ema else {"codebook": self._placeholder(spec)}

    def stats_init(self, spec, x):
        return vq_ema_init(self._placeholder(spec)) if spec.config.ema else {}

    def calibrate_stats(self, spec, x, stats):
        return vq_ema_init(self._fit(spec, x)) if spec.config.ema else dict(stats)

    def apply(self, spec, x, params, *, key=None, stats=None):
        return vq(x, self._codebook(spec, params, stats), spec.config)

    def indices(self, spec, x, params, stats):
        return vq_indices(x, self._codebook(spec, params, stats), spec.config)

    def from_indices(self, spec, idx, params, stats):
        return vq_from_indices(idx, self._codebook(spec, params, stats), spec.config)

    def losses(self, spec, x, params, stats):
        cb = self._codebook(spec, params, stats)
        if self._stages is None:
            cb = cb[None]
        codebook_loss, commitment = _losses(x, cb, spec.config, f"{self.name} losses")
        out = {"commitment": commitment.astype(jnp.float32)}
        if not spec.config.ema:
            out["codebook"] = codebook_loss.astype(jnp.float32)
        return out

    def update_stats(self, spec, x, params, stats, *, key):
        if not spec.config.ema:
            return dict(stats)
        stages = self._stacked(spec)
        x = jax.lax.stop_gradient(x)
        idx = self.indices(spec, x, params, stats)
        new = _ema_update(stats, x, idx, spec.config, f"{self.name} update_stats", stages)
        if key is not None and spec.config.restart_threshold > 0:
            new = _restart(new, x, key, spec.config, f"{self.name} update_stats", stages)
        return new


class RVQFamily(VQFamily):
    """``"rvq"``: :func:`rvq`, the codebooks ``[S, K, D]`` held as :class:`VQFamily` holds one
    (each stage fitted by k-means to the residuals of the stages before); codes ``[..., S]``;
    :meth:`codebook_size` is ``K^S``."""

    name = "rvq"
    config_types = (RVQConfig,)
    _stages = 0  # stacked: [S, K, D]

    def codebook_size(self, spec) -> int:
        return int(spec.config.codebook_size) ** int(spec.config.stages)

    def code_stages(self, spec) -> int:
        return int(spec.config.stages)

    def describe(self, spec) -> str:
        c = spec.config
        return f"rvq{c.stages}x{c.codebook_size}/d{c.dim}"

    def apply(self, spec, x, params, *, key=None, stats=None):
        return rvq(x, self._codebook(spec, params, stats), spec.config)

    def indices(self, spec, x, params, stats):
        return rvq_indices(x, self._codebook(spec, params, stats), spec.config)

    def from_indices(self, spec, idx, params, stats):
        return rvq_from_indices(idx, self._codebook(spec, params, stats), spec.config)


register_family(VQFamily())
register_family(RVQFamily())
