"""Integer inference — Jacob et al. 2018 (CVPR), eqs. (4)-(7): int8×int8 → int32 accumulate, int32
bias at scale ``s_in·s_w``, requantize with ``M = s_in·s_w/s_out = M0·2^−n`` (``M0`` in [0.5, 1) as
a 31-bit integer) (METHODS.md §1). Differs: input codes have no zero point (ReLU is ``max(q, 0)``
and padding is code 0); a weight zero point (GDNSQ's ``−min w/s``, not an integer) enters as the
paper's ``Σx`` term with a fixed-point coefficient (below); per-output-channel weight scales (so
``M`` is per channel); BatchNorm folded after weight quantization into ``M`` and the bias (the codes
stay the trained model's); the accumulator may be shifted left before the bias is added (the bias
keeps more fractional bits; ``bias_shift=0`` is the paper's); the rounding right shift rounds half
to even (the float reference's ``round``), not half away from zero as gemmlowp; the last layer is
requantized to a common int32 scale so that argmax over its int32 logits is the prediction; float
layers (a float first/last layer) run in float32, with the conversion to codes (``round(y/s)``, the
next layer's activation scale) and back (``acc·s_in·s_w``) at the boundaries. Hidden activations:
ReLU (``max(q, 0)``) or hardtanh (the codes clipped to ``[round(−1/s_out), round(1/s_out)]``, which
is ``round(clip(y, −1, 1)/s_out)`` exactly since rounding is monotone); other activations raise
ValueError.

Power-of-two weights (METHODS.md §5's shift levels; the ``pow2`` quantizer, codes of
:func:`qflax.quantizers.pow2_codes`) run without a weight multiply: the codes of a layer are
``±s_c·2^−k`` (or 0); with ``K`` the largest exponent the layer uses, ``ŵ = s_c·2^−K·w`` with
the integer ``w = ±2^(K−k)``, and ``x·w = Σ_k (x·m_k) << (K − k)`` where ``m_k`` is the ternary
``{−1, 0, +1}`` mask of the weights with exponent ``k``: one int8 × ternary product per exponent
in use (int32 accumulation) and left shifts combine them. ``s_c·2^−K`` is the weight scale of
the requantization multiplier, as for uniform weights. The result equals the int32 product with
``w`` exactly (``export_integer(..., shifts=False)`` builds that one-kernel program).

Binary layers (METHODS.md §9; weights AND inputs ±1: the ``binary`` quantizer or a ProxConnect++
pair whose forward is ``sign``: ``bc``, ``bnn``, ``bnn+``, ``approx_sign``; weights scaled per
output channel or per tensor by ``α = mean|w|``, or not at all) run as XNOR/popcount: the input
signs are bits (1 ↔ +1) packed 32 per uint32 word along the reduction axis (convolutions build
their patches first, im2col, in the kernel's ``(kh, kw, c_in)`` order), the weight signs too, and
``dot = n − 2·popcount(x XOR w)`` (``jax.lax.population_count``, int32) is the ±1 product.
SAME padding: the float model pads the ±1 input with 0, which is neither sign. Padded taps get
the bit 0, so ``popcount(x XOR w)`` counts the weight bits there; the exact product over the
valid taps is ``dot = n_valid + 2·popcount(w AND NOT valid) − 2·popcount(x XOR w)`` with
``valid`` the packed mask of the taps inside the image at that output position. The offset
``n_valid + 2·popcount(w AND NOT valid)`` depends only on the output position and channel (not
on the batch), so it is computed once per call; the tail bits of the last word are 0 in ``x``,
``w`` and ``valid`` and count nowhere. BNN++ (forward ``SignSwish_μ``, values strictly inside
(−1, 1) for every finite μ), ProxConnect (``prox``) and ProxQuant (``identity``) forwards are
not signs: in their relaxed state they have no bits, and integer inference refuses them; a
finished run ends them in their exact state (the ``hard`` stat set: forward ``sign``), which
runs as XNOR/popcount like the sign pairs.

Ternary weights (TWN, ``{−α, 0, α}``, α per tensor or per output channel) with uniform inputs
are a uniform layer whose int8 weight codes are ``{−1, 0, 1}`` at the scale α.

Learned uniform quantizers: LSQ (step), PACT (inputs ``α/(2^b − 1)``, DoReFa weights), DoReFa
(weights ``2c/n − 1``: the integer codes ``2c − n`` at ``1/n``; inputs ``1/n``) and GDNSQ (inputs
``2^ℓ_s`` with the lower bound β = 0; weights ``s·(v − zp)`` per channel): their learned scales
are static, so the reference is the model itself. A weight zero point that is not a multiple of
½ runs as ``2^k·(x·(v − zi)) + R·Σx`` (:func:`_zero_point_planes`).

Dead-zone weights (CoDeQ, METHODS.md §6: ``ŵ = s·v + z·sign(v)``, codes ``|v| ≤ 2^(B−1) − 1``,
step ``s`` and dead-zone shift ``z`` per tensor) with uniform inputs: ``x·ŵ = s·(x·v) +
z·(x·sign v)``, two int8 products combined in int32 at the unit ``s·2^−k`` as ``2^k·(x·v) +
round(z/s·2^k)·(x·sign v)`` (:func:`_codeq_planes`), then requantized as a uniform layer.

After a binary layer the float model computes ``h = act(BN(α·dot + b))``, max-pools it and, when
the next layer is binary too, takes ``sign`` (``sign(0) = +1``). Every one of these float32 ops
is monotone in ``dot`` (``α ≥ 0``; the BatchNorm factor ``γ/√(σ²+ε)`` may be negative, which
makes the chain decreasing; rounding is monotone), so ``bit = [sign(...) = +1]`` is a threshold
on the integer ``dot``: ``bit = [d·dot ≥ T]`` per channel, with the direction ``d = ±1``. ``T``
is found by evaluating the float32 chain itself on every integer ``dot`` in ``[−n, n]`` (so the
float rounding is the reference's, not an idealized real number), and max-pool moves before the
threshold: see :func:`_threshold_bits`. When the next layer is float (a float head) or
uniform, ``y = float32(dot)·α`` and the rest of the chain run in float32 as the model runs them.
The fake-quant reference (:func:`fake_quant_forward`) computes a binary layer as
``(x̂ ⊛ sign ŵ)·α``: the same real number as the model's ``x̂ ⊛ ŵ``, but with the ±1 sums exact
(integers below 2^24) and one rounding, so it does not depend on the summation order.

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
from qflax.layers import QuantConv, QuantLinear
from qflax.models import CNN, MLP
from qflax.numerics import check_choice
from qflax.quantizers import unpack

__all__ = [
    "ACTIVATIONS",
    "CALIBRATIONS",
    "BinaryLayer",
    "FloatLayer",
    "IntegerLayer",
    "IntegerProgram",
    "estimate_scale",
    "export_integer",
    "fake_quant_forward",
    "integer_forward",
    "quantize_input",
    "quantize_multiplier",
    "requantize",
    "static_act_scales",
]

_INT32_MAX = 2**31 - 1
_CONV_DIMS = ("NHWC", "HWIO", "NHWC")

# The hidden activations (``model.activation``) integer inference and its reference run.
ACTIVATIONS = ("relu", "hardtanh")
_ACT_FNS = {"relu": jax.nn.relu, "hardtanh": jax.nn.hard_tanh}
# Input quantizers with static uniform codes (a scale per tensor).
_UNIFORM_KINDS = ("absmax", "learned_step")
# Input quantizers whose codes are uniform at a static scale: absmax (a scale calibrated by
# static_act_scales) and the learned ones (the scale is a parameter: learned_step's scale,
# LSQ's step, PACT's α/(2^b − 1), GDNSQ's 2^ℓ_s with its lower bound β = 0), and DoReFa's
# fixed grid 1/(2^b − 1) on [0, 1].
_CODE_INPUTS = ("absmax", "learned_step", "lsq", "pact", "gdnsq", "dorefa")


# ---------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class _Step:
    path: str
    layer: Any
    op: str  # "dense" | "conv"
    norm: Any  # a BatchNorm applied after the layer (float reference only), or None
    act: str | None  # the activation after the layer (an ACTIVATIONS name), None for the head
    pool: bool
    flatten: bool  # flatten (batch, -1) before the layer
    prev_act: str | None  # the activation whose output is the layer's input (None: the input)


def _plan(model: nnx.Module) -> list[_Step]:
    """The layers of an MLP or CNN in execution order, with what follows each.

    Raises ValueError, naming the value, for a model whose ``activation`` is not one of
    :data:`ACTIVATIONS` (every path of integer inference and its reference starts here).
    """
    activation = getattr(model, "activation", "relu")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"model activation={activation!r} is not allowed for integer inference; allowed: "
            f"{', '.join(map(repr, ACTIVATIONS))}"
        )
    if isinstance(model, MLP):
        layers = [("stem", model.stem)] + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        steps = [
            _Step(p, m, "dense", None, activation, False, i == 0, activation if i else None)
            for i, (p, m) in enumerate(layers)
        ]
        return steps + [_Step("head", model.head, "dense", None, None, False, False, activation)]
    if isinstance(model, CNN):
        steps = []
        for i, ((path, layer, norm), pool) in enumerate(
            zip(
                (("stem", model.stem, model.stem_norm), ("conv2", model.conv2, model.conv2_norm)),
                model.pools,
                strict=True,
            )
        ):
            norm = None if isinstance(norm, Identity) else norm
            prev = activation if i else None
            steps.append(_Step(path, layer, "conv", norm, activation, pool, False, prev))
        steps.append(
            _Step("dense", model.dense, "dense", None, activation, False, True, activation)
        )
        return steps + [_Step("head", model.head, "dense", None, None, False, False, activation)]
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


def _sign_valued(spec: Any, role: str) -> bool:
    """Whether ``spec`` maps a tensor to ``α·sign`` (weights) or to ``sign`` (inputs) — for a
    relaxed pair (:attr:`~qflax.layers.TensorQuant.relaxed`): in its exact state (``hard``
    stat set), which :func:`_check_binary` checks on the concrete layer."""
    if spec is None:
        return False
    if spec.kind == "binary":
        return not spec.config.stochastic and (role == "weight" or spec.config.scaling == "none")
    if spec.kind == "pair":
        return role == "weight" or spec.scaling == "none"
    return False


def _binary_config(spec: Any) -> qz.BinaryConfig:
    if spec.kind == "binary":
        return spec.config
    return qz.BinaryConfig(scaling=spec.scaling, axis=spec.axis)


def _scale_on_output_axis(layer: Any, granularity: str, axis: int) -> bool:
    """Whether a weight scale of ``granularity`` (``"tensor"``, ``"channel"``, or a binary /
    ternary ``scaling`` ``"none"``) is one per tensor or one per output channel (the kernel's
    last axis): the scales integer inference folds into its per-channel multipliers."""
    ndim = _inner(layer).kernel[...].ndim
    return granularity in ("tensor", "none") or (
        granularity == "channel" and axis % ndim == ndim - 1
    )


def _is_binary_step(step: _Step) -> bool:
    """A quant layer whose weights are ``α·sign(w)`` (α per output channel, per tensor or 1) and
    whose inputs are ``sign(x)``: integer inference runs it as XNOR/popcount."""
    layer = step.layer
    if not _is_quant(layer):
        return False
    recipe = layer.recipe
    if not (_sign_valued(recipe.weight, "weight") and _sign_valued(recipe.act, "act")):
        return False
    config = _binary_config(recipe.weight)
    return _scale_on_output_axis(layer, config.scaling, config.axis)


def _binary_weight(layer: Any) -> tuple[jax.Array, jax.Array]:
    """``(y, α)`` of a binary layer's kernel: ``ŵ = α·y`` with ``y = sign(w)`` (±1 float32;
    ``sign(0) = +1``, as the quantizers and the pairs), α: (C,) or (1,) float32. A relaxed
    pair gives its forward before scaling (:meth:`~qflax.layers.TensorQuant.pair_values`),
    ``sign(w)`` in its exact state. Traceable (the fake-quant reference runs under jit)."""
    kernel = _layer_kernel(layer)
    spec = layer.recipe.weight
    alpha = qz.binary_scale(kernel, _binary_config(spec))
    if spec.kind == "pair":
        y, pair_alpha = spec.pair_values(kernel, _stats(layer, "weight"))
        alpha = alpha if pair_alpha is None else pair_alpha
    else:
        y = jnp.where(kernel >= 0, jnp.float32(1.0), jnp.float32(-1.0))
    return y.astype(jnp.float32), alpha.astype(jnp.float32).reshape(-1)


def _post(y: jax.Array, bias: Any, norm: Any, act: str | None) -> jax.Array:
    """Bias, eval-mode BatchNorm and the activation after a layer's product (the float ops the
    threshold folding of binary layers replays)."""
    if bias is not None:
        y = y + bias
    if norm is not None:
        y = norm(y, use_running_average=True)
    if act is not None:
        y = _ACT_FNS[act](y)
    return y


def fake_quant_forward(
    model: nnx.Module,
    x: jax.Array,
    act_scales: Mapping[str, float] | None = None,
    *,
    record: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """The eval-mode fake-quant forward of an MLP / CNN, with static activation scales.

    Re-traces the model's forward (flatten, layers, BatchNorm in eval mode, the model's ReLU or
    hardtanh, 2x2 max-pool) with each quant layer's quantized kernel (``quantized_kernel()``)
    and its input quantized by its activation quantizer: with ``act_scales=None`` the layer's
    own (dynamic absmax: equal to ``model(x)``); with ``act_scales[path] = s`` the same uniform
    quantizer with the fixed scale ``s`` (the reference integer inference matches). Input
    quantizers that are not uniform (binary, pairs) are the layer's own either way.

    Binary layers (``±1`` inputs, ``α·(±1)`` weights) compute ``(x̂ ⊛ sign ŵ)·α``: the real
    number of the model's ``x̂ ⊛ ŵ`` with the ±1 sums exact in float32 and a single rounding
    (the model's own forward agrees up to float32 rounding of its partial sums).

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
        layer, inner = step.layer, _inner(step.layer)
        spec = _act_spec(step)
        if spec is not None:
            static = act_scales is not None and spec.kind in _UNIFORM_KINDS
            if static and step.path in act_scales:
                x = _static_act(x, spec, act_scales[step.path])
            elif static and spec.kind != "learned_step":  # a learned scale is static already
                raise ValueError(
                    f"act_scales has no scale for layer {step.path!r}; allowed: act_scales "
                    "from static_act_scales(model, batches)"
                )
            else:
                x = spec.apply(x, _params(layer, "act"), stats=_stats(layer, "act"))
        if _is_binary_step(step):
            signs, alpha = _binary_weight(layer)
            y = _linear_op(step, x, signs) * alpha
        else:
            kernel = layer.quantized_kernel() if _is_quant(layer) else inner.kernel[...]
            y = _linear_op(step, x, kernel)
        bias = None if inner.bias is None else inner.bias[...]
        y = _post(y, bias, step.norm, step.act)
        if step.pool:
            y = _max_pool(y)
        x = y
    return x


def _is_quant(layer: Any) -> bool:
    return isinstance(layer, (QuantLinear, QuantConv))


def _params(layer: Any, role: str) -> dict[str, jax.Array]:
    names = dict(layer.param_names).get(role, ())
    return {name: getattr(layer, f"{role}_{name}")[...] for name in names}


def _stats(layer: Any, role: str) -> dict[str, jax.Array]:
    names = dict(getattr(layer, "stat_names", ())).get(role, ())
    return {name: getattr(layer, f"{role}_{name}")[...] for name in names}


def _act_grid(step: _Step) -> tuple[int, int]:
    """The code range ``[qmin, qmax]`` of a layer's uniform input quantizer
    (:data:`_CODE_INPUTS`); GDNSQ's depends on its learned range (read from the layer)."""
    spec = step.layer.recipe.act
    config = spec.config
    if spec.kind == "lsq":
        return -config.qn, config.qp
    if spec.kind == "pact":
        return 0, config.levels
    if spec.kind == "dorefa":
        return 0, 2**config.bits - 1
    if spec.kind == "gdnsq":
        big = jnp.asarray([-3.0e38, 3.0e38], jnp.float32)
        lo, hi = np.asarray(qz.gdnsq_act_codes(big, _params(step.layer, "act"), config))
        return int(lo), int(hi)
    return config.qmin, config.qmax


def _learned_act_scale(step: _Step) -> float | None:
    """The static input scale a learned input quantizer keeps as a parameter (None: absmax)."""
    layer, kind = step.layer, step.layer.recipe.act.kind
    if kind == "learned_step":
        return float(np.asarray(layer.act_scale[...], np.float32).reshape(()))
    if kind == "lsq":
        return float(np.asarray(layer.act_step[...], np.float32).reshape(()))
    if kind == "pact":  # levels {0, α/n, ..., α}: codes round(clip(x, 0, α)·n/α)
        alpha = float(np.asarray(layer.act_alpha[...], np.float32).reshape(()))
        return alpha / layer.recipe.act.config.levels
    if kind == "dorefa":  # q_k(clip(x, 0, 1)): codes round(clip(x, 0, 1)·n), n = 2^k − 1
        return 1.0 / (2**layer.recipe.act.config.bits - 1)
    if kind == "gdnsq":  # s = 2^ℓ_s in float32, as the quantizer computes it
        return float(jnp.exp2(jnp.asarray(layer.act_log_step[...], jnp.float32)).reshape(()))
    return None


def _check_act_spec(step: _Step):
    spec = _act_spec(step)
    recipe = str(step.layer.recipe) if _is_quant(step.layer) else "float"
    if spec is None or spec.kind not in _CODE_INPUTS:
        raise ValueError(
            f"layer {step.path!r} has recipe {recipe!r} (input quantizer {spec}); integer "
            f"inference supports {_SUPPORTED}"
        )
    config = spec.config
    if spec.kind == "gdnsq" and float(np.asarray(step.layer.act_lower[...])) != 0.0:
        raise ValueError(
            f"layer {step.path!r} has recipe {recipe!r}: its GDNSQ input has the lower bound "
            f"β={float(np.asarray(step.layer.act_lower[...])):.6g} (a zero point on the inputs); "
            "allowed: β = 0 (unsigned inputs, signed=False: inputs after a ReLU)"
        )
    lo, hi = _act_grid(step)
    uniform = spec.kind in _UNIFORM_KINDS
    if (
        (uniform and not config.symmetric)
        or getattr(config, "granularity", "tensor") != "tensor"
        or lo < -128
        or hi > 255
    ):
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
    Float layers and layers with binary (sign) inputs get no scale; a model with none of the
    others returns ``{}`` without running.

    Args:
      model: an MLP or CNN whose quant layers have absmax / learned_step activation quantizers
        (or sign-valued ones: binary, pairs).
      batches: arrays of inputs (or ``(x, y)`` pairs / dicts with an ``"image"`` or ``"x"`` key).
      calibration: one of :data:`CALIBRATIONS`.

    Returns:
      ``{path: scale}`` (Python floats) for every layer of the plan with a uniform input
      quantizer.
    """
    check_choice(calibration, "calibration", CALIBRATIONS)
    steps = [
        step
        for step in _plan(model)
        if not _is_float_step(step) and not _sign_valued(_act_spec(step), "act")
    ]
    specs = {step.path: _check_act_spec(step) for step in steps}
    if not specs:
        return {}
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
        learned = _learned_act_scale(step)
        if learned is not None:
            scales[step.path] = learned
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


# ---------------------------------------------------------------------------------- bit packing


def _pack_words(bits: jax.Array) -> jax.Array:
    """Packs ``{0, 1}`` values along the last axis into uint32 words, 32 per word.

    Bit ``j`` (least significant first) of word ``i`` is ``bits[..., 32·i + j]``; the last word
    is padded with 0 bits. ``(..., n) → (..., ceil(n/32))``.
    """
    n = bits.shape[-1]
    words = -(-n // 32)
    b = jnp.asarray(bits).astype(jnp.uint32)
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, 32 * words - n)])
    b = b.reshape(*b.shape[:-1], words, 32)
    # distinct bits: the sum is their OR
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _unpack_words(words: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`_pack_words`: the first ``n`` bits as uint8 ``{0, 1}``."""
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.astype(jnp.uint8).reshape(*words.shape[:-1], -1)[..., :n]


def _conv_pads(shape: tuple[int, ...], window: tuple[int, ...], strides, padding) -> list:
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(shape, window, strides, padding)]
    return [tuple(int(v) for v in p) for p in padding]


def _im2col(x: jax.Array, window: tuple[int, int], strides, padding) -> jax.Array:
    """The patches of an NHWC tensor, ``(B, H_out, W_out, kh·kw·C)`` in the HWIO kernel's
    ``(kh, kw, c)`` order (row-major), padded with 0 as ``lax.conv_general_dilated`` pads."""
    kh, kw = window
    sh, sw = tuple(strides) or (1, 1)
    pads = _conv_pads(x.shape[1:3], window, (sh, sw), padding)
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    cols = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


def _popcount_sum(words: jax.Array, axis: int) -> jax.Array:
    return jnp.sum(lax.population_count(words).astype(jnp.int32), axis=axis)


def _xnor_dot(
    bits: jax.Array,
    kernel: jax.Array,
    kernel_shape: tuple[int, ...],
    op: str = "dense",
    strides: tuple[int, ...] = (),
    padding: Any = "SAME",
) -> jax.Array:
    """The ±1 product ``Σ a·w`` of binary inputs and weights by XNOR/popcount (int32).

    Args:
      bits: the input signs as ``{0, 1}`` (1 ↔ +1), ``(B, features)`` or NHWC.
      kernel: the packed weight signs, uint32 ``(words, out)`` (:func:`_pack_words` of the
        kernel reshaped to ``(n, out)`` and transposed).
      kernel_shape: the float kernel's shape (``(n, out)`` or HWIO).
      op, strides, padding: the layer's ("dense" or "conv").

    Returns:
      ``n − 2·popcount(x XOR w)`` for dense layers. Convolutions: padded taps are 0 in the float
      model (neither sign); they get the bit 0, so ``popcount(x XOR w)`` counts the weight bits
      there, and ``dot = n_valid + 2·popcount(w AND NOT valid) − 2·popcount(x XOR w)`` (module
      docstring) with ``valid`` the packed mask of the image taps at each output position —
      batch-independent, computed once per call.
    """
    if op == "dense":
        x = _pack_words(bits)
        return math.prod(kernel_shape[:-1]) - 2 * _popcount_sum(x[..., :, None] ^ kernel, -2)
    window = tuple(kernel_shape[:2])
    x = _pack_words(_im2col(bits, window, strides, padding))  # (B, H_out, W_out, words)
    ones = jnp.ones((1, *bits.shape[1:]), jnp.uint8)
    valid = _pack_words(_im2col(ones, window, strides, padding))[0]  # (H_out, W_out, words)
    n_valid = _popcount_sum(valid, -1)[..., None]
    offset = n_valid + 2 * _popcount_sum(kernel & ~valid[..., :, None], -2)  # (H_out, W_out, C)
    return offset - 2 * _popcount_sum(x[..., :, None] ^ kernel, -2)


def _threshold_bits(
    dot: jax.Array, direction: jax.Array, threshold: jax.Array, pool: bool
) -> jax.Array:
    """The next binary layer's input bits ``sign(pool(act(BN(α·dot + b))))`` from ``dot``.

    Per channel the float chain ``f(dot) = [act(BN(α·dot + b)) ≥ 0]`` is monotone in ``dot``
    (every op is monotone, increasing or decreasing with the sign of the folded factor ``α·γ``),
    so ``f(dot) = [d·dot ≥ T]`` with ``d = ±1`` (:func:`_binary_thresholds`). Max-pool: the
    float model takes ``sign(max_i h_i)`` over a window; ``sign`` is monotone nondecreasing, so
    ``sign(max_i h_i) = max_i sign(h_i)``, i.e. ``OR_i f(dot_i) = OR_i [d·dot_i ≥ T]
    = [max_i (d·dot_i) ≥ T]``. So the pool runs on ``z = d·dot`` BEFORE the threshold: on
    channels with ``d = −1`` (a negative BatchNorm γ) that is a MIN-pool of ``dot``, not a
    max-pool (which would be wrong there), and one comparison per pooled value remains.
    """
    z = dot * direction
    if pool:
        z = _max_pool(z)
    return (z >= threshold).astype(jnp.uint8)


# ---------------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class IntegerLayer:
    """One quantized layer of integer inference (a pytree; the op description is static).

    ``acc = op(x, kernel)`` on integer codes with int32 accumulation (``x`` int8, or int16/int32
    for wider codes) — for power-of-two weights (``shifts`` set) ``acc = Σ_j op(x, kernel[j]) <<
    shifts[j]`` over one ternary mask per exponent, no weight multiply — negated per output
    channel where ``negate`` (a BatchNorm with ``γ < 0`` folded in) — for dead-zone (CoDeQ)
    weights ``acc = Σ_j coefficients[j]·op(x, kernel[j])`` over the codes and their signs, for
    weights with a zero point ``acc = coefficients[0]·op(x, kernel[0]) + input_sum·op(x, 1)`` —
    then by ``output``:

    * ``"codes"`` (the next layer is quantized):
      ``out = clip(requantize((acc << acc_shift) + bias, multiplier, shift), out_min, out_max)``,
      ``max(out, 0)`` if ``relu``, cast to ``out_dtype``, 2x2 max-pool if ``pool``; ``out`` are
      the next layer's input codes (real value ``s_out·out``). A hardtanh is in
      ``out_min``/``out_max`` (the codes of ±1).
    * ``"logits"`` (the last layer): the same without activation; int32 logits at a common scale.
    * ``"float"`` (the next layer is float): ``y = float32(acc)·acc_scale + float_bias``, then
      ReLU / hardtanh and pool in float32 (the boundary back to float).
    * ``"bits"`` (the next layer is binary): as ``"float"``, then ``y ≥ 0`` as uint8 bits.
    """

    kernel: jax.Array  # integer weight codes (int8), the layer's kernel layout; (E, ...) masks
    bias: jax.Array | None = None  # int32 bias at scale s_in·s_w[c]·2^−acc_shift, (out,)
    multiplier: jax.Array | None = None  # int32 M0 per output channel, (out,)
    shift: jax.Array | None = None  # int32 t per output channel (round(acc·M0/2^t)), (out,)
    acc_scale: jax.Array | None = None  # output="float": float32 s_in·s_w[c] (BN folded), (out,)
    float_bias: jax.Array | None = None  # output="float": float32 bias (BN folded), (out,)
    negate: jax.Array | None = None  # bool (out,): channels whose folded BN factor is < 0
    # Weights with a zero point: int32 R per output channel; acc += R·(x summed over the window).
    input_sum: jax.Array | None = None
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
    output: str = "codes"  # "codes" | "logits" | "float" | "bits"
    hardtanh: bool = False
    # Power-of-two weights: kernel[j] is the ternary mask of exponent K − shifts[j]; () for one
    # integer kernel.
    shifts: tuple[int, ...] = ()
    # Dead-zone (CoDeQ) weights: kernel[j] is a plane (the codes v, their signs) whose int32
    # product is multiplied by coefficients[j] (``(2^k, round(z/s·2^k))``); () otherwise.
    coefficients: tuple[int, ...] = ()


jax.tree_util.register_dataclass(
    IntegerLayer,
    data_fields=[
        "kernel",
        "bias",
        "multiplier",
        "shift",
        "acc_scale",
        "float_bias",
        "negate",
        "input_sum",
    ],
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
        "hardtanh",
        "shifts",
        "coefficients",
    ],
)


@dataclasses.dataclass(frozen=True)
class BinaryLayer:
    """A binary layer (±1 inputs and weights) of integer inference: XNOR/popcount (a pytree).

    ``dot = Σ sign(x)·sign(w)`` in int32 from packed bits (:func:`_xnor_dot`; convolutions with
    the exact SAME-padding correction), then by ``output``:

    * ``"bits"`` (the next layer is binary): ``bits = [pool(direction·dot) ≥ threshold]``
      (uint8), the folded ``sign(pool(act(BN(α·dot + b))))`` (:func:`_threshold_bits`).
    * ``"float"``: ``y = float32(dot)·alpha``, then as :class:`FloatLayer` after its product:
      bias, eval-mode BatchNorm, activation, pool, and the next layer's codes when
      ``out_scale`` is set; the float32 logits for the last layer.
    """

    kernel: jax.Array  # uint32 (words, out): the weight signs (1 ↔ +1), (kh, kw, c_in) packed
    threshold: jax.Array | None = None  # output="bits": int32 T per output channel, (out,)
    direction: jax.Array | None = None  # output="bits": int32 ±1 per output channel, (out,)
    alpha: jax.Array | None = None  # output="float": float32 α = mean|w| (or 1), (out,)
    bias: jax.Array | None = None  # output="float": float32 (out,)
    norm_mean: jax.Array | None = None  # output="float": BatchNorm running mean, or None
    norm_var: jax.Array | None = None
    norm_scale: jax.Array | None = None
    norm_bias: jax.Array | None = None
    out_scale: jax.Array | None = None  # output="float": the next layer's activation scale
    kernel_shape: tuple[int, ...] = ()  # the float kernel's shape ((n, out) or HWIO)
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    relu: bool = False
    hardtanh: bool = False
    pool: bool = False
    flatten: bool = False
    norm_epsilon: float = 0.0
    out_min: int = -128
    out_max: int = 127
    out_dtype: str = "int8"
    output: str = "bits"  # "bits" | "float"


jax.tree_util.register_dataclass(
    BinaryLayer,
    data_fields=[
        "kernel",
        "threshold",
        "direction",
        "alpha",
        "bias",
        "norm_mean",
        "norm_var",
        "norm_scale",
        "norm_bias",
        "out_scale",
    ],
    meta_fields=[
        "kernel_shape",
        "op",
        "strides",
        "padding",
        "relu",
        "hardtanh",
        "pool",
        "flatten",
        "norm_epsilon",
        "out_min",
        "out_max",
        "out_dtype",
        "output",
    ],
)


@dataclasses.dataclass(frozen=True)
class FloatLayer:
    """One float layer of a mixed program (a pytree), computed as the model computes it.

    ``y = op(x, kernel) + bias`` in float32, the eval-mode BatchNorm
    ``(y − mean)·rsqrt(var + ε)·scale + bias`` when ``norm_mean`` is set (flax's formula), ReLU
    or hardtanh, 2x2 max-pool; then, when ``out_scale`` is set (the next layer is quantized), the
    next layer's input codes ``clip(round(y / out_scale), out_min, out_max)`` as ``out_dtype`` —
    the codes of the uniform quantizer the fake-quant model applies there (the boundary to
    integer); when ``out_bits`` (the next layer is binary), its input signs ``y ≥ 0`` as uint8.
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
    hardtanh: bool = False
    out_bits: bool = False  # the next layer is binary: output y >= 0 as uint8 bits


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
        "hardtanh",
        "out_bits",
    ],
)


@dataclasses.dataclass(frozen=True)
class IntegerProgram:
    """Inference of a model with integer operands in its quantized layers (a pytree).

    ``layers`` run in order; :class:`IntegerLayer` on integer codes, :class:`BinaryLayer` on
    bits, :class:`FloatLayer` in float32. When the first layer is quantized, ``input_scale``,
    ``input_min``/``input_max`` quantize the float input to codes; when it is binary
    (``input_bits``), the input becomes its signs (``x ≥ 0`` as uint8 bits); otherwise
    ``input_scale`` is None and the input stays float. The result is int32 logits whose real
    value is ``logit_scale·logits`` when the last layer is an :class:`IntegerLayer`, float32
    logits (``logit_scale = 1``) otherwise.
    """

    layers: tuple[IntegerLayer | BinaryLayer | FloatLayer, ...]
    input_scale: float | None = 1.0
    input_min: int = -128
    input_max: int = 127
    logit_scale: float = 1.0
    input_bits: bool = False


jax.tree_util.register_dataclass(
    IntegerProgram,
    data_fields=["layers"],
    meta_fields=["input_scale", "input_min", "input_max", "logit_scale", "input_bits"],
)


def _code_dtype(lo: int, hi: int) -> str:
    for name in ("int8", "int16", "int32"):
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    raise ValueError(f"codes [{lo}, {hi}] do not fit int32")


def _sign_pairs() -> str:
    return ", ".join(n for n, f in qz.PAIRS.items() if f().forward is qz.sign)


_SUPPORTED = (
    "float layers (no quantizer); layers whose weight quantizer is absmax or learned_step "
    "(uniform, symmetric, per tensor or per output channel, <= 8 bits), lsq, dorefa, gdnsq, "
    "pow2 or ternary (per tensor or per output channel) or codeq AND whose input quantizer is "
    "absmax or learned_step (uniform, symmetric), lsq, pact, dorefa or gdnsq (lower bound 0), per "
    "tensor, <= 8 bits; binary layers whose weights AND inputs are signs (kind "
    f"'binary', deterministic, a pair whose forward is sign: {_sign_pairs()}, or a relaxed "
    "pair in the exact state a finished run ends in, hard=1), the weights scaled by mean|w| per "
    "output channel or per tensor or not at all, the inputs not scaled"
)

# Layer kinds whose input is uniform codes at a static scale.
_CODE_KINDS = ("uniform", "pow2", "codeq")


def _is_float_step(step: _Step) -> bool:
    layer = step.layer
    return not _is_quant(layer) or (layer.recipe.weight is None and layer.recipe.act is None)


def _check_weight_spec(step: _Step):
    spec = step.layer.recipe.weight
    if (
        spec is None
        or spec.kind not in _UNIFORM_KINDS
        or not spec.config.symmetric
        or spec.config.bits > 8
        or not _scale_on_output_axis(step.layer, spec.config.granularity, spec.config.axis)
    ):
        raise ValueError(
            f"layer {step.path!r} has recipe {str(step.layer.recipe)!r} (weight quantizer "
            f"{spec}); integer inference supports {_SUPPORTED}"
        )
    return spec


# Learned uniform weight quantizers whose codes (qflax.export.quantize_tensor) are integers at a
# per-tensor / per-channel scale, GDNSQ's with a (non-integer) zero point per channel.
_CODED_WEIGHTS = ("lsq", "dorefa", "gdnsq")


def _check_weight_granularity(step: _Step):
    """pow2 and the learned uniform weights (:data:`_CODED_WEIGHTS`): a scale per tensor or
    per output channel (DoReFa has one per tensor and no ``granularity`` field)."""
    spec = step.layer.recipe.weight
    config = spec.config
    granularity = getattr(config, "granularity", "tensor")
    axis = getattr(config, "axis", -1)
    if not _scale_on_output_axis(step.layer, granularity, axis):
        raise ValueError(
            f"layer {step.path!r} has recipe {str(step.layer.recipe)!r} (weight quantizer "
            f"{spec}, granularity={granularity!r}, axis={axis}); integer inference supports "
            f"{_SUPPORTED}"
        )
    return spec


def _check_ternary_spec(step: _Step):
    spec = step.layer.recipe.weight
    if not _scale_on_output_axis(step.layer, spec.config.scaling, spec.config.axis):
        raise ValueError(
            f"layer {step.path!r} has recipe {str(step.layer.recipe)!r}: its ternary scale is "
            f"per channel on axis {spec.config.axis}; allowed: the output-channel axis (-1)"
        )
    return spec


def _check_binary(step: _Step) -> None:
    recipe = step.layer.recipe
    name = str(recipe)
    for role, spec in (("weight", recipe.weight), ("act", recipe.act)):
        hard = _stats(step.layer, role).get("hard")
        if spec.kind == "pair" and spec.relaxed and not float(np.asarray(hard)) > 0:
            forward = qz.PAIRS[spec.pair](**dict(spec.pair_kwargs)).forward.__name__
            raise ValueError(
                f"layer {step.path!r} has recipe {name!r}: its {role} pair {spec.pair!r} is in "
                f"its relaxed state (hard=0): the forward {forward} is not a sign (BNN++'s "
                "SignSwish_μ lies strictly between −1 and +1 for every finite μ; ProxConnect's "
                "prox and ProxQuant's identity are not ±1 either), so its values have no bits "
                "for XNOR/popcount integer inference; allowed: the exact state a finished run "
                "ends in (hard=1, set by training at its last epoch), kind 'binary', or a pair "
                f"whose forward is sign ({_sign_pairs()})"
            )
        if not _sign_valued(spec, role):
            raise ValueError(
                f"layer {step.path!r} has recipe {name!r} ({role} quantizer {spec}); integer "
                f"inference supports {_SUPPORTED}"
            )
    if not _is_binary_step(step):
        raise ValueError(
            f"layer {step.path!r} has recipe {name!r}: its weight scale is per channel on axis "
            f"{_binary_config(recipe.weight).axis}; allowed: the output-channel axis (-1)"
        )
    if step.prev_act == "relu":
        raise ValueError(
            f"layer {step.path!r} is binary (recipe {name!r}: its input is quantized by sign) "
            "but follows a ReLU (model activation='relu'): sign(relu(x)) = +1 for every x, so "
            "the layer sees a constant input; allowed: a model built with activation='hardtanh'"
        )


def _layer_kind(step: _Step) -> str:
    """``"float"``, ``"uniform"``, ``"pow2"``, ``"codeq"`` or ``"binary"``; ValueError (naming
    the layer, its recipe and what is supported) for a layer integer inference cannot run."""
    if _is_float_step(step):
        return "float"
    recipe = step.layer.recipe
    if recipe.weight is None or recipe.act is None:
        raise ValueError(
            f"layer {step.path!r} has recipe {str(recipe)!r} (only one of its weight and "
            f"input quantized); integer inference supports {_SUPPORTED}"
        )
    if recipe.weight.kind in ("binary", "pair") or recipe.act.kind in ("binary", "pair"):
        _check_binary(step)
        return "binary"
    kind = recipe.weight.kind
    if kind in ("pow2", *_CODED_WEIGHTS):
        _check_weight_granularity(step)
    elif kind == "ternary":
        _check_ternary_spec(step)
    elif kind != "codeq":
        _check_weight_spec(step)
    _check_act_spec(step)
    # ternary codes {−1, 0, 1} at the scale α and the learned kinds run as uniform layers
    return kind if kind in ("pow2", "codeq") else "uniform"


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


def _op_fields(step: _Step) -> dict[str, Any]:
    inner = _inner(step.layer)
    padding = getattr(inner, "padding", "SAME")
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return dict(
        op=step.op,
        strides=tuple(int(s) for s in getattr(inner, "strides", ()) or ()),
        padding=padding,
        relu=step.act == "relu",
        hardtanh=step.act == "hardtanh",
        pool=step.pool,
        flatten=step.flatten,
    )


def _norm_fields(norm: Any) -> dict[str, Any]:
    """A BatchNorm's float32 arrays for :class:`FloatLayer` / :class:`BinaryLayer`."""
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


def _out_fields(next_scale: float | None, next_grid: tuple[int, int] | None) -> dict[str, Any]:
    """The conversion of a float output to the next layer's codes (none when it is not uniform)."""
    if next_scale is None:
        return {}
    lo, hi = next_grid
    return dict(
        out_scale=jnp.asarray(next_scale, jnp.float32),
        out_min=int(lo),
        out_max=int(hi),
        out_dtype=_code_dtype(lo, hi),
    )


def _float_layer(
    step: _Step, next_scale: float | None, next_grid: Any, next_bits: bool = False
) -> FloatLayer:
    inner = _inner(step.layer)
    return FloatLayer(
        kernel=jnp.asarray(inner.kernel[...], jnp.float32),
        bias=None if inner.bias is None else jnp.asarray(inner.bias[...], jnp.float32),
        **_norm_fields(step.norm),
        **_out_fields(next_scale, next_grid),
        **_op_fields(step),
        out_bits=next_bits,
    )


def _act_scale(step: _Step, act_scales: Mapping[str, float] | None) -> float:
    if act_scales is not None and step.path in act_scales:
        return float(np.float32(act_scales[step.path]))
    learned = _learned_act_scale(step)
    if learned is not None:
        return learned
    raise ValueError(
        f"act_scales has no scale for layer {step.path!r} (absmax activations need a static "
        "scale); allowed: act_scales from static_act_scales(model, batches)"
    )


def _auto_shift(worst: float, bias_units: float) -> int:
    """The largest ``k ≤ 16`` with ``(worst + bias_units)·2^k ≤ 2^30`` (0 when none)."""
    total = max(worst + bias_units, 1.0)
    return int(max(0, min(16, math.floor(30 - math.log2(total)))))


# ---------------------------------------------------------------------------------- pow2 weights


def _pow2_integer_kernel(q: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """The codes of a pow2 QArray as integers: ``(exponent, sign, K)``.

    ``exponent[i]`` is ``k`` of the level ``±s·2^−k`` (−1 for the zero code), ``sign[i]`` is
    ±1 (0 for zero), ``K`` the largest exponent in use (0 for an all-zero kernel): the integer
    weight is ``sign·2^(K − k)`` at the scale ``s·2^−K``.
    """
    v = np.asarray(q.values).astype(np.int64)
    half = 2 ** (q.bits - 1)
    k = v & (half - 1)
    zero = (k == half - 1) if q.pow2_zero else np.zeros(v.shape, bool)
    sign = np.where(zero, 0, np.where((v & half) != 0, -1, 1))
    exponent = np.where(zero, -1, k)
    return exponent, sign, int(exponent.max(initial=0))


def _pow2_planes(exponent: np.ndarray, sign: np.ndarray, top: int):
    """One ternary int8 mask per exponent in use and its left shift ``K − k`` (largest first)."""
    used = sorted(int(k) for k in np.unique(exponent) if k >= 0) or [top]
    masks = np.stack([np.where(exponent == k, sign, 0) for k in used]).astype(np.int8)
    return masks, tuple(top - k for k in used)


def _codeq_planes(q: Any, s_w: np.ndarray, act_max: int, fan_in: int):
    """The integer planes of a dead-zone (CoDeQ) kernel ``ŵ = s·v + z·sign(v)``.

    ``x·ŵ = s·(x·v) + z·(x·sign v)``: two int8 products combined in int32 at the unit
    ``s·2^−k``: ``acc = 2^k·(x·v) + R·(x·sign v)`` with ``R = round(z/s·2^k)``, ``k`` (≤ 30)
    as large as keeps the worst-case accumulator within 2^29 (the unit is 2^k times finer for
    the bias too; the bias shift takes what is left). The rounding of ``R`` is the one
    approximation: each nonzero weight's dead-zone offset is off by at most ``2^−(k+1)`` of a
    step ``s``. At 2 bits (``|v| ≤ 1``: ``v = sign v``) the levels are ``±(s + z)`` and the
    layer is exact: one plane ``v`` at the float32 scale ``s + z`` (the reference's own level).

    Returns:
      ``(planes, coefficients, weight scale per channel, worst-case |acc|)``.
    """
    v = np.asarray(q.values).astype(np.int64)
    sign = np.sign(v)
    z = float(np.asarray(q.zero_point, np.float64).reshape(-1)[0])
    s = float(np.asarray(q.scale, np.float64).reshape(-1)[0])
    out_channels = v.shape[-1]
    signs = np.abs(sign).reshape(fan_in, out_channels).sum(0)
    if np.abs(v).max(initial=0) <= 1:
        level = float(np.float32(s) + np.float32(z))  # fl(s·1 + z·1), as the quantizer computes
        planes = jnp.asarray(v[None].astype(np.int8))
        return planes, (1,), np.full(out_channels, level), act_max * float(signs.max(initial=0))
    ratio = z / s if s > 0 else 0.0
    per_channel = np.abs(v).reshape(fan_in, out_channels).sum(0)
    k, worst = _offset_fraction_bits(per_channel, signs, np.float64(ratio), act_max)
    planes = jnp.asarray(np.stack([v, sign]).astype(np.int8))
    return planes, (2**k, int(np.round(ratio * 2.0**k))), s_w * 2.0**-k, worst


def _offset_fraction_bits(
    per_channel: np.ndarray, count: Any, fraction: Any, act_max: int
) -> tuple[int, float]:
    """The fraction bits ``k`` of ``acc = 2^k·(x·v) + round(fraction·2^k)·(x·m)`` (``m`` a
    plane of ``count`` ±1/1 entries per output channel): the largest ``k ≤ 30`` that keeps the
    worst case ``act_max·(Σ|v|·2^k + count·|R|)`` within 2^29, and that worst case.

    Raises:
      ValueError: even ``k = 0`` overflows the int32 accumulator.
    """

    def worst(k: int) -> float:
        r = np.abs(np.round(fraction * 2.0**k))
        return act_max * float((per_channel * 2**k + count * r).max(initial=0))

    k = next((k for k in range(30, 0, -1) if worst(k) <= 2.0**29), 0)
    if worst(k) > _INT32_MAX:
        raise ValueError(
            f"weight codes summing to {int(per_channel.max(initial=0))} per channel overflow "
            "the int32 accumulator; allowed: narrower codes or a smaller fan-in"
        )
    return k, worst(k)


def _has_zero_point(q: Any) -> bool:
    return q.zero_point is not None and bool(np.any(np.asarray(q.zero_point) != 0))


def _zero_points(q: Any, out_channels: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(q.zero_point, np.float64).reshape(-1), (out_channels,))


def _half_integer_zero_point(q: Any) -> bool:
    """Whether ``2·zp`` is an integer: ``s·(v − zp) = (s/2)·(2v − 2zp)`` on integer codes."""
    twice = 2.0 * np.asarray(q.zero_point, np.float64)
    return bool(np.all(twice == np.round(twice)))


def _zero_point_planes(q: Any, s_w: np.ndarray, act_max: int, fan_in: int):
    """The integer form of uniform weights with a zero point: ``ŵ = s·(v − zp)``.

    ``zp`` per output channel (or per tensor) need not be an integer (GDNSQ: ``zp = −min w/s``).
    With ``zi = round(zp)`` and ``zf = zp − zi`` (``|zf| ≤ ½``): ``x·ŵ = s·(x·(v − zi)) −
    s·zf·Σx``; in int32 at the unit ``s·2^−k``: ``acc = 2^k·(x·(v − zi)) + R·Σx`` with
    ``R_c = round(−zf_c·2^k)`` and ``Σx`` the input codes summed over the output's window (a
    product with a ones kernel; padded taps are 0, as in the float model), ``k`` (≤ 30) as
    large as keeps the worst-case accumulator within 2^29. The rounding of ``R`` is the one
    approximation (none when ``zf·2^k`` is an integer): every weight is off by at most
    ``2^−(k+1)`` of a step ``s``, as the bias's rounding.

    Returns:
      ``(planes (1, ...), (2^k,), R (int32, per channel), weight scale per channel, worst)``.
    """
    out_channels = q.shape[-1]
    zp = _zero_points(q, out_channels)
    zi = np.round(zp)
    zf = zp - zi
    v = np.asarray(q.values).astype(np.int64) - zi.astype(np.int64)
    per_channel = np.abs(v).reshape(fan_in, out_channels).sum(0)
    k, worst = _offset_fraction_bits(per_channel, fan_in, zf, act_max)
    planes = jnp.asarray(v[None].astype(_code_dtype(int(v.min()), int(v.max()))))
    r = jnp.asarray(np.round(-zf * 2.0**k).astype(np.int32))
    return planes, (2**k,), r, s_w * 2.0**-k, worst


# ---------------------------------------------------------------------------------- export


def _integer_layer(
    step: _Step,
    kind: str,
    s_in: float,
    *,
    last: bool,
    next_kind: str | None,
    next_scale: float | None,
    next_grid: tuple[int, int] | None,
    logit_bits: int,
    bias_shift: int | None,
    shifts: bool,
) -> tuple[IntegerLayer, float | None]:
    """A uniform or pow2 layer; also returns the logit scale when it is the last layer."""
    layer, inner = step.layer, _inner(step.layer)
    wspec = layer.recipe.weight  # checked by _layer_kind, with the input's spec
    q = unpack(quantize_tensor(wspec, _layer_kernel(layer), _params(layer, "weight")))
    out_channels = q.shape[-1]
    s_w = np.broadcast_to(np.asarray(q.scale, np.float64).reshape(-1), (out_channels,))
    act_max = max(abs(q) for q in _act_grid(step))
    fan_in = math.prod(q.shape[:-1])
    plane_shifts: tuple[int, ...] = ()
    coefficients: tuple[int, ...] = ()
    input_sum = None
    if kind == "pow2":
        exponent, sign, top = _pow2_integer_kernel(q)
        magnitude = np.where(sign != 0, np.exp2(top - np.maximum(exponent, 0)), 0.0)
        worst = float(act_max * magnitude.reshape(fan_in, out_channels).sum(0).max())
        if worst > _INT32_MAX:
            raise ValueError(
                f"layer {step.path!r} (recipe {str(layer.recipe)!r}): its power-of-two weights "
                f"span 2^{top} (exponents 0..{top} in use), so the int32 accumulator can "
                f"overflow ({worst:.3g} > 2^31 − 1); allowed: fewer weight bits (pow2 with "
                "<= 4 bits always fits fan-ins up to 2^17)"
            )
        s_w = s_w * 2.0**-top
        if shifts:
            masks, plane_shifts = _pow2_planes(exponent, sign, top)
            kernel = jnp.asarray(masks)
        else:
            w = (sign * np.exp2(top - np.maximum(exponent, 0))).astype(np.int64)
            kernel = jnp.asarray(w.astype(_code_dtype(int(w.min()), int(w.max()))))
    elif kind == "codeq":
        kernel, coefficients, s_w, worst = _codeq_planes(q, s_w, act_max, fan_in)
    elif _has_zero_point(q) and not _half_integer_zero_point(q):
        kernel, coefficients, input_sum, s_w, worst = _zero_point_planes(q, s_w, act_max, fan_in)
    else:
        values = np.asarray(q.values)
        if _has_zero_point(q):  # zp a multiple of ½ (DoReFa: n/2): codes 2·(v − zp) at s/2
            values = np.round(2.0 * (values.astype(np.float64) - _zero_points(q, out_channels)))
            values = values.astype(np.int64)
            s_w = s_w / 2.0
        kernel = jnp.asarray(values.astype(_code_dtype(int(values.min()), int(values.max()))))
        if wspec.kind == "ternary":
            w_max = 1
        elif wspec.kind in _UNIFORM_KINDS:
            w_max = max(abs(wspec.config.qmin), wspec.config.qmax)
        else:
            w_max = int(np.abs(values.astype(np.int64)).max(initial=0))
        worst = float(fan_in * act_max * w_max)
    b = np.zeros(out_channels) if inner.bias is None else np.asarray(inner.bias[...], np.float64)
    m, mu, beta = _norm_factor(step.norm, out_channels)
    e = np.float64(s_in) * s_w * m  # real value of one accumulator unit, per channel (signed)
    b = beta + (b - mu) * m
    negative = e < 0
    negate = jnp.asarray(negative) if negative.any() else None
    e_abs = np.abs(e)
    fields = dict(_op_fields(step), shifts=plane_shifts, coefficients=coefficients)
    if not last and next_kind not in _CODE_KINDS:  # the boundary back to float (or to bits)
        output = "bits" if next_kind == "binary" else "float"
        layer_out = IntegerLayer(
            kernel=kernel,
            input_sum=input_sum,
            acc_scale=jnp.asarray(e, jnp.float32),
            float_bias=jnp.asarray(b, jnp.float32),
            output=output,
            **fields,
        )
        return layer_out, None
    units = float(np.abs(b / e_abs).max())  # the largest bias, in accumulator units
    k = _auto_shift(worst, units) if bias_shift is None else bias_shift
    bias_q = np.round(b * 2.0**k / e_abs)
    logit_scale = None
    if last:
        bits = math.ceil(math.log2(max(worst + units, 1.0)))
        logit_shift = int(max(0, min(20, logit_bits - bits)))
        out_scale = float(e_abs.max() * 2.0**-logit_shift)
        lo, hi, dtype, output = -_INT32_MAX, _INT32_MAX, "int32", "logits"
        logit_scale = out_scale
    else:
        out_scale = float(next_scale)
        lo, hi = next_grid
        dtype, output = _code_dtype(lo, hi), "codes"
        if step.act == "hardtanh":  # round(clip(y, −1, 1)/s) = clip(round(y/s), r(−1), r(1))
            s = np.float32(next_scale)
            lo = max(lo, int(np.round(np.float32(-1.0) / s)))
            hi = min(hi, int(np.round(np.float32(1.0) / s)))
    if worst * 2.0**k + np.abs(bias_q).max() > _INT32_MAX:
        raise ValueError(
            f"layer {step.path!r}: the int32 accumulator can overflow (bias_shift={k}); "
            "allowed: a smaller bias_shift"
        )
    m0, t = quantize_multiplier(e_abs / (out_scale * 2.0**k))
    layer_out = IntegerLayer(
        kernel=kernel,
        input_sum=input_sum,
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
    return layer_out, logit_scale


def _binary_weights(step: _Step) -> tuple[np.ndarray, jax.Array]:
    """``(sign(w), α)`` of a binary layer, computed by the jitted function the reference runs."""
    graphdef, state = nnx.split(step.layer)
    signs, alpha = jax.jit(lambda s: _binary_weight(nnx.merge(graphdef, s)))(state)
    return np.asarray(signs), alpha


def _binary_thresholds(step: _Step, alpha: jax.Array, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """``(direction, threshold)`` per channel: ``sign(act(BN(α·dot + b))) = +1`` iff
    ``direction·dot ≥ threshold``, for every integer ``dot`` in ``[−n, n]``.

    The float32 chain of the reference (:func:`_post`, with the same arguments passed at run
    time, jitted) is evaluated on every ``dot`` in ``[−n, n]``; it is monotone in ``dot``
    (nondecreasing when ``α·γ ≥ 0``, nonincreasing otherwise), which is checked, and the
    threshold is read off: nondecreasing: ``direction = 1``, ``T`` the smallest ``dot`` giving
    +1; nonincreasing: ``direction = −1``, ``T = −(the largest dot giving +1)``. A channel that
    is +1 everywhere gets ``T = −n`` (always true), one that is never +1 ``T = n + 1``.
    """
    inner = _inner(step.layer)
    bias = None if inner.bias is None else inner.bias[...]
    graphdef, state = (None, None) if step.norm is None else nnx.split(step.norm)
    act = step.act

    def chain(alpha, bias, state, dots):
        norm = None if graphdef is None else nnx.merge(graphdef, state)
        return _post(dots[:, None] * alpha, bias, norm, act) >= 0

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


def _binary_layer(
    step: _Step, next_scale: float | None, next_grid: Any, next_bits: bool
) -> BinaryLayer:
    inner = _inner(step.layer)
    signs, alpha = _binary_weights(step)
    plus = signs > 0
    shape = tuple(plus.shape)
    out_channels = shape[-1]
    fan_in = math.prod(shape[:-1])
    words = _pack_words(jnp.asarray(plus.reshape(fan_in, out_channels).T)).T  # (words, out)
    alpha = jnp.broadcast_to(alpha, (out_channels,))
    fields = dict(_op_fields(step), kernel_shape=shape)
    if next_bits:
        direction, threshold = _binary_thresholds(step, alpha, fan_in)
        return BinaryLayer(
            kernel=words,
            threshold=jnp.asarray(threshold),
            direction=jnp.asarray(direction),
            output="bits",
            **fields,
        )
    return BinaryLayer(
        kernel=words,
        alpha=alpha,
        bias=None if inner.bias is None else jnp.asarray(inner.bias[...], jnp.float32),
        **_norm_fields(step.norm),
        **_out_fields(next_scale, next_grid),
        output="float",
        **fields,
    )


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
    steps = _plan(model)
    kinds = [_layer_kind(step) for step in steps]
    if bias_shift is not None and not (
        isinstance(bias_shift, int) and not isinstance(bias_shift, bool) and 0 <= bias_shift <= 16
    ):
        raise ValueError(f"bias_shift={bias_shift!r} is not allowed; allowed: None or 0..16")
    scales = {
        step.path: _act_scale(step, act_scales)
        for step, kind in zip(steps, kinds, strict=True)
        if kind in _CODE_KINDS
    }
    layers: list[IntegerLayer | BinaryLayer | FloatLayer] = []
    logit_scale = 1.0
    for i, (step, kind) in enumerate(zip(steps, kinds, strict=True)):
        last = i == len(steps) - 1
        next_kind = None if last else kinds[i + 1]
        next_codes = next_kind in _CODE_KINDS
        next_scale = scales[steps[i + 1].path] if next_codes else None
        next_grid = _act_grid(steps[i + 1]) if next_codes else None
        if kind == "float":
            layers.append(_float_layer(step, next_scale, next_grid, next_kind == "binary"))
        elif kind == "binary":
            layers.append(_binary_layer(step, next_scale, next_grid, next_kind == "binary"))
        else:
            layer, scale = _integer_layer(
                step,
                kind,
                scales[step.path],
                last=last,
                next_kind=next_kind,
                next_scale=next_scale,
                next_grid=next_grid,
                logit_bits=logit_bits,
                bias_shift=bias_shift,
                shifts=shifts,
            )
            layers.append(layer)
            logit_scale = logit_scale if scale is None else scale
    first, first_kind = steps[0], kinds[0]
    coded = first_kind in _CODE_KINDS
    return IntegerProgram(
        layers=tuple(layers),
        input_scale=scales[first.path] if coded else None,
        input_min=_act_grid(first)[0] if coded else -128,
        input_max=_act_grid(first)[1] if coded else 127,
        logit_scale=logit_scale,
        input_bits=first_kind == "binary",
    )


def _layer_kernel(layer: Any) -> jax.Array:
    kernel = layer.inner.kernel[...]
    mask = getattr(layer.inner, "mask", None)
    return kernel if mask is None else kernel * mask


# ---------------------------------------------------------------------------------- forward


def quantize_input(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """The input codes ``clip(round(x / s_in), qmin, qmax)`` (the uniform quantizer's codes), or
    the input signs ``x ≥ 0`` as uint8 bits when the first layer is binary."""
    x = jnp.asarray(x, jnp.float32)
    if program.input_bits:
        return (x >= 0).astype(jnp.uint8)
    if program.input_scale is None:
        raise ValueError(
            "the program's first layer is float, so its input is not quantized; allowed: a "
            "program whose first layer is quantized"
        )
    codes = jnp.round(x / jnp.float32(program.input_scale))
    codes = jnp.clip(codes, program.input_min, program.input_max)
    return codes.astype(_code_dtype(program.input_min, program.input_max))


def _apply_op(
    layer: IntegerLayer | FloatLayer, h: jax.Array, kernel: jax.Array | None = None, **kwargs: Any
) -> jax.Array:
    kernel = layer.kernel if kernel is None else kernel
    if kernel.dtype != h.dtype:  # equal operand dtypes (int16 codes or kernel: widen the other)
        # the wider of the two (explicit: strict promotion has no int8 → int16 path)
        dtype = max(kernel.dtype, h.dtype, key=lambda d: jnp.dtype(d).itemsize)
        kernel, h = kernel.astype(dtype), h.astype(dtype)
    if layer.op == "dense":
        return lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())), **kwargs)
    return lax.conv_general_dilated(
        h, kernel, layer.strides, layer.padding, dimension_numbers=_CONV_DIMS, **kwargs
    )


def _activate_and_pool(layer: IntegerLayer | FloatLayer | BinaryLayer, y: jax.Array) -> jax.Array:
    """The layer's ReLU or hardtanh, then its 2x2 max-pool, in float32."""
    if layer.relu:
        y = jax.nn.relu(y)
    if layer.hardtanh:
        y = jax.nn.hard_tanh(y)
    return _max_pool(y) if layer.pool else y


def _float_epilogue(layer: FloatLayer | BinaryLayer, y: jax.Array) -> jax.Array:
    """Bias, BatchNorm (flax's eval formula), activation, pool and the output conversion."""
    if layer.bias is not None:
        y = y + layer.bias
    if layer.norm_mean is not None:  # flax's eval-mode BatchNorm, operation for operation
        mul = lax.rsqrt(layer.norm_var + layer.norm_epsilon) * layer.norm_scale
        y = (y - layer.norm_mean) * mul + layer.norm_bias
    y = _activate_and_pool(layer, y)
    if getattr(layer, "out_bits", False):
        return (y >= 0).astype(jnp.uint8)
    if layer.out_scale is None:
        return y
    codes = jnp.clip(jnp.round(y / layer.out_scale), layer.out_min, layer.out_max)
    return codes.astype(layer.out_dtype)


def _float_step(layer: FloatLayer, h: jax.Array) -> jax.Array:
    return _float_epilogue(layer, _apply_op(layer, h))


def _accumulate(layer: IntegerLayer, h: jax.Array) -> jax.Array:
    """The int32 accumulator: one integer product, or for pow2 weights the shifted sum of one
    ternary product per exponent ``Σ_j op(h, mask_j) << shifts[j]``."""
    if layer.coefficients:
        acc = None
        for j, c in enumerate(layer.coefficients):
            part = _apply_op(layer, h, layer.kernel[j], preferred_element_type=jnp.int32)
            if c != 1:
                part = part * jnp.int32(c)
            acc = part if acc is None else acc + part
        if layer.input_sum is not None:  # Σ x over each output's window: one product with ones
            ones = jnp.ones((*layer.kernel.shape[1:-1], 1), jnp.int8)
            total = _apply_op(layer, h, ones, preferred_element_type=jnp.int32)
            acc = acc + total * layer.input_sum
        return acc
    if not layer.shifts:
        return _apply_op(layer, h, preferred_element_type=jnp.int32)
    acc = None
    for j, s in enumerate(layer.shifts):
        part = _apply_op(layer, h, layer.kernel[j], preferred_element_type=jnp.int32)
        if s:
            part = lax.shift_left(part, jnp.int32(s))
        acc = part if acc is None else acc + part
    return acc


def _integer_step(layer: IntegerLayer, h: jax.Array) -> jax.Array:
    acc = _accumulate(layer, h)
    if layer.output in ("float", "bits"):
        y = _activate_and_pool(layer, acc.astype(jnp.float32) * layer.acc_scale + layer.float_bias)
        return (y >= 0).astype(jnp.uint8) if layer.output == "bits" else y
    if layer.negate is not None:
        acc = jnp.where(layer.negate, -acc, acc)
    if layer.acc_shift:
        acc = lax.shift_left(acc, jnp.int32(layer.acc_shift))
    out = requantize(acc + layer.bias, layer.multiplier, layer.shift)
    out = jnp.clip(out, layer.out_min, layer.out_max)
    if layer.relu and layer.output == "codes":
        out = jnp.maximum(out, 0)
    out = out.astype(layer.out_dtype)
    return _max_pool(out) if layer.pool else out


def _binary_step(layer: BinaryLayer, h: jax.Array) -> jax.Array:
    dot = _xnor_dot(h, layer.kernel, layer.kernel_shape, layer.op, layer.strides, layer.padding)
    if layer.output == "bits":
        return _threshold_bits(dot, layer.direction, layer.threshold, layer.pool)
    return _float_epilogue(layer, dot.astype(jnp.float32) * layer.alpha)


def integer_forward(program: IntegerProgram, x: jax.Array) -> jax.Array:
    """Runs an :class:`IntegerProgram`: the logits of ``x``.

    Quantized layers run ``lax.dot_general`` / ``lax.conv_general_dilated`` on integer codes
    with ``preferred_element_type=jnp.int32`` (pow2 layers: one per exponent, combined by left
    shifts), add the int32 bias, requantize with :func:`requantize` (integer multiply and
    rounding shift), clip to the next layer's codes, apply ReLU as ``max(q, 0)`` (hardtanh:
    the clip) and max-pool the codes. Binary layers run XNOR/popcount on packed bits and
    integer thresholds. Float layers run in float32. The float input is quantized once
    (:func:`quantize_input`) when the first layer is quantized or binary.

    Returns:
      int32 logits (real value ``program.logit_scale·logits``) when the last layer is an
      :class:`IntegerLayer`; float32 logits otherwise.
    """
    if program.input_bits or program.input_scale is not None:
        h = quantize_input(program, x)
    else:
        h = jnp.asarray(x, jnp.float32)
    for layer in program.layers:
        if layer.flatten:
            h = h.reshape(h.shape[0], -1)
        if isinstance(layer, IntegerLayer):
            h = _integer_step(layer, h)
        elif isinstance(layer, BinaryLayer):
            h = _binary_step(layer, h)
        else:
            h = _float_step(layer, h)
    return h
