"""ProxConnect++ pairs (Lu, Yu, Li, Partovi Nia, NeurIPS 2023); catalogue = our reading [inferred].

METHODS.md §4 and §9. ProxConnect++ trains latent weights ``θ`` with a forward quantizer ``F``
and a backward function ``B``::

    w_t = F(θ_t),    θ_{t+1} = θ_t − η · B′(θ_t)ᵀ ∇ℓ(w_t)

In JAX this is a ``custom_vjp`` whose value is ``F(x)`` and whose VJP is the VJP of ``B`` at
``x`` (``g · B′(x)`` for the elementwise functions here). The update rule and the catalogue
below are inferred from the paper's abstract and follow-up work, not read in the authors' code
[inferred]; every entry is data (a pair of plain functions), so it is easy to replace.

Catalogue (``PAIRS``):

===============  =====================  =====================
name             forward ``F``          backward ``B``
===============  =====================  =====================
``bc``           ``sign``               ``identity``
``pc``           ``prox`` (P_μ)         ``identity``
``proxquant``    ``identity``           ``prox`` (P_μ)
``bnn``          ``sign``               ``hardtanh``
``bnn+``         ``sign``               ``sign_swish`` (β)
``bnn++``        ``sign_swish`` (μ)     ``sign_swish`` (μ)
``approx_sign``  ``sign``               ``poly_sign``
===============  =====================  =====================

Hyperparameters (``μ``, ``β``) are ordinary arguments of the ``custom_vjp``, so they may be traced
arrays: an annealed ``μ`` inside a jitted train step does not recompile. They receive a zero
cotangent through a pair (the pair's gradient is only ``g · B′(x)``). Per-channel scaling
(``sign(w)·sg(mean|w|)``) is not part of a pair; the binary quantizer owns it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qflax.quantizers._binary import SCALINGS, BinaryConfig, binary_scale
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
    "BACKWARDS",
    "FORWARDS",
    "PAIRS",
    "QuantizerPair",
    "approx_sign",
    "bc",
    "bnn",
    "bnn_plus",
    "bnn_plus_plus",
    "hardtanh",
    "identity",
    "pair",
    "pc",
    "poly_sign",
    "prox",
    "proxquant",
    "sign",
    "sign_swish",
]

Elementwise = Callable[..., jax.Array]


# --------------------------------------------------------------------------------------------
# Validation and small helpers.


def _check_positive(value: Any, field: str) -> None:
    """Raises ValueError unless ``value`` is a finite number > 0.

    Python and NumPy numbers (and NumPy arrays) are checked; JAX arrays are not, since they may be
    traced (annealed inside ``jit``).
    """
    if isinstance(value, jax.Array):
        return
    allowed = "allowed: a finite number > 0 (or a JAX array of them)"
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating, np.ndarray)
    ):
        raise ValueError(f"{field}={value!r} is not a number; {allowed}")
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{field}={value!r} is not a real number; {allowed}")
    if not (np.all(np.isfinite(array)) and np.all(array > 0)):
        raise ValueError(f"{field}={value!r} is out of range; {allowed}")


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
    """``x`` as a JAX array of a floating dtype (integer and bool inputs become float32)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _hyper(value: jax.typing.ArrayLike, field: str, dtype: Any) -> jax.Array:
    """A validated hyperparameter cast to ``x``'s dtype (strict dtype promotion mixes nothing)."""
    _check_positive(value, field)
    return jnp.asarray(value, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The catalogue of elementwise functions. Each is pure and works under jit/vmap/grad.


def identity(x: jax.typing.ArrayLike) -> jax.Array:
    """The identity, ``x``; derivative 1 (the straight-through backward of BinaryConnect)."""
    return _as_float(x)


def sign(x: jax.typing.ArrayLike) -> jax.Array:
    """Binary sign with values ±1 and ``sign(0) = +1`` (unlike ``jnp.sign``); derivative 0.

    NaN stays NaN so that a debug check downstream can see it. XLA may flush subnormal inputs to
    zero (it does on CPU), so a negative subnormal can give +1.

    >>> sign(jnp.array([-2.0, -0.0, 0.0, 0.5])).tolist()
    [-1.0, 1.0, 1.0, 1.0]
    """
    x = _as_float(x)
    one = jnp.ones_like(x)
    return jnp.where(x < 0, -one, jnp.where(x >= 0, one, x))


def hardtanh(x: jax.typing.ArrayLike) -> jax.Array:
    """``clip(x, −1, 1)`` whose derivative is ``1[|x| ≤ 1]``, the bounds included (BNN's backward).

    Written with ``jnp.where`` rather than ``jnp.clip``: autodiff of ``jnp.clip`` gives ½ exactly on
    a bound, while the nested ``where`` selects the ``x`` branch at ``x = ±1`` (its comparisons are
    strict), so the derivative is exactly 1 on ``[−1, 1]`` and 0 outside.

    >>> hardtanh(jnp.array([-3.0, -1.0, 0.25, 1.0, 2.0])).tolist()
    [-1.0, -1.0, 0.25, 1.0, 1.0]
    >>> jax.vmap(jax.grad(hardtanh))(jnp.array([-1.5, -1.0, 1.0, 1.5])).tolist()
    [0.0, 1.0, 1.0, 0.0]
    """
    x = _as_float(x)
    one = jnp.ones_like(x)
    return jnp.where(x > 1, one, jnp.where(x < -1, -one, x))


def sign_swish(x: jax.typing.ArrayLike, beta: jax.typing.ArrayLike = 5.0) -> jax.Array:
    """SignSwish (BNN+), ``SS_β(x) = 2σ(βx)[1 + βx(1 − σ(βx))] − 1`` [code: larq].

    Its derivative (by autodiff; equal to larq's closed form) is
    ``SS′_β(x) = β[2 − βx·tanh(βx/2)] / (1 + cosh βx)``. ``SS_β → sign`` as ``β → ∞``
    (used by BNN++ with an annealed ``β = μ``). ``1 − σ(z)`` is computed as ``σ(−z)``, which keeps
    the tail exact for large ``βx``. Where ``βx`` overflows to ``±inf`` (``x = 1e38``, ``β = 5``
    in float32) or ``x = ±inf``, the value is the limit ``±1`` and the derivative 0, as for
    every large finite ``βx`` (the formula alone would give ``∞·0 = NaN``). NaN stays NaN.

    Args:
        x: input.
        beta: steepness ``β > 0`` (scalar or broadcastable to ``x``; may be a traced array).
            Default 5.0 as in larq.

    Returns:
        ``SS_β(x)`` with ``x``'s shape and dtype.

    >>> round(float(sign_swish(0.5, beta=2.0)), 6)
    0.855341
    """
    x = _as_float(x)
    beta = _hyper(beta, "beta", x.dtype)
    return _sign_swish_z(beta * x)


def _finite_z(z: jax.Array) -> jax.Array:
    """``±inf`` (``β·x`` overflowed, or ``x = ±inf``) replaced by ``±max``; finite ``z`` unchanged.

    At ``z = ±inf`` the formulas below form ``∞·0`` (NaN); at ``±max`` they give the limits,
    ``SS → ±1`` and ``SS′ → 0``, as they already do for every large finite ``z``.
    """
    big = float(jnp.finfo(z.dtype).max)
    # min/max propagate NaN in XLA (as jnp.minimum/maximum do): NaN stays NaN.
    return jnp.minimum(jnp.maximum(z, -big), big)


@jax.custom_jvp
def _sign_swish_z(z: jax.Array) -> jax.Array:
    """``SS_1(z) = 2σ(z)[1 + zσ(−z)] − 1`` with a closed-form derivative (one ``tanh``).

    Both sigmoids from one ``u = exp(−|z|)``: ``σ(|z|) = 1/(1 + u)``, ``σ(−|z|) = u/(1 + u)``
    (one exp and one division per element instead of two logistic functions; each tail exact).
    ``−|z|`` is spelled ``min(z, −z)`` so that XLA does not merge this exp with the derivative's
    ``exp(−|z|)`` (the backward of a pair): merged, it is one full-size array written by the
    forward and read by the backward instead of being recomputed inside each fusion."""
    z = _finite_z(z)
    u = jnp.exp(jnp.minimum(z, -z))
    big = 1 / (1 + u)  # σ(|z|)
    small = u * big  # σ(−|z|)
    positive = z >= 0
    return 2 * jnp.where(positive, big, small) * (1 + z * jnp.where(positive, small, big)) - 1


@_sign_swish_z.defjvp
def _sign_swish_z_jvp(primals, tangents):
    # SS′(z) = [2 − z·tanh(z/2)] / (1 + cosh z) = [2 − z·t](1 − t²)/2 with t = tanh(z/2)
    # (1 + cosh z = 2cosh²(z/2)): one exp instead of autodiff's sigmoid chain, and no
    # overflow for large |z|. Autodiff of the primal would also recompute the forward in the
    # backward pass of a pair.
    (z,), (dz,) = primals, tangents
    value = _sign_swish_z(z)
    z = _finite_z(z)
    u = jnp.exp(-jnp.abs(z))  # tanh(z/2) = sign(z)(1 − u)/(1 + u), 1 − tanh² = 4u/(1 + u)²
    t = jnp.sign(z) * (1 - u) / (1 + u)
    sech2 = 4 * u / jnp.square(1 + u)  # exact in the tails, where 1 − t² would round to 0
    return value, dz * ((2 - z * t) * sech2 / 2)


def prox(x: jax.typing.ArrayLike, mu: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """Proximal map ``P_μ`` toward ``{−1, +1}``: ``(x + μ·sign(x)) / (1 + μ)`` [inferred].

    Our reading of ProxConnect's forward quantizer: the proximal map of the quadratic distance
    regulariser ``r(w) = ½·dist(w, {−1, +1})²`` scaled by ``μ``, i.e.
    ``argmin_w ½(w − x)² + (μ/2)(w − sign(w))²``, which moves ``x`` a fraction ``μ/(1 + μ)`` of
    the way to ``sign(x)`` (ties at 0 go to +1). ``μ = 0`` is the identity, ``μ → ∞`` tends to
    ``sign``. Derivative ``1/(1 + μ)`` off 0 (the jump at 0 contributes nothing). Replace this
    function if the paper's exact regulariser differs.

    Args:
        x: input.
        mu: strength ``μ > 0`` (scalar or broadcastable to ``x``; may be a traced array).

    Returns:
        ``P_μ(x)`` with ``x``'s shape and dtype.

    >>> prox(jnp.array([-2.0, 0.0, 0.5]), mu=1.0).tolist()
    [-1.5, 0.5, 0.75]
    """
    x = _as_float(x)
    mu = _hyper(mu, "mu", x.dtype)
    return (x + mu * sign(x)) / (1 + mu)


def poly_sign(x: jax.typing.ArrayLike) -> jax.Array:
    """ApproxSign of Bi-Real Net: ``2x + x²`` on ``[−1, 0)``, ``2x − x²`` on ``[0, 1)``, ±1 outside.

    Equal to ``2x − x·|x|`` inside; its derivative is ``2 − 2|x|`` on ``(−1, 1)`` and 0 outside
    (continuous: both sides are 0 at ±1).

    >>> poly_sign(jnp.array([-2.0, -0.5, 0.0, 0.5, 1.0])).tolist()
    [-1.0, -0.75, 0.0, 0.75, 1.0]
    """
    x = _as_float(x)
    one = jnp.ones_like(x)
    return jnp.where(x < -1, -one, jnp.where(x >= 1, one, 2 * x - x * jnp.abs(x)))


def _levels_m(bits: jax.typing.ArrayLike, dtype: Any) -> jax.Array:
    """``m = 2^bits − 1`` (the number of steps of a ``bits``-bit staircase on ``[−1, 1]``)."""
    _check_positive(bits, "bits")
    return jnp.exp2(jnp.round(jnp.asarray(bits, dtype))) - 1


def staircase(x: jax.typing.ArrayLike, bits: jax.typing.ArrayLike = 2) -> jax.Array:
    """The ``bits``-bit quantizer of ``[−1, 1]``: ``2^bits`` levels ``(2k − m)/m``,
    ``m = 2^bits − 1`` (odd multiples of ``1/m``, no zero level), nearest level with ties
    upward; ``bits = 1`` is :func:`sign` (``±1``, ``0 ↦ +1``). Derivative 0.

    >>> staircase(jnp.array([-1.0, -0.2, 0.0, 0.34, 2.0]), bits=2).tolist()
    [-1.0, -0.3333333432674408, 0.3333333432674408, 0.3333333432674408, 1.0]
    """
    x = _as_float(x)
    m = _levels_m(bits, x.dtype)
    v = (jnp.clip(x, -1, 1) + 1) / 2 * m
    k = jnp.clip(jnp.floor(v + 0.5), 0, m)
    return jnp.where(jnp.isnan(x), x, (2 * k - m) / m)


def soft_staircase(
    x: jax.typing.ArrayLike, bits: jax.typing.ArrayLike = 2, beta: jax.typing.ArrayLike = 5.0
) -> jax.Array:
    """A smooth, strictly increasing surrogate of :func:`staircase` on ``[−1, 1]`` (±1 outside).

    With ``v = (x + 1)/2·m`` split as ``v = j + r`` (``j`` integer, ``0 ≤ r < 1``), each step is
    a scaled ``tanh`` centred on the decision boundary: ``softround(v) = j + ½ +
    ½·tanh(β(r − ½))/tanh(β/2)``, and ``B(x) = (2·softround(v) − m)/m`` — continuous, equal to
    the levels' midpoints between steps only in the limit ``β → ∞`` (the staircase), and the
    straight line ``clip(x, −1, 1)`` as ``β → 0`` (the clipped STE). Per-interval ``tanh`` steps
    as in differentiable soft quantization (DSQ) [inferred]; ``bits = 1`` gives a soft sign.

    >>> round(float(soft_staircase(0.0, bits=1, beta=1e-3)), 4), float(soft_staircase(-1.0))
    (0.0, -1.0)
    """
    x = _as_float(x)
    m = _levels_m(bits, x.dtype)
    beta = _hyper(beta, "beta", x.dtype)
    v = (hardtanh(x) + 1) / 2 * m  # hardtanh: derivative 1 on the bounds (jnp.clip's is ½)
    j = jax.lax.stop_gradient(jnp.clip(jnp.floor(v), 0, m - 1))
    r = v - j
    soft = j + 0.5 + 0.5 * jnp.tanh(beta * (r - 0.5)) / jnp.tanh(beta / 2)
    return ((2 * soft - m) / m).astype(x.dtype)


# Forward candidates: any function may be a forward (value of the quantizer).
_FORWARDS: dict[str, Elementwise] = dict(
    {
        "identity": identity,
        "sign": sign,
        "hardtanh": hardtanh,
        "sign_swish": sign_swish,
        "prox": prox,
        "poly_sign": poly_sign,
        "staircase": staircase,
        "soft_staircase": soft_staircase,
    }
)
FORWARDS: Mapping[str, Elementwise] = types.MappingProxyType(_FORWARDS)
# Forwards whose values are already on a quantizer's grid (a pair with one of these as its
# forward is exact; others are relaxed and end training in their exact state).
_EXACT_FORWARDS: set[Any] = {sign, staircase}

# Backward candidates: only functions with a useful derivative (``sign`` has derivative 0
# everywhere, so it would stop all gradients, and is left out).
_BACKWARDS: dict[str, Elementwise] = dict(
    {
        "identity": identity,
        "hardtanh": hardtanh,
        "sign_swish": sign_swish,
        "prox": prox,
        "poly_sign": poly_sign,
        "soft_staircase": soft_staircase,
    }
)
BACKWARDS: Mapping[str, Elementwise] = types.MappingProxyType(_BACKWARDS)


# --------------------------------------------------------------------------------------------
# The pair: value of ``forward``, VJP of ``backward``. Defined once at module level.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pair(
    forward: Elementwise,
    backward: Elementwise,
    x: jax.Array,
    forward_kwargs: dict[str, Any],
    backward_kwargs: dict[str, Any],
) -> jax.Array:
    del backward, backward_kwargs
    return _forward_value(forward, x, forward_kwargs)


def _forward_value(forward: Elementwise, x: jax.Array, forward_kwargs: dict[str, Any]) -> jax.Array:
    y = jnp.asarray(forward(x, **forward_kwargs))
    if y.shape != x.shape:
        raise ValueError(
            f"forward={_name(forward)} returned shape {y.shape} for an input of shape {x.shape}; "
            "allowed: an elementwise function (output shape == input shape)"
        )
    return y


def _pair_fwd(
    forward: Elementwise,
    backward: Elementwise,
    x: jax.Array,
    forward_kwargs: dict[str, Any],
    backward_kwargs: dict[str, Any],
) -> tuple[jax.Array, tuple[jax.Array, dict[str, Any]]]:
    del backward
    return _forward_value(forward, x, forward_kwargs), (x, backward_kwargs)


def _pair_bwd(
    forward: Elementwise,
    backward: Elementwise,
    residuals: tuple[jax.Array, dict[str, Any]],
    g: jax.Array,
) -> tuple[jax.Array, None, None]:
    del forward
    x, backward_kwargs = residuals
    y, vjp = jax.vjp(lambda x_: jnp.asarray(backward(x_, **backward_kwargs)), x)
    if y.shape != x.shape:
        raise ValueError(
            f"backward={_name(backward)} returned shape {y.shape} for an input of shape "
            f"{x.shape}; allowed: an elementwise function (output shape == input shape)"
        )
    (g_x,) = vjp(g.astype(y.dtype))
    # None: a symbolic zero cotangent for every hyperparameter (both kwargs dicts).
    return g_x.astype(x.dtype), None, None


_pair.defvjp(_pair_fwd, _pair_bwd)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def _check_kwargs(kwargs: Mapping[str, Any] | None, field: str) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(
            f"{field}={kwargs!r} is not allowed; allowed: None or a mapping from argument names "
            "(str) to values (numbers or arrays)"
        )
    return dict(kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizerPair:
    """A forward/backward quantizer ``q(x)``: value ``forward(x)``, VJP ``g · backward′(x)``.

    Made by :func:`pair` and the named factories; call it on an array. Hashes by identity, so it
    can be a static argument of ``jax.jit``.
    """

    # Value of the quantizer: ``forward(x, **forward_kwargs)``.
    forward: Elementwise
    # Gradient of the quantizer: the VJP of ``backward(x, **backward_kwargs)`` at ``x``.
    backward: Elementwise
    # Keyword arguments of ``forward`` (hyperparameters; may be traced arrays).
    forward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Keyword arguments of ``backward`` (hyperparameters; may be traced arrays).
    backward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        x = _as_float(x)
        return _pair(
            self.forward, self.backward, x, dict(self.forward_kwargs), dict(self.backward_kwargs)
        )

    def __repr__(self) -> str:
        def call(fn: Elementwise, kwargs: dict[str, Any]) -> str:
            args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
            return f"{_name(fn)}(x{args})"

        return (
            f"QuantizerPair(forward={call(self.forward, self.forward_kwargs)}, "
            f"backward={call(self.backward, self.backward_kwargs)})"
        )


def pair(
    forward: Elementwise,
    backward: Elementwise,
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
    backward_kwargs: Mapping[str, Any] | None = None,
) -> QuantizerPair:
    """A quantizer with value ``forward(x)`` and the gradient of ``backward`` (ProxConnect++).

    ``q(x) = forward(x, **forward_kwargs)``; ``vjp(q)(g) = vjp(backward(·, **backward_kwargs))(g)``
    at ``x``, i.e. ``g · B′(x)`` for an elementwise ``B``. Both functions must be elementwise
    (output shape == input shape) and ``backward`` differentiable. Plain functions such as
    ``jnp.sign`` or ``lambda x: jnp.tanh(3 * x)`` work with no kwargs. The kwargs are passed to
    the ``custom_vjp`` as ordinary arguments, so their values may be traced arrays (e.g. an
    annealed ``μ`` under ``jit``: no recompilation); they get zero cotangents. Their values must
    be numbers or arrays; bind anything static (a string option) with ``functools.partial``.

    Args:
        forward: the forward quantizer ``F`` (its value is the output).
        backward: the differentiable function ``B`` whose VJP is used.
        forward_kwargs: keyword arguments of ``forward``.
        backward_kwargs: keyword arguments of ``backward``.

    Returns:
        A callable ``q(x) -> x̂``.

    >>> q = pair(sign, hardtanh)
    >>> x = jnp.array([-2.0, -0.5, 0.0, 1.0])
    >>> q(x).tolist(), jax.grad(lambda v: q(v).sum())(x).tolist()
    ([-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    """
    if not callable(forward):
        raise ValueError(f"forward={forward!r} is not callable; allowed: a function x -> x̂")
    if not callable(backward):
        raise ValueError(f"backward={backward!r} is not callable; allowed: a function x -> y")
    return QuantizerPair(
        forward=forward,
        backward=backward,
        forward_kwargs=_check_kwargs(forward_kwargs, "forward_kwargs"),
        backward_kwargs=_check_kwargs(backward_kwargs, "backward_kwargs"),
    )


# --------------------------------------------------------------------------------------------
# The named catalogue (METHODS.md §4 table, plus Bi-Real Net's ApproxSign).


def bc() -> QuantizerPair:
    """BinaryConnect: forward ``sign``, backward ``identity`` (the plain STE)."""
    return pair(sign, identity)


def pc(mu: jax.typing.ArrayLike = 1.0) -> QuantizerPair:
    """ProxConnect: forward ``P_μ`` (:func:`prox`), backward ``identity`` [inferred]."""
    _check_positive(mu, "mu")
    return pair(prox, identity, forward_kwargs={"mu": mu})


def proxquant(mu: jax.typing.ArrayLike = 1.0) -> QuantizerPair:
    """ProxQuant ("reverse PC"): forward ``identity``, backward ``P_μ`` [inferred].

    The gradient is ``g / (1 + μ)`` (off 0).
    """
    _check_positive(mu, "mu")
    return pair(identity, prox, backward_kwargs={"mu": mu})


def bnn() -> QuantizerPair:
    """BNN: forward ``sign``, backward ``hardtanh`` (gradient ``g · 1[|x| ≤ 1]``)."""
    return pair(sign, hardtanh)


def bnn_plus(beta: jax.typing.ArrayLike = 5.0) -> QuantizerPair:
    """BNN+: forward ``sign``, backward SignSwish with steepness ``β``."""
    _check_positive(beta, "beta")
    return pair(sign, sign_swish, backward_kwargs={"beta": beta})


def bnn_plus_plus(mu: jax.typing.ArrayLike = 5.0) -> QuantizerPair:
    """BNN++: forward and backward SignSwish with ``β = μ`` [inferred].

    Anneal ``μ`` upward during training (pass a traced array) so the forward tends to ``sign``.
    """
    _check_positive(mu, "mu")
    return pair(sign_swish, sign_swish, forward_kwargs={"beta": mu}, backward_kwargs={"beta": mu})


def approx_sign() -> QuantizerPair:
    """Bi-Real Net's ApproxSign: forward ``sign``, backward :func:`poly_sign`."""
    return pair(sign, poly_sign)


def multibit(bits: int = 2, beta: jax.typing.ArrayLike = 5.0) -> QuantizerPair:
    """A ``bits``-bit pair: forward :func:`staircase`, backward :func:`soft_staircase` (a smooth
    surrogate whose steps sharpen with ``β``); ``bits = 1`` is a sign with a soft-sign
    backward. F = P∘B with P the staircase of B's own levels (non-decreasing) [inferred]."""
    _check_positive(beta, "beta")
    return pair(
        staircase,
        soft_staircase,
        forward_kwargs={"bits": bits},
        backward_kwargs={"bits": bits, "beta": beta},
    )


_PAIRS: dict[str, Callable[..., QuantizerPair]] = dict(
    {
        "bc": bc,
        "pc": pc,
        "proxquant": proxquant,
        "bnn": bnn,
        "bnn+": bnn_plus,
        "bnn++": bnn_plus_plus,
        "approx_sign": approx_sign,
        "multibit": multibit,
    }
)
# Name -> factory; each factory returns a callable q(x). A read-only view: the catalogue above
# and the pairs registered by user code (:func:`register_pair`).
PAIRS: Mapping[str, Callable[..., QuantizerPair]] = types.MappingProxyType(_PAIRS)


# --------------------------------------------------------------------------------------------
# User registration: pairs, forwards and backwards defined outside qflax.


def _check_new_name(name: Any, registry: Mapping[str, Any], what: str, replace: bool) -> None:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"name={name!r} is not allowed for a {what}; allowed: a non-empty name")
    if name in registry and not replace:
        raise ValueError(
            f"a {what} named {name!r} is already registered; allowed: a new name, or replace=True"
        )


def register_pair(
    name: str, factory: Callable[..., QuantizerPair] | QuantizerPair, *, replace: bool = False
) -> Callable[..., QuantizerPair]:
    """Adds a pair to :data:`PAIRS` so configs and recipes can name it.

    Args:
      name: the name (``--config.pair.name=NAME``, ``recipes.binary(pair=NAME)``).
      factory: a function of the pair's hyperparameters (keywords with defaults, e.g. ``mu``,
        which runs may anneal) returning a :class:`QuantizerPair`, or a ready pair.
      replace: allow replacing a registered name (a config file imported twice re-registers
        its pair: the same function's qualified name is accepted without it).

    Returns:
      The factory.
    """
    if isinstance(factory, QuantizerPair):
        ready = factory

        def factory() -> QuantizerPair:
            return ready

        factory.__name__ = name
    if not callable(factory):
        raise ValueError(f"factory={factory!r} is not allowed; allowed: a pair factory or pair")
    old = _PAIRS.get(name)
    same = old is not None and getattr(old, "__qualname__", None) == getattr(
        factory, "__qualname__", object()
    )
    _check_new_name(name, _PAIRS if not same else {}, "pair", replace)
    _PAIRS[name] = factory
    return factory


def _register_elementwise(
    registry: dict[str, Elementwise], name: str, fn: Elementwise, what: str, replace: bool
) -> Elementwise:
    if not callable(fn):
        raise ValueError(f"fn={fn!r} is not allowed for a {what}; allowed: a function x -> y")
    old = registry.get(name)
    same = old is not None and getattr(old, "__qualname__", None) == getattr(fn, "__qualname__", 0)
    _check_new_name(name, registry if not same else {}, what, replace)
    registry[name] = fn
    return fn


def register_forward(
    name: str, fn: Elementwise, *, exact: bool = False, replace: bool = False
) -> Elementwise:
    """Adds an elementwise forward ``F(x, **kwargs)`` to :data:`FORWARDS`; ``exact=True``: its
    values are quantized already (a pair with it is not relaxed, see
    :attr:`PairConfig.relaxed`)."""
    fn = _register_elementwise(_FORWARDS, name, fn, "forward", replace)
    if exact:
        _EXACT_FORWARDS.add(fn)
    return fn


def register_backward(name: str, fn: Elementwise, *, replace: bool = False) -> Elementwise:
    """Adds a differentiable elementwise backward ``B(x, **kwargs)`` to :data:`BACKWARDS`."""
    return _register_elementwise(_BACKWARDS, name, fn, "backward", replace)


def _keyword_defaults(fn: Callable[..., Any], skip_first: bool) -> dict[str, Any]:
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    if skip_first:
        params = params[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def composed_pair(forward: str, backward: str, **kwargs: Any) -> QuantizerPair:
    """The pair ``(FORWARDS[forward], BACKWARDS[backward])``; each keyword goes to every one of
    the two functions that takes it (``beta=`` reaches both SignSwishes).

    >>> q = composed_pair("sign", "sign_swish", beta=3.0)
    >>> q.forward is sign, q.backward_kwargs
    (True, {'beta': 3.0})
    """
    check = {"forward": (forward, FORWARDS), "backward": (backward, BACKWARDS)}
    for field, (name, registry) in check.items():
        if name not in registry:
            allowed = ", ".join(registry)
            raise ValueError(f"{field}={name!r} is not allowed; allowed: {allowed}")
    f, b = FORWARDS[forward], BACKWARDS[backward]
    f_names, b_names = _keyword_defaults(f, True), _keyword_defaults(b, True)
    unknown = sorted(set(kwargs) - set(f_names) - set(b_names))
    if unknown:
        allowed = ", ".join(sorted({*f_names, *b_names})) or "none"
        raise TypeError(
            f"arguments {unknown} are not taken by {forward}/{backward}; allowed: {allowed}"
        )
    for k, v in kwargs.items():
        _check_positive(v, k)
    return pair(
        f,
        b,
        forward_kwargs={k: v for k, v in kwargs.items() if k in f_names},
        backward_kwargs={k: v for k, v in kwargs.items() if k in b_names},
    )


# --------------------------------------------------------------------------------------------
# The pair as a quantizer family of layers and runs.


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairConfig:
    """A ProxConnect++ pair in a layer: a named pair, or a forward and a backward by name.

    >>> PairConfig(pair="bnn", scaling="channel").label
    'bnn'
    >>> PairConfig(forward="sign", backward="sign_swish", kwargs={"beta": 3.0}).label
    'sign/sign_swish'
    """

    # A name in PAIRS (the catalogue or a registered pair); or None with forward and backward.
    pair: str | None = None
    # A name in FORWARDS and one in BACKWARDS: the composed pair (pair=None).
    forward: str | None = None
    backward: str | None = None
    # Keyword arguments of the pair's factory (or of the composed functions), as sorted
    # (name, number) tuples (a mapping is accepted and converted). Static: changing them
    # recompiles; μ is annealed through the layer's state instead.
    kwargs: tuple[tuple[str, Any], ...] = ()
    # Output scale: "none" (±1), "tensor" or "channel" (sg(mean|x|), per `axis`).
    scaling: str = "none"
    # The channel axis of scaling="channel".
    axis: int = -1
    # F and B act on x / sg(mean|x|) (per channel with scaling="channel", else per tensor), so
    # μ/β are scale-free; False: on x itself (the pair's own definition).
    normalize: bool = False
    # A learned output scale α (a QuantParam per tensor, or per channel on `axis`, as
    # `scaling` says; initialised to mean|x|): y = α·pair(x/α). False: α = sg(mean|x|).
    learn_scale: bool = False

    def __post_init__(self):
        from qflax.numerics import check_choice

        named = self.pair is not None
        composed = self.forward is not None or self.backward is not None
        if named == composed or (composed and (self.forward is None or self.backward is None)):
            raise ValueError(
                f"pair={self.pair!r}, forward={self.forward!r}, backward={self.backward!r} is not "
                "allowed; allowed: a pair name, or a forward and a backward name (not both)"
            )
        if named:
            check_choice(self.pair, "pair", tuple(PAIRS))
        else:
            check_choice(self.forward, "forward", tuple(FORWARDS))
            check_choice(self.backward, "backward", tuple(BACKWARDS))
        kwargs = self.kwargs
        if isinstance(kwargs, Mapping):
            kwargs = tuple(sorted(kwargs.items()))
        kwargs = tuple(tuple(item) for item in kwargs)
        for item in kwargs:
            if len(item) != 2 or not isinstance(item[0], str):
                raise ValueError(
                    f"pair_kwargs={self.kwargs!r} is not allowed; allowed: a mapping or (name, "
                    "value) pairs"
                )
            if not isinstance(item[1], (int, float, np.integer, np.floating)) or isinstance(
                item[1], (bool, np.bool_)
            ):
                raise ValueError(
                    f"pair_kwargs[{item[0]!r}]={item[1]!r} is not allowed; allowed: a number"
                )
        object.__setattr__(self, "kwargs", kwargs)
        try:
            self.make()  # validates the arguments now
        except TypeError:
            allowed = ", ".join(self.defaults()) or "none"
            raise ValueError(
                f"pair_kwargs={dict(kwargs)!r} are not arguments of pair {self.label!r}; "
                f"allowed: {allowed}"
            ) from None
        check_choice(self.scaling, "scaling", SCALINGS)
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise ValueError(f"axis={self.axis!r} is not an integer; allowed: an int axis")
        for field in ("normalize", "learn_scale"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise ValueError(
                    f"{field}={getattr(self, field)!r} is not allowed; allowed: True or False"
                )
        if self.learn_scale and self.scaling == "none":
            raise ValueError(
                "learn_scale=True with scaling='none' is not allowed (no scale to learn); "
                "allowed: scaling='tensor' or 'channel'"
            )
        bits = dict(self.kwargs).get("bits", self.defaults().get("bits", 1))
        if isinstance(bits, bool) or float(bits) != int(bits) or not 1 <= int(bits) <= 8:
            raise ValueError(f"pair_kwargs['bits']={bits!r} is not allowed; allowed: 1..8")

    @property
    def label(self) -> str:
        """The pair's name, or ``forward/backward``."""
        return self.pair if self.pair is not None else f"{self.forward}/{self.backward}"

    def make(self, **overrides: Any) -> QuantizerPair:
        """The :class:`QuantizerPair` (``overrides``: e.g. an annealed, traced ``mu``)."""
        kwargs = {**dict(self.kwargs), **overrides}
        if self.pair is not None:
            return PAIRS[self.pair](**kwargs)
        return composed_pair(self.forward, self.backward, **kwargs)

    def defaults(self) -> dict[str, Any]:
        """The keyword defaults of the pair's factory (of both functions, when composed)."""
        if self.pair is not None:
            return _keyword_defaults(PAIRS[self.pair], False)
        f = _keyword_defaults(FORWARDS[self.forward], True)
        return {**f, **_keyword_defaults(BACKWARDS[self.backward], True)}

    @property
    def bits(self) -> int:
        """Bits of the forward's levels: its ``bits`` argument (multi-bit pairs), else 1."""
        return int(dict(self.kwargs).get("bits", self.defaults().get("bits", 1)))

    @property
    def relaxed(self) -> bool:
        """Whether the forward is not an exact quantizer (``pc``, ``proxquant``, ``bnn++``, a
        composed or user pair with another forward): its layers end training in the exact
        state (``sign``, or the ``bits``-bit :func:`staircase`)."""
        return self.make().forward not in _EXACT_FORWARDS

    def exact(self, x: jax.Array) -> jax.Array:
        """The exact forward training ends with: ``sign`` (1 bit) or the staircase."""
        return sign(x) if self.bits == 1 else staircase(x, bits=self.bits)


class PairFamily(QuantizerFamily):
    """``"pair"``: a ProxConnect++ pair (:class:`PairConfig`) times an output scale ``α``:
    ``sg(mean|x|)`` per tensor or per channel when ``scaling`` says so (XNOR-style), or a
    learned ``α`` (``learn_scale``: ``y = α·pair(x/α)``). A ``mu`` the pair's factory takes is
    a state the loop anneals (``anneal.mu_end``); a pair whose forward is not an exact
    quantizer keeps a ``hard`` state, 0 while training and 1 for the exact model (``sign``, or
    the ``bits``-bit staircase, same scale) training ends with."""

    name = "pair"
    config_types = (PairConfig,)

    def bits(self, spec) -> int:
        return spec.config.bits

    def granularity(self, spec) -> str:
        return spec.config.scaling

    def describe(self, spec) -> str:
        gran = spec.config.scaling
        suffix = "" if gran in ("tensor", "none") else f"/{gran}"
        return f"pair:{spec.config.label}{spec.config.bits}{suffix}"

    def learnable(self, spec) -> bool:
        return spec.config.learn_scale

    def init(self, spec, x):
        cfg = spec.config
        alpha = binary_scale(x, BinaryConfig(scaling=cfg.scaling, axis=cfg.axis))
        alpha = jnp.maximum(alpha, jnp.finfo(jnp.float32).tiny).astype(jnp.float32)
        return {"scale": compact(alpha, cfg.scaling)}

    def stats_init(self, spec, x):
        out = {}
        if "mu" in spec.config.defaults():
            out["mu"] = jnp.asarray(self.stat_start(spec, "mu"), jnp.float32)
        if spec.config.relaxed:
            out["hard"] = jnp.zeros((), jnp.float32)
        return out

    def stat_start(self, spec, name):
        if name != "mu" or "mu" not in spec.config.defaults():
            return super().stat_start(spec, name)
        return float(dict(spec.config.kwargs).get("mu", spec.config.defaults()["mu"]))

    def schedule(self, spec, *, epoch, epochs, anneal):
        out = {}
        end = float(getattr(anneal, "mu_end", 0.0) or 0.0)
        if end and "mu" in spec.config.defaults():
            start = self.stat_start(spec, "mu")
            frac = min(epoch / max(epochs - 1, 1), 1.0)
            out["mu"] = start * (end / start) ** frac
        if spec.config.relaxed:
            out["hard"] = float(epoch >= epochs)
        return out

    def ends_exact(self, spec) -> bool:
        return spec.config.relaxed

    def _alpha(self, spec, x, params):
        cfg = spec.config
        if cfg.learn_scale:
            return expand(params["scale"], x, cfg.scaling, cfg.axis)
        if cfg.scaling == "none":
            return None
        return binary_scale(x, BinaryConfig(scaling=cfg.scaling, axis=cfg.axis))

    def values(self, spec, x, stats=None, params=None):
        """The forward before the output scale: ``(y, α)`` with ``apply(x) = α·y`` (α None
        for ``scaling="none"``); ``y`` is the pair's forward of ``x`` (of ``x/α`` when
        ``normalize`` or ``learn_scale``), or the exact forward where ``stats["hard"]`` is set
        (traceable)."""
        cfg = spec.config
        stats = dict(stats or {})
        overrides = {"mu": stats["mu"]} if "mu" in stats else {}
        q = cfg.make(**overrides)
        alpha = self._alpha(spec, x, params or {})  # the output scale, also the normaliser
        if cfg.normalize or cfg.learn_scale:  # y = F(x/a), dy/dx = B′(x/a)/a
            a = alpha
            if a is None:
                a = binary_scale(x, BinaryConfig(scaling="tensor"))
            a = jnp.maximum(a, jnp.finfo(jnp.float32).tiny).astype(x.dtype)
            z = x / a
        else:
            z = x
        y = q(z).astype(x.dtype)
        if "hard" in stats:  # the exact model: sign (scale-free: of x) / staircase forward
            exact = cfg.exact(x if cfg.bits == 1 else z).astype(x.dtype)
            y = jnp.where(jnp.asarray(stats["hard"]) > 0, exact, y)
        return y, alpha

    def apply(self, spec, x, params, *, key=None, stats=None):
        y, alpha = self.values(spec, x, stats, params)
        return y if alpha is None else alpha.astype(x.dtype) * y

    def codes(self, spec, x, params, stats):
        from qflax.quantizers._qarray import _binary_qarray, _uniform_qarray, quantize_binary

        cfg = spec.config
        hard = float(jnp.asarray((stats or {}).get("hard", 0.0))) > 0
        y, alpha = self.values(spec, x, {"hard": 1.0} if hard else {}, params)
        m = 2.0**cfg.bits - 1.0
        k = (y + 1.0) * (m / 2.0)  # the level index of (2k − m)/m
        if not bool(jnp.all((jnp.abs(y) <= 1.0) & (jnp.abs(k - jnp.round(k)) < 1e-3))):
            raise NotExportable(
                f"pair={cfg.label!r} with {dict(cfg.kwargs)} has a forward that is not a sign "
                f"or on its {cfg.bits}-bit levels, so it has no integer codes; allowed: a "
                "pair whose forward is sign or staircase (bc, pc, bnn, bnn+, multibit), or its "
                "exact state (hard=1)"
            )
        a = jnp.ones((1,) * x.ndim, jnp.float32) if alpha is None else alpha
        if cfg.bits == 1:
            if cfg.learn_scale:
                return _binary_qarray(y > 0, a)
            q = quantize_binary(x, BinaryConfig(scaling=cfg.scaling, axis=cfg.axis))
            return dataclasses.replace(q, values=(y > 0).astype(jnp.uint8))
        # x̂ = α·(2k − m)/m = (2α/m)·(k − m/2): unsigned codes k, a float zero point m/2
        zero_point = jnp.full(jnp.shape(a), m / 2.0, jnp.float32)
        return _uniform_qarray(jnp.round(k), 2.0 * a / m, zero_point, cfg.bits, False)

    def params_from_codes(self, spec, q):
        if not spec.config.learn_scale:
            return {}
        m = 2.0**spec.config.bits - 1.0
        alpha = q.scale if spec.config.bits == 1 else q.scale * (m / 2.0)
        return {"scale": alpha}

    def _check_exact(self, spec, stats):
        cfg = spec.config
        if cfg.bits != 1:
            raise NotExportable(
                f"pair {cfg.label!r} has {cfg.bits}-bit levels; integer inference runs 1-bit "
                "pairs (XNOR/popcount); allowed: bits=1, or `qflax eval` without --integer"
            )
        hard = (stats or {}).get("hard")
        if isinstance(hard, jax.core.Tracer):  # a traced reference: planning checked it eagerly
            return
        if cfg.relaxed and not (hard is not None and float(np.asarray(hard)) > 0):
            forward = getattr(cfg.make().forward, "__name__", "its forward")
            raise NotExportable(
                f"pair {cfg.label!r} is in its relaxed state (hard=0): the forward {forward} "
                "is not a sign (BNN++'s SignSwish_μ lies strictly between −1 and +1 for every "
                "finite μ; ProxConnect's prox and ProxQuant's identity are not ±1 either), so "
                "its values have no bits for XNOR/popcount integer inference; allowed: the "
                "exact state a finished run ends in (hard=1, set by training at its last "
                "epoch), kind 'binary', or a pair whose forward is sign"
            )

    def weight_lowering(self, spec, params, stats):
        self._check_exact(spec, stats)
        return WeightLowering("binary", granularity=spec.config.scaling, axis=spec.config.axis)

    def input_lowering(self, spec, params, stats):
        self._check_exact(spec, stats)
        if spec.config.scaling != "none":
            raise NotExportable(
                f"pair inputs with scaling={spec.config.scaling!r}: XNOR/popcount runs "
                "unscaled signs"
            )
        return InputLowering("sign")

    def sign_values(self, spec, x, params, stats):
        return self.values(spec, x, stats, params)

    def check_int8(self, spec) -> None:
        cfg = spec.config
        if cfg.relaxed or cfg.bits > 7:
            forward = getattr(cfg.make().forward, "__name__", "its forward")
            raise NotExportable(
                f"pair {cfg.label!r} with forward {forward} and bits={cfg.bits}: an int8 operand "
                "needs a forward that is a sign or a staircase of <= 7 bits in every training "
                "step (a relaxed forward is between the levels until its exact state)"
            )

    def int8_scale(self, spec, x, params, stats):
        # α·(2k − m)/m: codes 2k − m in [−m, m] at the scale α/m (m = 1: signs at α)
        _, alpha = self.values(spec, x, stats, params)
        a = jnp.ones((1,) * x.ndim, jnp.float32) if alpha is None else alpha
        return jax.lax.stop_gradient(a.astype(jnp.float32) / (2.0**spec.config.bits - 1.0))


register_family(PairFamily())
