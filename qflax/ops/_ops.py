"""Quantized ``dot_general`` / ``conv_general_dilated`` / ``einsum`` with three quantizer slots.

Each op has the signature of its ``jax.lax`` / ``jax.numpy`` counterpart plus three keyword-only
slots, each a callable ``x -> x̂`` (``None`` keeps that tensor in float):

* ``lhs_quantizer`` and ``rhs_quantizer`` quantize the two forward operands::

      y = op(Q_lhs(lhs), Q_rhs(rhs))

  Their gradients are the quantizers' own (straight-through, clipped, pairs, learned scales...),
  so ``∂L/∂lhs = Q_lhs'ᵀ · vjp_lhs(op)(g)`` at the quantized operands, and gradients reach every
  learnable quantizer parameter the callables close over.
* ``grad_quantizer`` quantizes the output cotangent ``g`` before the two backward products::

      dlhs = vjp_lhs(op at (Q_lhs(lhs), Q_rhs(rhs)))(Q_dlhs(g))
      drhs = vjp_rhs(op at (Q_lhs(lhs), Q_rhs(rhs)))(Q_drhs(g))

  A single callable is used for both (``Q_dlhs = Q_drhs``, applied once); a pair
  ``(dlhs_quantizer, drhs_quantizer)`` applies two independent quantizers (e.g. stochastic
  rounding with two keys, as in Chen et al. 2020, METHODS.md §7). The forward value never changes.
  A gradient quantizer wrapped by :func:`with_operands` is called as ``Q(g, lhs, rhs)`` with the
  quantized forward operands (e.g. leverage-score sampling, whose row probabilities use the
  norms of the input's rows: Xi et al. 2023).

``forward_dtype="int8"`` (``dot_general`` and ``einsum``) runs the forward product on integer
codes: each slot is an :func:`int8_operand` — a quantizer whose values are ``s · c`` with integer
codes ``c`` in ``[−128, 127]`` and a scale ``s`` constant along the contracted axes (per tensor,
or per row / output channel) — and the op computes

    y = (s_lhs ⊗ s_rhs) · op_int32(c_lhs, c_rhs)        (int8 × int8, int32 accumulation)

which equals ``op(Q_lhs(lhs), Q_rhs(rhs))`` up to float32 rounding (the integer sum is exact;
the float one rounds at every add). The backward is unchanged: the float transposes of the op
at the quantized operands, then the quantizers' own VJPs (and the gradient quantizer, if any).

The gradient quantizer is wrapped in one module-level ``jax.custom_vjp``; the callables it gets
are closure-converted (``jax.closure_convert``), so they may close over traced arrays (a PRNG key
or a learnable parameter inside ``jit``/``grad``); the hoisted values get zero cotangents (they do
not affect the forward value). With no gradient quantizer the op is the plain ``jax.lax`` op on
the quantized operands: its jaxpr has exactly one ``dot_general`` / ``conv_general_dilated``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "FORWARD_DTYPES",
    "GradQuantizer",
    "Int8Operand",
    "OperandGradQuantizer",
    "Quantizer",
    "int8_operand",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
    "quantized_einsum",
    "with_operands",
]

# A quantizer slot: ``x -> x̂`` (same shape and dtype), or None for float.
Quantizer = Callable[[jax.Array], jax.Array]
# The gradient slot: one quantizer for both backward products, or (dlhs, drhs) quantizers.
GradQuantizer = Quantizer | tuple[Quantizer | None, Quantizer | None]


class OperandGradQuantizer:
    """A gradient quantizer that also reads the forward operands: ``fn(g, lhs, rhs) -> ĝ``
    (``lhs``/``rhs``: the quantized operands the forward multiplied). Made by
    :func:`with_operands`; any slot of ``grad_quantizer`` may hold one."""

    def __init__(self, fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]):
        if not callable(fn):
            raise ValueError(f"fn={fn!r} is not callable; allowed: a function (g, lhs, rhs) -> ĝ")
        self.fn = fn

    def __call__(self, g: jax.Array, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return self.fn(g, lhs, rhs)

    def __repr__(self) -> str:
        return f"with_operands({self.fn!r})"


def with_operands(fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]):
    """Marks ``fn(g, lhs, rhs) -> ĝ`` as a gradient quantizer that reads the forward operands.

    >>> q = with_operands(lambda g, lhs, rhs: g * (jnp.abs(lhs).sum() > 0))
    >>> jax.grad(lambda x: quantized_dot_general(x, jnp.ones((2, 1)), (((1,), (0,)), ((), ())),
    ...     grad_quantizer=q).sum())(jnp.ones((1, 2))).tolist()
    [[1.0, 1.0]]
    """
    return OperandGradQuantizer(fn)


# The dtypes a forward product can take its quantized operands in (float32: fake-quant values).
FORWARD_DTYPES = ("float32", "int8")


class Int8Operand:
    """A quantizer slot whose values are ``scale(x) · c`` with integer codes ``c`` in
    ``[−128, 127]``: made by :func:`int8_operand`; what ``forward_dtype="int8"`` needs."""

    def __init__(self, quantizer: Quantizer, scale: Callable[[jax.Array], jax.Array]):
        if not callable(quantizer):
            raise ValueError(f"quantizer={quantizer!r} is not callable; allowed: x -> x̂")
        if not callable(scale):
            raise ValueError(f"scale={scale!r} is not callable; allowed: x -> s")
        self.quantizer = quantizer
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.quantizer(x)

    def __repr__(self) -> str:
        return f"int8_operand({self.quantizer!r}, {self.scale!r})"


def int8_operand(quantizer: Quantizer, scale: Callable[[jax.Array], jax.Array]) -> Int8Operand:
    """Marks ``quantizer`` as giving ``scale(x) · c`` with integers ``c`` in ``[−128, 127]``.

    ``scale(x)`` broadcasts against ``x`` and must be constant along the axes the op contracts
    (one per tensor, or per output channel of a kernel); it gets no gradient (the quantizer's
    own VJP differentiates its scale). Codes are recovered as ``round(x̂ / s)`` (exact while
    ``|c| ≤ 2²¹``), so a quantizer that is only ``s · c`` up to a few ulps (PACT's ``c·α/n``)
    gives the same codes.

    >>> q = int8_operand(lambda x: jnp.round(x * 4) / 4, lambda x: jnp.float32(0.25))
    >>> quantized_dot_general(jnp.array([[0.3, 0.6]]), jnp.array([[1.0], [2.0]]),
    ...     (((1,), (0,)), ((), ())), lhs_quantizer=q,
    ...     rhs_quantizer=int8_operand(lambda w: w, lambda w: jnp.float32(1.0)),
    ...     forward_dtype="int8").tolist()
    [[1.5]]
    """
    return Int8Operand(quantizer, scale)


def _int8_codes(x_hat: jax.Array, scale: jax.Array) -> jax.Array:
    """``round(x̂ / s)`` as int8 (``s = 0``: a zero tensor, codes 0; NaN: code 0, as XLA casts;
    out-of-range values saturate)."""
    s = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    c = jnp.round(x_hat.astype(jnp.float32) / s)
    return jnp.clip(c, -128.0, 127.0).astype(jnp.int8)


def _int8_forward(int_op, scale_op, out_dtype, lhs, rhs, lhs_scale, rhs_scale) -> jax.Array:
    """``(s_lhs ⊗ s_rhs) · int_op(c_lhs, c_rhs)``: one int8 product with int32 accumulation."""
    acc = int_op(_int8_codes(lhs, lhs_scale), _int8_codes(rhs, rhs_scale))
    return (acc.astype(jnp.float32) * scale_op(lhs_scale, rhs_scale)).astype(out_dtype)


def _operand_scale(operand: Int8Operand, x: jax.Array, field: str) -> jax.Array:
    s = jax.lax.stop_gradient(jnp.asarray(operand.scale(x), jnp.float32))
    if s.ndim > x.ndim:
        raise ValueError(
            f"{field}.scale returned shape {s.shape} for an operand of shape {x.shape}; "
            "allowed: a shape that broadcasts against the operand"
        )
    s = s.reshape((1,) * (x.ndim - s.ndim) + s.shape)
    try:
        jnp.broadcast_shapes(s.shape, x.shape)
    except ValueError:
        raise ValueError(
            f"{field}.scale returned shape {s.shape} for an operand of shape {x.shape}; "
            "allowed: a shape that broadcasts against the operand"
        ) from None
    return s


def _check_scale_axes(
    s: jax.Array, x_shape: tuple[int, ...], contracted: Sequence[int], field: str
) -> None:
    varying = [a for a in contracted if s.shape[a] != 1 and x_shape[a] != 1]
    if varying:
        raise ValueError(
            f"{field}.scale of shape {s.shape} varies along the contracted axes {varying} of an "
            f"operand of shape {x_shape}; allowed for forward_dtype='int8': a scale per tensor "
            "or along axes the product keeps (per output channel)"
        )


def _broadcast_axes(s: jax.Array, x_shape: tuple[int, ...], axes: Sequence[int]) -> jax.Array:
    """``s`` broadcast to the operand's sizes on ``axes`` (the axes both operands share)."""
    shape = tuple(x_shape[a] if a in axes else n for a, n in enumerate(s.shape))
    return jnp.broadcast_to(s, shape)


def _dot_scales(dimension_numbers, lhs, rhs, ls, rs, fields):
    """Scales shaped for ``lax.dot_general(ls, rs, dimension_numbers)`` (the output's scale)."""
    (lc, rc), (lb, rb) = dimension_numbers
    _check_scale_axes(ls, lhs.shape, lc, fields[0])
    _check_scale_axes(rs, rhs.shape, rc, fields[1])
    return _broadcast_axes(ls, lhs.shape, lb), _broadcast_axes(rs, rhs.shape, rb)


def _einsum_labels(subscripts: str) -> tuple[str, str, str]:
    spec = subscripts.replace(" ", "")
    if "." in spec:
        raise ValueError(
            f"subscripts={subscripts!r} uses an ellipsis; allowed for forward_dtype='int8': "
            "explicit labels"
        )
    if "->" in spec:
        inputs, out = spec.split("->")
    else:
        inputs = spec
        out = "".join(sorted(c for c in set(inputs.replace(",", "")) if inputs.count(c) == 1))
    parts = inputs.split(",")
    if len(parts) != 2:
        raise ValueError(f"subscripts={subscripts!r} names {len(parts)} operands; allowed: 2")
    return parts[0], parts[1], out


def _einsum_scales(subscripts, lhs, rhs, ls, rs, fields):
    """Scales shaped for ``jnp.einsum(subscripts, ls, rs)`` (the output's scale)."""
    a, b, out = _einsum_labels(subscripts)
    for labels, s, x, field in ((a, ls, lhs, fields[0]), (b, rs, rhs, fields[1])):
        contracted = [i for i, c in enumerate(labels) if c not in out]
        _check_scale_axes(s, x.shape, contracted, field)
    shared = lambda labels, other: [i for i, c in enumerate(labels) if c in other and c in out]
    return (
        _broadcast_axes(ls, lhs.shape, shared(a, b)),
        _broadcast_axes(rs, rhs.shape, shared(b, a)),
    )


def _check_forward_dtype(forward_dtype: Any, lhs_quantizer: Any, rhs_quantizer: Any) -> bool:
    """Whether the forward runs on int8 codes (checks the slots)."""
    if forward_dtype is None or forward_dtype == "float32":
        return False
    if forward_dtype not in FORWARD_DTYPES:
        raise ValueError(
            f"forward_dtype={forward_dtype!r} is not allowed; allowed: {FORWARD_DTYPES} or None"
        )
    for q, field in ((lhs_quantizer, "lhs_quantizer"), (rhs_quantizer, "rhs_quantizer")):
        if not isinstance(q, Int8Operand):
            raise ValueError(
                f"{field}={q!r} is not an int8 operand; allowed for forward_dtype='int8': "
                "int8_operand(quantizer, scale) in both slots"
            )
    return True


# --------------------------------------------------------------------------------------------
# The gradient-quantizing wrapper: one custom_vjp, defined once.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _grad_quantized(
    op: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[..., jax.Array] | None,
    dlhs_quantizer: Callable[..., jax.Array] | None,
    drhs_quantizer: Callable[..., jax.Array] | None,
    shared: bool,
    lhs: jax.Array,
    rhs: jax.Array,
    dlhs_consts: tuple[jax.Array, ...],
    drhs_consts: tuple[jax.Array, ...],
    forward_consts: tuple[jax.Array, ...],
) -> jax.Array:
    """``op(lhs, rhs)`` — or ``forward(lhs, rhs, *forward_consts)``, a product of the same
    value (the int8 one) — whose backward transposes ``op`` at ``(lhs, rhs)`` with the output
    cotangent quantized by the two gradient quantizers (None: as it is)."""
    del dlhs_quantizer, drhs_quantizer, shared, dlhs_consts, drhs_consts
    return op(lhs, rhs) if forward is None else forward(lhs, rhs, *forward_consts)


def _grad_quantized_fwd(op, forward, dlhs_quantizer, drhs_quantizer, shared, lhs, rhs, dc, rc, fc):
    del dlhs_quantizer, drhs_quantizer, shared
    out = op(lhs, rhs) if forward is None else forward(lhs, rhs, *fc)
    return out, (lhs, rhs, dc, rc, fc)


def _apply_converted(quantizer, g: jax.Array, operands, consts: tuple[jax.Array, ...]):
    if quantizer is None:
        return g
    g_hat = quantizer(g, *operands, *consts)
    if g_hat.shape != g.shape:
        raise ValueError(
            f"grad_quantizer returned shape {g_hat.shape} for a cotangent of shape {g.shape}; "
            "allowed: a quantizer that keeps the shape"
        )
    return g_hat.astype(g.dtype)


def _grad_quantized_bwd(op, forward, dlhs_quantizer, drhs_quantizer, shared, residuals, g):
    del forward
    lhs, rhs, dc, rc, fc = residuals
    dq, dq_operands = dlhs_quantizer if dlhs_quantizer is not None else (None, False)
    rq, rq_operands = drhs_quantizer if drhs_quantizer is not None else (None, False)
    g_lhs = _apply_converted(dq, g, (lhs, rhs) if dq_operands else (), dc)
    g_rhs = g_lhs if shared else _apply_converted(rq, g, (lhs, rhs) if rq_operands else (), rc)
    # The op is linear in each operand: transpose each map (no forward recomputation).
    (dlhs,) = jax.linear_transpose(lambda a: op(a, rhs), lhs)(g_lhs)
    (drhs,) = jax.linear_transpose(lambda b: op(lhs, b), rhs)(g_rhs)
    zeros = lambda consts: tuple(jnp.zeros_like(c) for c in consts)
    return dlhs, drhs, zeros(dc), zeros(rc), zeros(fc)


_grad_quantized.defvjp(_grad_quantized_fwd, _grad_quantized_bwd)


def _check_slot(value: Any, field: str) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{field}={value!r} is not callable; allowed: None or a function x -> x̂")


def _split_grad_quantizer(grad_quantizer: Any) -> tuple[Any, Any, bool]:
    """Returns ``(dlhs_quantizer, drhs_quantizer, shared)``."""
    if isinstance(grad_quantizer, tuple | list):
        if len(grad_quantizer) != 2:
            raise ValueError(
                f"grad_quantizer has {len(grad_quantizer)} entries; allowed: a callable or a "
                "pair (dlhs_quantizer, drhs_quantizer)"
            )
        dq, rq = grad_quantizer
        _check_slot(dq, "grad_quantizer[0]")
        _check_slot(rq, "grad_quantizer[1]")
        return dq, rq, False
    _check_slot(grad_quantizer, "grad_quantizer")
    return grad_quantizer, grad_quantizer, True


def _quantize_operand(quantizer: Quantizer | None, x: jax.Array, field: str) -> jax.Array:
    if quantizer is None:
        return x
    x_hat = jnp.asarray(quantizer(x))
    if x_hat.shape != x.shape:
        raise ValueError(
            f"{field} returned shape {x_hat.shape} for an operand of shape {x.shape}; "
            "allowed: a quantizer that keeps the shape"
        )
    return x_hat


def _quantized_binary_op(
    op: Callable[[jax.Array, jax.Array], jax.Array],
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    lhs_quantizer: Quantizer | None,
    rhs_quantizer: Quantizer | None,
    grad_quantizer: GradQuantizer | None,
    int8: tuple[Callable, Callable, Callable] | None = None,
) -> jax.Array:
    """``op(Q_lhs(lhs), Q_rhs(rhs))`` with the output cotangent quantized by ``grad_quantizer``.

    ``int8``: ``(int_op, scale_op, scales)`` for an int8 forward (slots checked by
    :func:`_check_forward_dtype`): ``int_op`` the op on int8 codes accumulating int32,
    ``scale_op`` the op on the two scales (the output's scale) and ``scales(lhs, rhs, ls, rs,
    fields)`` shaping the scales for it."""
    _check_slot(lhs_quantizer, "lhs_quantizer")
    _check_slot(rhs_quantizer, "rhs_quantizer")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    lhs_hat = _quantize_operand(lhs_quantizer, lhs, "lhs_quantizer")
    rhs_hat = _quantize_operand(rhs_quantizer, rhs, "rhs_quantizer")
    dq, rq, shared = (None, None, True)
    if grad_quantizer is not None:
        dq, rq, shared = _split_grad_quantizer(grad_quantizer)
    if int8 is None and dq is None and rq is None:
        return op(lhs_hat, rhs_hat)
    out = jax.eval_shape(op, lhs_hat, rhs_hat)
    forward, forward_consts = None, ()
    if int8 is not None:
        int_op, scale_op, scales = int8
        fields = ("lhs_quantizer", "rhs_quantizer")
        ls = _operand_scale(lhs_quantizer, lhs, fields[0])
        rs = _operand_scale(rhs_quantizer, rhs, fields[1])
        forward_consts = scales(lhs_hat, rhs_hat, ls, rs, fields)
        forward = functools.partial(_int8_forward, int_op, scale_op, out.dtype)
    example = jax.ShapeDtypeStruct(out.shape, out.dtype)

    def convert(q):
        # (the converted function, whether it takes the operands) and its hoisted constants
        if q is None:
            return None, []
        if isinstance(q, OperandGradQuantizer):
            fn, consts = jax.closure_convert(q.fn, example, lhs_hat, rhs_hat)
            return (fn, True), consts
        fn, consts = jax.closure_convert(q, example)
        return (fn, False), consts

    dq_conv, dc = convert(dq)
    rq_conv, rc = (dq_conv, []) if shared else convert(rq)
    return _grad_quantized(
        op,
        forward,
        dq_conv,
        rq_conv,
        shared,
        lhs_hat,
        rhs_hat,
        tuple(dc),
        tuple(rc),
        forward_consts,
    )


# --------------------------------------------------------------------------------------------
# Public ops.


def quantized_dot_general(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    dimension_numbers: lax.DotDimensionNumbers,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    *,
    out_sharding: Any = None,
    lhs_quantizer: Quantizer | None = None,
    rhs_quantizer: Quantizer | None = None,
    grad_quantizer: GradQuantizer | None = None,
    forward_dtype: str | None = None,
) -> jax.Array:
    """``jax.lax.dot_general`` of quantized operands, with an optional gradient quantizer.

    Drop-in for ``nnx.Linear(dot_general=...)`` through ``functools.partial`` of the slots.

    Args:
      lhs: left operand (for ``nnx.Linear``, the input activations).
      rhs: right operand (for ``nnx.Linear``, the kernel).
      dimension_numbers: as for ``jax.lax.dot_general``.
      precision: as for ``jax.lax.dot_general``.
      preferred_element_type: as for ``jax.lax.dot_general``.
      out_sharding: as for ``jax.lax.dot_general`` (Flax passes it).
      lhs_quantizer: ``lhs -> lhs_hat`` or None (float).
      rhs_quantizer: ``rhs -> rhs_hat`` or None (float).
      grad_quantizer: ``g -> g_hat`` applied to the output cotangent before both backward
        products, or a pair ``(dlhs_quantizer, drhs_quantizer)`` applied independently; None:
        float gradients.
      forward_dtype: None or ``"float32"`` (the product of the quantized values) or ``"int8"``
        (the product of their int8 codes, int32 accumulation, one rescale: both slots
        :func:`int8_operand` s; see the module docstring).

    Returns:
      ``lax.dot_general(lhs_quantizer(lhs), rhs_quantizer(rhs), dimension_numbers, ...)``.

    >>> q = lambda x: jnp.round(x)
    >>> quantized_dot_general(jnp.array([[0.6, 1.4]]), jnp.array([[1.0], [2.0]]),
    ...                       (((1,), (0,)), ((), ())), lhs_quantizer=q).tolist()
    [[3.0]]
    """
    op = functools.partial(
        lax.dot_general,
        dimension_numbers=dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
    int8 = None
    if _check_forward_dtype(forward_dtype, lhs_quantizer, rhs_quantizer):
        int_op = functools.partial(
            lax.dot_general,
            dimension_numbers=dimension_numbers,
            preferred_element_type=jnp.int32,
            out_sharding=out_sharding,
        )
        scale_op = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers)
        scales = functools.partial(_dot_scales, dimension_numbers)
        int8 = (int_op, scale_op, scales)
    return _quantized_binary_op(op, lhs, rhs, lhs_quantizer, rhs_quantizer, grad_quantizer, int8)


def quantized_conv_general_dilated(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    out_sharding: Any = None,
    *,
    lhs_quantizer: Quantizer | None = None,
    rhs_quantizer: Quantizer | None = None,
    grad_quantizer: GradQuantizer | None = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` of quantized operands, with an optional gradient quantizer.

    Drop-in for ``nnx.Conv(conv_general_dilated=...)``. Gradients reach both the input and the
    kernel (and every quantizer parameter) through the quantizers' own VJPs.

    Args:
      lhs: input (for ``nnx.Conv``, the activations).
      rhs: kernel.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        out_sharding: as for ``jax.lax.conv_general_dilated``.
      lhs_quantizer: ``lhs -> lhs_hat`` or None (float).
      rhs_quantizer: ``rhs -> rhs_hat`` or None (float).
      grad_quantizer: as for :func:`quantized_dot_general`.

    Returns:
      ``lax.conv_general_dilated(lhs_quantizer(lhs), rhs_quantizer(rhs), ...)``.
    """
    op = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
    return _quantized_binary_op(op, lhs, rhs, lhs_quantizer, rhs_quantizer, grad_quantizer)


def quantized_einsum(
    subscripts: str,
    /,
    *operands: jax.typing.ArrayLike,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    out_sharding: Any = None,
    optimize: Any = "auto",
    lhs_quantizer: Quantizer | None = None,
    rhs_quantizer: Quantizer | None = None,
    grad_quantizer: GradQuantizer | None = None,
    forward_dtype: str | None = None,
) -> jax.Array:
    """``jnp.einsum`` of two quantized operands, with an optional gradient quantizer.

    Drop-in for ``nnx.Einsum(einsum_op=...)`` (called as
    ``einsum_op(subscripts, inputs, kernel, precision=..., out_sharding=...)``) and for the
    ``einsum=`` argument of :class:`qflax.models.SelfAttention`. ``lhs_quantizer`` applies to the
    first operand, ``rhs_quantizer`` to the second; with every slot ``None`` any number of
    operands is accepted (plain ``jnp.einsum``).

    Args:
      subscripts: the einsum equation.
      *operands: the operands (exactly two when a quantizer slot is set).
      precision, preferred_element_type, out_sharding, optimize: as for ``jnp.einsum``.
      lhs_quantizer: quantizer of ``operands[0]`` or None.
      rhs_quantizer: quantizer of ``operands[1]`` or None.
      grad_quantizer: as for :func:`quantized_dot_general` (applied to the einsum's output
        cotangent).
      forward_dtype: as for :func:`quantized_dot_general` (explicit labels, no ellipsis).

    Returns:
      ``jnp.einsum(subscripts, lhs_quantizer(operands[0]), rhs_quantizer(operands[1]), ...)``.
    """
    op_kwargs = dict(
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
        optimize=optimize,
    )
    int8 = _check_forward_dtype(forward_dtype, lhs_quantizer, rhs_quantizer)
    if lhs_quantizer is None and rhs_quantizer is None and grad_quantizer is None:
        return jnp.einsum(subscripts, *operands, **op_kwargs)
    if len(operands) != 2:
        raise ValueError(
            f"quantized_einsum got {len(operands)} operands with a quantizer slot set; allowed: "
            "exactly 2 (lhs, rhs)"
        )
    op = functools.partial(jnp.einsum, subscripts, **op_kwargs)
    if int8:
        int_kwargs = dict(op_kwargs, precision=None, preferred_element_type=jnp.int32)
        int_op = functools.partial(jnp.einsum, subscripts, **int_kwargs)
        scale_op = functools.partial(jnp.einsum, subscripts)
        int8 = (int_op, scale_op, functools.partial(_einsum_scales, subscripts))
    return _quantized_binary_op(
        op, operands[0], operands[1], lhs_quantizer, rhs_quantizer, grad_quantizer, int8 or None
    )
