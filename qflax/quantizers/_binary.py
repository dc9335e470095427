"""Binary sign (BinaryConnect / BNN / XNOR-Net) and ternary (TWN) quantizers.

Binary: BinaryConnect (Courbariaux, Bengio & David 2015): deterministic ``sign(x)`` or stochastic
``+1`` with probability ``clip((x + 1)/2, 0, 1)``; BNN (Hubara et al. 2016): backward
``g·1[|x| ≤ 1]``; XNOR-Net-style scaling (Rastegari et al. 2016) ``sign(w)·sg(mean|w|)`` per tensor
or per output channel (METHODS.md §2 DoReFa k=1 and §9). What differs: ``sign(0) = +1``, and the
scale is recomputed from ``x`` on every call (no learnable parameter).

Ternary: Ternary Weight Networks (Li, Zhang & Liu 2016): ``Δ = threshold·mean|w|`` (threshold 0.7
in the paper), ``t = sign(w)·1[|w| > Δ]``, ``α = mean(|w| : |w| > Δ)``, ``ŵ = α·t``. What differs:
with ``scaling="channel"`` both ``Δ`` and ``α`` are per output channel (the paper is per layer);
``α`` is recomputed from ``x`` with stop_gradient (not learnable); an all-zero slice gives
``α = 0``.

Gradients wrt ``x`` (``config.gradient``; for both quantizers, ``g`` is the cotangent of the
unscaled ``±1``/``{−1, 0, 1}`` output, so a scaled output passes ``α·g``): ``"ste"`` identity,
``"clipped_ste"`` ``g·1[|x| ≤ 1]`` (bound included; BNN's rule, applied to ternary too), ``"true"``
zero. Scales and thresholds carry no gradient.

Both quantizers propagate NaN and keep the shape and dtype of ``x``. Neither has learnable
params: ``*_init`` returns ``{}`` and the functions accept only an empty dict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from qflax.numerics import NOISE_SOURCES, check_choice, uniform_noise
from qflax.quantizers._base import kept_small, reduce_axes, sum_to_shape, sums_to_shape
from qflax.quantizers._family import (
    InputLowering,
    NotExportable,
    QuantizerFamily,
    WeightLowering,
    register_family,
)

__all__ = [
    "BINARY_GRADIENTS",
    "SCALINGS",
    "BinaryConfig",
    "TernaryConfig",
    "binary",
    "binary_codes",
    "binary_init",
    "binary_scale",
    "ternary",
    "ternary_codes",
    "ternary_init",
    "ternary_scale",
]

SCALINGS = ("none", "tensor", "channel")
BINARY_GRADIENTS = ("ste", "clipped_ste", "true")


def _check_axis_field(axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis={axis!r} is not an integer; allowed: an int axis of the tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryConfig:
    """Configuration of the binary sign quantizer."""

    # False: sign(x) with sign(0) = +1. True: +1 with probability clip((x+1)/2, 0, 1) (needs a key).
    stochastic: bool = False
    # Output scale: "none" (±1), "tensor" (sg(mean|x|)) or "channel" (the same per index of axis).
    scaling: str = "none"
    # The output-channel axis for scaling="channel" (checked against x when used).
    axis: int = -1
    # Gradient wrt x: "ste" (identity), "clipped_ste" (g·1[|x| <= 1], BNN) or "true" (zero).
    gradient: str = "clipped_ste"
    # The uniform variates of stochastic=True (qflax.numerics.NOISE_SOURCES): "threefry"
    # (jax.random.uniform, the default: earlier runs reproduce) or "hash" (a counter hash
    # computed where it is used: nothing of the tensor's size drawn or stored; other draws).
    noise: str = "threefry"

    def __post_init__(self):
        check_choice(self.noise, "noise", NOISE_SOURCES)
        if not isinstance(self.stochastic, (bool, np.bool_)):
            raise ValueError(f"stochastic={self.stochastic!r} is not a bool; allowed: True, False")
        object.__setattr__(self, "stochastic", bool(self.stochastic))
        check_choice(self.scaling, "scaling", SCALINGS)
        _check_axis_field(self.axis)
        check_choice(self.gradient, "gradient", BINARY_GRADIENTS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TernaryConfig:
    """Configuration of the ternary (TWN) quantizer."""

    # Dead-zone ratio: Δ = threshold·mean|x| (TWN uses 0.7); a finite number > 0.
    threshold: float = 0.7
    # Output scale: "none" ({-1, 0, 1}), "tensor" or "channel" (α = sg(mean(|x| : |x| > Δ))).
    scaling: str = "tensor"
    # The output-channel axis for scaling="channel" (Δ and α per index of it; checked when used).
    axis: int = -1
    # Gradient wrt x: "ste" (identity), "clipped_ste" (g·1[|x| <= 1]) or "true" (zero).
    gradient: str = "ste"

    def __post_init__(self):
        t = self.threshold
        if (
            isinstance(t, bool)
            or not isinstance(t, numbers.Real)
            or not np.isfinite(float(t))
            or float(t) <= 0
        ):
            raise ValueError(f"threshold={t!r} is not allowed; allowed: a finite number > 0")
        object.__setattr__(self, "threshold", float(t))  # numpy scalars -> a Python float
        check_choice(self.scaling, "scaling", SCALINGS)
        _check_axis_field(self.axis)
        check_choice(self.gradient, "gradient", BINARY_GRADIENTS)


# ----------------------------------------------------------------------------------------------
# Shared helpers.


def _check_float(x: jax.Array, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} expects a floating array, got dtype {x.dtype}")


def _check_no_params(params: Any, name: str) -> None:
    if params is None:
        return
    if not isinstance(params, Mapping) or len(params):
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"params={keys!r} is not allowed; allowed: {{}} ({name} has no learnable params)"
        )


def _scale_axes(ndim: int, scaling: str, axis: int) -> tuple[int, ...]:
    """Axes a scale statistic is reduced over (raises ValueError for an axis out of range)."""
    return reduce_axes(ndim, "channel" if scaling == "channel" else "tensor", axis)


def _straight_through(x: jax.Array, g: jax.Array, gradient: str) -> jax.Array:
    if gradient == "ste":
        return g
    if gradient == "clipped_ste":
        return jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g))
    return jnp.zeros_like(g)  # "true"


# ----------------------------------------------------------------------------------------------
# Binary.


def _binary_plus(x: jax.Array, u: jax.Array | None, config: BinaryConfig) -> jax.Array:
    """Boolean mask of the elements that become +1."""
    if config.stochastic:
        p = jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
        return u < p  # P(u < p) = p for u ~ U[0, 1)
    return x >= 0  # sign(0) = sign(-0.0) = +1


def _binary_value(x, u, config):
    one = jnp.ones((), x.dtype)
    out = jnp.where(_binary_plus(x, u, config), one, -one)
    return jnp.where(jnp.isnan(x), x, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _binary_q(x: jax.Array, u: jax.Array | None, config: BinaryConfig) -> jax.Array:
    return _binary_value(x, u, config)


def _binary_fwd(x, u, config):
    x_res = x if config.gradient == "clipped_ste" else None
    return _binary_value(x, u, config), x_res


def _binary_bwd(config, x, g):
    return _straight_through(x, g, config.gradient), None  # no gradient to the noise u


_binary_q.defvjp(_binary_fwd, _binary_bwd)


def _binary_noise(x: jax.Array, config: BinaryConfig, key: jax.Array | None, name: str):
    if not config.stochastic:
        return None
    if key is None:
        raise ValueError(
            f"key=None is not allowed for {name} with stochastic=True; allowed: a PRNG key"
        )
    return uniform_noise(key, x.shape, config.noise)


def _scale_shape(shape: tuple[int, ...], scaling: str, axis: int) -> tuple[int, ...]:
    """The keepdims shape of a scale statistic of a tensor of ``shape``."""
    axes = _scale_axes(len(shape), scaling, axis)
    return tuple(1 if a in axes else n for a, n in enumerate(shape))


def _mean_abs(x: jax.Array, scaling: str, axis: int) -> jax.Array:
    shape = _scale_shape(x.shape, scaling, axis)
    # (no gradient: every caller stops it; the fused sum's reduction has no JVP rule)
    total = sum_to_shape(jnp.abs(lax.stop_gradient(x).astype(jnp.float32)), shape)
    return total / float(math.prod(x.shape) // math.prod(shape))


def binary_init(x: ArrayLike, config: BinaryConfig) -> dict:
    """Returns ``{}``: the binary quantizer has no learnable params (the scale comes from ``x``)."""
    x = jnp.asarray(x)
    _check_float(x, "binary_init")
    if config.scaling == "channel":
        _scale_axes(x.ndim, config.scaling, config.axis)
    return {}


def binary_scale(x: ArrayLike, config: BinaryConfig) -> jax.Array:
    """The output scale ``α`` (float32, stop_gradient, keepdims shape; ones for ``"none"``).

    ``"tensor"``: ``mean|x|``, shape ``(1,)*x.ndim``; ``"channel"``: ``mean|x|`` over every axis but
    ``config.axis``. ``binary(x) == α·(2·binary_codes(x) − 1)`` (cast to ``x.dtype``).
    """
    x = jnp.asarray(x)
    _check_float(x, "binary_scale")
    if config.scaling == "none":
        return jnp.ones((1,) * x.ndim, jnp.float32)
    return lax.stop_gradient(_mean_abs(x, config.scaling, config.axis))


def binary(
    x: ArrayLike,
    params: Mapping[str, Any] | None,
    config: BinaryConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Binarizes ``x`` to ``±α`` (``α = 1`` for ``scaling="none"``).

    Args:
      x: floating array.
      params: ``{}`` (from :func:`binary_init`).
      config: the quantizer's configuration.
      key: PRNG key, required when ``config.stochastic`` (ignored otherwise).

    Returns:
      ``α·b`` with ``b ∈ {−1, +1}``, same shape and dtype as ``x``.

    >>> binary(jnp.array([0.3, 0.0, -2.0]), {}, BinaryConfig()).tolist()
    [1.0, 1.0, -1.0]
    >>> binary(jnp.array([0.5, -1.0, 0.0]), {}, BinaryConfig(scaling="tensor")).tolist()
    [0.5, -0.5, 0.5]
    """
    x = jnp.asarray(x)
    _check_float(x, "binary")
    _check_no_params(params, "binary")
    alpha = None if config.scaling == "none" else binary_scale(x, config)
    b = _binary_q(x, _binary_noise(x, config, key, "binary"), config)
    return b if alpha is None else alpha.astype(x.dtype) * b


def binary_codes(
    x: ArrayLike,
    params: Mapping[str, Any] | None,
    config: BinaryConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Int32 codes in ``{0, 1}``: 1 where :func:`binary` gives ``+α`` (same key, same draw)."""
    x = lax.stop_gradient(jnp.asarray(x))
    _check_float(x, "binary_codes")
    _check_no_params(params, "binary_codes")
    if config.scaling == "channel":
        _scale_axes(x.ndim, config.scaling, config.axis)
    plus = _binary_plus(x, _binary_noise(x, config, key, "binary_codes"), config)
    return plus.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Ternary.


def _ternary_masks(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masks of the elements that become +1 and −1 (``|x| > Δ``, strict)."""
    xc = x.astype(jnp.float32)
    return xc > delta, xc < -delta


def _ternary_value(x, delta, config):
    one = jnp.ones((), x.dtype)
    positive, negative = _ternary_masks(x, delta)
    out = jnp.where(positive, one, jnp.where(negative, -one, jnp.zeros((), x.dtype)))
    return jnp.where(jnp.isnan(x), x, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ternary_q(x: jax.Array, delta: jax.Array, config: TernaryConfig) -> jax.Array:
    return _ternary_value(x, delta, config)


def _ternary_fwd(x, delta, config):
    x_res = x if config.gradient == "clipped_ste" else None
    return _ternary_value(x, delta, config), (x_res, delta)


def _ternary_bwd(config, res, g):
    x, delta = res
    return _straight_through(x, g, config.gradient), jnp.zeros_like(delta)


_ternary_q.defvjp(_ternary_fwd, _ternary_bwd)


def _ternary_threshold(x: jax.Array, config: TernaryConfig) -> jax.Array:
    """``Δ = threshold·mean|x|`` per tensor (per channel for ``scaling="channel"``), float32."""
    return lax.stop_gradient(config.threshold * _mean_abs(x, config.scaling, config.axis))


def ternary_init(x: ArrayLike, config: TernaryConfig) -> dict:
    """Returns ``{}``: the ternary quantizer has no learnable params."""
    x = jnp.asarray(x)
    _check_float(x, "ternary_init")
    if config.scaling == "channel":
        _scale_axes(x.ndim, config.scaling, config.axis)
    return {}


def ternary_scale(x: ArrayLike, config: TernaryConfig) -> jax.Array:
    """The output scale ``α = mean(|x| : |x| > Δ)`` (float32, stop_gradient, keepdims shape).

    Ones for ``scaling="none"``; 0 where no element exceeds ``Δ`` (an all-zero slice).
    ``ternary(x) == α·ternary_codes(x)`` (cast to ``x.dtype``).
    """
    x = jnp.asarray(x)
    _check_float(x, "ternary_scale")
    if config.scaling == "none":
        return jnp.ones((1,) * x.ndim, jnp.float32)
    shape = _scale_shape(x.shape, config.scaling, config.axis)
    ax = jnp.abs(lax.stop_gradient(x).astype(jnp.float32))
    kept = ax > kept_small(_ternary_threshold(x, config))
    # One fused pass for both sums (qflax.quantizers._base.fused_sums; XLA:CPU otherwise writes
    # the masked |x| and the mask out at full size before two separate sums).
    total, count = sums_to_shape((jnp.where(kept, ax, 0.0), kept.astype(jnp.float32)), shape)
    return lax.stop_gradient(total / jnp.maximum(count, 1.0))


def ternary(
    x: ArrayLike,
    params: Mapping[str, Any] | None,
    config: TernaryConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Ternarizes ``x`` to ``{−α, 0, +α}`` (``α = 1`` for ``scaling="none"``).

    Args:
      x: floating array.
      params: ``{}`` (from :func:`ternary_init`).
      config: the quantizer's configuration.
      key: unused (deterministic); accepted for a uniform signature.

    Returns:
      ``α·t`` with ``t = sign(x)·1[|x| > Δ]``, same shape and dtype as ``x``.

    >>> ternary(jnp.array([1.0, -0.2, 0.3, -2.0]), {}, TernaryConfig()).tolist()
    [1.5, 0.0, 0.0, -1.5]
    """
    del key
    x = jnp.asarray(x)
    _check_float(x, "ternary")
    _check_no_params(params, "ternary")
    t = _ternary_q(x, _ternary_threshold(x, config), config)
    if config.scaling == "none":
        return t
    return ternary_scale(x, config).astype(x.dtype) * t


def ternary_codes(
    x: ArrayLike, params: Mapping[str, Any] | None, config: TernaryConfig
) -> jax.Array:
    """Int32 codes in ``{−1, 0, 1}``: ``sign(x)·1[|x| > Δ]``."""
    x = lax.stop_gradient(jnp.asarray(x))
    _check_float(x, "ternary_codes")
    _check_no_params(params, "ternary_codes")
    positive, negative = _ternary_masks(x, _ternary_threshold(x, config))
    return positive.astype(jnp.int32) - negative.astype(jnp.int32)


# ---------------------------------------------------------------------------------- families


class BinaryFamily(QuantizerFamily):
    """``"binary"``: :func:`binary` (scale from the tensor); no learnable params."""

    name = "binary"
    config_types = (BinaryConfig,)

    def bits(self, spec) -> int:
        return 1

    def granularity(self, spec) -> str:
        return spec.config.scaling

    def apply(self, spec, x, params, *, key=None, stats=None):
        return binary(x, {}, spec.config, key=key)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_binary

        return quantize_binary(x, spec.config)

    def weight_lowering(self, spec, params, stats):
        cfg = spec.config
        if cfg.stochastic:
            raise NotExportable("stochastic binary weights have no fixed signs to run")
        return WeightLowering("binary", granularity=cfg.scaling, axis=cfg.axis)

    def input_lowering(self, spec, params, stats):
        cfg = spec.config
        if cfg.stochastic or cfg.scaling != "none":
            raise NotExportable(
                f"binary inputs with stochastic={cfg.stochastic}, scaling={cfg.scaling!r}: "
                "XNOR/popcount runs deterministic, unscaled signs"
            )
        return InputLowering("sign")

    def sign_values(self, spec, x, params, stats):
        y = jnp.where(x >= 0, jnp.float32(1.0), jnp.float32(-1.0))
        return y, binary_scale(x, spec.config)

    def check_int8(self, spec) -> None:
        pass  # codes ±1 (binary) or {−1, 0, 1} (ternary) at the output scale α

    def int8_scale(self, spec, x, params, stats):
        return binary_scale(x, spec.config)


class TernaryFamily(BinaryFamily):
    """``"ternary"``: :func:`ternary` (TWN; threshold and scale from the tensor)."""

    name = "ternary"
    config_types = (TernaryConfig,)

    def bits(self, spec) -> int:
        return 2

    def apply(self, spec, x, params, *, key=None, stats=None):
        return ternary(x, {}, spec.config)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_ternary

        return quantize_ternary(x, spec.config)

    def weight_lowering(self, spec, params, stats):
        # codes {−1, 0, 1} at the scale α: a uniform layer
        return WeightLowering(
            "uniform", code_max=1, granularity=spec.config.scaling, axis=spec.config.axis
        )

    def input_lowering(self, spec, params, stats):
        raise NotExportable("ternary inputs: integer inference runs ternary weights only")

    def sign_values(self, spec, x, params, stats):
        raise NotExportable("ternary weights are not signs")

    def int8_scale(self, spec, x, params, stats):
        return ternary_scale(x, spec.config)


register_family(BinaryFamily())
register_family(TernaryFamily())
