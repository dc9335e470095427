"""LSQ — Esser et al. 2020 (ICLR), eqs. (1)–(3) and the gradient scale of §2.2; METHODS.md §2.

Differs from the paper: the step may be per tensor (the paper), per channel or per group; the
gradient scale then counts the elements that share one step (see below). Signed 1-bit codes
(``QP = 0``) use ``max(QP, 1)`` in the gradient scale and in the init, which the paper leaves
undefined.

Forward, per element of the grouped view ``grouped(x, granularity, axis, group_size)`` with ``s``
the step of the element's slice::

    v = x / s
    x̂ = s · round(clip(v, −QN, QP))       (round = round-half-to-even)

with ``QN = 2^(b−1)``, ``QP = 2^(b−1) − 1`` for signed codes and ``QN = 0``, ``QP = 2^b − 1`` for
unsigned codes. Backward, with the cotangent ``g`` and the paper's strict inside test
``−QN < v < QP``::

    ∂L/∂x = g                          where −QN < v < QP, 0 elsewhere (v on a bound included)
    ∂L/∂s = γ · Σ g · (round(v) − v)   over −QN < v < QP
          + γ · Σ g · (−QN)            over v ≤ −QN
          + γ · Σ g · QP               over v ≥ QP

with the gradient scale ``γ = 1/√(numel · max(QP, 1))`` when ``grad_scale`` (1 otherwise).
``numel`` is the number of elements of ``x`` that share one step: ``x.size`` per tensor (the
paper's ``N_W`` for weights; for activations pass the tensor the step covers), the elements of one
channel per channel (``x.size / x.shape[axis]``), and ``group_size`` per group. The sums run over
those elements.
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

from qflax.numerics import check_bits, check_finite, check_nonempty
from qflax.quantizers._base import (
    check_granularity,
    grouped,
    param_shape,
    reduce_axes,
    sum_to_shape,
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

__all__ = ["LSQConfig", "lsq", "lsq_init", "lsq_numel"]


def _check_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is not a bool; allowed: True, False")
    return bool(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQConfig:
    """Configuration of the LSQ quantizer (hashable; validated at construction).

    >>> LSQConfig(bits=4).qn, LSQConfig(bits=4).qp
    (8, 7)
    >>> LSQConfig(bits=4, signed=False).qp
    15
    """

    # Bit-width b of the integer codes, 1..32.
    bits: int = 8
    # Signed codes [-2^(b-1), 2^(b-1)-1]; unsigned codes [0, 2^b-1].
    signed: bool = True
    # Which elements share a step: "tensor", "channel" or "group" (qflax/quantizers/_base.py).
    granularity: str = "tensor"
    # The channel axis ("channel") or the axis cut into groups ("group"); unused for "tensor".
    axis: int = -1
    # Elements per group along `axis` for granularity="group"; None otherwise.
    group_size: int | None = None
    # Multiply the step's gradient by 1/sqrt(numel * QP) (the paper's gradient scale).
    grad_scale: bool = True

    def __post_init__(self):
        check_bits(self.bits, "bits")
        _check_bool(self.signed, "signed")
        _check_bool(self.grad_scale, "grad_scale")
        check_granularity(self.granularity, self.axis, self.group_size)

    @property
    def qn(self) -> int:
        """``QN``: the magnitude of the most negative code (0 for unsigned codes)."""
        return 2 ** (self.bits - 1) if self.signed else 0

    @property
    def qp(self) -> int:
        """``QP``: the largest code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


def _view_shape(shape: tuple[int, ...], config: LSQConfig) -> tuple[int, ...]:
    """The shape of ``grouped(x, ...)``; raises ValueError for a bad axis or group size."""
    return view_shape(tuple(shape), config.granularity, config.axis, config.group_size)


def _param_shape(shape: tuple[int, ...], config: LSQConfig) -> tuple[int, ...]:
    """The shape of the per-granularity params for a tensor of ``shape``."""
    return param_shape(tuple(shape), config.granularity, config.axis, config.group_size)


def lsq_numel(shape: tuple[int, ...], config: LSQConfig) -> int:
    """The number of elements of a tensor of ``shape`` that share one step."""
    return math.prod(shape) // math.prod(_param_shape(tuple(shape), config))


def _compute_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# The quantizer on the grouped view: one custom_vjp, defined once.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lsq_view(config: LSQConfig, numel: int, x: jax.Array, step: jax.Array) -> jax.Array:
    v = x / step
    return step * jnp.round(jnp.clip(v, -float(config.qn), float(config.qp)))


def _lsq_fwd(config, numel, x, step):
    return _lsq_view(config, numel, x, step), (x, step)


def _lsq_bwd(config, numel, residuals, g):
    x, step = residuals
    qn, qp = float(config.qn), float(config.qp)
    v = x / step
    below = v <= -qn
    above = v >= qp
    inside = ~(below | above)
    dx = jnp.where(inside, g, jnp.zeros_like(g))
    dxhat_ds = jnp.where(inside, jnp.round(v) - v, jnp.where(below, -qn, qp))
    gamma = 1.0 / math.sqrt(numel * max(config.qp, 1)) if config.grad_scale else 1.0
    dstep = sum_to_shape(g * dxhat_ds, step.shape) * gamma
    return dx, dstep


_lsq_view.defvjp(_lsq_fwd, _lsq_bwd)


# --------------------------------------------------------------------------------------------
# Public functions.


def lsq_init(x: ArrayLike, config: LSQConfig) -> dict[str, jax.Array]:
    """The paper's init ``{"step": 2·mean|x| / √QP}`` (float32), per granularity slice.

    ``QP`` is replaced by ``max(QP, 1)`` (signed 1-bit codes have ``QP = 0``), and the step is
    floored at the smallest normal float32 so that an all-zero slice gets ``s > 0``.

    Raises:
      ValueError: if ``x`` is empty (the mean of nothing is NaN), or, when ``x`` is concrete
        (not traced), if it holds NaN or ±inf (the step would be non-finite).
    """
    x = jnp.asarray(x)
    check_nonempty(x, "lsq_init")
    check_finite(x, "lsq_init")
    shape = _param_shape(x.shape, config)
    view = grouped(x.astype(jnp.float32), config.granularity, config.axis, config.group_size)
    axes = reduce_axes(x.ndim, config.granularity, config.axis)
    mean_abs = jnp.mean(jnp.abs(view), axis=axes, keepdims=True)
    step = 2.0 * mean_abs / math.sqrt(max(config.qp, 1))
    step = jnp.maximum(step, float(jnp.finfo(jnp.float32).tiny))
    return {"step": step.reshape(shape)}


def lsq(
    x: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: LSQConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantizes and dequantizes ``x``: ``x̂ = s·round(clip(x/s, −QN, QP))``.

    Args:
      x: a floating array.
      params: ``{"step": s}``, float32 of the params shape (see :func:`lsq_init`).
      config: the quantizer's config.
      key: unused (deterministic); accepted so that all quantizers share one signature.

    Returns:
      ``x̂`` with the shape and dtype of ``x`` (narrow floats are computed in float32).

    Raises:
      ValueError: if ``params`` is not ``{"step": ...}`` of the params shape, or the axis or
        group size does not fit ``x``.

    >>> lsq(jnp.array([0.2, 0.7, 1.3, 9.0]), {"step": jnp.full((1,), 0.5)}, LSQConfig(bits=3))
    Array([0. , 0.5, 1.5, 1.5], dtype=float32)
    """
    del key
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    if not isinstance(params, Mapping) or set(params) != {"step"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params={got!r} is not allowed; allowed: a dict with the key 'step'")
    expected = _param_shape(x.shape, config)
    if jnp.shape(params["step"]) != expected:
        raise ValueError(
            f"params['step'] has shape {jnp.shape(params['step'])}, but a tensor of shape "
            f"{x.shape} with granularity={config.granularity!r}, axis={config.axis}, "
            f"group_size={config.group_size} needs shape {expected}; allowed: exactly {expected}"
        )
    dtype = _compute_dtype(x.dtype)
    step = jnp.asarray(params["step"]).astype(dtype)
    view = grouped(x.astype(dtype), config.granularity, config.axis, config.group_size)
    y = _lsq_view(config, lsq_numel(x.shape, config), view, step)
    return ungrouped(y, x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------------- family


class LSQFamily(QuantizerFamily):
    """``"lsq"``: :func:`lsq` (learned step with the paper's gradient scale and
    ``2·mean|x|/√QP`` initialisation)."""

    name = "lsq"
    config_types = (LSQConfig,)

    def learnable(self, spec) -> bool:
        return True

    def param_tags(self, spec):
        return {"step": ("step",)}

    def init(self, spec, x):
        return {k: compact(v, spec.config.granularity) for k, v in lsq_init(x, spec.config).items()}

    def _full(self, spec, x, params):
        gran, axis = spec.config.granularity, spec.config.axis
        return {k: expand(v, x, gran, axis) for k, v in params.items()}

    def apply(self, spec, x, params, *, key=None, stats=None):
        return lsq(x, self._full(spec, x, params), spec.config)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_lsq

        return quantize_lsq(x, self._full(spec, x, params), spec.config)

    def params_from_codes(self, spec, q):
        return {"step": q.scale}

    def check_int8(self, spec) -> None:
        cfg = spec.config
        if cfg.qp > 127 or cfg.granularity == "group":
            raise NotExportable(
                f"lsq with codes [-{cfg.qn}, {cfg.qp}], granularity={cfg.granularity!r}: an "
                "int8 operand needs codes in [-128, 127] with a step per tensor or channel"
            )

    def int8_scale(self, spec, x, params, stats):
        return jax.lax.stop_gradient(self._full(spec, x, params)["step"])

    def weight_lowering(self, spec, params, stats):
        return WeightLowering("uniform", granularity=spec.config.granularity, axis=spec.config.axis)

    def input_lowering(self, spec, params, stats):
        cfg = spec.config
        if cfg.granularity != "tensor":
            raise NotExportable(
                f"lsq inputs with granularity={cfg.granularity!r}: integer inference runs "
                "one step per tensor"
            )
        step = float(np.asarray(params["step"], np.float32).reshape(()))
        return InputLowering("codes", -cfg.qn, cfg.qp, step)


register_family(LSQFamily())
