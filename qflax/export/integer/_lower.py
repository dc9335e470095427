"""Lowering a planned model to an :class:`~qflax.export.IntegerProgram`
(:func:`export_integer`): per layer of the plan, by its weight lowering, an
:class:`~qflax.export.IntegerLayer` (weights from :mod:`._weights`, BatchNorm folded into the
requantization), a :class:`~qflax.export.BinaryLayer` (packed signs, folded thresholds) or a
:class:`~qflax.export.FloatLayer`, each with its :class:`~qflax.export.integer.Epilogue`.
Depends on the plan, the arithmetic, the program types (and the float reference's chain, which
the thresholds replay)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax.export._export import quantize_tensor
from qflax.export.integer._arith import (
    INT32_MAX,
    auto_shift,
    code_dtype,
    pack_words,
    padded_columns,
    quantize_multiplier,
)
from qflax.export.integer._plan import (
    CODE_KINDS,
    InputGrid,
    Step,
    binary_weight,
    inner,
    input_grid,
    layer_kernel,
    layer_lowering,
    params,
    plan,
)
from qflax.export.integer._program import (
    BinaryLayer,
    Epilogue,
    FloatLayer,
    IntegerLayer,
    IntegerProgram,
)
from qflax.export.integer._reference import post
from qflax.export.integer._weights import lower_weights
from qflax.quantizers import WeightLowering, unpack

__all__ = ["export_integer"]


@dataclasses.dataclass(frozen=True)
class _Next:
    """What a layer's output feeds: the next layer's lowering kind (None after the last layer)
    and, when it runs on codes, its input scale and grid."""

    kind: str | None = None
    scale: float | None = None
    grid: InputGrid | None = None


def _norm_factor(norm: Any, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, μ, β)`` of an eval-mode BatchNorm in float64: ``BN(y) = (y − μ)·m + β``."""
    if norm is None:
        return np.ones(channels), np.zeros(channels), np.zeros(channels)
    _check_norm_axis(norm)
    var = np.asarray(norm.var[...], np.float64)
    gamma = np.ones(channels) if norm.scale is None else np.asarray(norm.scale[...], np.float64)
    beta = np.zeros(channels) if norm.bias is None else np.asarray(norm.bias[...], np.float64)
    m = gamma / np.sqrt(var + float(norm.epsilon))
    return m, np.asarray(norm.mean[...], np.float64), beta


def _check_norm_axis(norm: Any) -> None:
    if tuple(np.atleast_1d(norm.axis).tolist()) != (-1,):
        raise ValueError(f"BatchNorm axis={norm.axis!r} is not allowed; allowed: -1")


def _op_fields(step: Step) -> dict[str, Any]:
    layer = inner(step.layer)
    padding = getattr(layer, "padding", "SAME")
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return dict(
        op=step.op,
        strides=tuple(int(s) for s in getattr(layer, "strides", ()) or ()),
        padding=padding,
        flatten=step.flatten,
    )


def _norm_fields(norm: Any) -> dict[str, Any]:
    """A BatchNorm's float32 arrays for a float32 :class:`Epilogue`."""
    if norm is None:
        return {}
    _check_norm_axis(norm)
    channels = norm.mean[...].shape[0]
    return dict(
        norm_mean=jnp.asarray(norm.mean[...], jnp.float32),
        norm_var=jnp.asarray(norm.var[...], jnp.float32),
        norm_scale=jnp.ones((channels,), jnp.float32)
        if norm.scale is None
        else jnp.asarray(norm.scale[...], jnp.float32),
        norm_bias=jnp.zeros((channels,), jnp.float32)
        if norm.bias is None
        else jnp.asarray(norm.bias[...], jnp.float32),
        norm_epsilon=float(norm.epsilon),
    )


def _float_output(nxt: _Next) -> dict[str, Any]:
    """The output of a float32 epilogue: the next layer's codes, its bits, or float32."""
    if nxt.kind == "binary":
        return dict(output="bits")
    if nxt.scale is None:
        return dict(output="float")
    lo, hi = nxt.grid.qmin, nxt.grid.qmax
    return dict(
        output="codes",
        out_scale=jnp.asarray(nxt.scale, jnp.float32),
        out_min=int(lo),
        out_max=int(hi),
        out_dtype=code_dtype(lo, hi),
    )


def _float_bias(step: Step) -> jax.Array | None:
    bias = inner(step.layer).bias
    return None if bias is None else jnp.asarray(bias[...], jnp.float32)


def _float_layer(step: Step, nxt: _Next) -> FloatLayer:
    epilogue = Epilogue(
        bias=_float_bias(step),
        **_norm_fields(step.norm),
        activation=step.act,
        pool=step.pool,
        **_float_output(nxt),
    )
    kernel = jnp.asarray(inner(step.layer).kernel[...], jnp.float32)
    return FloatLayer(kernel=kernel, epilogue=epilogue, **_op_fields(step))


def _act_scale(step: Step, act_scales: Mapping[str, float] | None) -> float:
    if act_scales is not None and step.path in act_scales:
        return float(np.float32(act_scales[step.path]))
    learned = input_grid(step).learned_scale
    if learned is not None:
        return learned
    raise ValueError(
        f"act_scales has no scale for layer {step.path!r} (absmax activations need a static "
        "scale); allowed: act_scales from static_act_scales(model, batches)"
    )


def _integer_layer(
    step: Step,
    lowering: WeightLowering,
    s_in: float,
    nxt: _Next,
    *,
    logit_bits: int,
    bias_shift: int | None,
    shifts: bool,
) -> tuple[IntegerLayer, float | None]:
    """A uniform, pow2 or codeq layer; also returns the logit scale when it is the last layer."""
    layer = step.layer
    wspec = layer.recipe.weight  # checked by layer_lowering, with the input's spec
    q = unpack(quantize_tensor(wspec, layer_kernel(layer), params(layer, "weight")))
    grid = input_grid(step)
    act_max = max(abs(grid.qmin), abs(grid.qmax))
    weights = lower_weights(step, lowering, q, act_max, shifts)
    worst, out_channels = weights.worst, q.shape[-1]
    bias = inner(layer).bias
    b = np.zeros(out_channels) if bias is None else np.asarray(bias[...], np.float64)
    m, mu, beta = _norm_factor(step.norm, out_channels)
    e = np.float64(s_in) * weights.scale * m  # real value of one accumulator unit (signed)
    b = beta + (b - mu) * m
    negative = e < 0
    negate = jnp.asarray(negative) if negative.any() else None
    e_abs = np.abs(e)
    fields = dict(
        _op_fields(step),
        kernel=weights.kernel,
        input_sum=weights.input_sum,
        shifts=weights.shifts,
        coefficients=weights.coefficients,
    )
    last = nxt.kind is None
    if not last and nxt.kind not in CODE_KINDS:  # the boundary back to float (or to bits)
        epilogue = Epilogue(
            scale=jnp.asarray(e, jnp.float32),
            bias=jnp.asarray(b, jnp.float32),
            activation=step.act,
            pool=step.pool,
            output="bits" if nxt.kind == "binary" else "float",
        )
        return IntegerLayer(epilogue=epilogue, **fields), None
    units = float(np.abs(b / e_abs).max())  # the largest bias, in accumulator units
    k = auto_shift(worst, units) if bias_shift is None else bias_shift
    bias_q = np.round(b * 2.0**k / e_abs)
    logit_scale = None
    if last:
        bits = math.ceil(math.log2(max(worst + units, 1.0)))
        logit_shift = int(max(0, min(20, logit_bits - bits)))
        out_scale = float(e_abs.max() * 2.0**-logit_shift)
        lo, hi, dtype, output = -INT32_MAX, INT32_MAX, "int32", "logits"
        logit_scale = out_scale
    else:
        out_scale = float(nxt.scale)
        lo, hi = nxt.grid.qmin, nxt.grid.qmax
        dtype, output = code_dtype(lo, hi), "codes"
        if step.act == "hardtanh":  # round(clip(y, −1, 1)/s) = clip(round(y/s), r(−1), r(1))
            s = np.float32(nxt.scale)
            lo = max(lo, int(np.round(np.float32(-1.0) / s)))
            hi = min(hi, int(np.round(np.float32(1.0) / s)))
    if worst * 2.0**k + np.abs(bias_q).max() > INT32_MAX:
        raise ValueError(
            f"layer {step.path!r}: the int32 accumulator can overflow (bias_shift={k}); "
            "allowed: a smaller bias_shift"
        )
    m0, t = quantize_multiplier(e_abs / (out_scale * 2.0**k))
    epilogue = Epilogue(
        multiplier=jnp.asarray(m0),
        shift=jnp.asarray(t),
        acc_bias=jnp.asarray(bias_q.astype(np.int32)),
        negate=negate,
        activation=step.act,
        pool=step.pool,
        acc_shift=k,
        out_min=int(lo),
        out_max=int(hi),
        out_dtype=dtype,
        output=output,
    )
    return IntegerLayer(epilogue=epilogue, **fields), logit_scale


def _binary_weights(step: Step) -> tuple[np.ndarray, jax.Array]:
    """``(sign(w), α)`` of a binary layer, computed by the jitted function the reference runs."""
    graphdef, state = nnx.split(step.layer)
    signs, alpha = jax.jit(lambda s: binary_weight(nnx.merge(graphdef, s)))(state)
    return np.asarray(signs), alpha


def _binary_thresholds(step: Step, alpha: jax.Array, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """``(direction, threshold)`` per channel: ``sign(act(BN(α·dot + b))) = +1`` iff
    ``direction·dot ≥ threshold``, for every integer ``dot`` in ``[−n, n]``.

    The float32 chain of the reference (:func:`~qflax.export.integer._reference.post`, with the same
    arguments passed at run time, jitted) is evaluated on every ``dot`` in ``[−n, n]``; it is
    monotone in ``dot`` (nondecreasing when ``α·γ ≥ 0``, nonincreasing otherwise), which is checked,
    and the threshold is read off: nondecreasing: ``direction = 1``, ``T`` the smallest ``dot``
    giving +1; nonincreasing: ``direction = −1``, ``T = −(the largest dot giving +1)``. A channel
    that is +1 everywhere gets ``T = −n`` (always true), one that is never +1 ``T = n + 1``.
    """
    layer = inner(step.layer)
    bias = None if layer.bias is None else layer.bias[...]
    graphdef, state = (None, None) if step.norm is None else nnx.split(step.norm)
    act = step.act

    def chain(alpha, bias, state, dots):
        norm = None if graphdef is None else nnx.merge(graphdef, state)
        return post(dots[:, None] * alpha, bias, norm, act) >= 0

    n = int(fan_in)
    dots = jnp.arange(-n, n + 1, dtype=jnp.int32).astype(jnp.float32)
    plus = np.asarray(jax.jit(chain)(alpha, bias, state, dots))  # (2n + 1, channels)
    up = np.all(plus[1:] >= plus[:-1], axis=0)
    down = np.all(plus[1:] <= plus[:-1], axis=0)
    if not np.all(up | down):  # cannot happen: every op of the chain is monotone
        raise ValueError(
            f"layer {step.path!r}: sign(act(BN(α·dot + b))) is not monotone in dot on channels "
            f"{np.flatnonzero(~(up | down)).tolist()}; allowed: a monotone chain"
        )
    some = plus.any(axis=0)
    first = np.argmax(plus, axis=0) - n  # the smallest dot giving +1
    final = n - np.argmax(plus[::-1], axis=0)  # the largest dot giving +1
    direction = np.where(up, 1, -1).astype(np.int32)
    threshold = np.where(some, np.where(up, first, -final), n + 1).astype(np.int32)
    return direction, threshold


def _binary_layer(step: Step, nxt: _Next) -> BinaryLayer:
    signs, alpha = _binary_weights(step)
    plus = signs > 0
    shape = tuple(plus.shape)
    out_channels = shape[-1]
    fan_in = math.prod(shape[:-1])
    words = pack_words(jnp.asarray(plus.reshape(fan_in, out_channels).T)).T  # (words, out)
    words = jnp.pad(words, ((0, 0), (0, padded_columns(out_channels) - out_channels)))
    alpha = jnp.broadcast_to(alpha, (out_channels,))
    if nxt.kind == "binary":
        direction, threshold = _binary_thresholds(step, alpha, fan_in)
        epilogue = Epilogue(
            threshold=jnp.asarray(threshold),
            direction=jnp.asarray(direction),
            activation=step.act,
            pool=step.pool,
            output="bits",
        )
    else:
        epilogue = Epilogue(
            scale=alpha,
            bias=_float_bias(step),
            **_norm_fields(step.norm),
            activation=step.act,
            pool=step.pool,
            **_float_output(nxt),
        )
    return BinaryLayer(kernel=words, epilogue=epilogue, kernel_shape=shape, **_op_fields(step))


def export_integer(
    model: nnx.Module,
    act_scales: Mapping[str, float] | None = None,
    *,
    logit_bits: int = 30,
    bias_shift: int | None = None,
    shifts: bool = True,
) -> IntegerProgram:
    """Builds the integer program of an MLP / CNN, float layers and quantized layers mixed.

    Every layer must be float (no quantizer: it runs in float32 as the model runs it), uniform
    (absmax / learned_step weights, symmetric, <= 8 bits), power-of-two (pow2 weights) with an
    absmax / learned_step input, or binary (sign weights AND inputs); anything else raises
    ValueError naming the layer and its recipe, before any work. A binary layer after a ReLU
    is refused (its input signs would all be +1: ``activation="hardtanh"`` models), as is a
    model whose activation is not relu/hardtanh. A quantized layer followed by an eval-mode
    BatchNorm has the BatchNorm folded in AFTER quantization
    (``BN(x̂·ŵ) = x̂·ŵ·m + β − μ·m`` with ``m = γ/√(σ²+ε)``: the codes stay the model's, the
    per-channel factor goes into the requantization multiplier, or into the threshold of a
    binary layer), so the reference is the model's own fake-quant forward
    (:func:`fake_quant_forward` with the same ``act_scales``).

    Per uniform / pow2 layer (``s_in``: its static input scale, ``s_w[c]``: the weight scale of
    channel ``c`` (pow2: ``s_c·2^−K``, module docstring), ``e[c] = s_in·s_w[c]·m[c]``,
    ``b[c]``: the bias with BN folded):

    * followed by a uniform / pow2 layer (input scale ``s_out``): int8 weight codes (pow2: one
      ternary mask per exponent, combined by shifts), the accumulator shifted left by ``k``
      bits, ``bias = round(b·2^k/|e|)`` (int32), ``(M0, t) = quantize_multiplier(|e|/(s_out·
      2^k))``, output clipped to the next layer's codes. ``k = 0`` is the paper's bias at
      scale ``s_in·s_w``; ``bias_shift=None`` takes the largest ``k ≤ 16`` the worst-case
      accumulator allows, which rounds the bias 2^k times finer (the float reference adds the
      exact bias).
    * followed by a float layer: ``y = acc·e + b`` in float32 (the boundary back to float);
      followed by a binary layer: the same, then the signs ``y ≥ 0`` as bits.
    * the last layer: int32 logits at a common scale ``s_in·max|e|·2^−k``, with ``k ≥ 0`` as
      large as keeps ``|logits| < 2^logit_bits``, so argmax over them is the prediction.

    Per binary layer (:class:`BinaryLayer`): XNOR/popcount ``dot``; followed by a binary layer,
    the folded per-channel threshold on ``dot`` (BatchNorm, activation, pool and the next sign);
    otherwise ``float32(dot)·α`` and the float ops (float32 logits when it is the last layer).

    A float layer followed by a quantized one ends with the next layer's input codes
    ``clip(round(y/s), qmin, qmax)`` (the boundary to integer) or signs; a quantized first
    layer gets its codes (or signs) from :func:`quantize_input`.

    Args:
      model: MLP or CNN.
      act_scales: ``{path: scale}`` of the uniform inputs (from :func:`static_act_scales`);
        None or a missing path: the layer's learned scale (learned_step), absmax layers need
        one. Binary layers need none.
      logit_bits: bound on the magnitude of the int32 logits (bits).
      bias_shift: ``k`` above (0..16), None: automatic.
      shifts: pow2 layers as one ternary mask per exponent combined by left shifts (True), or
        as one integer kernel ``±2^(K−k)`` (False; the same int32 accumulator, with a multiply).

    Returns:
      The :class:`IntegerProgram`.
    """
    steps = plan(model)
    lowerings = [layer_lowering(step) for step in steps]
    if bias_shift is not None and not (
        isinstance(bias_shift, int) and not isinstance(bias_shift, bool) and 0 <= bias_shift <= 16
    ):
        raise ValueError(f"bias_shift={bias_shift!r} is not allowed; allowed: None or 0..16")
    coded = [lowering.kind in CODE_KINDS for lowering in lowerings]
    scales = {
        step.path: _act_scale(step, act_scales)
        for step, on_codes in zip(steps, coded, strict=True)
        if on_codes
    }
    grids = {step.path: input_grid(step) for step, c in zip(steps, coded, strict=True) if c}
    layers: list[IntegerLayer | BinaryLayer | FloatLayer] = []
    logit_scale = 1.0
    for i, (step, lowering) in enumerate(zip(steps, lowerings, strict=True)):
        if i == len(steps) - 1:
            nxt = _Next()
        else:
            following = steps[i + 1]
            nxt = _Next(
                lowerings[i + 1].kind, scales.get(following.path), grids.get(following.path)
            )
        if lowering.kind == "float":
            layers.append(_float_layer(step, nxt))
        elif lowering.kind == "binary":
            layers.append(_binary_layer(step, nxt))
        else:
            layer, scale = _integer_layer(
                step,
                lowering,
                scales[step.path],
                nxt,
                logit_bits=logit_bits,
                bias_shift=bias_shift,
                shifts=shifts,
            )
            layers.append(layer)
            logit_scale = logit_scale if scale is None else scale
    first = steps[0]
    grid = grids.get(first.path)
    return IntegerProgram(
        layers=tuple(layers),
        input_scale=scales[first.path] if coded[0] else None,
        input_min=grid.qmin if coded[0] else -128,
        input_max=grid.qmax if coded[0] else 127,
        logit_scale=logit_scale,
        input_bits=lowerings[0].kind == "binary",
    )
