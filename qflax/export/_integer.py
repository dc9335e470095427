"""Integer inference — Jacob et al. 2018 (CVPR), eqs. (4)-(7): int8×int8 → int32 accumulate,
int32 bias at scale ``s_in·s_w``, requantize with ``M = s_in·s_w/s_out = M0·2^−n`` (``M0`` in
[0.5, 1) as a 31-bit integer) (METHODS.md §1). Differs: symmetric quantization only (zero points
0, so ReLU is ``max(q, 0)`` and padding is code 0); per-output-channel weight scales (so ``M`` is
per channel); BatchNorm folded after weight quantization into ``M`` and the bias (the codes stay
the trained model's); the accumulator may be shifted left before the bias is added (the bias
keeps more fractional bits; ``bias_shift=0`` is the paper's); the rounding right shift rounds
half to even (the float reference's ``round``), not half away from zero as gemmlowp; the last
layer is requantized to a common int32 scale so that argmax over its int32 logits is the
prediction; float layers (a float first/last layer) run in float32, with the conversion to
codes (``round(y/s)``, the next layer's activation scale) and back (``acc·s_in·s_w``) at the
boundaries.

Activation scales must be STATIC for integer inference: the ``absmax`` recipe recomputes the
activation scale from every batch, which integer hardware cannot do. :func:`static_act_scales`
calibrates one scale per layer input (``max|x| / qmax`` over a few batches, or another
estimator of :mod:`qflax.calibration`); ``learned_step`` scales are static already. The
fake-quant reference that integer inference matches is :func:`fake_quant_forward` with those
scales (for learned_step models: the model itself).
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
from qflax.export._fold import Identity
from qflax.export._qarray import unpack
from qflax.layers import QuantConv, QuantLinear
from qflax.models import CNN, MLP
from qflax.numerics import check_choice

__all__ = [
    "CALIBRATIONS",
    "FloatLayer",
    "IntegerLayer",
    "IntegerProgram",
    "estimate_scale",
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
    activation = getattr(model, "activation", "relu")
    if activation != "relu":
        raise ValueError(
            f"model activation={activation!r} is not allowed for integer inference; allowed: "
            "'relu' (hardtanh models, e.g. binary-activation ones, are not supported yet)"
        )
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
    recipe = str(step.layer.recipe) if _is_quant(step.layer) else "float"
    if spec is None or spec.kind not in ("absmax", "learned_step"):
        raise ValueError(
            f"layer {step.path!r} has recipe {recipe!r} (input quantizer {spec}); integer "
            f"inference supports {_SUPPORTED}"
        )
    config = spec.config
    if not config.symmetric or config.granularity != "tensor" or config.bits > 8:
        raise ValueError(
            f"layer {step.path!r} has recipe {recipe!r} (input config {config}); integer "
            f"inference supports {_SUPPORTED}"
        )
    return spec


# Range estimators of static activation scales (qflax.calibration), by name.
CALIBRATIONS = ("absmax", "minmax", "percentile", "mse")


def _batch_inputs(batch: Any) -> jax.Array:
    if isinstance(batch, Mapping):
        batch = batch.get("image", batch.get("x"))
    elif isinstance(batch, tuple | list):
        batch = batch[0]
    return jnp.asarray(batch, jnp.float32)


def estimate_scale(x: jax.Array, config: qz.UniformConfig, calibration: str) -> float:
    """One symmetric per-tensor scale of ``x`` for the codes of ``config`` (z = 0).

    ``absmax``: ``max|x| / qmax``; ``percentile``: the 99.99th percentile of ``|x|`` instead of
    the max; ``mse``: the clip ratio minimising the squared error (64 candidates); ``minmax``:
    the smallest scale whose codes ``[qmin, qmax]`` cover ``[min(x, 0), max(x, 0)]`` (the
    symmetric grid of integer inference has no zero point, so this is ``max(max/qmax,
    min/qmin)``: absmax up to the one extra negative code) — all from :mod:`qflax.calibration`.
    """
    from qflax import calibration as cal

    check_choice(calibration, "calibration", CALIBRATIONS)
    common = dict(bits=config.bits, signed=config.signed, narrow_range=config.narrow_range)
    if calibration == "absmax":
        scale, _ = cal.absmax(x, **common)
    elif calibration == "percentile":
        scale, _ = cal.percentile(x, percentile=99.99, **common)
    elif calibration == "mse":
        scale, _ = cal.mse(x, **common)
    else:
        lo = float(jnp.minimum(jnp.min(x), 0.0))
        hi = float(jnp.maximum(jnp.max(x), 0.0))
        qmin, qmax = config.qmin, config.qmax
        candidates = [hi / qmax if qmax > 0 else 0.0, lo / qmin if qmin < 0 else 0.0]
        scale = max(*candidates, float(cal.MIN_SCALE))
    return max(float(np.asarray(scale).reshape(-1)[0]), float(np.finfo(np.float32).tiny))


def static_act_scales(
    model: nnx.Module, batches: Iterable[Any], *, calibration: str = "absmax"
) -> dict[str, float]:
    """One static activation scale per quant layer input, calibrated over ``batches``.

    The inputs are those of the model's own eval-mode forward (absmax activations: dynamic
    scales). ``calibration="absmax"`` gives ``max|x| / qmax`` over all batches (a running
    max); the other estimators (:func:`estimate_scale`) see the inputs of all batches at
    once. ``learned_step`` activation scales are already static and are returned as they are.
    Float layers get no scale.

    Args:
      model: an MLP or CNN whose quant layers have absmax / learned_step activation quantizers.
      batches: arrays of inputs (or ``(x, y)`` pairs / dicts with an ``"image"`` or ``"x"`` key).
      calibration: one of :data:`CALIBRATIONS`.

    Returns:
      ``{path: scale}`` (Python floats) for every quantized layer of the plan.
    """
    check_choice(calibration, "calibration", CALIBRATIONS)
    steps = [step for step in _plan(model) if not _is_float_step(step)]
    specs = {step.path: _check_act_spec(step) for step in steps}
    graphdef, state = nnx.split(model)  # weights as arguments, not constants XLA would fold
    reduce = calibration == "absmax"
    jitted = jax.jit(lambda state, xb: _record(nnx.merge(graphdef, state), xb, reduce))
    seen: dict[str, list] = {}
    for batch in batches:
        for path, value in jitted(state, _batch_inputs(batch)).items():
            if path in specs:
                seen.setdefault(path, []).append(value)
    if not seen:
        raise ValueError("batches is empty; allowed: at least one batch of inputs")
    scales = {}
    for step in steps:
        spec = specs[step.path]
        if spec.kind == "learned_step":
            scales[step.path] = float(np.asarray(step.layer.act_scale[...]).reshape(()))
        elif reduce:
            qmin, qmax = spec.config.qmin, spec.config.qmax
            amax = max(float(v) for v in seen[step.path])
            denominator = qmax if qmax > 0 else -qmin
            scales[step.path] = max(amax / denominator, float(np.finfo(np.float32).tiny))
        else:
            x = jnp.concatenate(seen[step.path], axis=0)
            scales[step.path] = estimate_scale(x, spec.config, calibration)
    return scales


def _record(model: nnx.Module, x: jax.Array, reduce: bool = True) -> dict[str, jax.Array]:
    record: dict[str, jax.Array] = {}
    fake_quant_forward(model, x, None, record=record)
    if not reduce:
        return record
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
    """One quantized layer of integer inference (a pytree; the op description is static).

    ``acc = op(x, kernel)`` on integer codes with int32 accumulation (``x`` int8, or int16/int32
    for wider codes), negated per output channel where ``negate`` (a BatchNorm with ``γ < 0``
    folded in), then by ``output``:

    * ``"codes"`` (the next layer is quantized):
      ``out = clip(requantize((acc << acc_shift) + bias, multiplier, shift), out_min, out_max)``,
      ``max(out, 0)`` if ``relu``, cast to ``out_dtype``, 2x2 max-pool if ``pool``; ``out`` are
      the next layer's input codes (real value ``s_out·out``).
    * ``"logits"`` (the last layer): the same without ReLU; int32 logits at a common scale.
    * ``"float"`` (the next layer is float): ``y = float32(acc)·acc_scale + float_bias``, then
      ReLU and pool in float32 (the boundary back to float).
    """

    kernel: jax.Array  # integer weight codes (int8), the layer's kernel layout
    bias: jax.Array | None = None  # int32 bias at scale s_in·s_w[c]·2^−acc_shift, (out,)
    multiplier: jax.Array | None = None  # int32 M0 per output channel, (out,)
    shift: jax.Array | None = None  # int32 t per output channel (round(acc·M0/2^t)), (out,)
    acc_scale: jax.Array | None = None  # output="float": float32 s_in·s_w[c] (BN folded), (out,)
    float_bias: jax.Array | None = None  # output="float": float32 bias (BN folded), (out,)
    negate: jax.Array | None = None  # bool (out,): channels whose folded BN factor is < 0
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    relu: bool = False
    pool: bool = False
    flatten: bool = False
    out_min: int = -128
    out_max: int = 127
    out_dtype: str = "int8"
    acc_shift: int = 0  # bits the accumulator is shifted left before the bias is added
    output: str = "codes"  # "codes" | "logits" | "float"


jax.tree_util.register_dataclass(
    IntegerLayer,
    data_fields=["kernel", "bias", "multiplier", "shift", "acc_scale", "float_bias", "negate"],
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
        "acc_shift",
        "output",
    ],
)


@dataclasses.dataclass(frozen=True)
class FloatLayer:
    """One float layer of a mixed program (a pytree), computed as the model computes it.

    ``y = op(x, kernel) + bias`` in float32, the eval-mode BatchNorm
    ``(y − mean)·rsqrt(var + ε)·scale + bias`` when ``norm_mean`` is set (flax's formula), ReLU,
    2x2 max-pool; then, when ``out_scale`` is set (the next layer is quantized), the next
    layer's input codes ``clip(round(y / out_scale), out_min, out_max)`` as ``out_dtype`` — the
    codes of the uniform quantizer the fake-quant model applies there (the boundary to integer).
    """

    kernel: jax.Array  # float32 kernel, the layer's layout
    bias: jax.Array | None = None  # float32 (out,)
    norm_mean: jax.Array | None = None  # BatchNorm running mean (out,), or None: no BatchNorm
    norm_var: jax.Array | None = None  # BatchNorm running variance (out,)
    norm_scale: jax.Array | None = None  # BatchNorm γ (out,) (ones when the norm has none)
    norm_bias: jax.Array | None = None  # BatchNorm β (out,) (zeros when the norm has none)
    out_scale: jax.Array | None = None  # float32 (): the next layer's activation scale, or None
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    relu: bool = False
    pool: bool = False
    flatten: bool = False
    norm_epsilon: float = 0.0
    out_min: int = -128
    out_max: int = 127
    out_dtype: str = "int8"


jax.tree_util.register_dataclass(
    FloatLayer,
    data_fields=[
        "kernel",
        "bias",
        "norm_mean",
        "norm_var",
        "norm_scale",
        "norm_bias",
        "out_scale",
    ],
    meta_fields=[
        "op",
        "strides",
        "padding",
        "relu",
        "pool",
        "flatten",
        "norm_epsilon",
        "out_min",
        "out_max",
        "out_dtype",
    ],
)


@dataclasses.dataclass(frozen=True)
class IntegerProgram:
    """Inference of a model with integer operands in its quantized layers (a pytree).

    ``layers`` run in order; :class:`IntegerLayer` on integer codes, :class:`FloatLayer` in
    float32. When the first layer is quantized, ``input_scale``, ``input_min``/``input_max``
    quantize the float input to codes (otherwise ``input_scale`` is None and the input stays
    float). The result is int32 logits whose real value is ``logit_scale·logits`` when the last
    layer is quantized, float32 logits (``logit_scale = 1``) when it is float.
    """

    layers: tuple[IntegerLayer | FloatLayer, ...]
    input_scale: float | None = 1.0
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


_SUPPORTED = (
    "float layers (no quantizer), and layers whose weight AND input quantizers are both "
    "absmax or learned_step (uniform, symmetric; weights per tensor or per output channel, "
    "inputs per tensor; <= 8 bits)"
)


def _is_float_step(step: _Step) -> bool:
    layer = step.layer
    return not _is_quant(layer) or (layer.recipe.weight is None and layer.recipe.act is None)


def _check_weight_spec(step: _Step):
    spec = step.layer.recipe.weight
    config = None if spec is None else spec.config
    shape = tuple(_inner(step.layer).kernel[...].shape)
    if (
        spec is None
        or spec.kind not in ("absmax", "learned_step")
        or not config.symmetric
        or config.granularity not in ("tensor", "channel")
        or config.bits > 8
        or (config.granularity == "channel" and config.axis % len(shape) != len(shape) - 1)
    ):
        raise ValueError(
            f"layer {step.path!r} has recipe {str(step.layer.recipe)!r} (weight quantizer "
            f"{spec}); integer inference supports {_SUPPORTED}"
        )
    return spec


def _check_step(step: _Step) -> None:
    """Raises ValueError unless ``step`` is a float layer or a supported quantized layer."""
    if _is_float_step(step):
        return
    layer = step.layer
    if layer.recipe.weight is None or layer.recipe.act is None:
        raise ValueError(
            f"layer {step.path!r} has recipe {str(layer.recipe)!r} (only one of its weight and "
            f"input quantized); integer inference supports {_SUPPORTED}"
        )
    _check_weight_spec(step)
    _check_act_spec(step)


def _norm_factor(norm: Any, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, μ, β)`` of an eval-mode BatchNorm in float64: ``BN(y) = (y − μ)·m + β``."""
    if norm is None:
        return np.ones(channels), np.zeros(channels), np.zeros(channels)
    if tuple(np.atleast_1d(norm.axis).tolist()) != (-1,):
        raise ValueError(f"BatchNorm axis={norm.axis!r} is not allowed; allowed: -1")
    var = np.asarray(norm.var[...], np.float64)
    gamma = np.ones(channels) if norm.scale is None else np.asarray(norm.scale[...], np.float64)
    beta = np.zeros(channels) if norm.bias is None else np.asarray(norm.bias[...], np.float64)
    m = gamma / np.sqrt(var + float(norm.epsilon))
    return m, np.asarray(norm.mean[...], np.float64), beta


def _op_fields(step: _Step) -> dict[str, Any]:
    inner = _inner(step.layer)
    padding = getattr(inner, "padding", "SAME")
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return dict(
        op=step.op,
        strides=tuple(int(s) for s in getattr(inner, "strides", ()) or ()),
        padding=padding,
        relu=step.relu,
        pool=step.pool,
        flatten=step.flatten,
    )


def _float_layer(step: _Step, next_scale: float | None, next_spec: Any) -> FloatLayer:
    inner = _inner(step.layer)
    norm = {}
    if step.norm is not None:
        bn = step.norm
        channels = bn.mean[...].shape[0]
        norm = dict(
            norm_mean=jnp.asarray(bn.mean[...], jnp.float32),
            norm_var=jnp.asarray(bn.var[...], jnp.float32),
            norm_scale=jnp.ones((channels,), jnp.float32)
            if bn.scale is None
            else jnp.asarray(bn.scale[...], jnp.float32),
            norm_bias=jnp.zeros((channels,), jnp.float32)
            if bn.bias is None
            else jnp.asarray(bn.bias[...], jnp.float32),
            norm_epsilon=float(bn.epsilon),
        )
    out = {}
    if next_scale is not None:
        lo, hi = next_spec.config.qmin, next_spec.config.qmax
        out = dict(
            out_scale=jnp.asarray(next_scale, jnp.float32),
            out_min=int(lo),
            out_max=int(hi),
            out_dtype=_code_dtype(lo, hi),
        )
    return FloatLayer(
        kernel=jnp.asarray(inner.kernel[...], jnp.float32),
        bias=None if inner.bias is None else jnp.asarray(inner.bias[...], jnp.float32),
        **norm,
        **out,
        **_op_fields(step),
    )


def _act_scale(step: _Step, act_scales: Mapping[str, float] | None) -> float:
    if act_scales is not None and step.path in act_scales:
        return float(np.float32(act_scales[step.path]))
    spec = step.layer.recipe.act
    if spec.kind == "learned_step":
        return float(np.asarray(step.layer.act_scale[...], np.float32).reshape(()))
    raise ValueError(
        f"act_scales has no scale for layer {step.path!r} (absmax activations need a static "
        "scale); allowed: act_scales from static_act_scales(model, batches)"
    )


def _auto_shift(worst: float, bias_units: float) -> int:
    """The largest ``k ≤ 16`` with ``(worst + bias_units)·2^k ≤ 2^30`` (0 when none)."""
    total = max(worst + bias_units, 1.0)
    return int(max(0, min(16, math.floor(30 - math.log2(total)))))


def export_integer(
    model: nnx.Module,
    act_scales: Mapping[str, float] | None = None,
    *,
    logit_bits: int = 30,
    bias_shift: int | None = None,
) -> IntegerProgram:
    """Builds the integer program of an MLP / CNN, float layers and quantized layers mixed.

    Every layer must be float (no quantizer: it runs in float32 as the model runs it) or
    quantized by absmax / learned_step (uniform symmetric, <= 8 bits) on both its weights and
    its input; anything else raises ValueError naming the layer and its recipe. A quantized
    layer followed by an eval-mode BatchNorm has the BatchNorm folded in AFTER quantization
    (``BN(x̂·ŵ) = x̂·ŵ·m + β − μ·m`` with ``m = γ/√(σ²+ε)``: the codes stay the model's, the
    per-channel factor goes into the requantization multiplier), so the reference is the
    model's own fake-quant forward (:func:`fake_quant_forward` with the same ``act_scales``).

    Per quantized layer (``s_in``: its static input scale, ``s_w[c]``: the weight scale of
    channel ``c``, ``e[c] = s_in·s_w[c]·m[c]``, ``b[c]``: the bias with BN folded):

    * followed by a quantized layer (input scale ``s_out``): int8 weight codes, the accumulator
      shifted left by ``k`` bits, ``bias = round(b·2^k/|e|)`` (int32),
      ``(M0, t) = quantize_multiplier(|e|/(s_out·2^k))``, output clipped to the next layer's
      codes. ``k = 0`` is the paper's bias at scale ``s_in·s_w``; ``bias_shift=None`` takes
      the largest ``k ≤ 16`` the worst-case accumulator allows, which rounds the bias 2^k
      times finer (the float reference adds the exact bias).
    * followed by a float layer: ``y = acc·e + b`` in float32 (the boundary back to float).
    * the last layer: int32 logits at a common scale ``s_in·max|e|·2^−k``, with ``k ≥ 0`` as
      large as keeps ``|logits| < 2^logit_bits``, so argmax over them is the prediction.

    A float layer followed by a quantized one ends with the next layer's input codes
    ``clip(round(y/s), qmin, qmax)`` (the boundary to integer); a quantized first layer gets
    its codes from :func:`quantize_input`.

    Args:
      model: MLP or CNN.
      act_scales: ``{path: scale}`` of the quantized layers' inputs (from
        :func:`static_act_scales`); None or a missing path: the layer's learned scale
        (learned_step), absmax layers need one.
      logit_bits: bound on the magnitude of the int32 logits (bits).
      bias_shift: ``k`` above (0..16), None: automatic.

    Returns:
      The :class:`IntegerProgram`.
    """
    steps = _plan(model)
    for step in steps:
        _check_step(step)
    if bias_shift is not None and not (
        isinstance(bias_shift, int) and not isinstance(bias_shift, bool) and 0 <= bias_shift <= 16
    ):
        raise ValueError(f"bias_shift={bias_shift!r} is not allowed; allowed: None or 0..16")
    quantized = [not _is_float_step(step) for step in steps]
    scales = {
        step.path: _act_scale(step, act_scales)
        for step, q in zip(steps, quantized, strict=True)
        if q
    }
    layers: list[IntegerLayer | FloatLayer] = []
    logit_scale = 1.0
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        next_quantized = not last and quantized[i + 1]
        next_scale = scales[steps[i + 1].path] if next_quantized else None
        next_spec = steps[i + 1].layer.recipe.act if next_quantized else None
        if not quantized[i]:
            layers.append(_float_layer(step, next_scale, next_spec))
            continue
        layer, inner = step.layer, _inner(step.layer)
        wspec, spec = _check_weight_spec(step), _check_act_spec(step)
        q = unpack(quantize_tensor(wspec, _layer_kernel(layer), _params(layer, "weight")))
        out_channels = q.shape[-1]
        s_w = np.broadcast_to(np.asarray(q.scale, np.float64).reshape(-1), (out_channels,))
        s_in = np.float64(scales[step.path])
        b = (
            np.zeros(out_channels)
            if inner.bias is None
            else np.asarray(inner.bias[...], np.float64)
        )
        m, mu, beta = _norm_factor(step.norm, out_channels)
        e = s_in * s_w * m  # real value of one accumulator unit, per channel (signed)
        b = beta + (b - mu) * m
        negative = e < 0
        negate = jnp.asarray(negative) if negative.any() else None
        e_abs = np.abs(e)
        fan_in = math.prod(q.shape[:-1])
        act_max = max(abs(spec.config.qmin), spec.config.qmax)
        w_max = max(abs(wspec.config.qmin), wspec.config.qmax)
        worst = float(fan_in * act_max * w_max)
        fields = _op_fields(step)
        if not last and not next_quantized:  # the boundary back to float
            layers.append(
                IntegerLayer(
                    kernel=jnp.asarray(q.values),
                    acc_scale=jnp.asarray(e, jnp.float32),
                    float_bias=jnp.asarray(b, jnp.float32),
                    output="float",
                    **fields,
                )
            )
            continue
        units = float(np.abs(b / e_abs).max())  # the largest bias, in accumulator units
        k = _auto_shift(worst, units) if bias_shift is None else bias_shift
        bias_q = np.round(b * 2.0**k / e_abs)
        if last:
            bits = math.ceil(math.log2(max(worst + units, 1.0)))
            logit_shift = int(max(0, min(20, logit_bits - bits)))
            out_scale = float(e_abs.max() * 2.0**-logit_shift)
            lo, hi, dtype, output = -_INT32_MAX, _INT32_MAX, "int32", "logits"
            logit_scale = out_scale
        else:
            out_scale = float(next_scale)
            lo, hi = next_spec.config.qmin, next_spec.config.qmax
            dtype, output = _code_dtype(lo, hi), "codes"
        if worst * 2.0**k + np.abs(bias_q).max() > _INT32_MAX:
            raise ValueError(
                f"layer {step.path!r}: the int32 accumulator can overflow (bias_shift={k}); "
                "allowed: a smaller bias_shift"
            )
        m0, t = quantize_multiplier(e_abs / (out_scale * 2.0**k))
        layers.append(
            IntegerLayer(
                kernel=jnp.asarray(q.values),
                bias=jnp.asarray(bias_q.astype(np.int32)),
                multiplier=jnp.asarray(m0),
                shift=jnp.asarray(t),
                negate=negate,
                out_min=int(lo),
                out_max=int(hi),
                out_dtype=dtype,
                acc_shift=k,
                output=output,
                **fields,
            )
        )
    first = steps[0]
    input_spec = first.layer.recipe.act if quantized[0] else None
    return IntegerProgram(
        layers=tuple(layers),
        input_scale=scales[first.path] if quantized[0] else None,
        input_min=input_spec.config.qmin if quantized[0] else -128,
        input_max=input_spec.config.qmax if quantized[0] else 127,
        logit_scale=logit_scale,
    )


def _layer_kernel(layer: Any) -> jax.Array:
    kernel = layer.inner.kernel[...]
    mask = getattr(layer.inner, "mask", None)
    return kernel if mask is None else kernel * mask


def quantize_input(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """The input codes ``clip(round(x / s_in), qmin, qmax)`` (the uniform quantizer's codes)."""
    if program.input_scale is None:
        raise ValueError(
            "the program's first layer is float, so its input is not quantized; allowed: a "
            "program whose first layer is quantized"
        )
    x = jnp.asarray(x, jnp.float32)
    codes = jnp.round(x / jnp.float32(program.input_scale))
    codes = jnp.clip(codes, program.input_min, program.input_max)
    return codes.astype(_code_dtype(program.input_min, program.input_max))


def _apply_op(layer: IntegerLayer | FloatLayer, h: jax.Array, **kwargs: Any) -> jax.Array:
    kernel = layer.kernel
    if layer.op == "dense":
        return lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())), **kwargs)
    if kernel.dtype != h.dtype:  # conv needs equal operand dtypes (int16 codes: widen int8)
        kernel = kernel.astype(h.dtype)
    return lax.conv_general_dilated(
        h, kernel, layer.strides, layer.padding, dimension_numbers=_CONV_DIMS, **kwargs
    )


def _float_step(layer: FloatLayer, h: jax.Array) -> jax.Array:
    y = _apply_op(layer, h)
    if layer.bias is not None:
        y = y + layer.bias
    if layer.norm_mean is not None:  # flax's eval-mode BatchNorm, operation for operation
        mul = lax.rsqrt(layer.norm_var + layer.norm_epsilon) * layer.norm_scale
        y = (y - layer.norm_mean) * mul + layer.norm_bias
    if layer.relu:
        y = jax.nn.relu(y)
    if layer.pool:
        y = _max_pool(y)
    if layer.out_scale is None:
        return y
    codes = jnp.clip(jnp.round(y / layer.out_scale), layer.out_min, layer.out_max)
    return codes.astype(layer.out_dtype)


def _integer_step(layer: IntegerLayer, h: jax.Array) -> jax.Array:
    acc = _apply_op(layer, h, preferred_element_type=jnp.int32)
    if layer.output == "float":
        y = acc.astype(jnp.float32) * layer.acc_scale + layer.float_bias
        if layer.relu:
            y = jax.nn.relu(y)
        return _max_pool(y) if layer.pool else y
    if layer.negate is not None:
        acc = jnp.where(layer.negate, -acc, acc)
    if layer.acc_shift:
        acc = lax.shift_left(acc, jnp.int32(layer.acc_shift))
    out = requantize(acc + layer.bias, layer.multiplier, layer.shift)
    out = jnp.clip(out, layer.out_min, layer.out_max)
    if layer.relu:
        out = jnp.maximum(out, 0)
    out = out.astype(layer.out_dtype)
    return _max_pool(out) if layer.pool else out


def integer_forward(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """Runs an :class:`IntegerProgram`: the logits of ``x``.

    Quantized layers run ``lax.dot_general`` / ``lax.conv_general_dilated`` on integer codes
    with ``preferred_element_type=jnp.int32``, add the int32 bias, requantize with
    :func:`requantize` (integer multiply and rounding shift), clip to the next layer's codes,
    apply ReLU as ``max(q, 0)`` and max-pool the codes. Float layers run in float32. The float
    input is quantized once (:func:`quantize_input`) when the first layer is quantized.

    Returns:
      int32 logits (real value ``program.logit_scale·logits``) when the last layer is
      quantized; float32 logits when it is float.
    """
    if program.input_scale is not None:
        h = quantize_input(program, x)
    else:
        h = jnp.asarray(x, jnp.float32)
    for layer in program.layers:
        if layer.flatten:
            h = h.reshape(h.shape[0], -1)
        h = _integer_step(layer, h) if isinstance(layer, IntegerLayer) else _float_step(layer, h)
    return h
