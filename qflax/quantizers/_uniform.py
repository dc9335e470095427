"""Uniform affine quantizer — Jacob et al. 2018 (CVPR), eq. (1) ``r = S·(q − Z)``; METHODS.md §1.

Differs from the paper: the paper quantizes only at inference time; here the quantizer is also a
training-time function with a choice of gradients (straight-through, clipped straight-through,
true), and with an optional learned step (the LSQ-style gradient, without LSQ's gradient scale
``1/√(numel·QP)``, which belongs to the LSQ quantizer) and learned zero point.

Forward, per element of the grouped view ``grouped(x, granularity, axis, group_size)``, with
``s`` the scale and ``z`` the zero point of the element's group::

    u  = x / s
    z' = round(z)                          (0 when symmetric; an integer, so codes are integers)
    v  = u + z'                            (the pre-round code)
    q  = clip(round(u) + z', qmin, qmax)   (the integer code; round = round-half-to-even)
    x̂  = s · (q − z')

Backward, with the inside mask ``m = 1[qmin ≤ v ≤ qmax]`` (on the pre-round ``v``, both bounds
inclusive) and ``g`` the cotangent of ``x̂``::

    ∂L/∂x = g                              gradient="ste"          (identity straight-through)
          = g · m                          gradient="clipped_ste"  (zero outside the range)
          = 0                              gradient="true"         (round is flat almost everywhere)
    ∂L/∂s = Σ g · (round(u) − u)           where m = 1  (LSQ: straight-through round)
          + Σ g · (q − z')                 where m = 0  (q = qmin or qmax: the exact derivative)
                                           (0 everywhere unless learn_scale)
    ∂L/∂z = Σ g · (−s)                     where m = 0  (0 inside; straight-through round(z))
                                           (0 everywhere unless learn_zero_point)

The sums run over the elements that share the parameter (the whole tensor, a channel or a group).
The mask is on ``v``, not on the rounded code: an element with ``qmax < v ≤ qmax + ½`` is coded
``qmax`` within half a step, yet counts as outside (zero ``clipped_ste`` gradient, scale gradient
``qmax − z'``); likewise below ``qmin``. Elements exactly on an end of the range (where
:func:`uniform_init` puts the extremes of the data) are inside in exact arithmetic; in float32
their side depends on the rounding of ``x / s``, which XLA may compute differently under ``jit``
than eagerly.
``gradient`` selects only the gradient to ``x``; the gradients to ``s`` and ``z`` use the formulas
above for every choice of ``gradient``. For ``symmetric=True`` the zero point is 0 whatever
``params["zero_point"]`` holds, and its gradient is 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics import (
    check_bits,
    check_choice,
    check_finite,
    check_nonempty,
    check_positive,
    int_range,
)
from qflax.quantizers._base import (
    check_granularity,
    grouped,
    param_shape,
    reduce_axes,
    sums_to_shape,
    ungrouped,
    view_shape,
)
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
    "UNIFORM_GRADIENTS",
    "UniformConfig",
    "uniform",
    "uniform_codes",
    "uniform_dequantize",
    "uniform_init",
]

UNIFORM_GRADIENTS = ("ste", "clipped_ste", "true")

_PARAM_NAMES = ("scale", "zero_point")


def _check_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is not a bool; allowed: True, False")
    return bool(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformConfig:
    """Configuration of the uniform affine quantizer (hashable; validated at construction).

    >>> UniformConfig(bits=4).qmin, UniformConfig(bits=4).qmax
    (-8, 7)
    >>> UniformConfig(bits=4, signed=False, symmetric=False).qmax
    15
    """

    # Bit-width b of the integer codes, 1..32.
    bits: int = 8
    # Signed codes [-2^(b-1), 2^(b-1)-1]; unsigned codes [0, 2^b-1].
    signed: bool = True
    # True: the zero point is fixed at 0; False: an (integer) zero point shifts the grid.
    symmetric: bool = True
    # Drop the most negative signed code (±(2^(b-1)-1)), or the largest unsigned code.
    narrow_range: bool = False
    # Which elements share a scale: "tensor", "channel" or "group" (see qflax/quantizers/_base.py).
    granularity: str = "tensor"
    # The channel axis ("channel") or the axis cut into groups ("group"); unused for "tensor".
    axis: int = -1
    # Elements per group along `axis` for granularity="group"; None otherwise.
    group_size: int | None = None
    # Gradient to x: "ste" identity, "clipped_ste" zero outside the range, "true" zero (a.e.).
    gradient: str = "ste"
    # Whether the scale receives its (LSQ-style) gradient; zero gradient otherwise.
    learn_scale: bool = False
    # Whether the zero point receives its gradient; only with symmetric=False.
    learn_zero_point: bool = False

    def __post_init__(self):
        check_bits(self.bits, "bits")
        for field in ("signed", "symmetric", "narrow_range", "learn_scale", "learn_zero_point"):
            _check_bool(getattr(self, field), field)
        qmin, qmax = int_range(self.bits, self.signed, self.narrow_range)
        if qmax <= qmin:
            raise ValueError(
                f"narrow_range=True with bits={self.bits} and signed={self.signed} leaves one "
                "level; allowed: narrow_range=False, or bits >= 2"
            )
        check_granularity(self.granularity, self.axis, self.group_size)
        check_choice(self.gradient, "gradient", UNIFORM_GRADIENTS)
        if self.learn_zero_point and self.symmetric:
            raise ValueError(
                "learn_zero_point=True needs a zero point, but symmetric=True fixes it at 0; "
                "allowed: learn_zero_point=False with symmetric=True, or symmetric=False"
            )

    @property
    def qmin(self) -> int:
        """The smallest integer code."""
        return int_range(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        """The largest integer code."""
        return int_range(self.bits, self.signed, self.narrow_range)[1]


# --------------------------------------------------------------------------------------------
# Shapes, dtypes and bounds.


def _view_shape(shape: tuple[int, ...], config: UniformConfig) -> tuple[int, ...]:
    """The shape of ``grouped(x, ...)``; raises ValueError for a bad axis or group size."""
    return view_shape(tuple(shape), config.granularity, config.axis, config.group_size)


def _param_shape(shape: tuple[int, ...], config: UniformConfig) -> tuple[int, ...]:
    """The shape of the per-granularity params for a tensor of ``shape``."""
    return param_shape(tuple(shape), config.granularity, config.axis, config.group_size)


def _compute_dtype(dtype) -> np.dtype:
    """float32 for narrower floats (bf16, f16); the dtype itself for float32/float64."""
    dtype = np.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else np.dtype(np.float32)


def _float_bounds(config: UniformConfig, dtype) -> tuple[float, float]:
    """``qmin``, ``qmax`` as floats of ``dtype``, rounded toward the inside of the range.

    Exact for ``bits <= 24`` in float32; for wider codes the largest representable codes inside
    ``[qmin, qmax]`` (so the cast of a clipped code to the integer dtype never overflows).
    """
    dtype = np.dtype(dtype)
    lo, hi = dtype.type(config.qmin), dtype.type(config.qmax)
    if float(lo) < config.qmin:
        lo = np.nextafter(lo, dtype.type(0))
    if float(hi) > config.qmax:
        hi = np.nextafter(hi, dtype.type(0))
    return float(lo), float(hi)


def _code_dtype(config: UniformConfig) -> np.dtype:
    """int32, or uint32 for 32-bit unsigned codes (which int32 cannot hold)."""
    return np.dtype(np.int32 if config.qmax <= np.iinfo(np.int32).max else np.uint32)


def _check_floating(x: jax.Array, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")


def _prepare_params(
    params: Mapping[str, ArrayLike], shape: tuple[int, ...], config: UniformConfig, dtype
) -> tuple[jax.Array, jax.Array]:
    """Checks ``params`` against a tensor of ``shape`` and returns ``(scale, zero_point)``."""
    if not isinstance(params, Mapping):
        raise ValueError(
            f"params must be a dict with keys {_PARAM_NAMES}, got {type(params).__name__}"
        )
    unknown = sorted(set(params) - set(_PARAM_NAMES))
    if unknown:
        raise ValueError(f"params has unknown keys {unknown}; allowed: {list(_PARAM_NAMES)}")
    required = ("scale",) if config.symmetric else _PARAM_NAMES
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(
            f"params is missing {missing}; allowed: a dict with keys {list(required)} "
            f"(symmetric={config.symmetric}), as returned by uniform_init"
        )
    expected = _param_shape(shape, config)
    for name in _PARAM_NAMES:
        if name in params and jnp.shape(params[name]) != expected:
            raise ValueError(
                f"params[{name!r}] has shape {jnp.shape(params[name])}, but a tensor of shape "
                f"{tuple(shape)} with granularity={config.granularity!r}, axis={config.axis}, "
                f"group_size={config.group_size} needs shape {expected}; allowed: exactly "
                f"{expected}"
            )
    scale = jnp.asarray(params["scale"]).astype(dtype)
    if "zero_point" in params:
        zero_point = jnp.asarray(params["zero_point"]).astype(dtype)
    else:
        zero_point = jnp.zeros(expected, dtype)
    return scale, zero_point


# --------------------------------------------------------------------------------------------
# The quantizer on the grouped view: one custom_vjp, defined once.


def _integer_zero_point(config: UniformConfig, zero_point: jax.Array) -> jax.Array:
    return jnp.zeros_like(zero_point) if config.symmetric else jnp.round(zero_point)


def _float_codes(
    config: UniformConfig, x: jax.Array, scale: jax.Array, zero_point: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Returns the codes ``q`` (integer-valued floats) and the integer zero point ``z'``."""
    lo, hi = _float_bounds(config, x.dtype)
    z = _integer_zero_point(config, zero_point)
    q = jnp.clip(jnp.round(x / scale) + z, lo, hi)
    return q, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _uniform_view(
    config: UniformConfig, x: jax.Array, scale: jax.Array, zero_point: jax.Array
) -> jax.Array:
    q, z = _float_codes(config, x, scale, zero_point)
    return scale * (q - z)


def _uniform_fwd(config, x, scale, zero_point):
    return _uniform_view(config, x, scale, zero_point), (x, scale, zero_point)


def _uniform_bwd(config, residuals, g):
    x, scale, zero_point = residuals
    lo, hi = _float_bounds(config, x.dtype)
    q, z = _float_codes(config, x, scale, zero_point)
    u = x / scale
    v = u + z
    inside = (v >= lo) & (v <= hi)  # on the pre-round code, both bounds inclusive

    if config.gradient == "ste":
        dx = g
    elif config.gradient == "clipped_ste":
        dx = jnp.where(inside, g, jnp.zeros_like(g))
    else:  # "true"
        dx = jnp.zeros_like(g)

    # The scale and zero-point sums share one pass over x and g (one multi-output reduction).
    terms = []
    if config.learn_scale:
        dxhat_ds = jnp.where(inside, jnp.round(u) - u, q - z)
        terms.append(g * dxhat_ds)
    if config.learn_zero_point:
        dxhat_dz = jnp.where(inside, jnp.zeros_like(x), -jnp.broadcast_to(scale, x.shape))
        terms.append(g * dxhat_dz)
    sums = list(sums_to_shape(tuple(terms), scale.shape)) if terms else []
    dscale = sums.pop(0) if config.learn_scale else jnp.zeros_like(scale)
    dzero = sums.pop(0) if config.learn_zero_point else jnp.zeros_like(zero_point)
    return dx, dscale, dzero


_uniform_view.defvjp(_uniform_fwd, _uniform_bwd)


# --------------------------------------------------------------------------------------------
# Public functions.


_MIN_SCALE = float(np.finfo(np.float32).tiny)


def symmetric_params(amax: jax.Array, qmax: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = max(amax, 0) / qmax`` (at least the smallest normal float32), ``z = 0``.

    The one place where a symmetric range becomes ``(scale, zero_point)``; shared with
    ``qflax.calibration``.
    """
    scale = jnp.maximum(jnp.maximum(amax, 0.0) / qmax, _MIN_SCALE)
    return scale, jnp.zeros_like(scale)


def affine_params(
    lo: jax.Array, hi: jax.Array, qmin: int | jax.Array, qmax: int | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Maps ``[min(lo, 0), max(hi, 0)]`` onto ``[qmin, qmax]`` with 0 on an integer code.

    ``s = (hi − lo) / (qmax − qmin)`` (at least the smallest normal float32),
    ``z = qmin − round(lo / s)``. Shared with ``qflax.calibration``.
    """
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = jnp.maximum((hi - lo) / (qmax - qmin), _MIN_SCALE)
    # lo / s lies in [-(qmax - qmin), 0], so z lies in [qmin, qmax]; the clip only absorbs
    # float rounding.
    zero_point = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
    return scale, zero_point


def uniform_init(x: ArrayLike, config: UniformConfig) -> dict[str, jax.Array]:
    """Data-dependent params ``{"scale": s, "zero_point": z}`` (float32) from the range of ``x``.

    * symmetric, signed: ``s = max|x| / qmax``, so ``±max|x|`` map to ``±qmax`` (for signed 1-bit
      codes ``{−1, 0}``, where ``qmax = 0``: ``s = max|x| / 1``, so ``−max|x|`` maps to ``−1``);
      ``z = 0``.
    * symmetric, unsigned: ``s = max(max x, 0) / qmax``; ``z = 0``.
    * asymmetric: the range ``[lo, hi] = [min(min x, 0), max(max x, 0)]`` (it always holds 0, so
      0 is exactly representable), ``s = (hi − lo) / (qmax − qmin)``,
      ``z = qmin − round(lo / s)``, an integer in ``[qmin, qmax]``.

    The statistics are taken at the config's granularity; ``s`` is floored at the smallest normal
    float32 so that an all-zero tensor (or group) gets ``s > 0``.

    Args:
      x: the tensor to be quantized (any real dtype; the statistics are taken in float32).
      config: the quantizer's config.

    Returns:
      ``{"scale": s, "zero_point": z}``, float32 arrays of the params shape (they broadcast
      against ``grouped(x, ...)``).

    Raises:
      ValueError: if ``x`` is empty (at any time: shapes are static), or, when ``x`` is concrete
        (not traced by ``jit``/``vmap``/``grad``), if it holds NaN or ±inf: one ``inf`` would
        make an infinite scale and a NaN tensor. A traced ``x`` is not checked; its non-finite
        values give a non-finite scale (and so NaN in :func:`uniform`), which the training
        loop's non-finite check reports.
    """
    x = jnp.asarray(x)
    check_nonempty(x, "uniform_init")
    check_finite(x, "uniform_init")
    return _uniform_stats(x, config)


def _uniform_stats(x: jax.Array, config: UniformConfig) -> dict[str, jax.Array]:
    """:func:`uniform_init` without the value checks (a dynamic scale: NaN must propagate)."""
    shape = _param_shape(x.shape, config)  # validates axis and group size before any work
    view = grouped(x.astype(jnp.float32), config.granularity, config.axis, config.group_size)
    axes = reduce_axes(x.ndim, config.granularity, config.axis)
    qmin, qmax = config.qmin, config.qmax
    if config.symmetric:
        if config.signed:
            top = jnp.max(jnp.abs(view), axis=axes, keepdims=True)
            denominator = qmax if qmax > 0 else -qmin
        else:
            top = jnp.max(view, axis=axes, keepdims=True)
            denominator = qmax
        scale, zero_point = symmetric_params(top, float(denominator))
    else:
        lo = jnp.min(view, axis=axes, keepdims=True)
        hi = jnp.max(view, axis=axes, keepdims=True)
        scale, zero_point = affine_params(lo, hi, float(qmin), float(qmax))
    return {"scale": scale.reshape(shape), "zero_point": zero_point.reshape(shape)}


def uniform(
    x: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: UniformConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantizes and dequantizes ``x``: ``x̂ = s·(clip(round(x/s) + z, qmin, qmax) − z)``.

    Pure and elementwise on the grouped view; the gradients are those in the module docstring.
    Narrow float inputs (bfloat16, float16) are computed in float32 and cast back.

    Args:
      x: a floating array.
      params: ``{"scale": s, "zero_point": z}`` of the params shape (see :func:`uniform_init`);
        ``"zero_point"`` may be left out when ``config.symmetric``.
      config: the quantizer's config.
      key: unused (the quantizer is deterministic); accepted so that all quantizers share one
        signature.

    Returns:
      ``x̂``, with the shape and dtype of ``x``.

    Non-finite values: NaN stays NaN (``round`` and ``clip`` keep it), so a NaN in training stays
    visible to the loop's non-finite check instead of being hidden behind a finite code; ``±inf``
    saturates to ``s·(qmax − z')`` / ``s·(qmin − z')`` like any value beyond the range.

    Raises:
      ValueError: if the params' shapes do not fit ``x`` at this granularity, or the axis or
        group size does not fit ``x``; or, for a concrete scale (not traced), if a scale is
        ``<= 0`` or non-finite (``s = 0`` divides by zero, a negative ``s`` flips the grid).
        A traced scale is not checked.

    >>> config = UniformConfig(bits=4)
    >>> x = jnp.array([0.25, 0.75, 1.25, 9.0])
    >>> uniform(x, {"scale": jnp.full((1,), 0.5)}, config).tolist()
    [0.0, 1.0, 1.0, 3.5]
    """
    del key
    return _uniform_impl(x, params, config, check=True)


def _uniform_impl(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: UniformConfig, *, check: bool
) -> jax.Array:
    """:func:`uniform`; ``check=False`` skips the scale's value check (a dynamic scale computed
    from ``x``, where a NaN must propagate)."""
    x = jnp.asarray(x)
    _check_floating(x, "x")
    dtype = _compute_dtype(x.dtype)
    scale, zero_point = _prepare_params(params, x.shape, config, dtype)
    if check:
        check_positive(params["scale"], "uniform", "params['scale']")
    view = grouped(x.astype(dtype), config.granularity, config.axis, config.group_size)
    y = _uniform_view(config, view, scale, zero_point)
    return ungrouped(y, x.shape).astype(x.dtype)


def uniform_codes(
    x: ArrayLike, params: Mapping[str, ArrayLike], config: UniformConfig
) -> jax.Array:
    """The integer codes ``q = clip(round(x/s) + round(z), qmin, qmax)`` (no gradient).

    Returns an int32 array of ``x``'s shape (uint32 for 32-bit unsigned codes, which int32 cannot
    hold). ``uniform_dequantize(uniform_codes(x, p, c), p, c, dtype=x.dtype)`` equals
    ``uniform(x, p, c)`` exactly for finite ``x``.

    Integer codes cannot hold NaN, so a concrete ``x`` (not traced) holding NaN or ±inf raises
    ValueError naming their count and the first index, and a concrete scale ``<= 0`` or
    non-finite raises as in :func:`uniform`. Under ``jit``/``vmap`` nothing can raise: ±inf
    saturate to ``qmax``/``qmin`` and NaN becomes whatever code XLA converts NaN to (0 on CPU),
    which decodes to a finite value — check ``jnp.isfinite(x).all()`` yourself there.
    """
    x = jax.lax.stop_gradient(jnp.asarray(x))
    _check_floating(x, "x")
    dtype = _compute_dtype(x.dtype)
    scale, zero_point = _prepare_params(params, x.shape, config, dtype)
    check_finite(x, "uniform_codes")
    check_positive(params["scale"], "uniform_codes", "params['scale']")
    scale, zero_point = jax.lax.stop_gradient((scale, zero_point))
    view = grouped(x.astype(dtype), config.granularity, config.axis, config.group_size)
    q, _ = _float_codes(config, view, scale, zero_point)
    return ungrouped(q, x.shape).astype(_code_dtype(config))


def uniform_dequantize(
    q: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: UniformConfig,
    *,
    dtype=jnp.float32,
) -> jax.Array:
    """``x̂ = s·(q − round(z))`` from integer codes ``q`` (the inverse map of the grid).

    Args:
      q: integer codes of the tensor's shape, as returned by :func:`uniform_codes`.
      params: the params the codes were made with.
      config: the quantizer's config.
      dtype: the floating dtype of the result (computed in float32 when narrower).

    Returns:
      ``x̂`` of ``q``'s shape and ``dtype``.

    Raises:
      ValueError: for a concrete scale ``<= 0`` or non-finite (as :func:`uniform`).
    """
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise TypeError(f"q must be an integer array of codes, got dtype {q.dtype}")
    compute = _compute_dtype(dtype)
    scale, zero_point = _prepare_params(params, q.shape, config, compute)
    check_positive(params["scale"], "uniform_dequantize", "params['scale']")
    view = grouped(q.astype(compute), config.granularity, config.axis, config.group_size)
    z = _integer_zero_point(config, zero_point)
    return ungrouped(scale * (view - z), q.shape).astype(dtype)


# ---------------------------------------------------------------------------------- families


def _symmetric_only(params: dict[str, jax.Array], config: UniformConfig) -> dict[str, jax.Array]:
    return {"scale": params["scale"]} if config.symmetric else params


class AbsmaxFamily(QuantizerFamily):
    """``"absmax"``: :func:`uniform` with the scale recomputed from the tensor on every call
    (``uniform_init`` of ``stop_gradient(x)``); no learnable params."""

    name = "absmax"
    config_types = (UniformConfig,)

    def roles(self, spec):
        return ("weight", "act", "grad")

    def check(self, spec) -> None:
        if spec.config.learn_scale or spec.config.learn_zero_point:
            raise ValueError(
                "config.learn_scale/learn_zero_point=True is not allowed for kind='absmax' (its "
                "scale is recomputed from the tensor); allowed: False, or kind='learned_step'"
            )

    def scale_count(self, spec, shape) -> int:
        per = 1 if spec.config.symmetric else 2
        return per * super().scale_count(spec, shape)

    def _params(self, spec, x):
        # Unchecked: a dynamic scale of a non-finite tensor stays non-finite (NaN propagates).
        stats = jax.lax.stop_gradient(_uniform_stats(jax.lax.stop_gradient(x), spec.config))
        return _symmetric_only(stats, spec.config)

    def apply(self, spec, x, params, *, key=None, stats=None):
        return _uniform_impl(x, self._params(spec, x), spec.config, check=False)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_uniform

        return quantize_uniform(
            x, _symmetric_only(uniform_init(x, spec.config), spec.config), spec.config
        )

    def weight_lowering(self, spec, params, stats):
        cfg = spec.config
        if not cfg.symmetric or cfg.bits > 8:
            raise NotExportable(
                f"{self.name} weights with symmetric={cfg.symmetric}, bits={cfg.bits}: integer "
                "inference runs symmetric codes of <= 8 bits"
            )
        return WeightLowering(
            "uniform",
            code_max=max(abs(cfg.qmin), cfg.qmax),
            granularity=cfg.granularity,
            axis=cfg.axis,
        )

    def check_int8(self, spec) -> None:
        cfg = spec.config
        if not cfg.symmetric or cfg.qmin < -128 or cfg.qmax > 127 or cfg.granularity == "group":
            raise NotExportable(
                f"{self.name} with symmetric={cfg.symmetric}, codes [{cfg.qmin}, {cfg.qmax}], "
                f"granularity={cfg.granularity!r}: an int8 operand needs symmetric codes in "
                "[-128, 127] with a scale per tensor or channel"
            )

    def int8_scale(self, spec, x, params, stats):
        if self.learnable(spec):
            return jax.lax.stop_gradient(self._full(spec, x, params)["scale"])
        return self._params(spec, x)["scale"]

    def input_lowering(self, spec, params, stats):
        cfg = spec.config
        if not cfg.symmetric or cfg.granularity != "tensor":
            raise NotExportable(
                f"{self.name} inputs with symmetric={cfg.symmetric}, granularity="
                f"{cfg.granularity!r}: integer inference runs symmetric codes per tensor"
            )
        if self.learnable(spec):  # learned_step: the learned scale (a given one replaces it)
            scale = params.get("scale")
            if scale is not None and not isinstance(scale, jax.core.Tracer):
                scale = float(np.asarray(scale, np.float32).reshape(()))
            else:  # traced (a reference under jit): only how scales apply is asked
                scale = None
            return InputLowering("codes", cfg.qmin, cfg.qmax, scale, static="optional")
        return InputLowering("codes", cfg.qmin, cfg.qmax, None, static="required")


class LearnedStepFamily(AbsmaxFamily):
    """``"learned_step"``: :func:`uniform` with ``learn_scale=True``; the scale (and the zero
    point when asymmetric) is a learnable param initialised from data by ``uniform_init``."""

    name = "learned_step"

    def roles(self, spec):
        return ("weight", "act")

    def default_config(self) -> UniformConfig:
        return UniformConfig(learn_scale=True)

    def check(self, spec) -> None:
        if not spec.config.learn_scale:
            raise ValueError(
                "config.learn_scale=False is not allowed for kind='learned_step'; allowed: True"
            )

    def learnable(self, spec) -> bool:
        return True

    def param_tags(self, spec):
        return {"scale": ("step",)}

    def init(self, spec, x):
        params = _symmetric_only(uniform_init(x, spec.config), spec.config)
        return {k: compact(v, spec.config.granularity) for k, v in params.items()}

    def _full(self, spec, x, params):
        if "scale" not in params:
            raise ValueError(
                "params is missing 'scale' for kind='learned_step'; allowed: the dict "
                "returned by TensorQuant.init"
            )
        gran, axis = spec.config.granularity, spec.config.axis
        return {k: expand(v, x, gran, axis) for k, v in params.items()}

    def apply(self, spec, x, params, *, key=None, stats=None):
        return uniform(x, self._full(spec, x, params), spec.config, key=key)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_uniform

        return quantize_uniform(x, self._full(spec, x, params), spec.config)

    def params_from_codes(self, spec, q):
        out = {"scale": q.scale}
        if q.zero_point is not None:
            out["zero_point"] = q.zero_point
        return out


register_family(AbsmaxFamily())
register_family(LearnedStepFamily())
