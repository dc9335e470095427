"""GDNSQ — learnable bit-width quantizers, after aifoundry-org/MHAQ (``src/quantization/gdnsq``,
Apache-2.0) and arXiv:2508.14004; METHODS.md §3 [code].

Differs from the code: the noise ``r`` is drawn from an explicit PRNG key; the activation
parameters are scalars per call (one quantizer per layer input).

The convergence test (one, as the code's): a layer has converged when its integer bit-width
``GDNSQFamily.used_bits`` — ``ceil(log2(max code − min code + 1))`` over the widest weight
channel; for inputs, the codes of the whole clip range — is at most its target; the training
loop applies it after every evaluation (``qflax.train``). :func:`gdnsq_used_bits` (distinct
codes present) is a diagnostic, never larger than that width, not the test.

Rounding is written ``round(v) = v + n`` with the rounding noise ``n = round(v) − v``. Every rule
sets ``∂n/∂v = 0`` (straight through) and replaces ``∂n/∂s`` by ``ρ``::

    backward="noise"  ρ = r/√3,  r uniform on {−½, +½} per element (needs a key; |ρ| = 1/√12,
                                 the std of uniform rounding noise) — the DEFAULT: the paper's
                                 rule, the code's ``QNSTE`` (its default ``qnmethod: STE``)
    backward="ste"    ρ = 0      (a plain straight-through estimator: no noise-scale term; the
                                 code has no such rule)
    backward="lsq"    ρ = round(v) − v = n   (the code's ``QNLSQ``: ``grad_scale = g·n``)

``lsq`` is the code's rule as written, and it is dimensionally odd: ``ρ`` stands for ``∂n/∂s``,
which has units of 1/step, but ``n`` is a pure number, so ``∂ŵ/∂s = n + s·n = (1 + s)·n``
depends on the units of ``w``. LSQ's own step gradient (Esser et al. 2020, inside the range) is
``∂ŵ/∂s = round(v) − v = n``: that is ``backward="ste"`` here.

**Weights** (:func:`gdnsq_weight`), per output channel ``c`` (or per tensor): ``z_c = min w_c``,
``s_c = 2^ℓ_c``, ``v = (w − z)/s``, ``ŵ = s·round(v) + z`` (no clip). Since ``s·v + z = w``,
``ŵ = w + s·n``, so (``g`` the cotangent, sums over the channel)::

    ∂ŵ/∂w = 1                          (the path through z = min w cancels: ∂ŵ/∂z = 1 − 1 = 0)
    ∂ŵ/∂s = n + s·ρ                    (n from the explicit factor s, s·ρ through n)
    ∂L/∂w = g
    ∂L/∂ℓ_c = ln 2 · s_c · Σ g·(n + s_c·ρ)        (∂s/∂ℓ = s·ln 2)

i.e. ``ste``: ``ln2·s·Σ g·n``; ``noise``: ``ln2·s·Σ g·(n + s·r/√3)``;
``lsq``: ``ln2·s·(1 + s)·Σ g·n``
(this is the code's chain: its noise function receives ``v`` already divided by ``s``).
The continuous bit-width is ``b_c = log2(max w_c − min w_c + s_c) − ℓ_c``
(:func:`gdnsq_weight_bits`, differentiated normally).

**Activations** (:func:`gdnsq_act`), scalars ``ℓ_s``, ``ℓ_q`` and lower bound ``β``: ``s = 2^ℓ_s``,
``Q = 2^ℓ_q``, ``lo = β``, ``hi = β + Q − s``, ``c = clip(x, lo, hi)``, ``v = (c − β)/s``,
``x̂ = s·round(v) + β = c + s·n``. The clip is differentiated normally with explicit masks
(as torch's ``clamp``: ``x`` passes its gradient on ``lo ≤ x ≤ hi``, bounds included; ``lo``
receives it where ``x < lo``, ``hi`` where ``x > hi``)::

    ∂L/∂x   = g·1[lo ≤ x ≤ hi]
    ∂L/∂ℓ_s = ln 2 · s · Σ g·(n + s·ρ − 1[x > hi])
    ∂L/∂ℓ_q = ln 2 · Q · Σ g·1[x > hi]
    ∂L/∂β   = Σ g·(1[x < lo] + 1[x > hi])          (0 unless signed: β is learnable only then)

The bit-width is ``b_a = ℓ_q − ℓ_s`` (:func:`gdnsq_act_bits`).

Every power ``2^ℓ`` is :func:`qflax.numerics.exp2`, built from exponent bits: exact at integer
``ℓ`` (XLA:CPU's ``jnp.exp2`` is not, e.g. ``2^13 → 8192.0005``, which moved values on a grid
point or a bound to the wrong side), with the derivative ``ln2·2^ℓ`` used above.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import NOISE_SOURCES, check_choice, exp2, uniform_noise
from qflax.quantizers._base import fused_sums, kept_small, reduce_axes, sum_to_shape
from qflax.quantizers._family import (
    InputLowering,
    NotExportable,
    QuantizerFamily,
    WeightLowering,
    compact,
    expand,
    register_family,
)

__all__ = [
    "GDNSQ_BACKWARDS",
    "GDNSQActConfig",
    "GDNSQWeightConfig",
    "gdnsq_act",
    "gdnsq_act_bits",
    "gdnsq_act_codes",
    "gdnsq_act_init",
    "gdnsq_used_bits",
    "gdnsq_weight",
    "gdnsq_weight_bits",
    "gdnsq_weight_codes",
    "gdnsq_weight_init",
]

GDNSQ_BACKWARDS = ("ste", "noise", "lsq")
_LN2 = math.log(2.0)
_INV_SQRT3 = 1.0 / math.sqrt(3.0)


def _check_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is not a bool; allowed: True, False")
    return bool(value)


def _check_float(value, field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(value)):
        extra = ", None" if allow_none else ""
        raise ValueError(f"{field}={value!r} is not a finite number; allowed: a float{extra}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDNSQWeightConfig:
    """Configuration of the GDNSQ weight quantizer (hashable; validated at construction)."""

    # One log-step per output channel ("channel") or one for the whole tensor ("tensor").
    granularity: str = "channel"
    # The output-channel axis for granularity="channel".
    axis: int = -1
    # Gradient rule of the rounding noise: "noise" (the paper's; needs a key), "ste" or "lsq".
    backward: str = "noise"
    # The log2 step that gdnsq_weight_init returns (the code uses -12).
    init_log_step: float = -12.0
    # None: start at init_log_step; a number: start each channel at this continuous bit-width
    # (ℓ_c = log2(spread_c / (2^init_bits − 1)), so b_c = init_bits), e.g. 8 for short runs.
    init_bits: float | None = None
    # None: no floor (the code); a number: the step is capped at spread_c / (2^min_bits − 1) in
    # the forward pass, so a channel keeps at least 2^min_bits levels (1: never a constant
    # channel); the continuous bit-width the penalty sees is not floored.
    min_bits: float | None = None
    # The draws of r for backward="noise" (qflax.numerics.NOISE_SOURCES): "threefry"
    # (jax.random.bernoulli: a full-size random array, the default, so existing runs reproduce)
    # or "hash" (a counter hash of two words drawn from the key, computed inside the fusions
    # that use r: nothing of the tensor's size is drawn or stored; other draws for a key).
    noise: str = "threefry"

    def __post_init__(self):
        check_choice(self.noise, "noise", NOISE_SOURCES)
        check_choice(self.granularity, "granularity", ("tensor", "channel"))
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"axis={self.axis!r} is not an integer; allowed: an int axis")
        check_choice(self.backward, "backward", GDNSQ_BACKWARDS)
        _check_float(self.init_log_step, "init_log_step")
        _check_init_bits(self.init_bits)
        _check_min_bits(self.min_bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDNSQActConfig:
    """Configuration of the GDNSQ activation quantizer (hashable; validated at construction)."""

    # False: the lower bound β is fixed (0 after a ReLU); True: β is learnable.
    signed: bool = False
    # Gradient rule of the rounding noise: "noise" (the paper's; needs a key), "ste" or "lsq".
    backward: str = "noise"
    # The log2 step ℓ_s that gdnsq_act_init returns (the code uses -10).
    init_log_step: float = -10.0
    # The log2 range ℓ_q that gdnsq_act_init returns (the code uses 10); None: from the data.
    init_log_range: float | None = 10.0
    # None: start at init_log_step; a number: ℓ_s = ℓ_q − init_bits (b_a = init_bits), with ℓ_q
    # from init_log_range or the data.
    init_bits: float | None = None
    # None: no floor (the code); a number: ℓ_q is raised to at least ℓ_s + min_bits in the
    # forward pass (at least 2^min_bits levels: 1 keeps activations from collapsing to one
    # level); the continuous bit-width the penalty sees is not floored.
    min_bits: float | None = None
    # The draws of r for backward="noise" (qflax.numerics.NOISE_SOURCES): "threefry"
    # (jax.random.bernoulli: a full-size random array, the default, so existing runs reproduce)
    # or "hash" (a counter hash of two words drawn from the key, computed inside the fusions
    # that use r: nothing of the tensor's size is drawn or stored; other draws for a key).
    noise: str = "threefry"

    def __post_init__(self):
        check_choice(self.noise, "noise", NOISE_SOURCES)
        _check_bool(self.signed, "signed")
        check_choice(self.backward, "backward", GDNSQ_BACKWARDS)
        _check_float(self.init_log_step, "init_log_step")
        _check_float(self.init_log_range, "init_log_range", allow_none=True)
        _check_init_bits(self.init_bits)
        _check_min_bits(self.min_bits)


# --------------------------------------------------------------------------------------------
# Shared pieces.


def _check_min_bits(value) -> None:
    _check_float(value, "min_bits", allow_none=True)
    if value is not None and not 0.0 < float(value) <= 8.0:
        raise ValueError(f"min_bits={value!r} is out of range; allowed: None or (0, 8]")


def _check_init_bits(value) -> None:
    _check_float(value, "init_bits", allow_none=True)
    if value is not None and not 1.0 <= float(value) <= 24.0:
        raise ValueError(f"init_bits={value!r} is out of range; allowed: None or 1..24")


def _compute_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else np.dtype(np.float32)


def _as_float(x: ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


def _check_params(params, names: tuple[str, ...], shape: tuple[int, ...], where: str) -> None:
    if not isinstance(params, Mapping) or set(params) != set(names):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"params={got!r} is not allowed for {where}; allowed: a dict with keys {list(names)}"
        )
    for name in names:
        if jnp.shape(params[name]) != shape:
            raise ValueError(
                f"params[{name!r}] has shape {jnp.shape(params[name])}, but {where} needs shape "
                f"{shape}; allowed: exactly {shape}"
            )


def _rho(backward: str, n: jax.Array, r: jax.Array) -> jax.Array:
    """The rule's ``∂n/∂s``."""
    if backward == "ste":
        return jnp.zeros_like(n)
    if backward == "noise":
        return r * _INV_SQRT3
    return n


def _noise_signs(config, key: jax.Array | None, shape, dtype, name: str) -> jax.Array:
    """``r`` uniform on {−½, +½} per element for the noise rule; a scalar 0 otherwise."""
    if config.backward != "noise":
        return jnp.zeros((), dtype)
    if key is None:
        raise ValueError(
            f"key=None is not allowed for {name} with backward='noise'; allowed: a PRNG key"
        )
    # (threefry: the draws of jax.random.bernoulli(key, 0.5, shape), which is this comparison)
    heads = uniform_noise(key, shape, config.noise) < 0.5
    return jnp.where(heads, 0.5, -0.5).astype(dtype)


# --------------------------------------------------------------------------------------------
# Weights.


def _weight_axes(ndim: int, config: GDNSQWeightConfig) -> tuple[int, ...]:
    return reduce_axes(ndim, config.granularity, config.axis)


def _weight_param_shape(shape: tuple[int, ...], config: GDNSQWeightConfig) -> tuple[int, ...]:
    axes = _weight_axes(len(shape), config)
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _weight_forward(config, w, log_step):
    """``(ŵ, z)``: the quantized weights and the per-channel minimum ``z``."""
    axes = _weight_axes(w.ndim, config)
    z = kept_small(jnp.min(w, axis=axes, keepdims=True))
    s = exp2(log_step)
    return s * jnp.round((w - z) / s) + z, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdnsq_weight(config, w, log_step, r):
    return _weight_forward(config, w, log_step)[0]


def _gdnsq_weight_fwd(config, w, log_step, r):
    y, z = _weight_forward(config, w, log_step)
    return y, (w, z, log_step, r)


def _gdnsq_weight_bwd(config, residuals, g):
    w, z, log_step, r = residuals
    s = exp2(log_step)
    v = (w - z) / s
    n = jnp.round(v) - v
    dwhat_ds = n + s * _rho(config.backward, n, r)
    dlog = sum_to_shape(g * dwhat_ds, log_step.shape) * (s * _LN2)
    return g, dlog, jnp.zeros_like(r)


_gdnsq_weight.defvjp(_gdnsq_weight_fwd, _gdnsq_weight_bwd)


def gdnsq_weight_init(w: ArrayLike, config: GDNSQWeightConfig) -> dict[str, jax.Array]:
    """``{"log_step": ℓ}`` (float32, the params shape).

    ``ℓ = config.init_log_step`` everywhere, or with ``config.init_bits = B`` set, per channel
    ``ℓ_c = log2(spread_c / (2^B − 1))`` (``spread_c = max w_c − min w_c``, floored at 2^−24) so
    that the continuous bit-width starts at ``b_c = B`` exactly.
    """
    shape = _weight_param_shape(jnp.shape(w), config)
    if config.init_bits is None:
        return {"log_step": jnp.full(shape, config.init_log_step, jnp.float32)}
    w = _as_float(w, "w").astype(jnp.float32)
    axes = _weight_axes(w.ndim, config)
    spread = jnp.max(w, axis=axes, keepdims=True) - jnp.min(w, axis=axes, keepdims=True)
    spread = jnp.maximum(spread, 2.0**-24)
    levels = 2.0 ** float(config.init_bits) - 1.0
    return {"log_step": jnp.log2(spread / levels).reshape(shape)}


def _weight_prepare(w, params, config, where):
    w = _as_float(w, "w")
    shape = _weight_param_shape(w.shape, config)
    _check_params(params, ("log_step",), shape, f"{where} of a tensor of shape {w.shape}")
    dtype = _compute_dtype(w.dtype)
    return w, w.astype(dtype), jnp.asarray(params["log_step"]).astype(dtype)


def _floor_weight_step(wc, log_step, config) -> jax.Array:
    """``ℓ`` capped so that every channel keeps ``2^min_bits`` levels (no-op without a floor)."""
    if config.min_bits is None:
        return log_step
    axes = _weight_axes(wc.ndim, config)
    spread = jax.lax.stop_gradient(
        jnp.max(wc, axis=axes, keepdims=True) - jnp.min(wc, axis=axes, keepdims=True)
    )
    cap = jnp.log2(jnp.maximum(spread, 2.0**-24) / (2.0 ** float(config.min_bits) - 1.0))
    return jnp.minimum(log_step, cap)


def _floor_act_range(log_step, log_range, config) -> jax.Array:
    if config is None or config.min_bits is None:
        return log_range
    return jnp.maximum(log_range, log_step + float(config.min_bits))


def gdnsq_weight(
    w: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: GDNSQWeightConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantizes weights on the grid ``min w_c + 2^ℓ_c·k`` (no clip); gradients per module doc.

    Args:
      w: a floating array of weights.
      params: ``{"log_step": ℓ}``; ℓ has ``w``'s shape with every axis but ``config.axis`` set
        to 1 ("channel"), or all ones ("tensor").
      config: the quantizer's config.
      key: PRNG key of ``r``; required when ``config.backward == "noise"``, ignored otherwise.

    Returns:
      ``ŵ``, shape and dtype of ``w``.

    >>> gdnsq_weight(jnp.array([[0.1], [0.9], [1.3]]), {"log_step": jnp.full((1, 1), -1.0)},
    ...              GDNSQWeightConfig(backward="ste")).ravel().tolist()
    [0.10000000149011612, 1.100000023841858, 1.100000023841858]
    """
    w, wc, log_step = _weight_prepare(w, params, config, "gdnsq_weight")
    log_step = _floor_weight_step(wc, log_step, config)
    r = _noise_signs(config, key, w.shape, wc.dtype, "gdnsq_weight")
    return _gdnsq_weight(config, wc, log_step, r).astype(w.dtype)


def gdnsq_weight_codes(
    w: ArrayLike, params: Mapping[str, ArrayLike], config: GDNSQWeightConfig
) -> jax.Array:
    """The int32 codes ``round((w − min w_c)/2^ℓ_c)`` (no gradient), each ≥ 0."""
    w, wc, log_step = _weight_prepare(w, params, config, "gdnsq_weight_codes")
    wc, log_step = jax.lax.stop_gradient((wc, log_step))
    log_step = _floor_weight_step(wc, log_step, config)
    z = jnp.min(wc, axis=_weight_axes(w.ndim, config), keepdims=True)
    return jnp.round((wc - z) / exp2(log_step)).astype(jnp.int32)


def gdnsq_weight_bits(
    w: ArrayLike, params: Mapping[str, ArrayLike], config: GDNSQWeightConfig
) -> jax.Array:
    """The continuous bit-width ``b_c = log2(max w_c − min w_c + 2^ℓ_c) − ℓ_c`` (params shape).

    Differentiable in ``w`` (through the max and min) and in ``ℓ``.

    >>> gdnsq_weight_bits(jnp.array([[0.0], [3.0]]), {"log_step": jnp.zeros((1, 1))},
    ...                   GDNSQWeightConfig(backward="ste")).tolist()
    [[2.0]]
    """
    w, wc, log_step = _weight_prepare(w, params, config, "gdnsq_weight_bits")
    axes = _weight_axes(w.ndim, config)
    spread = jnp.max(wc, axis=axes, keepdims=True) - jnp.min(wc, axis=axes, keepdims=True)
    return jnp.log2(spread + exp2(log_step)) - log_step


# --------------------------------------------------------------------------------------------
# Activations.

_ACT_PARAMS = ("log_step", "log_range", "lower")


def _act_parts(x, log_step, log_range, lower):
    s = exp2(log_step)
    q = exp2(log_range)
    hi = lower + q - s
    return s, q, hi, jnp.clip(x, lower, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdnsq_act(config, x, log_step, log_range, lower, r):
    s, _, _, c = _act_parts(x, log_step, log_range, lower)
    return s * jnp.round((c - lower) / s) + lower


def _gdnsq_act_fwd(config, x, log_step, log_range, lower, r):
    return _gdnsq_act(config, x, log_step, log_range, lower, r), (x, log_step, log_range, lower, r)


def _gdnsq_act_bwd(config, residuals, g):
    x, log_step, log_range, lower, r = residuals
    s, q, hi, c = _act_parts(x, log_step, log_range, lower)
    below = x < lower
    above = x > hi
    zero = jnp.zeros_like(g)
    # (c − β)/s spelled as −((β − c)/s) (the same float: negation is exact), so that it is not
    # one instruction with the forward's division: XLA does not duplicate a division into two
    # fusions and would write it out as a full-size temporary.
    v = -((lower - c) / s)
    n = jnp.round(v) - v
    dx = jnp.where(below | above, zero, g)
    dxhat_ds = n + s * _rho(config.backward, n, r) - above.astype(g.dtype)
    # The three sums share one pass over x and g (one multi-output reduction).
    terms = (g * dxhat_ds, jnp.where(above, g, zero))
    if config.signed:
        terms += (jnp.where(below | above, g, zero),)
    sums = fused_sums(terms, tuple(range(g.ndim)))
    dlog_step = sums[0] * (s * _LN2)
    dlog_range = sums[1] * (q * _LN2)
    dlower = sums[2] if config.signed else jnp.zeros((), g.dtype)
    return dx, dlog_step, dlog_range, dlower, jnp.zeros_like(r)


_gdnsq_act.defvjp(_gdnsq_act_fwd, _gdnsq_act_bwd)


def gdnsq_act_init(x: ArrayLike | None, config: GDNSQActConfig) -> dict[str, jax.Array]:
    """Scalar params ``{"log_step": ℓ_s, "log_range": ℓ_q, "lower": β}`` (float32).

    ``ℓ_s = config.init_log_step`` (or ``ℓ_q − config.init_bits`` when that is set, applied
    after ``ℓ_q`` is known). With ``config.init_log_range`` set (the code's default 10):
    ``ℓ_q = init_log_range`` and ``β = 0`` (unsigned) or ``β = −2^(ℓ_q − 1)`` (signed, as the code:
    the range is centred on 0). With ``init_log_range=None`` the range is taken from ``x``:
    ``β = 0`` (unsigned) or ``min x`` (signed), and ``ℓ_q = log2(max x − β + s)``, so that
    ``hi = β + 2^ℓ_q − s = max x`` (floored so that ``2^ℓ_q ≥ s``).
    """
    log_step = jnp.asarray(config.init_log_step, jnp.float32)
    if config.init_log_range is not None:
        log_range = jnp.asarray(config.init_log_range, jnp.float32)
        lower = -exp2(log_range - 1.0) if config.signed else jnp.zeros((), jnp.float32)
        if config.init_bits is not None:
            log_step = log_range - float(config.init_bits)
        return {"log_step": log_step, "log_range": log_range, "lower": lower}
    if x is None:
        raise ValueError(
            "x=None is not allowed with init_log_range=None; allowed: the data to take the range "
            "from, or a float init_log_range"
        )
    x = _as_float(x, "x").astype(jnp.float32)
    lower = jnp.min(x) if config.signed else jnp.zeros((), jnp.float32)
    spread = jnp.maximum(jnp.max(x) - lower, 0.0)
    if config.init_bits is not None:
        # hi = β + 2^ℓ_q − s = max x with 2^ℓ_q = s·2^B: s = spread / (2^B − 1).
        levels = 2.0 ** float(config.init_bits)
        log_step = jnp.log2(jnp.maximum(spread, 2.0**-24) / (levels - 1.0))
        return {
            "log_step": log_step,
            "log_range": log_step + float(config.init_bits),
            "lower": lower,
        }
    s = exp2(log_step)
    log_range = jnp.log2(spread + s)
    return {"log_step": log_step, "log_range": log_range, "lower": lower}


def _act_prepare(x, params, where):
    x = _as_float(x, "x")
    _check_params(params, _ACT_PARAMS, (), where)
    dtype = _compute_dtype(x.dtype)
    values = tuple(jnp.asarray(params[k]).astype(dtype) for k in _ACT_PARAMS)
    return x, x.astype(dtype), values


def gdnsq_act(
    x: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: GDNSQActConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """``x̂ = s·round((clip(x, β, β + 2^ℓ_q − s) − β)/s) + β``, ``s = 2^ℓ_s``.

    Args:
      x: a floating array (the input of a quantized layer).
      params: scalars ``{"log_step", "log_range", "lower"}`` (see :func:`gdnsq_act_init`).
      config: the quantizer's config.
      key: PRNG key of ``r``; required when ``config.backward == "noise"``, ignored otherwise.

    Returns:
      ``x̂``, shape and dtype of ``x``.

    >>> p = {"log_step": jnp.asarray(-1.0), "log_range": jnp.asarray(1.0),
    ...      "lower": jnp.asarray(0.0)}
    >>> gdnsq_act(jnp.array([-1.0, 0.3, 0.8, 5.0]), p, GDNSQActConfig(backward="ste")).tolist()
    [0.0, 0.5, 1.0, 1.5]
    """
    x, xc, (log_step, log_range, lower) = _act_prepare(x, params, "gdnsq_act")
    log_range = _floor_act_range(log_step, log_range, config)
    r = _noise_signs(config, key, x.shape, xc.dtype, "gdnsq_act")
    return _gdnsq_act(config, xc, log_step, log_range, lower, r).astype(x.dtype)


def gdnsq_act_codes(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: GDNSQActConfig | None = None
) -> jax.Array:
    """The int32 codes ``round((clip(x, β, hi) − β)/s)`` in ``[0, 2^ℓ_q/s − 1]`` (no gradient);
    ``config``: applies its ``min_bits`` floor as :func:`gdnsq_act` does."""
    _, xc, parts = _act_prepare(x, params, "gdnsq_act_codes")
    xc, (log_step, log_range, lower) = jax.lax.stop_gradient((xc, parts))
    log_range = _floor_act_range(log_step, log_range, config)
    s, _, _, c = _act_parts(xc, log_step, log_range, lower)
    return jnp.round((c - lower) / s).astype(jnp.int32)


def gdnsq_act_bits(params: Mapping[str, ArrayLike]) -> jax.Array:
    """The activation bit-width ``b_a = ℓ_q − ℓ_s`` (differentiable)."""
    return jnp.asarray(params["log_range"]) - jnp.asarray(params["log_step"])


# --------------------------------------------------------------------------------------------
# Integer bit-width used at evaluation.


def gdnsq_used_bits(codes: ArrayLike, *, axis: int | None = None) -> jax.Array:
    """``ceil(log2(number of distinct values present))`` — how many codes a tensor really uses.

    A diagnostic: never more than the range-based width of the convergence test
    (``ceil(log2(max − min + 1))``, ``GDNSQFamily.used_bits``, see the module docstring) and less
    when codes inside the range go unused. One distinct value gives 0 bits.

    Args:
      codes: the codes (integers, or integer-valued floats) of one tensor, e.g. from
        :func:`gdnsq_weight_codes` or :func:`gdnsq_act_codes`.
      axis: None: one width for the whole tensor (shape ``()``); an int: one width per index
        of that axis (shape ``(codes.shape[axis],)``), e.g. per output channel.

    Returns:
      int32 bit-widths.

    >>> gdnsq_used_bits(jnp.array([[0, 1], [5, 5], [2, 7]]), axis=0).tolist()
    [1, 0, 1]
    >>> int(gdnsq_used_bits(jnp.array([0, 1, 2, 2, 9])))
    2
    """
    codes = jnp.asarray(codes)
    if axis is None:
        rows = codes.reshape(1, -1)
    else:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis={axis!r} is not an integer; allowed: None or an int axis")
        if not -codes.ndim <= axis < codes.ndim:
            raise ValueError(
                f"axis={axis} is out of range for codes of rank {codes.ndim}; "
                f"allowed: None or {-codes.ndim}..{codes.ndim - 1}"
            )
        rows = jnp.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)
    ordered = jnp.sort(rows, axis=1)
    distinct = 1 + jnp.sum((ordered[:, 1:] != ordered[:, :-1]).astype(jnp.int32), axis=1)
    bits = jnp.ceil(jnp.log2(distinct.astype(jnp.float32))).astype(jnp.int32)
    return bits[0] if axis is None else bits


# ---------------------------------------------------------------------------------- family


class GDNSQFamily(QuantizerFamily):
    """``"gdnsq"``: :func:`gdnsq_weight` (GDNSQWeightConfig) or :func:`gdnsq_act`
    (GDNSQActConfig): learned log-step (and log-range, lower bound) so the bit-width itself is
    learned; ``spec.target_bits`` is the bit-width the exterior-point penalty drives it to."""

    name = "gdnsq"
    config_types = (GDNSQWeightConfig, GDNSQActConfig)

    @staticmethod
    def _is_act(spec) -> bool:
        return isinstance(spec.config, GDNSQActConfig)

    def roles(self, spec):
        return ("act",) if self._is_act(spec) else ("weight",)

    def bits(self, spec) -> int:
        return int(spec.target_bits)

    def learnable(self, spec) -> bool:
        return True

    def learns_bits(self, spec) -> bool:
        return True

    def needs_key(self, spec) -> bool:
        return spec.config.backward == "noise"

    def init(self, spec, x):
        if self._is_act(spec):
            return gdnsq_act_init(x, spec.config)
        params = gdnsq_weight_init(x, spec.config)
        return {k: compact(v, spec.config.granularity) for k, v in params.items()}

    def placeholder(self, spec, shape):
        if self._is_act(spec):
            cfg = spec.config
            if cfg.init_log_range is None:
                cfg = dataclasses.replace(cfg, init_log_range=0.0)
            return gdnsq_act_init(None, cfg)
        out = super().placeholder(spec, shape)
        out["log_step"] = jnp.full_like(out["log_step"], float(spec.config.init_log_step))
        return out

    def _full(self, spec, x, params):
        gran, axis = spec.config.granularity, spec.config.axis
        return {k: expand(v, x, gran, axis) for k, v in params.items()}

    def apply(self, spec, x, params, *, key=None, stats=None):
        if self.needs_key(spec) and key is None:
            raise ValueError(
                "key=None is not allowed for a GDNSQ quantizer with backward='noise'; "
                "allowed: a PRNG key (the quant layers pass one per call)"
            )
        if self._is_act(spec):
            return gdnsq_act(x, params, spec.config, key=key)
        return gdnsq_weight(x, self._full(spec, x, params), spec.config, key=key)

    def bit_width(self, spec, x, params):
        """Weights: one per output channel (compact); activations: a scalar ``ℓ_q − ℓ_s``."""
        if self._is_act(spec):
            return gdnsq_act_bits(params)
        x = jnp.asarray(x)
        bits = gdnsq_weight_bits(x, self._full(spec, x, params), spec.config)
        return compact(bits, spec.config.granularity)

    def used_bits(self, spec, x, params):
        """As the code's convergence test: ``ceil(log2(max code − min code + 1))``, the widest
        channel for weights; activations ``ceil(log2(round(2^(ℓ_q − ℓ_s))))``, the codes of
        the whole clip range ``[β, β + 2^ℓ_q − s]`` (not only those a batch reaches)."""
        if self._is_act(spec):
            bits = gdnsq_act_bits(params)
            if spec.config.min_bits is not None:  # the forward pass's floor
                bits = jnp.maximum(bits, float(spec.config.min_bits))
            levels = jnp.maximum(jnp.round(exp2(bits)), 1.0)
        else:
            x = jnp.asarray(x)
            codes = gdnsq_weight_codes(x, self._full(spec, x, params), spec.config)
            levels = (jnp.max(codes) - jnp.min(codes) + 1).astype(jnp.float32)
        return jnp.ceil(jnp.log2(levels) - 1e-6).astype(jnp.int32)

    def stored_scales(self, spec, shape) -> int:
        # Weights also need their zero point min w_c per channel at rest.
        return self.scale_count(spec, shape)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_gdnsq_act, quantize_gdnsq_weight

        if self._is_act(spec):
            return quantize_gdnsq_act(x, params, spec.config)
        return quantize_gdnsq_weight(x, self._full(spec, x, params), spec.config)

    def params_from_codes(self, spec, q):
        # s = 2^ℓ (min_bits already applied when exported).
        return {"log_step": jnp.log2(jnp.asarray(q.scale, jnp.float32))}

    def weight_lowering(self, spec, params, stats):
        return WeightLowering("uniform", granularity=spec.config.granularity, axis=spec.config.axis)

    def input_lowering(self, spec, params, stats):
        if not self._is_act(spec):
            raise NotExportable("GDNSQWeightConfig quantizes weights, not inputs")
        lower = float(np.asarray(params["lower"]).reshape(())) if "lower" in params else 0.0
        if lower != 0.0:
            raise NotExportable(
                f"its GDNSQ input has the lower bound β={lower:.6g} (a zero point on the "
                "inputs); allowed: β = 0 (unsigned inputs, signed=False: inputs after a ReLU)"
            )
        big = jnp.asarray([-3.0e38, 3.0e38], jnp.float32)
        lo, hi = (int(v) for v in np.asarray(gdnsq_act_codes(big, params, spec.config)))
        # s = 2^ℓ_s in float32, as the quantizer computes it
        step = float(exp2(jnp.asarray(params["log_step"], jnp.float32)).reshape(()))
        return InputLowering("codes", lo, hi, step)


register_family(GDNSQFamily())
