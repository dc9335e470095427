"""Integer-only inference — Jacob et al. 2018 (CVPR), eqs. (4)-(7): int8×int8 → int32
accumulate, int32 bias at scale ``s_in·s_w``, requantize with ``M = s_in·s_w/s_out = M0·2^−n``
(``M0`` in [0.5, 1) as a 31-bit integer) (METHODS.md §1). Differs: symmetric quantization only
(zero points 0, so ReLU is ``max(q, 0)`` and padding is code 0); per-output-channel weight
scales (so ``M`` is per channel); the rounding right shift rounds half to even (the float
reference's ``round``), not half away from zero as gemmlowp; the last layer is requantized to a
common int32 scale so that argmax over its int32 logits is the prediction.

Activation scales must be STATIC for integer inference: the ``absmax`` recipe recomputes the
activation scale from every batch, which integer hardware cannot do. :func:`static_act_scales`
calibrates one scale per layer input (``max|x| / qmax`` over a few batches), and the fake-quant
reference that integer inference matches is :func:`fake_quant_forward` with those scales.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from qflax import quantizers as qz
from qflax.export._export import quantize_tensor
from qflax.export._fold import Identity, fold_model_batchnorm
from qflax.export._qarray import unpack
from qflax.layers import QuantConv, QuantLinear
from qflax.models import CNN, MLP

__all__ = [
    "IntegerLayer",
    "IntegerProgram",
    "export_integer",
    "fake_quant_forward",
    "integer_forward",
    "quantize_multiplier",
    "requantize",
    "static_act_scales",
]

_INT32_MAX = 2**31 - 1
_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class _Step:
    path: str
    layer: Any
    op: str  # "dense" | "conv"
    norm: Any  # a BatchNorm applied after the layer (float reference only), or None
    relu: bool
    pool: bool
    flatten: bool  # flatten (batch, -1) before the layer


def _plan(model: nnx.Module) -> list[_Step]:
    """The layers of an MLP or CNN in execution order, with what follows each."""
    if isinstance(model, MLP):
        layers = [("stem", model.stem)] + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        steps = [_Step(p, m, "dense", None, True, False, i == 0) for i, (p, m) in enumerate(layers)]
        return steps + [_Step("head", model.head, "dense", None, False, False, False)]
    if isinstance(model, CNN):
        steps = []
        for (path, layer, norm), pool in zip(
            (("stem", model.stem, model.stem_norm), ("conv2", model.conv2, model.conv2_norm)),
            model.pools,
            strict=True,
        ):
            norm = None if isinstance(norm, Identity) else norm
            steps.append(_Step(path, layer, "conv", norm, True, pool, False))
        steps.append(_Step("dense", model.dense, "dense", None, True, False, True))
        return steps + [_Step("head", model.head, "dense", None, False, False, False)]
    raise ValueError(
        f"model={type(model).__name__} is not allowed for integer inference; allowed: MLP, CNN"
    )


def _inner(layer: Any) -> Any:
    return layer.inner if isinstance(layer, (QuantLinear, QuantConv)) else layer


def _linear_op(step: _Step, x: jax.Array, kernel: jax.Array, **kwargs: Any) -> jax.Array:
    inner = _inner(step.layer)
    if step.op == "dense":
        return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)
    padding = inner.padding
    if not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    return lax.conv_general_dilated(
        x,
        kernel,
        tuple(inner.strides),
        padding,
        dimension_numbers=_CONV_DIMS,
        **kwargs,
    )


def _max_pool(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.integer):
        init = jnp.array(jnp.iinfo(x.dtype).min, x.dtype)
    else:
        init = jnp.array(-jnp.inf, x.dtype)
    return lax.reduce_window(x, init, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


# ---------------------------------------------------------------------------------- float reference


def _act_spec(step: _Step):
    layer = step.layer
    if not isinstance(layer, (QuantLinear, QuantConv)):
        return None
    return layer.recipe.act


def _static_act(x: jax.Array, spec, scale: float) -> jax.Array:
    config = spec.config
    return qz.uniform(x, {"scale": jnp.full((1,) * x.ndim, scale, jnp.float32)}, config)


def fake_quant_forward(
    model: nnx.Module,
    x: jax.Array,
    act_scales: Mapping[str, float] | None = None,
    *,
    record: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """The eval-mode fake-quant forward of an MLP / CNN, with static activation scales.

    Re-traces the model's forward (flatten, layers, BatchNorm in eval mode, ReLU, 2x2 max-pool)
    with each quant layer's quantized kernel (``quantized_kernel()``) and its input quantized by
    its activation quantizer: with ``act_scales=None`` the layer's own (dynamic absmax: equal to
    ``model(x)``); with ``act_scales[path] = s`` the same uniform quantizer with the fixed scale
    ``s`` (the reference integer inference matches).

    Args:
      model: an MLP or CNN (quant layers or float layers).
      x: a batch of inputs.
      act_scales: ``{path: scale}`` from :func:`static_act_scales`; None: dynamic.
      record: if given, ``record[path]`` receives each layer's float input (before quantization).

    Returns:
      Float32 logits.
    """
    x = jnp.asarray(x, jnp.float32)
    for step in _plan(model):
        if step.flatten:
            x = x.reshape(x.shape[0], -1)
        if record is not None:
            record[step.path] = x
        spec = _act_spec(step)
        if spec is not None:
            if act_scales is None:
                x = spec.apply(x, _params(step.layer, "act"))
            else:
                x = _static_act(x, spec, act_scales[step.path])
        layer, inner = step.layer, _inner(step.layer)
        kernel = layer.quantized_kernel() if _is_quant(layer) else inner.kernel[...]
        y = _linear_op(step, x, kernel)
        if inner.bias is not None:
            y = y + inner.bias[...]
        if step.norm is not None:
            y = step.norm(y, use_running_average=True)
        if step.relu:
            y = jax.nn.relu(y)
        if step.pool:
            y = _max_pool(y)
        x = y
    return x


def _is_quant(layer: Any) -> bool:
    return isinstance(layer, (QuantLinear, QuantConv))


def _params(layer: Any, role: str) -> dict[str, jax.Array]:
    names = dict(layer.param_names).get(role, ())
    return {name: getattr(layer, f"{role}_{name}")[...] for name in names}


def _check_act_spec(step: _Step):
    spec = _act_spec(step)
    if spec is None or spec.kind not in ("absmax", "learned_step"):
        raise ValueError(
            f"layer {step.path!r} has act quantizer {spec}; allowed for integer inference: "
            "absmax or learned_step (uniform, symmetric, per tensor, <= 8 bits)"
        )
    config = spec.config
    if not config.symmetric or config.granularity != "tensor" or config.bits > 8:
        raise ValueError(
            f"layer {step.path!r} act config {config} is not allowed; allowed: symmetric=True, "
            "granularity='tensor', bits <= 8"
        )
    return spec


def static_act_scales(model: nnx.Module, batches: Iterable[Any]) -> dict[str, float]:
    """One static activation scale per quant layer input: ``max|x| / qmax`` over ``batches``.

    The inputs are those of the model's own eval-mode forward (dynamic absmax activations).
    ``learned_step`` activation scales are already static and are returned as they are.

    Args:
      model: an MLP or CNN whose quant layers have absmax / learned_step activation quantizers.
      batches: arrays of inputs (or ``(x, y)`` pairs / dicts with an ``"image"`` or ``"x"`` key).

    Returns:
      ``{path: scale}`` (Python floats) for every layer of the plan.
    """
    amax: dict[str, float] = {}
    graphdef, state = nnx.split(model)  # weights as arguments, not constants XLA would fold
    jitted = jax.jit(lambda state, xb: _record(nnx.merge(graphdef, state), xb))

    def record_fn(xb):
        return jitted(state, xb)

    for batch in batches:
        if isinstance(batch, Mapping):
            batch = batch.get("image", batch.get("x"))
        elif isinstance(batch, tuple | list):
            batch = batch[0]
        for path, value in record_fn(jnp.asarray(batch, jnp.float32)).items():
            amax[path] = max(amax.get(path, 0.0), float(value))
    if not amax:
        raise ValueError("batches is empty; allowed: at least one batch of inputs")
    scales = {}
    for step in _plan(model):
        spec = _check_act_spec(step)
        if spec.kind == "learned_step":
            scales[step.path] = float(np.asarray(step.layer.act_scale[...]).reshape(()))
            continue
        qmin, qmax = spec.config.qmin, spec.config.qmax
        denominator = qmax if qmax > 0 else -qmin
        scales[step.path] = max(amax[step.path] / denominator, float(np.finfo(np.float32).tiny))
    return scales


def _record(model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
    record: dict[str, jax.Array] = {}
    fake_quant_forward(model, x, None, record=record)
    return {k: jnp.max(jnp.abs(v)) for k, v in record.items()}


# ---------------------------------------------------------------------------------- requantize


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Writes real multipliers ``M > 0`` as ``M ≈ M0·2^−t`` with an int32 ``M0`` in [2^30, 2^31).

    (``M0/2^31`` is the paper's ``M0`` in [0.5, 1); ``t = 31 + n``.) Computed in float64 numpy.
    Multipliers below ``2^−31`` give ``M0 = 0`` (the output is 0).

    Returns:
      ``(M0, t)``, int32 arrays of ``m``'s shape, ``1 ≤ t ≤ 62``.
    """
    m = np.asarray(m, np.float64)
    if np.any(~np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"multipliers must be finite and >= 0; got {m}")
    frac, exp = np.frexp(m)  # m = frac·2^exp, frac in [0.5, 1)
    m0 = np.round(frac * 2.0**31).astype(np.int64)
    carry = m0 == 2**31
    m0 = np.where(carry, 2**30, m0)
    exp = exp + carry
    t = 31 - exp
    tiny = (t > 62) | (m == 0)
    m0 = np.where(tiny, 0, m0)
    t = np.where(tiny, 31, t)
    if np.any(t < 1):
        raise ValueError(f"multipliers >= 2^30 are not supported; got max {m.max()}")
    return m0.astype(np.int32), t.astype(np.int32)


def requantize(acc: jax.Array, m0: jax.Array, t: jax.Array) -> jax.Array:
    """``round(acc·M0 / 2^t)`` exactly, rounding half to even, in 32-bit integer arithmetic.

    ``acc`` int32 (``|acc| < 2^31``), ``m0`` int32 in [0, 2^31), ``t`` int32 in [1, 62], both
    broadcast against ``acc``. The 62-bit product is formed from 16-bit halves in uint32 (no
    int64, which JAX disables by default). Results beyond int32 saturate.
    """
    acc = jnp.asarray(acc, jnp.int32)
    neg = acc < 0
    a = jnp.abs(jnp.maximum(acc, -_INT32_MAX)).astype(jnp.uint32)
    m = jnp.asarray(m0, jnp.int32).astype(jnp.uint32)
    t = jnp.asarray(t, jnp.int32).astype(jnp.uint32)
    low16 = jnp.uint32(0xFFFF)
    ah, al = a >> 16, a & low16
    mh, ml = m >> 16, m & low16
    lo = al * ml
    mid1, mid2 = ah * ml, al * mh
    mid = mid1 + mid2
    hi = ah * mh + ((mid < mid1).astype(jnp.uint32) << 16) + (mid >> 16)
    lo2 = lo + (mid << 16)
    hi = hi + (lo2 < lo).astype(jnp.uint32)
    lo = lo2
    one = jnp.uint32(1)
    zero = jnp.uint32(0)
    big = t >= 32
    # t < 32: q = (hi << (32 − t)) | (lo >> t), remainder (0, lo mod 2^t), half (0, 2^(t−1)).
    ts = jnp.minimum(t, 31)
    q_small = jnp.where(ts == 0, lo, (hi << (32 - jnp.maximum(ts, 1))) | (lo >> ts))
    over_small = (hi >> ts) != 0
    r_small_lo = lo & ((one << ts) - one)
    half_small_lo = one << (ts - one)
    # t >= 32: q = hi >> (t − 32), remainder (hi mod 2^(t−32), lo), half at bit t−1.
    tb = jnp.clip(t - 32, 0, 31).astype(jnp.uint32)
    q_big = hi >> tb
    r_big_hi = hi & ((one << tb) - one)
    half_big_hi = jnp.where(tb == 0, zero, one << jnp.maximum(tb, 1) - one)
    half_big_lo = jnp.where(tb == 0, jnp.uint32(2**31), zero)
    q = jnp.where(big, q_big, q_small)
    r_hi = jnp.where(big, r_big_hi, zero)
    r_lo = jnp.where(big, lo, r_small_lo)
    h_hi = jnp.where(big, half_big_hi, zero)
    h_lo = jnp.where(big, half_big_lo, half_small_lo)
    above = (r_hi > h_hi) | ((r_hi == h_hi) & (r_lo > h_lo))
    tie = (r_hi == h_hi) & (r_lo == h_lo)
    up = above | (tie & ((q & one) == one))
    overflow = (~big & over_small) | (q >= jnp.uint32(_INT32_MAX))
    q = jnp.where(overflow, jnp.uint32(_INT32_MAX), q + up.astype(jnp.uint32))
    q = jnp.minimum(q, jnp.uint32(_INT32_MAX)).astype(jnp.int32)
    return jnp.where(neg, -q, q)


# ---------------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class IntegerLayer:
    """One layer of integer inference (a pytree; the op description is static).

    ``out = clip(requantize(op(x, kernel) + bias, multiplier, shift), out_min, out_max)``, then
    ``max(out, 0)`` if ``relu`` and a 2x2 max-pool if ``pool``. The real value of ``out`` is
    ``out_scale·out``; ``x`` is int8 (or int16/int32 for wider codes).
    """

    kernel: jax.Array  # integer weight codes (int8), the layer's kernel layout
    bias: jax.Array  # int32 bias at scale s_in·s_w[c], (out,)
    multiplier: jax.Array  # int32 M0 per output channel, (out,)
    shift: jax.Array  # int32 t per output channel (round(acc·M0/2^t)), (out,)
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    relu: bool = False
    pool: bool = False
    flatten: bool = False
    out_min: int = -128
    out_max: int = 127
    out_dtype: str = "int8"


jax.tree_util.register_dataclass(
    IntegerLayer,
    data_fields=["kernel", "bias", "multiplier", "shift"],
    meta_fields=[
        "op",
        "strides",
        "padding",
        "relu",
        "pool",
        "flatten",
        "out_min",
        "out_max",
        "out_dtype",
    ],
)


@dataclasses.dataclass(frozen=True)
class IntegerProgram:
    """Integer-only inference of a model (a pytree): quantize the input, run the layers.

    ``input_scale``, ``input_min``/``input_max`` quantize the float input to codes (the only
    float operation); the last layer returns int32 logits whose real value is
    ``logit_scale·logits``.
    """

    layers: tuple[IntegerLayer, ...]
    input_scale: float = 1.0
    input_min: int = -128
    input_max: int = 127
    logit_scale: float = 1.0


jax.tree_util.register_dataclass(
    IntegerProgram,
    data_fields=["layers"],
    meta_fields=["input_scale", "input_min", "input_max", "logit_scale"],
)


def _code_dtype(lo: int, hi: int) -> str:
    for name in ("int8", "int16", "int32"):
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    raise ValueError(f"codes [{lo}, {hi}] do not fit int32")


def _has_bn(model: nnx.Module) -> bool:
    return isinstance(model, CNN) and any(
        isinstance(n, nnx.BatchNorm) for n in (model.stem_norm, model.conv2_norm)
    )


def export_integer(
    model: nnx.Module, act_scales: Mapping[str, float], *, logit_bits: int = 30
) -> IntegerProgram:
    """Builds the integer program of an MLP / CNN whose layers are all absmax/learned_step quant.

    A CNN with BatchNorm is folded first (``fold_model_batchnorm(model, remove=True)``): its
    fake-quant reference is :func:`fake_quant_forward` of that folded model.

    Per layer (``s_in``: its static input scale, ``s_w[c]``: the weight scale of channel ``c``,
    ``s_out``: the next layer's input scale): int8 weight codes; ``bias = round(b/(s_in·s_w))``
    (int32); ``(M0, t) = quantize_multiplier(s_in·s_w/s_out)``; the output range is the next
    layer's activation code range. The last layer maps to a common scale
    ``s_out = s_in·max(s_w)·2^−k``, with ``k ≥ 0`` as large as keeps ``|logits| < 2^logit_bits``
    (from the worst-case accumulator), so argmax over the int32 logits is the prediction.

    Args:
      model: MLP or CNN.
      act_scales: ``{path: scale}`` from :func:`static_act_scales`.
      logit_bits: bound on the magnitude of the int32 logits (bits).

    Returns:
      The :class:`IntegerProgram`.
    """
    if _has_bn(model):
        model = fold_model_batchnorm(model, remove=True)
    steps = _plan(model)
    layers = []
    specs = [_check_act_spec(step) for step in steps]
    input_config = specs[0].config
    for i, (step, spec) in enumerate(zip(steps, specs, strict=True)):
        if step.norm is not None:
            raise ValueError(f"layer {step.path!r} is followed by a BatchNorm; fold it first")
        layer = step.layer
        wspec = layer.recipe.weight
        if (
            wspec is None
            or wspec.kind not in ("absmax", "learned_step")
            or not wspec.config.symmetric
            or wspec.config.granularity not in ("tensor", "channel")
            or wspec.config.bits > 8
            or (wspec.config.granularity == "channel" and wspec.config.axis % 2 != 1)
        ):
            raise ValueError(
                f"layer {step.path!r} has weight quantizer {wspec}; allowed for integer "
                "inference: absmax/learned_step, symmetric, per tensor or per output channel "
                "(last axis), <= 8 bits"
            )
        q = unpack(quantize_tensor(wspec, _layer_kernel(layer), _params(layer, "weight")))
        out_channels = q.shape[-1]
        s_w = np.broadcast_to(np.asarray(q.scale, np.float64).reshape(-1), (out_channels,))
        s_in = np.float64(np.float32(act_scales[step.path]))
        inner = _inner(layer)
        b = (
            np.zeros(out_channels)
            if inner.bias is None
            else np.asarray(inner.bias[...], np.float64)
        )
        acc_scale = s_in * s_w
        bias_q = np.round(b / acc_scale)
        if np.any(np.abs(bias_q) > _INT32_MAX):
            raise ValueError(f"layer {step.path!r}: the int32 bias overflows")
        last = i == len(steps) - 1
        fan_in = math.prod(q.shape[:-1])
        act_max = max(abs(spec.config.qmin), spec.config.qmax)
        w_max = max(abs(wspec.config.qmin), wspec.config.qmax)
        if last:
            worst = fan_in * act_max * w_max + np.abs(bias_q).max()
            k = int(max(0, min(20, logit_bits - math.ceil(math.log2(max(worst, 1.0))))))
            out_scale = float(acc_scale.max() * 2.0**-k)
            lo, hi, dtype = -_INT32_MAX, _INT32_MAX, "int32"
        else:
            next_spec = specs[i + 1]
            out_scale = float(np.float32(act_scales[steps[i + 1].path]))
            lo, hi = next_spec.config.qmin, next_spec.config.qmax
            dtype = _code_dtype(lo, hi)
        m0, t = quantize_multiplier(acc_scale / out_scale)
        padding = getattr(inner, "padding", "SAME")
        if not isinstance(padding, str):
            padding = tuple(tuple(int(v) for v in p) for p in padding)
        layers.append(
            IntegerLayer(
                kernel=jnp.asarray(q.values),
                bias=jnp.asarray(bias_q.astype(np.int32)),
                multiplier=jnp.asarray(m0),
                shift=jnp.asarray(t),
                op=step.op,
                strides=tuple(int(s) for s in getattr(inner, "strides", ()) or ()),
                padding=padding,
                relu=step.relu,
                pool=step.pool,
                flatten=step.flatten,
                out_min=int(lo),
                out_max=int(hi),
                out_dtype=dtype,
            )
        )
        if last:
            logit_scale = out_scale
    return IntegerProgram(
        layers=tuple(layers),
        input_scale=float(np.float32(act_scales[steps[0].path])),
        input_min=input_config.qmin,
        input_max=input_config.qmax,
        logit_scale=logit_scale,
    )


def _layer_kernel(layer: Any) -> jax.Array:
    kernel = layer.inner.kernel[...]
    mask = getattr(layer.inner, "mask", None)
    return kernel if mask is None else kernel * mask


def quantize_input(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """The input codes ``clip(round(x / s_in), qmin, qmax)`` (the uniform quantizer's codes)."""
    x = jnp.asarray(x, jnp.float32)
    codes = jnp.round(x / jnp.float32(program.input_scale))
    codes = jnp.clip(codes, program.input_min, program.input_max)
    return codes.astype(_code_dtype(program.input_min, program.input_max))


def integer_forward(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """Integer-only inference: int32 logits (real value ``program.logit_scale·logits``).

    The float input is quantized once (:func:`quantize_input`); every layer then runs
    ``lax.dot_general`` / ``lax.conv_general_dilated`` on integer operands with
    ``preferred_element_type=jnp.int32``, adds the int32 bias, requantizes with
    :func:`requantize` (integer multiply and rounding shift), clips to the next layer's codes,
    applies ReLU as ``max(q, 0)`` and max-pools the codes.
    """
    h = quantize_input(program, x)
    for layer in program.layers:
        if layer.flatten:
            h = h.reshape(h.shape[0], -1)
        if layer.op == "dense":
            acc = lax.dot_general(
                h,
                layer.kernel,
                (((h.ndim - 1,), (0,)), ((), ())),
                preferred_element_type=jnp.int32,
            )
        else:
            acc = lax.conv_general_dilated(
                h,
                layer.kernel,
                layer.strides,
                layer.padding,
                dimension_numbers=_CONV_DIMS,
                preferred_element_type=jnp.int32,
            )
        acc = acc + layer.bias
        out = requantize(acc, layer.multiplier, layer.shift)
        out = jnp.clip(out, layer.out_min, layer.out_max)
        if layer.relu:
            out = jnp.maximum(out, 0)
        out = out.astype(layer.out_dtype)
        if layer.pool:
            out = _max_pool(out)
        h = out
    return h
