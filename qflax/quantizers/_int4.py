"""INT4 transformer training — Xi, Li, Chen, Zhu 2023 (arXiv:2306.11987), eqs. of §4 (HQ forward)
and §5 (bit splitting, leverage-score sampling); METHODS.md §7.

Differs from the authors' code: the block size falls back to the largest power of two dividing
both the block and the contraction dimension (the code assumes divisibility); leverage scores use
the dequantized contribution of each hi/lo row (``14·hi_i/s``, ``lo_i/s``; the code uses the
norms of the integer codes, weighting hi rows 14× too little), the water-filling of the sampling
probabilities is exact (the code iterates a bounded number of times); the ``"unbiased"`` variant
(maximum at 91, ``lo`` in [−7, 7]) is ours [inferred].

Forward (family ``"hadamard"``, weights and activations). Along the contraction axis ``a`` of
``x``, with ``H`` the block-diagonal normalised Sylvester Hadamard matrix (block ``b``, ``H·Hᵀ =
I``) and ``Q`` the LSQ quantizer (learned step ``s``, signed codes ``[−8, 7]`` at 4 bits)::

    x̂ = Q(x·H)·Hᵀ          so    x̂ · ŵᵀ = Q(x·H)·Q(w·H)ᵀ   (rows of x, w along a)

when both operands of a product use the same ``H`` (same block, same contraction size).

Backward (family ``"bitsplit"``, the output cotangent ``g = ∇Y``). With ``R = 2^b − 2`` (14),
``h = R/2 − 1`` (6) and ``v = g·t/max|g|``::

    hi = round(clip(v / R, −h, h))
    lo = clip(stochastic_round(v − R·hi), −l, l)
    ĝ  = (R·hi + lo) · max|g| / t

``"paper"``: ``t = R²/2`` (98), ``l = h`` (6) — biased wherever ``|v − R·hi| > h``: at the
largest elements (``|v| > 90``) *and* at every ``v`` whose remainder ``|v − 14·round(v/14)|``
exceeds 6 (e.g. ``v = 6.5`` comes back as 6 on average). ``"unbiased"``: ``t = R·h + h + 1``
(91), ``l = h + 1`` (7): ``|v − R·hi| ≤ 7`` everywhere, so ``E[ĝ] = g`` exactly (still INT4).

``∇X`` uses ``ĝ`` (one key); ``∇W`` (another key) optionally samples the ``2N`` rows
``{R·hi_i·u, lo_i·u}`` (``u = max|g|/t``) with leverage scores ``ℓ = ‖row‖·‖X_i‖``, keeping each
with ``p = min(1, c·ℓ)``, ``Σp = N`` (exact water-filling), scaled by ``1/p``:
``E[Xᵀ ĝ_W] = Xᵀ ĝ``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import NOISE_SOURCES, check_bits, check_choice, stochastic_round
from qflax.ops import with_operands
from qflax.quantizers._family import NotExportable, QuantizerFamily, register_family
from qflax.quantizers._lsq import LSQConfig, lsq, lsq_init

__all__ = [
    "BITSPLIT_VARIANTS",
    "BitSplit",
    "BitSplitConfig",
    "HadamardConfig",
    "bit_split",
    "bit_split_dequantize",
    "bit_split_quantize",
    "block_hadamard",
    "hadamard_block",
    "hadamard_codes",
    "hadamard_init",
    "hadamard_matrix",
    "hadamard_quantize",
    "leverage_probabilities",
    "leverage_rows",
    "leverage_sample",
    "water_fill",
]

BITSPLIT_VARIANTS = ("paper", "unbiased")


def _check_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is not a bool; allowed: True, False")
    return bool(value)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ------------------------------------------------------------------------------ Hadamard


@functools.lru_cache(maxsize=32)
def _hadamard_np(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def hadamard_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """The normalised Sylvester Hadamard matrix of order ``n`` (a power of two): ``H·Hᵀ = I``,
    ``H = Hᵀ``, entries ``±1/√n``.

    >>> (hadamard_matrix(4) * 2).tolist()[1]
    [1.0, -1.0, 1.0, -1.0]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not _is_power_of_two(int(n)):
        raise ValueError(f"n={n!r} is not allowed; allowed: a power of two >= 1")
    return jnp.asarray(_hadamard_np(int(n)), dtype)


def hadamard_block(dim: int, block: int) -> int:
    """The block used for a contraction axis of size ``dim``: ``block`` when it divides ``dim``,
    else the largest power of two dividing both (1: no rotation, e.g. an odd ``dim``).

    >>> hadamard_block(128, 32), hadamard_block(48, 32), hadamard_block(7, 32)
    (32, 16, 1)
    """
    return math.gcd(int(dim), int(block))  # block is a power of two, so the gcd is one too


def block_hadamard(x: ArrayLike, block: int, axis: int = -1, *, transpose: bool = False):
    """``x·H`` along ``axis`` (``x·Hᵀ`` with ``transpose``), ``H`` block-diagonal normalised
    Hadamard with blocks of :func:`hadamard_block` ``(x.shape[axis], block)``."""
    x = jnp.asarray(x)
    axis = _check_axis(axis, x.ndim)
    b = hadamard_block(x.shape[axis], block)
    if b == 1:
        return x
    h = hadamard_matrix(b, x.dtype)
    h = h.T if transpose else h
    moved = jnp.moveaxis(x, axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // b, b)
    out = jnp.einsum("...kb,bc->...kc", blocks, h, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)


def _check_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} is out of range for a tensor of rank {ndim}; allowed: {-ndim}..{ndim - 1}"
        )
    return axis % ndim


@dataclasses.dataclass(frozen=True, kw_only=True)
class HadamardConfig:
    """Configuration of the Hadamard quantizer ``x̂ = Q(x·H)·Hᵀ`` (hashable; validated).

    >>> HadamardConfig().lsq_config.qn, HadamardConfig().lsq_config.qp
    (8, 7)
    """

    # Bit-width of the LSQ codes on the rotated tensor (4: [−8, 7] signed), 2..8.
    bits: int = 4
    # Signed codes [−2^(b−1), 2^(b−1)−1] (rotated tensors are signed); False: [0, 2^b−1].
    signed: bool = True
    # Hadamard block size (a power of two); a contraction size it does not divide uses the
    # largest power of two dividing both (hadamard_block).
    block: int = 32
    # The contraction axis: −1 for activations, −2 for Linear (in, out) / Conv (..., cin, cout)
    # kernels.
    axis: int = -1
    # LSQ's gradient scale 1/sqrt(numel·QP) on the step.
    grad_scale: bool = True

    def __post_init__(self):
        check_bits(self.bits, "bits", 2, 8)
        _check_bool(self.signed, "signed")
        _check_bool(self.grad_scale, "grad_scale")
        b = self.block
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not _is_power_of_two(b):
            raise ValueError(f"block={b!r} is not allowed; allowed: a power of two >= 1")
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise ValueError(f"axis={self.axis!r} is not an integer; allowed: an axis index")

    @property
    def lsq_config(self) -> LSQConfig:
        """The LSQ quantizer of the rotated tensor (one step per tensor, as the paper)."""
        return LSQConfig(bits=self.bits, signed=self.signed, grad_scale=self.grad_scale)


def _step_view(step: ArrayLike, ndim: int) -> jax.Array:
    step = jnp.asarray(step)
    if step.size != 1:
        raise ValueError(
            f"params['step'] has shape {step.shape}; allowed: one step per tensor (shape ())"
        )
    return step.reshape((1,) * ndim)


def hadamard_init(x: ArrayLike, config: HadamardConfig) -> dict[str, jax.Array]:
    """``{"step": 2·mean|x·H| / √QP}`` (shape ``()``): LSQ's init on the rotated tensor."""
    x = jnp.asarray(x)
    rotated = block_hadamard(x.astype(jnp.float32), config.block, config.axis)
    return {"step": lsq_init(rotated, config.lsq_config)["step"].reshape(())}


def hadamard_quantize(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: HadamardConfig
) -> jax.Array:
    """``x̂ = Q(x·H)·Hᵀ`` along ``config.axis`` (shape and dtype of ``x``), ``Q`` = LSQ with
    ``params["step"]``. Gradients: LSQ's (STE inside the grid, the step's gradient) through the
    two linear rotations.

    >>> x = jnp.array([[0.3, -1.2, 0.5, 2.0]])
    >>> y = hadamard_quantize(x, {"step": jnp.asarray(0.25)}, HadamardConfig(block=4))
    >>> bool(jnp.allclose(block_hadamard(y, 4) / 0.25, jnp.round(block_hadamard(y, 4) / 0.25)))
    True
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    if not isinstance(params, Mapping) or set(params) != {"step"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params={got!r} is not allowed; allowed: a dict with the key 'step'")
    dtype = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.float32
    rotated = block_hadamard(x.astype(dtype), config.block, config.axis)
    step = _step_view(params["step"], x.ndim).astype(dtype)
    q = lsq(rotated, {"step": step}, config.lsq_config)
    return block_hadamard(q, config.block, config.axis, transpose=True).astype(x.dtype)


def hadamard_codes(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: HadamardConfig
) -> jax.Array:
    """The int8 codes ``c`` of the rotated tensor: ``Q(x·H) = step·c`` (``c`` in [−QN, QP]), so
    an integer product ``c_x·c_wᵀ`` (int32) times ``s_x·s_w`` is ``x̂·ŵᵀ``."""
    x = jnp.asarray(x)
    cfg = config.lsq_config
    rotated = block_hadamard(x.astype(jnp.float32), config.block, config.axis)
    step = _step_view(params["step"], x.ndim).astype(jnp.float32)
    codes = jnp.round(jnp.clip(rotated / step, -float(cfg.qn), float(cfg.qp)))
    return codes.astype(jnp.int8)


class HadamardFamily(QuantizerFamily):
    """``"hadamard"``: :func:`hadamard_quantize` (Hadamard rotation along the contraction axis,
    LSQ on the rotated tensor, rotation back); a learned step per tensor, initialised from the
    rotated data as LSQ's. No integer codes at rest: integer inference would need the rotation
    of the inputs at run time."""

    name = "hadamard"
    config_types = (HadamardConfig,)

    def roles(self, spec):
        return ("weight", "act")

    def describe(self, spec) -> str:
        return f"hadamard{spec.config.bits}/b{spec.config.block}"

    def learnable(self, spec) -> bool:
        return True

    def init(self, spec, x):
        return hadamard_init(x, spec.config)

    def apply(self, spec, x, params, *, key=None, stats=None):
        return hadamard_quantize(x, params, spec.config)

    def _no_export(self, what: str):
        return NotExportable(
            f"kind='hadamard' has no {what}: its codes live in the rotated basis x·H, and "
            "integer inference would have to rotate every input at run time; allowed: keep "
            "these layers in float for export, or a family with integer codes (lsq, absmax)"
        )

    def codes(self, spec, x, params, stats):
        raise self._no_export("integer codes at rest")

    def weight_lowering(self, spec, params, stats):
        raise self._no_export("integer lowering of weights")

    def input_lowering(self, spec, params, stats):
        raise self._no_export("integer lowering of inputs")


# ------------------------------------------------------------------------------ bit splitting


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitSplitConfig:
    """Configuration of the bit-splitting gradient quantizer (hashable; validated).

    >>> c = BitSplitConfig()
    >>> c.radix, c.hi_max, c.lo_max, c.target
    (14, 6, 6, 98)
    >>> c = BitSplitConfig(variant="unbiased")
    >>> c.lo_max, c.target
    (7, 91)
    """

    # Bits of each half (hi and lo codes), 3..8; the constants of the paper are those of 4.
    bits: int = 4
    # "paper": max|g| -> R²/2 (98), lo in ±(R/2−1) (biased where |v − R·hi| > 6);
    # "unbiased": max|g| -> R·(R/2−1) + R/2 (91), lo in ±R/2 (exactly unbiased).
    variant: str = "paper"
    # Leverage-score sampling of the 2N hi/lo rows in the ∇W product (N kept on average).
    lss: bool = True
    # The lo codes' stochastic rounding variates: "hash" or "threefry"
    # (qflax.numerics.stochastic_round).
    noise: str = "hash"

    def __post_init__(self):
        check_bits(self.bits, "bits", 3, 8)
        check_choice(self.variant, "variant", BITSPLIT_VARIANTS)
        _check_bool(self.lss, "lss")
        check_choice(self.noise, "noise", NOISE_SOURCES)

    @property
    def radix(self) -> int:
        """``R = 2^b − 2``: the weight of a hi code (14 at 4 bits)."""
        return 2**self.bits - 2

    @property
    def hi_max(self) -> int:
        """``|hi| ≤ R/2 − 1`` (6 at 4 bits)."""
        return self.radix // 2 - 1

    @property
    def lo_max(self) -> int:
        """``|lo| ≤`` 6 (paper) or 7 (unbiased) at 4 bits."""
        return self.hi_max if self.variant == "paper" else self.hi_max + 1

    @property
    def target(self) -> int:
        """The value ``max|g|`` is mapped to: 98 (paper) or 91 (unbiased) at 4 bits."""
        if self.variant == "paper":
            return self.radix * self.radix // 2
        return self.radix * self.hi_max + self.lo_max


class BitSplit(NamedTuple):
    """A gradient split into two INT4 halves.

    Invariants: ``ĝ = (radix·hi + lo)·unit`` (:func:`bit_split_dequantize`); ``|hi| ≤ hi_max``,
    ``|lo| ≤ lo_max`` (int8 containers); ``unit = max|g|/target`` (0 for an all-zero ``g``,
    NaN when ``g`` holds a non-finite value, with the codes then 0).
    """

    hi: jax.Array
    lo: jax.Array
    unit: jax.Array


def bit_split(g: ArrayLike, key: jax.Array, config: BitSplitConfig) -> BitSplit:
    """Splits ``g`` into hi and lo INT4 codes (one scale per tensor; stochastic lo rounding)."""
    g = jnp.asarray(g)
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"g must be a floating array, got dtype {g.dtype}")
    dtype = g.dtype if jnp.finfo(g.dtype).bits >= 32 else jnp.float32
    g = g.astype(dtype)
    m = jnp.max(jnp.abs(g)) if g.size else jnp.zeros((), dtype)
    finite = jnp.isfinite(m)
    usable = finite & (m > 0)
    safe_m = jnp.where(usable, m, jnp.ones_like(m))
    # v = g·t/max|g| without forming t/max|g| (which overflows for subnormal maxima).
    v = jnp.where(usable, g / safe_m, jnp.zeros_like(g)) * float(config.target)
    radix = float(config.radix)
    hi = jnp.round(jnp.clip(v / radix, -config.hi_max, config.hi_max))
    lo = stochastic_round(v - radix * hi, key, noise=config.noise)
    lo = jnp.clip(lo, -config.lo_max, config.lo_max)
    unit = jnp.where(usable, m / float(config.target), jnp.zeros_like(m))
    unit = jnp.where(finite, unit, jnp.full_like(m, jnp.nan))
    return BitSplit(hi.astype(jnp.int8), lo.astype(jnp.int8), unit)


def bit_split_dequantize(split: BitSplit, config: BitSplitConfig, dtype=jnp.float32):
    """``ĝ = (radix·hi + lo)·unit``."""
    code = config.radix * split.hi.astype(jnp.int32) + split.lo.astype(jnp.int32)
    return (code.astype(dtype) * split.unit.astype(dtype)).astype(dtype)


def bit_split_quantize(g: ArrayLike, key: jax.Array, config: BitSplitConfig) -> jax.Array:
    """``ĝ`` of :func:`bit_split` (shape and dtype of ``g``): the ∇X quantizer.

    >>> g = jnp.array([0.0, 28 / 91, -1.0])  # v = 0, 28, -91: integers, no rounding noise
    >>> bit_split_quantize(g, jax.random.key(0), BitSplitConfig(variant="unbiased")).tolist()
    [0.0, 0.3076923191547394, -1.0]
    """
    g = jnp.asarray(g)
    split = bit_split(g, key, config)
    dtype = g.dtype if jnp.finfo(g.dtype).bits >= 32 else jnp.float32
    return bit_split_dequantize(split, config, dtype).astype(g.dtype)


# ------------------------------------------------------------------------------ leverage sampling


def water_fill(scores: ArrayLike, budget: int) -> jax.Array:
    """Probabilities ``p = min(1, c·scores)`` with ``Σp = budget`` (exact water-filling).

    ``scores`` ≥ 0 (1-D). The ``k`` largest scores are capped at 1 and the rest share
    ``budget − k`` in proportion: ``c = (budget − k)/Σ_{rest}``, with ``k`` the smallest count
    for which the largest uncapped ``c·score ≤ 1``. With fewer than ``budget`` positive scores
    every positive one gets ``p = 1`` (``Σp`` = their count); zero scores get ``p = 0``.

    >>> water_fill(jnp.array([8.0, 1.0, 1.0, 0.0]), 2).tolist()
    [1.0, 0.5, 0.5, 0.0]
    """
    s = jnp.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores has shape {s.shape}; allowed: a 1-D array")
    n = s.shape[0]
    budget = int(budget)
    if not 0 <= budget <= n:
        raise ValueError(f"budget={budget} is out of range; allowed: 0..{n} (the number of scores)")
    if budget == 0:
        return jnp.zeros_like(s)
    desc = -jnp.sort(-s)
    # tail[k] = Σ_{j ≥ k} desc[j], summed from the smallest up (better rounding).
    tail = jnp.cumsum(desc[::-1])[::-1]
    k = jnp.arange(n)
    left = (budget - k).astype(s.dtype)  # probability mass left for the uncapped scores
    ok = (left * desc <= tail) & (k < budget) & (desc > 0)
    found = jnp.any(ok)
    first = jnp.argmax(ok)
    c = left[first] / jnp.where(found, tail[first], jnp.ones_like(tail[0]))
    p = jnp.where(found, jnp.minimum(1.0, c * s), jnp.ones_like(s))
    return jnp.where(s > 0, p, jnp.where(jnp.isnan(s), s, jnp.zeros_like(s)))


def leverage_rows(
    g_shape: tuple[int, ...], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]
) -> int:
    """How many leading axes of ``∇Y`` (and of ``X``) index the rows of the ∇W product.

    The longest common leading prefix of ``g_shape[:-1]`` and ``lhs_shape[:-1]``: all axes but
    the last for ``nnx.Linear`` (tokens ``(batch, length)``) and for einsums such as
    ``"btd,dhk->bthk"`` (``(b, t)``). When the three shapes have one rank ≥ 3 (a convolution:
    NHWC input, HWIO kernel, NHWC output, where a pixel is not a row of the product) at most the
    leading (sample) axis. 0: the whole tensor is one row. Any choice keeps the estimator
    unbiased; it only sets which rows are sampled and so the variance.
    """
    prefix = 0
    limit = min(len(g_shape), len(lhs_shape)) - 1
    while prefix < limit and g_shape[prefix] == lhs_shape[prefix]:
        prefix += 1
    if len(g_shape) == len(lhs_shape) == len(rhs_shape) >= 3:
        prefix = min(prefix, 1)
    return prefix


def _row_norms(x: jax.Array) -> jax.Array:
    """‖x_i‖ of the rows of a 2-D ``x``, up to one common factor (scaled by max|x| first, so
    huge values do not overflow)."""
    m = jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
    safe = jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones_like(m))
    return jnp.sqrt(jnp.sum(jnp.square(x / safe), axis=1))


def leverage_probabilities(
    split: BitSplit, lhs: ArrayLike, rows: int, config: BitSplitConfig
) -> jax.Array:
    """Keep probabilities of the ``2N`` candidate rows ``[hi rows; lo rows]`` (``N = rows``):
    ``p = water_fill(ℓ, N)``, ``ℓ_i = ‖contribution row i‖·‖X_i‖`` with the contributions
    ``radix·hi_i·unit`` and ``lo_i·unit`` (the common ``unit`` dropped)."""
    hi = split.hi.reshape(rows, -1).astype(jnp.float32) * float(config.radix)
    lo = split.lo.reshape(rows, -1).astype(jnp.float32)
    x = jnp.asarray(lhs).astype(jnp.float32).reshape(rows, -1)
    x_norm = _row_norms(x)
    scores = jnp.concatenate([_row_norms(hi) * x_norm, _row_norms(lo) * x_norm])
    return water_fill(scores, rows)


def leverage_sample(
    g: ArrayLike, lhs: ArrayLike, rhs: ArrayLike, key: jax.Array, config: BitSplitConfig
) -> jax.Array:
    """The ∇W quantizer: bit splitting, then leverage-score sampling of the hi/lo rows.

    Returns ``ĝ_W`` of ``g``'s shape: row ``i`` is ``m_hi/p_hi·radix·hi_i·unit +
    m_lo/p_lo·lo_i·unit`` with independent ``m ~ Bernoulli(p)``, so the op's product
    ``Xᵀ ĝ_W`` is the sampled estimator and ``E[ĝ_W | split] = ĝ``. Rows are matched to ``X``
    by :func:`leverage_rows`; ``config.lss=False``: plain :func:`bit_split_quantize`.
    """
    g = jnp.asarray(g)
    k_round, k_sample = jax.random.split(key)
    if not config.lss:
        return bit_split_quantize(g, k_round, config)
    lhs = jnp.asarray(lhs)
    dtype = g.dtype if jnp.finfo(g.dtype).bits >= 32 else jnp.float32
    split = bit_split(g, k_round, config)
    axes = leverage_rows(g.shape, lhs.shape, jnp.shape(rhs))
    rows = math.prod(g.shape[:axes])
    p = leverage_probabilities(split, lhs, rows, config)
    keep = jax.random.uniform(k_sample, p.shape, jnp.float32) < p
    safe_p = jnp.where(keep, p, jnp.ones_like(p))
    weight = jnp.where(keep, 1.0 / safe_p, jnp.where(jnp.isnan(p), p, jnp.zeros_like(p)))
    w_hi, w_lo = weight[:rows, None], weight[rows:, None]
    hi = split.hi.reshape(rows, -1).astype(jnp.float32) * float(config.radix)
    lo = split.lo.reshape(rows, -1).astype(jnp.float32)
    sampled = (w_hi * hi + w_lo * lo) * split.unit.astype(jnp.float32)
    return sampled.reshape(g.shape).astype(dtype).astype(g.dtype)


class BitSplitFamily(QuantizerFamily):
    """``"bitsplit"`` (role ``"grad"``): bit splitting of the output cotangent; ∇X gets
    :func:`bit_split_quantize`, ∇W :func:`leverage_sample` (``lss=True``) through
    :func:`qflax.ops.with_operands`, each with its own key."""

    name = "bitsplit"
    config_types = (BitSplitConfig,)

    def roles(self, spec):
        return ("grad",)

    def granularity(self, spec) -> str:
        return "tensor"

    def describe(self, spec) -> str:
        cfg = spec.config
        noise = "" if cfg.noise == "hash" else f"/{cfg.noise}"
        return f"bitsplit{cfg.bits}/{cfg.variant}{'+lss' if cfg.lss else ''}{noise}"

    def needs_key(self, spec) -> bool:
        return True

    def apply(self, spec, x, params, *, key=None, stats=None):
        if key is None:
            raise ValueError(
                "kind='bitsplit' rounds stochastically and needs a PRNG key; allowed: a key"
            )
        return bit_split_quantize(x, key, spec.config)

    def grad_slots(self, spec, key):
        if key is None:
            raise ValueError(
                "kind='bitsplit' quantizes gradients stochastically and needs a PRNG key; "
                "allowed: a key (quant layers pass their noise key)"
            )
        cfg = spec.config
        k_dx, k_dw = jax.random.split(key)
        dx = functools.partial(bit_split_quantize, key=k_dx, config=cfg)
        if not cfg.lss:
            return dx, functools.partial(bit_split_quantize, key=k_dw, config=cfg)
        return dx, with_operands(functools.partial(leverage_sample, key=k_dw, config=cfg))

    def variance_bound(self, spec, g):
        # Without sampling, each lo is a stochastic rounding: E(lo − r)² ≤ 1/4 per element, so
        # E‖ĝ − E ĝ‖² ≤ numel·unit²/4 (unit = max|g|/target); the paper variant adds its bias.
        if spec.config.variant != "unbiased":
            return None
        unit = jnp.max(jnp.abs(g)) / spec.config.target
        return jnp.size(g) * jnp.square(unit) / 4.0


register_family(HadamardFamily())
register_family(BitSplitFamily())
