"""CoDeQ dead-zone quantizer (saintslab/CoDeQ, ``DeadZoneLDZCompander``; METHODS.md §6).

Joint pruning and quantization with a learnable dead-zone width and a learnable bit-width, per
tensor (one layer's weights). Same forward as the authors' code [code]; what differs: the
straight-through gradients are written out as one ``custom_vjp`` (formulas below, our reading of
the authors' ``RoundSTE``/``ClampSTE``/``ReluSTE`` composition [inferred]), the top level ``a`` is
a configurable quantile, the bit-width can be fixed, and a ``"clipped_ste"`` variant is offered.

Forward, with ``θ_d = params["theta_d"]``, ``θ_b = params["theta_b"]`` (scalars)::

    a     = sg(quantile(|w|, config.quantile))            (linear interpolation, no gradient)
    B     = round(6·|tanh θ_b| + 2) ∈ {2, …, 8}           (or config.fixed_bits)
    d     = 2a·(1 − |tanh θ_d|)                           (dead-zone width: |w| < d/2 → 0)
    Q     = 2^(B−1) − 1                                   (codes −Q..Q; 2^(B−1) from exponent bits)
    s     = (a − d/2)/(Q − ½) + 1e-8                      (the authors' eps guards d = 2a)
    shift = d/2 − s/2
    u     = sign(w)·relu(|w| − shift)/s                   (the pre-round code)
    q     = clip(round(u), −Q, Q)                         (round half to even)
    ŵ     = s·q + shift·sign(q)

so the levels are 0 and ``±(shift + s·k)``, ``k = 1..Q``: the first nonzero level is ``d/2 + s/2``
and the top level (``k = Q``) is ``a`` (+ ``Q·1e-8``). ``|w| < d/2`` (the dead zone) gives exactly 0
(``|w| = d/2`` too: ``u = ½`` rounds to even 0).

Backward. The authors' STEs replace ``round``, ``clip`` and ``relu`` by the identity in the chain
rule (``sign`` keeps its zero derivative). Written out, with ``g`` the cotangent of ``ŵ``, the
relu mask ``m_r`` and the clip mask ``m_c`` (both 1 for ``gradient="ste"``, the authors' choice;
``m_r = 1[|w| > shift]`` and ``m_c = 1[|u| ≤ Q]`` for ``gradient="clipped_ste"``, which keeps the
straight-through ``round`` only)::

    ∂ŵ/∂w     = m_c·m_r                                   (so ∂L/∂w = g under "ste")
    ∂ŵ/∂s     = q − m_c·u
    ∂ŵ/∂shift = sign(q) − m_c·m_r·sign(w)

(at ``w = 0`` exactly, the authors' graph gives ``∂ŵ/∂w = sign(0)² = 0``; we give ``m_c·m_r``.)
The clip bounds ``±Q`` get no gradient (as in ``ClampSTE``). The scalar chain is then ordinary
calculus, with ``ΣG_s = Σ g·∂ŵ/∂s`` and ``ΣG_shift = Σ g·∂ŵ/∂shift`` over the tensor::

    ∂L/∂d  = ΣG_s·∂s/∂d + ΣG_shift·(½ − ½·∂s/∂d),   ∂s/∂d = −1/(2(Q − ½))
    ∂L/∂Q  = (ΣG_s − ½·ΣG_shift)·∂s/∂Q,             ∂s/∂Q = −(a − d/2)/(Q − ½)²
    ∂L/∂θ_d = ∂L/∂d · (−2a·sign(θ_d)·(1 − tanh²θ_d))
    ∂L/∂B  = ∂L/∂Q · ln2·2^(B−1)                     (Q treated as a smooth function of B)
    ∂L/∂θ_b = ∂L/∂B · 6·sign(θ_b)·(1 − tanh²θ_b)     (straight-through round of the bit-width)

``∂L/∂θ_b = 0`` with ``fixed_bits``. Only the elementwise part is a ``custom_vjp``; the scalar
chain is differentiated by JAX (through the STE round of ``B`` and the exact ``2^(B−1)``, each a
module-level ``custom_vjp``). Decoupled weight decay on ``θ_d`` and ``θ_b`` (METHODS §6) belongs
to the optimizer, not here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from qflax.numerics import check_bits, check_choice, exp2
from qflax.quantizers._family import (
    NotExportable,
    QuantizerFamily,
    WeightLowering,
    register_family,
)
from qflax.quantizers._pow2 import _check_float

__all__ = [
    "CODEQ_GRADIENTS",
    "CoDeQConfig",
    "codeq",
    "codeq_bits",
    "codeq_codes",
    "codeq_deadzone",
    "codeq_init",
    "codeq_sparsity",
]

CODEQ_GRADIENTS = ("ste", "clipped_ste")

_PARAM_NAMES = ("theta_b", "theta_d")
_STEP_EPS = 1e-8  # added to the step, as in the authors' code
_MIN_BITS, _MAX_BITS = 2, 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoDeQConfig:
    """Configuration of the CoDeQ dead-zone quantizer (module docstring for the formulas).

    >>> CoDeQConfig(fixed_bits=4).fixed_bits
    4
    """

    # A fixed bit-width 2..8 (theta_b then gets no gradient), or None to learn it from theta_b.
    fixed_bits: int | None = None
    # The quantile of |w| that sets the top level a; in (0, 1]. The authors use 0.99.
    quantile: float = 0.99
    # "ste": identity through round, clip and relu (authors); "clipped_ste": through round only.
    gradient: str = "ste"

    def __post_init__(self):
        if self.fixed_bits is not None:
            object.__setattr__(
                self, "fixed_bits", check_bits(self.fixed_bits, "fixed_bits", _MIN_BITS, _MAX_BITS)
            )
        allowed = "allowed: a float in (0, 1]"
        if isinstance(self.quantile, (bool, np.bool_)) or not isinstance(
            self.quantile, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"quantile={self.quantile!r} is not a number; {allowed}")
        if not 0.0 < float(self.quantile) <= 1.0:
            raise ValueError(f"quantile={self.quantile!r} is out of range; {allowed}")
        object.__setattr__(self, "quantile", float(self.quantile))
        check_choice(self.gradient, "gradient", CODEQ_GRADIENTS)


# ----------------------------------------------------------------------------------------------
# Custom VJPs (each defined once, at module level).


@jax.custom_vjp
def _round_ste(x: jax.Array) -> jax.Array:
    """``round(x)`` (half to even) with the identity gradient."""
    return jnp.round(x)


def _round_ste_fwd(x):
    return jnp.round(x), None


def _round_ste_bwd(_, g):
    return (g,)


_round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


def _codes_float(w, step, shift, q_max):
    """Returns the pre-round code ``u`` and the clipped code ``q`` (integer-valued floats)."""
    sign_w = jnp.sign(w)
    u = sign_w * jnp.maximum(jnp.abs(w) - shift, 0.0) / step
    q = jnp.clip(jnp.round(u), -q_max, q_max)
    return u, q


def _core_value(w, step, shift, q_max):
    _, q = _codes_float(w, step, shift, q_max)
    return jnp.where(q == 0, 0.0, step * q + shift * jnp.sign(q))  # +0.0, never -0.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _codeq_core(w, step, shift, q_max, config: CoDeQConfig):
    del config
    return _core_value(w, step, shift, q_max)


def _codeq_core_fwd(w, step, shift, q_max, config):
    del config
    return _core_value(w, step, shift, q_max), (w, step, shift, q_max)


def _codeq_core_bwd(config, res, g):
    w, step, shift, q_max = res
    u, q = _codes_float(w, step, shift, q_max)
    sign_w = jnp.sign(w)
    if config.gradient == "ste":
        m = jnp.ones_like(w)
        m_c = m
    else:  # "clipped_ste"
        m_c = (jnp.abs(u) <= q_max).astype(w.dtype)
        m = m_c * (jnp.abs(w) > shift).astype(w.dtype)
    dw = g * m
    dstep = jnp.sum(g * (q - m_c * u))
    dshift = jnp.sum(g * (jnp.sign(q) - m * sign_w))
    return dw, dstep.astype(step.dtype), dshift.astype(shift.dtype), jnp.zeros_like(q_max)


_codeq_core.defvjp(_codeq_core_fwd, _codeq_core_bwd)


# ----------------------------------------------------------------------------------------------
# Parameters and the scalar chain.


def _check_params(params: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(params, Mapping) or set(params) != set(_PARAM_NAMES):
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"params={keys!r} is not allowed; allowed: a dict with the keys 'theta_d' and "
            "'theta_b' (scalars), as returned by codeq_init"
        )
    out = []
    for name in ("theta_d", "theta_b"):
        theta = jnp.asarray(params[name])
        if theta.shape != ():
            raise ValueError(f"params[{name!r}] has shape {theta.shape}; allowed: a scalar ()")
        if not jnp.issubdtype(theta.dtype, jnp.floating):
            raise ValueError(f"params[{name!r}] has dtype {theta.dtype}; allowed: a float dtype")
        out.append(theta.astype(jnp.float32))
    return out[0], out[1]


_INF_BITS = 0x7F800000  # the bits of +inf; larger bits (as uint32) are NaN
_NAN_BITS = 0x7FC00000


def _count_at_most(bits: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.sum(bits <= v, dtype=jnp.int32)


def _select_bits(bits: jax.Array, k: jax.Array) -> jax.Array:
    """The bits of the ``k``-th smallest (0-based) of non-negative floats given as uint32 bits.

    For floats ``≥ 0`` the order of the bits is the order of the values, so a binary search on
    the bits (31 counting passes over the data, no sort) finds the exact order statistic.
    """

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = _count_at_most(bits, mid) > k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = lax.fori_loop(0, 31, step, (jnp.uint32(0), jnp.uint32(_INF_BITS)))
    return lo


@jax.jit
def _abs_quantile(a: jax.Array, q: jax.Array) -> jax.Array:
    """``jnp.quantile(a, q)`` (linear interpolation) for a float32 ``a ≥ 0``, without sorting.

    The two order statistics come from :func:`_select_bits`; the interpolation repeats
    ``jnp.quantile``'s arithmetic op for op (same dtype as ``q``), so the value agrees within 1 ulp
    (XLA may contract the final multiply-add differently, as it does for ``jnp.quantile`` itself
    between eager and jit). Any NaN gives NaN, as ``jnp.quantile``.
    """
    bits = lax.bitcast_convert_type(a.ravel(), jnp.uint32)
    n = lax.convert_element_type(bits.shape[0], q.dtype)
    position = q * (n - 1)
    low, high = jnp.floor(position), jnp.ceil(position)
    high_weight = position - low
    low_weight = 1 - high_weight
    low = jnp.clip(low, 0, n - 1).astype(jnp.int32)
    high = jnp.clip(high, 0, n - 1).astype(jnp.int32)
    low_bits = _select_bits(bits, low)
    # high is low or low + 1: the next order statistic is low_bits again (a tie) or the
    # smallest larger value.
    larger = jnp.min(jnp.where(bits > low_bits, bits, jnp.uint32(0xFFFFFFFF)))
    high_bits = jnp.where(_count_at_most(bits, low_bits) > high, low_bits, larger)
    any_nan = jnp.max(bits) > _INF_BITS
    low_bits = jnp.where(any_nan, jnp.uint32(_NAN_BITS), low_bits)
    high_bits = jnp.where(any_nan, jnp.uint32(_NAN_BITS), high_bits)
    low_value = lax.bitcast_convert_type(low_bits, jnp.float32).astype(q.dtype)
    high_value = lax.bitcast_convert_type(high_bits, jnp.float32).astype(q.dtype)
    return (low_value * low_weight + high_value * high_weight).astype(jnp.float32)


def _absmax(w: jax.Array, config: CoDeQConfig) -> jax.Array:
    """``sg(quantile(|w|, config.quantile))``; selection instead of ``jnp.quantile``'s full sort."""
    a = jnp.abs(w).astype(jnp.float32)
    if a.size == 0:
        return lax.stop_gradient(jnp.quantile(a, config.quantile))
    return lax.stop_gradient(_abs_quantile(a, jnp.asarray(config.quantile)))


def _bits(theta_b: jax.Array, config: CoDeQConfig) -> jax.Array:
    if config.fixed_bits is not None:
        return jnp.asarray(float(config.fixed_bits), jnp.float32)
    span = float(_MAX_BITS - _MIN_BITS)
    return _round_ste(span * jnp.abs(jnp.tanh(theta_b)) + float(_MIN_BITS))


def _deadzone(a: jax.Array, theta_d: jax.Array) -> jax.Array:
    return 2.0 * a * (1.0 - jnp.abs(jnp.tanh(theta_d)))


def _quant_params(w: jax.Array, params: Any, config: CoDeQConfig):
    """Returns ``(step, shift, Q)`` as float32 scalars (differentiable in the thetas)."""
    theta_d, theta_b = _check_params(params)
    a = _absmax(w, config)
    bits = _bits(theta_b, config)
    d = _deadzone(a, theta_d)
    q_max = exp2(bits - 1.0) - 1.0  # exact at the integer bits; gradient ln2·2^(bits−1)
    step = (a - d / 2.0) / (q_max - 0.5) + _STEP_EPS
    shift = d / 2.0 - step / 2.0
    return step, shift, q_max


# ----------------------------------------------------------------------------------------------
# Public functions.


def codeq_init(
    w: ArrayLike,
    config: CoDeQConfig,
    *,
    theta_d: float = 3.0,
    theta_b: float = 3.0,
) -> dict[str, jax.Array]:
    """Returns ``{"theta_d": 3.0, "theta_b": 3.0}`` (float32 scalars; the authors' init).

    ``θ = 3`` gives ``|tanh θ| ≈ 0.995``: 8 bits and a dead zone ``d ≈ 0.01·a`` at the start.
    ``w`` and ``config`` are accepted for the uniform ``name_init(x, config)`` signature.

    >>> p = codeq_init(jnp.ones((4,)), CoDeQConfig())
    >>> float(p["theta_d"]), float(p["theta_b"])
    (3.0, 3.0)
    """
    del w, config
    return {
        "theta_d": jnp.asarray(theta_d, jnp.float32),
        "theta_b": jnp.asarray(theta_b, jnp.float32),
    }


def codeq(
    w: ArrayLike,
    params: Mapping[str, ArrayLike],
    config: CoDeQConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Dead-zone quantizes ``w`` (one tensor, one scale): ``ŵ = s·q + shift·sign(q)``.

    Args:
      w: floating array (a layer's weights); computed in float32, returned in ``w``'s dtype.
      params: ``{"theta_d", "theta_b"}`` scalars (:func:`codeq_init`).
      config: the quantizer's configuration.
      key: unused (deterministic); accepted for a uniform signature.

    Returns:
      ``ŵ``, same shape and dtype as ``w``; gradients to ``w``, ``θ_d`` and ``θ_b`` as in the
      module docstring.

    >>> w = jnp.array([-1.0, -0.5, -0.01, 0.0, 0.3, 1.0])
    >>> cfg = CoDeQConfig(fixed_bits=2, quantile=1.0)  # levels 0, ±a = ±1
    >>> codeq(w, {"theta_d": jnp.array(0.5), "theta_b": jnp.array(0.0)}, cfg).round(4).tolist()
    [-1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    """
    del key
    w = jnp.asarray(w)
    _check_float(w, "codeq")
    wf = w.astype(jnp.float32)
    step, shift, q_max = _quant_params(wf, params, config)
    return _codeq_core(wf, step, shift, q_max, config).astype(w.dtype)


def codeq_bits(params: Mapping[str, ArrayLike], config: CoDeQConfig) -> jax.Array:
    """The bit-width ``B = round(6·|tanh θ_b| + 2)`` (or ``fixed_bits``), a float32 scalar.

    >>> float(codeq_bits({"theta_d": jnp.array(3.0), "theta_b": jnp.array(3.0)}, CoDeQConfig()))
    8.0
    """
    _, theta_b = _check_params(params)
    return _bits(theta_b, config)


def codeq_deadzone(
    w: ArrayLike, params: Mapping[str, ArrayLike], config: CoDeQConfig | None = None
) -> jax.Array:
    """The dead-zone width ``d = 2a·(1 − |tanh θ_d|)``: ``|w| < d/2`` quantizes to 0.

    ``config`` only supplies the quantile for ``a`` (default ``CoDeQConfig()``: 0.99).
    """
    config = CoDeQConfig() if config is None else config
    w = jnp.asarray(w)
    _check_float(w, "codeq_deadzone")
    theta_d, _ = _check_params(params)
    return _deadzone(_absmax(w, config), theta_d)


def codeq_codes(w: ArrayLike, params: Mapping[str, ArrayLike], config: CoDeQConfig) -> jax.Array:
    """The integer codes ``q ∈ [−Q, Q]`` (int32) of :func:`codeq`; ``ŵ = s·q + shift·sign(q)``.

    >>> w = jnp.array([-1.0, -0.01, 0.3, 1.0])
    >>> cfg = CoDeQConfig(fixed_bits=2, quantile=1.0)
    >>> codeq_codes(w, {"theta_d": jnp.array(0.5), "theta_b": jnp.array(0.0)}, cfg).tolist()
    [-1, 0, 0, 1]
    """
    w = jnp.asarray(w)
    _check_float(w, "codeq_codes")
    wf = lax.stop_gradient(w).astype(jnp.float32)
    step, shift, q_max = lax.stop_gradient(_quant_params(wf, params, config))
    _, q = _codes_float(wf, step, shift, q_max)
    return q.astype(jnp.int32)


def codeq_sparsity(w: ArrayLike, params: Mapping[str, ArrayLike], config: CoDeQConfig) -> jax.Array:
    """The fraction of exactly-zero outputs of :func:`codeq` (float32 scalar, no gradient)."""
    w_hat = lax.stop_gradient(codeq(w, params, config))
    return jnp.mean((w_hat == 0).astype(jnp.float32))


# ---------------------------------------------------------------------------------- family


class CoDeQFamily(QuantizerFamily):
    """``"codeq"``: :func:`codeq` (weights): learned dead-zone ``θ_d`` and bit-width ``θ_b``,
    tagged ``"deadzone"`` / ``"bits"`` for their decoupled decays (``quant.deadzone_decay`` /
    ``quant.bits_decay``)."""

    name = "codeq"
    config_types = (CoDeQConfig,)

    def roles(self, spec):
        return ("weight",)

    def bits(self, spec) -> int:
        return 8 if spec.config.fixed_bits is None else int(spec.config.fixed_bits)

    def granularity(self, spec) -> str:
        return "tensor"

    def learnable(self, spec) -> bool:
        return True

    def param_tags(self, spec):
        return {"theta_d": ("deadzone",), "theta_b": ("bits",)}

    def init(self, spec, x):
        return codeq_init(x, spec.config)

    def apply(self, spec, x, params, *, key=None, stats=None):
        return codeq(x, params, spec.config)

    def reads_bits(self, spec) -> bool:
        return True

    def used_bits(self, spec, x, params):
        return codeq_bits(params, spec.config).astype(jnp.int32)

    def scale_count(self, spec, shape) -> int:
        return 2  # the step s and the shift of the first level

    def stored_scales(self, spec, shape) -> int:
        return self.scale_count(spec, shape)

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import quantize_codeq

        return quantize_codeq(x, params, spec.config)

    def check_importable(self, spec, path):
        raise NotExportable(
            f"layer {path!r} has codeq weights, which import_model cannot restore (the "
            "quantizer re-derives its grid from the kernel, so the exported codes do not map "
            "back to themselves); allowed: the other kinds. The packed export itself (codes, "
            "scales, model_bytes) and integer inference are unaffected"
        )

    def weight_lowering(self, spec, params, stats):
        return WeightLowering("codeq")


register_family(CoDeQFamily())
