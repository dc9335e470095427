"""DBSSQ, differentiable bit-shifting quantization (Badar 2025; zia-badar/DBSSQ; METHODS.md §5).

The blend ``q_ε(x) = ε·x + (1 − ε)·Q(x)`` with ``ε`` annealed from 1 to 0, so training ends at
the exact quantizer ``Q``; weights normalised per output channel, activations batch-normalised
without affine parameters, both quantized at ``x/3`` and rescaled by 3 [code]. What differs from
the authors' code: levels for any number of shift bits (their code spells out s = 0..3 and
q = 1..4 case by case), built from exponent bits; the gradient rescaling is a flag on a
``custom_vjp`` (their backward hook); the activation normalisation uses batch statistics over all
axes but the last (their ``BatchNorm2d`` works on NCHW) [inferred] in training, and running
statistics (PyTorch's update, momentum 0.1, unbiased variance) in evaluation, as their
``BatchNorm2d`` does in ``eval()`` mode [code].

Levels (``config.levels``), with ``b = config.bits``:

* ``"shift"`` (``b`` shift bits, plus one sign bit): ``Q(x) = sign(x)·2^−k``, the ``2^b``
  magnitudes ``{1, ½, …, 2^−(2^b − 1)}``. ``|x|`` is rounded *up* to the next power of two
  (``2^⌈log2|x|⌉``; a power of two stays itself), ``|x| > ½`` gives 1 (also ``|x| > 1``: it
  saturates), and everything below the smallest magnitude (including 0) gives the smallest
  magnitude. Built from the float's exponent bits with integer operations, so it is exact.
* ``"uniform"`` (``b``-bit codes, no zero level): ``Q(x) = sign(x)·m/2^(b−1)`` with
  ``m = min(max(⌈|x|·2^(b−1)⌉, 1), 2^(b−1))``.

``sign(x)`` here is the authors' ``x ≤ 0 → −1`` (their ``cond1 = x <= 0``): 0 and −0.0 map to the
negative smallest level. NaN stays NaN. The sign is read from the float's bits, so subnormals keep
theirs (a positive subnormal gives the positive smallest level) even where XLA flushes them to
zero in arithmetic (XLA:CPU does). Computed in float32 (float64 for float64 inputs) and cast
back to ``x``'s dtype (float16 loses shift levels below its smallest normal, 2^−14).

Gradient (``custom_vjp``): the exact derivative of ``q_ε`` is ``ε`` almost everywhere; the
authors divide it by ``ε`` (``grad_scaling``), so ``rescale_grad=True`` (default) gives the
cotangent unchanged, ``∂L/∂x = g``, for every ``ε`` including ``ε = 0``, where the division is
undefined and we take the straight-through estimator (gradient 1). ``rescale_grad=False`` gives
``g·ε`` (zero at ``ε = 0``). ``ε`` is a schedule, not a parameter: its cotangent is 0. ``ε`` is an
ordinary (traced) argument, so annealing it inside a jitted step does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from qflax.numerics import check_bits, check_choice
from qflax.quantizers._family import (
    NotExportable,
    QuantizerFamily,
    expand,
    first_value,
    register_family,
)
from qflax.quantizers._pow2 import _check_float, _layout

__all__ = [
    "DBSSQ_EPSILONS",
    "DBSSQ_LEVELS",
    "DBSSQConfig",
    "dbssq",
    "dbssq_act",
    "dbssq_epsilon_schedule",
    "dbssq_level_set",
    "dbssq_quantize",
    "dbssq_running_stats",
    "dbssq_weight",
    "dbssq_weight_init",
]

DBSSQ_LEVELS = ("shift", "uniform")

# The paper's 15-epoch schedule of ε (one value per epoch) [code/paper].
DBSSQ_EPSILONS = (
    1.0,
    *(2.0**-1,) * 3,
    *(2.0**-2,) * 3,
    *(2.0**-3,) * 3,
    *(2.0**-4,) * 2,
    2.0**-5,
    2.0**-6,
    2.0**-7,
)

_MAX_BITS = {"shift": 6, "uniform": 16}
_MIN_BITS = {"shift": 0, "uniform": 1}
_SIGMA_MULTIPLE = 3.0  # quantize x/3, rescale by 3 (±3σ covers the range)
_BN_EPS = 1e-5  # the variance guard of batch normalisation (PyTorch's default)
_BN_MOMENTUM = 0.1  # PyTorch's BatchNorm momentum: the new batch's weight in the running stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class DBSSQConfig:
    """Configuration of the DBSSQ quantizer (module docstring for the levels and gradient).

    >>> DBSSQConfig(levels="shift", bits=2).num_magnitudes
    4
    """

    # "shift": power-of-two magnitudes 2^-k; "uniform": n-bit codes m/2^(bits-1), no zero.
    levels: str = "shift"
    # Shift bits s (0..6; 2^s magnitudes) for "shift"; code bits q (1..16) for "uniform".
    bits: int = 2
    # Divide the blend's gradient ε by ε (effective gradient 1; the STE at ε = 0).
    rescale_grad: bool = True

    def __post_init__(self):
        check_choice(self.levels, "levels", DBSSQ_LEVELS)
        lo, hi = _MIN_BITS[self.levels], _MAX_BITS[self.levels]
        object.__setattr__(self, "bits", check_bits(self.bits, "bits", lo, hi))
        if not isinstance(self.rescale_grad, (bool, np.bool_)):
            raise ValueError(
                f"rescale_grad={self.rescale_grad!r} is not a bool; allowed: True, False"
            )
        object.__setattr__(self, "rescale_grad", bool(self.rescale_grad))

    @property
    def num_magnitudes(self) -> int:
        """The number of positive levels: ``2^bits`` (shift) or ``2^(bits−1)`` (uniform)."""
        return 2**self.bits if self.levels == "shift" else 2 ** (self.bits - 1)


# ----------------------------------------------------------------------------------------------
# The levels Q(x).


def _shift_value(xc: jax.Array, config: DBSSQConfig) -> jax.Array:
    lay = _layout(xc.dtype)
    bits = lax.bitcast_convert_type(jnp.abs(xc), lay.uint_dtype)
    # Adding 2^nmant - 1 carries into the exponent iff the mantissa is nonzero: the ceiling.
    field = (bits + (2**lay.nmant - 1)) >> lay.nmant
    field = jnp.clip(field, lay.bias - (config.num_magnitudes - 1), lay.bias)
    return lax.bitcast_convert_type(field << lay.nmant, lay.float_dtype)


def _uniform_value(xc: jax.Array, config: DBSSQConfig) -> jax.Array:
    n = float(config.num_magnitudes)
    m = jnp.clip(jnp.ceil(jnp.abs(xc) * n), 1.0, n)
    return m * (1.0 / n)


def _nonpositive(xc: jax.Array) -> jax.Array:
    """``x ≤ 0`` read from the bits: the sign bit set, or every magnitude bit 0 (±0.0).

    Not ``xc <= 0``: XLA:CPU flushes subnormals to zero before comparing, so a positive
    subnormal would test ``≤ 0``. Nor ``bits << 1 == 0`` (or ``jnp.signbit(x) | (|x| == 0)``):
    LLVM folds those integer tests of a bitcast float back into a float comparison, which flushes
    again under ``jit``. The carry of ``magnitude + (2^(n−1) − 1)`` into the top bit is 1 exactly
    when the magnitude is nonzero, and no comparison is left to fold.
    """
    lay = _layout(xc.dtype)
    top = np.iinfo(lay.uint_dtype).bits - 1
    low = lay.uint_dtype((1 << top) - 1)  # every bit but the sign bit
    bits = lax.bitcast_convert_type(xc, lay.uint_dtype)
    nonzero = ((bits & low) + low) >> top  # 1 iff the magnitude bits are not all 0
    negative = bits >> top
    return (negative | (1 - nonzero)) == 1


def _quantize_compute(xc: jax.Array, config: DBSSQConfig) -> jax.Array:
    mag = _shift_value(xc, config) if config.levels == "shift" else _uniform_value(xc, config)
    out = jnp.where(_nonpositive(xc), -mag, mag)
    return jnp.where(jnp.isnan(xc), xc, out)


def _compute_dtype(dtype) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def dbssq_quantize(x: ArrayLike, config: DBSSQConfig) -> jax.Array:
    """The hard quantizer ``Q(x)`` (shift or uniform levels; no custom gradient).

    >>> cfg = DBSSQConfig(levels="shift", bits=2)  # magnitudes 1, 1/2, 1/4, 1/8
    >>> dbssq_quantize(jnp.array([0.7, 0.5, 0.3, 0.126, 0.01, 0.0, -2.0]), cfg).tolist()
    [1.0, 0.5, 0.5, 0.25, 0.125, -0.125, -1.0]
    >>> cfg = DBSSQConfig(levels="uniform", bits=2)  # magnitudes 1/2, 1
    >>> dbssq_quantize(jnp.array([0.7, 0.5, 0.3, -0.2]), cfg).tolist()
    [1.0, 0.5, 0.5, -0.5]
    """
    x = jnp.asarray(x)
    _check_float(x, "dbssq_quantize")
    return _quantize_compute(x.astype(_compute_dtype(x.dtype)), config).astype(x.dtype)


def dbssq_level_set(config: DBSSQConfig) -> np.ndarray:
    """Every value ``Q`` can output, sorted (float64 numpy): ``2·num_magnitudes`` levels."""
    if config.levels == "shift":
        mags = np.exp2(-np.arange(config.num_magnitudes, dtype=np.float64))
    else:
        n = config.num_magnitudes
        mags = np.arange(1, n + 1, dtype=np.float64) / n
    return np.sort(np.concatenate([-mags, mags]))


# ----------------------------------------------------------------------------------------------
# The blend q_ε and its custom VJP (defined once, at module level).


def _blend_value(x: jax.Array, epsilon: jax.Array, config: DBSSQConfig) -> jax.Array:
    xc = x.astype(_compute_dtype(x.dtype))
    eps = epsilon.astype(xc.dtype)
    # ε·x + (1 − ε)·Q: exactly Q at ε = 0 and exactly x at ε = 1 (finite x).
    return (eps * xc + (1.0 - eps) * _quantize_compute(xc, config)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dbssq_q(x: jax.Array, epsilon: jax.Array, config: DBSSQConfig) -> jax.Array:
    return _blend_value(x, epsilon, config)


def _dbssq_fwd(x, epsilon, config):
    return _blend_value(x, epsilon, config), epsilon


def _dbssq_bwd(config, epsilon, g):
    if config.rescale_grad:
        dx = g  # (g·ε)/ε, and the STE at ε = 0
    else:
        dx = g * epsilon.astype(g.dtype)
    return dx, jnp.zeros_like(epsilon)


_dbssq_q.defvjp(_dbssq_fwd, _dbssq_bwd)


def _check_epsilon(epsilon: ArrayLike) -> jax.Array:
    if not isinstance(epsilon, jax.Array):  # a traced ε cannot be checked
        value = np.asarray(epsilon)
        if value.shape != () or not np.issubdtype(value.dtype, np.number):
            raise ValueError(f"epsilon={epsilon!r} is not allowed; allowed: a scalar in [0, 1]")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"epsilon={epsilon!r} is out of range; allowed: a scalar in [0, 1]")
    eps = jnp.asarray(epsilon)
    if eps.shape != ():
        raise ValueError(f"epsilon has shape {eps.shape}; allowed: a scalar in [0, 1]")
    if not jnp.issubdtype(eps.dtype, jnp.floating):
        eps = eps.astype(jnp.float32)
    return eps


def dbssq(
    x: ArrayLike, epsilon: ArrayLike, config: DBSSQConfig, *, key: jax.Array | None = None
) -> jax.Array:
    """The blend ``q_ε(x) = ε·x + (1 − ε)·Q(x)``; gradient ``g`` (rescaled) or ``g·ε``.

    Args:
      x: floating array.
      epsilon: scalar ``ε ∈ [0, 1]``; may be traced (anneal it without recompiling).
      config: the quantizer's configuration.
      key: unused (deterministic); accepted for a uniform signature.

    Returns:
      ``q_ε(x)``, same shape and dtype as ``x``.

    >>> x = jnp.array([0.3, -0.7])
    >>> dbssq(x, 0.0, DBSSQConfig()).tolist(), dbssq(x, 0.5, DBSSQConfig()).tolist()
    ([0.5, -1.0], [0.4000000059604645, -0.8500000238418579])
    """
    del key
    x = jnp.asarray(x)
    _check_float(x, "dbssq")
    return _dbssq_q(x, _check_epsilon(epsilon), config)


# ----------------------------------------------------------------------------------------------
# Weights and activations.


def _channel_axes(ndim: int, axis: int) -> tuple[int, ...]:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis={axis!r} is not an integer; allowed: an axis of the tensor")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} is out of range for rank {ndim}; allowed: {-ndim}..{ndim - 1}"
        )
    a = int(axis) % ndim
    return tuple(i for i in range(ndim) if i != a)


def _channel_std(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.std(w.astype(jnp.float32), axis=axes, keepdims=True)


def dbssq_weight_init(w: ArrayLike, *, axis: int = -1) -> jax.Array:
    """``σ_c``: the per-output-channel std of the pretrained weights (float32, keepdims shape).

    Population std (``ddof=0``) over every axis but ``axis`` (the output channel; ``-1`` for Flax
    ``Dense`` (in, out) and ``Conv`` HWIO kernels). Keep it fixed during training.

    >>> dbssq_weight_init(jnp.array([[1.0, 0.0], [-1.0, 0.0]])).tolist()
    [[1.0, 0.0]]
    """
    w = jnp.asarray(w)
    _check_float(w, "dbssq_weight_init")
    return lax.stop_gradient(_channel_std(w, _channel_axes(w.ndim, axis)))


def dbssq_weight(
    w: ArrayLike,
    epsilon: ArrayLike,
    sigma: ArrayLike,
    config: DBSSQConfig,
    *,
    axis: int = -1,
) -> jax.Array:
    """DBSSQ weights: ``3·σ_c · q_ε(ŵ/3)``, ``ŵ = (w − sg(μ_c))/sg(std_c)`` per output channel.

    ``μ_c``, ``std_c`` are the current channel mean and (population) std, detached; a channel
    with ``std_c = 0`` is divided by 1 instead. ``σ_c`` (from :func:`dbssq_weight_init`) is the
    fixed pretrained std and gets no gradient. With ``rescale_grad`` the gradient to ``w`` is
    ``g·σ_c/std_c``. The channel mean is not added back (the levels are symmetric about 0).

    Args:
      w: floating weights.
      epsilon: scalar ``ε ∈ [0, 1]`` (may be traced).
      sigma: per-channel ``σ_c`` of the keepdims shape (1 on every axis but ``axis``).
      config: the quantizer's configuration.
      axis: the output-channel axis.

    Returns:
      The quantized weights, same shape and dtype as ``w``.
    """
    w = jnp.asarray(w)
    _check_float(w, "dbssq_weight")
    axes = _channel_axes(w.ndim, axis)
    sigma = jnp.asarray(sigma)
    want = tuple(1 if i in axes else d for i, d in enumerate(w.shape))
    if sigma.shape != want:
        raise ValueError(
            f"sigma has shape {sigma.shape}; allowed for w of shape {w.shape} and axis={axis}: "
            f"{want} (as returned by dbssq_weight_init)"
        )
    wf = w.astype(jnp.float32)
    mean = lax.stop_gradient(jnp.mean(wf, axis=axes, keepdims=True))
    std = lax.stop_gradient(_channel_std(wf, axes))
    std = jnp.where(std > 0, std, 1.0)
    w_hat = (wf - mean) / std
    scale = _SIGMA_MULTIPLE * lax.stop_gradient(sigma.astype(jnp.float32))
    out = scale * dbssq(w_hat / _SIGMA_MULTIPLE, epsilon, config)
    return out.astype(w.dtype)


def dbssq_act(
    x: ArrayLike,
    epsilon: ArrayLike,
    config: DBSSQConfig,
    *,
    running: tuple[ArrayLike, ArrayLike] | None = None,
) -> jax.Array:
    """DBSSQ activations: ``3·q_ε(x̂/3)``, ``x̂`` batch-normalised without affine parameters.

    ``x̂ = (x − μ)/sqrt(var + 1e-5)`` per feature (the last axis). ``running=None`` (training):
    ``μ``, ``var`` are this batch's mean and (population) variance over every axis but the last
    (NHWC / (batch, features)), not detached (training-mode batch norm: the gradient flows
    through them) [inferred]. ``running=(mean, var)`` (evaluation, the authors' ``BatchNorm2d``
    in ``eval()`` mode): the running statistics of :func:`dbssq_running_stats`, each of shape
    ``(features,)``, detached — the output of one example then does not depend on the others.

    Args:
      x: floating array with at least 2 axes, features last.
      epsilon: scalar ``ε ∈ [0, 1]`` (may be traced).
      config: the quantizer's configuration.
      running: the running ``(mean, var)``, or None for this batch's statistics.

    Returns:
      The quantized, normalised activations (same shape and dtype as ``x``).
    """
    x = jnp.asarray(x)
    _check_float(x, "dbssq_act")
    if x.ndim < 2:
        raise ValueError(
            f"x has shape {x.shape}; allowed: at least 2 axes (batch statistics are taken over "
            "every axis but the last)"
        )
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if running is None:
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    else:
        mean = _running(running[0], x.shape[-1], "mean")
        var = _running(running[1], x.shape[-1], "var")
    x_hat = (xf - mean) * lax.rsqrt(var + _BN_EPS)
    out = _SIGMA_MULTIPLE * dbssq(x_hat / _SIGMA_MULTIPLE, epsilon, config)
    return out.astype(x.dtype)


def _running(value: ArrayLike, features: int, name: str) -> jax.Array:
    value = jnp.asarray(value)
    if value.shape != (features,):
        raise ValueError(
            f"running {name} has shape {value.shape}; allowed for x with {features} features "
            f"(last axis): ({features},)"
        )
    return lax.stop_gradient(value.astype(jnp.float32))


def dbssq_running_stats(
    x: ArrayLike, mean: ArrayLike, var: ArrayLike, *, momentum: float = _BN_MOMENTUM
) -> tuple[jax.Array, jax.Array]:
    """The running ``(mean, var)`` after a training batch ``x`` (PyTorch's BatchNorm update).

    ``mean ← (1 − m)·mean + m·μ_B`` and ``var ← (1 − m)·var + m·σ²_B·n/(n − 1)`` with the batch
    mean ``μ_B`` and population variance ``σ²_B`` of each feature (last axis) over the ``n``
    elements of every other axis (the unbiased variance, as PyTorch keeps; ``n = 1``: the
    population one). Detached; float32 of shape ``(features,)``.

    >>> m, v = dbssq_running_stats(jnp.array([[0.0], [2.0]]), jnp.zeros(1), jnp.ones(1))
    >>> [round(float(m[0]), 6), round(float(v[0]), 6)]
    [0.1, 1.1]
    """
    x = lax.stop_gradient(jnp.asarray(x)).astype(jnp.float32)
    _check_float(x, "dbssq_running_stats")
    if x.ndim < 2:
        raise ValueError(f"x has shape {x.shape}; allowed: at least 2 axes, features last")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum={momentum!r} is out of range; allowed: 0 <= momentum <= 1")
    features = x.shape[-1]
    mean = _running(mean, features, "mean")
    var = _running(var, features, "var")
    axes = tuple(range(x.ndim - 1))
    n = int(np.prod([x.shape[a] for a in axes]))
    batch_mean = jnp.mean(x, axis=axes)
    batch_var = jnp.mean(jnp.square(x - batch_mean), axis=axes) * (n / max(n - 1, 1))
    m = jnp.float32(momentum)
    return (1 - m) * mean + m * batch_mean, (1 - m) * var + m * batch_var


# ----------------------------------------------------------------------------------------------
# The schedule.


def dbssq_epsilon_schedule(epoch: ArrayLike, total_epochs: int = 15) -> jax.Array:
    """ε for ``epoch`` (0-based, may be fractional or traced): the 15-epoch schedule, stretched.

    Piecewise constant in the fraction ``epoch/total_epochs``: ``ε = DBSSQ_EPSILONS[i]`` with
    ``i = ⌊15·epoch/total_epochs⌋``, i.e. 1, ½ ×3, ¼ ×3, ⅛ ×3, 1/16 ×2, 1/32, 1/64, 1/128 at
    ``total_epochs=15``. Negative epochs give 1. At and after the end (``epoch ≥ total_epochs``)
    it returns 0: the exact quantizer, for evaluation and deployment after training.

    Args:
      epoch: the epoch index (int), or a fractional epoch (``step/steps_per_epoch``).
      total_epochs: the training length in epochs, a positive int (static).

    Returns:
      ``ε`` as a float32 scalar.

    >>> [float(dbssq_epsilon_schedule(e)) for e in (0, 1, 4, 14, 15)]
    [1.0, 0.5, 0.25, 0.0078125, 0.0]
    """
    if (
        isinstance(total_epochs, (bool, np.bool_))
        or not isinstance(total_epochs, (int, np.integer))
        or total_epochs < 1
    ):
        raise ValueError(
            f"total_epochs={total_epochs!r} is not allowed; allowed: a positive integer"
        )
    table = jnp.asarray((*DBSSQ_EPSILONS, 0.0), jnp.float32)
    n = len(DBSSQ_EPSILONS)
    if isinstance(epoch, (int, np.integer)) and not isinstance(epoch, (bool, np.bool_)):
        index = min(max(int(epoch) * n // int(total_epochs), 0), n)  # exact integer arithmetic
        return table[index]
    position = jnp.floor(jnp.asarray(epoch, jnp.float32) * n / float(total_epochs))
    index = jnp.clip(position, 0.0, float(n)).astype(jnp.int32)
    return table[index]


# ---------------------------------------------------------------------------------- family


class DBSSQFamily(QuantizerFamily):
    """``"dbssq"``: :func:`dbssq_weight` (``role="weight"``: per-channel normalisation,
    rescaled by the fixed pretrained spread ``sigma``, a state set from the kernel when the
    layer is built) or :func:`dbssq_act` (``role="act"``). The blend ``ε`` is a state the
    training loop anneals (:func:`dbssq_epsilon_schedule`), 0 at the end: the exact quantizer."""

    name = "dbssq"
    config_types = (DBSSQConfig,)
    needs_role = True

    def roles(self, spec):
        return (spec.role,)

    def bits(self, spec) -> int:
        # shift: 2^b magnitudes and a sign; uniform: b-bit codes
        return int(spec.config.bits) + (1 if spec.config.levels == "shift" else 0)

    def granularity(self, spec) -> str:
        return "channel" if spec.role == "weight" else "none"

    def channel_axis(self, spec) -> int:
        return -1

    def stats_init(self, spec, x):
        out = {"epsilon": jnp.ones((), jnp.float32)}
        if spec.role == "weight":
            sigma = dbssq_weight_init(jax.lax.stop_gradient(jnp.asarray(x)), axis=-1)
            out["sigma"] = jnp.asarray(sigma, jnp.float32).reshape(-1)
        elif x is not None:  # activations of a layer that knows its input features
            features = jnp.shape(x)[-1]
            out["mean"] = jnp.zeros((features,), jnp.float32)
            out["var"] = jnp.ones((features,), jnp.float32)
        return out

    def training_stats(self, spec, stats):
        """A training step normalises with the batch's own statistics: the running ones are
        dropped from what :meth:`apply` sees (and updated by :meth:`update_stats`)."""
        return {k: v for k, v in stats.items() if k not in ("mean", "var")}

    def update_stats(self, spec, x, params, stats, *, key):
        if spec.role != "act" or "mean" not in stats:
            return dict(stats)
        mean, var = dbssq_running_stats(x, stats["mean"], stats["var"])
        return {**stats, "mean": mean, "var": var}

    @staticmethod
    def _running(stats):
        return (stats["mean"], stats["var"]) if "mean" in stats else None

    def schedule(self, spec, *, epoch, epochs, anneal):
        """``ε`` for ``epoch`` (0 at ``epoch = epochs``: the exact model training ends with)."""
        return {"epsilon": float(dbssq_epsilon_schedule(epoch, epochs))}

    def ends_exact(self, spec) -> bool:
        return True

    def apply(self, spec, x, params, *, key=None, stats=None):
        if spec.role == "act":
            return dbssq_act(x, stats["epsilon"], spec.config, running=self._running(stats))
        sigma = expand(jnp.asarray(stats["sigma"]), x, "channel", -1)
        return dbssq_weight(x, stats["epsilon"], sigma, spec.config, axis=-1)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_dbssq_act, quantize_dbssq_weight

        stats = self.stats_init(spec, x) if stats is None else dict(stats)
        epsilon = first_value(stats["epsilon"])
        if epsilon != 0.0:
            raise NotExportable(
                f"epsilon={epsilon!r}: a DBSSQ blend ε·x + (1 − ε)·Q(x) with ε > 0 is not on "
                "its levels, so it has no integer codes; allowed: epsilon=0.0, the exact model "
                "DBSSQ training ends in (layer.set_stat('epsilon', 0.0))"
            )
        if spec.role == "act":
            return quantize_dbssq_act(x, spec.config, running=self._running(stats))
        sigma = jnp.asarray(stats["sigma"], jnp.float32)
        sigma = sigma.reshape((1,) * (x.ndim - 1) + (-1,))  # compact (C,) -> last axis
        return quantize_dbssq_weight(x, sigma, spec.config, axis=-1)

    def check_importable(self, spec, path):
        raise NotExportable(
            f"layer {path!r} has dbssq weights, which import_model cannot restore (the "
            "quantizer re-derives its grid from the kernel, so the exported codes do not map "
            "back to themselves); allowed: the other kinds. The packed export itself (codes, "
            "scales, model_bytes) and integer inference are unaffected"
        )


register_family(DBSSQFamily())
