"""The plan of integer inference: a model's chain of linear layers (read from its
``layer_sequence()`` description, :class:`~qflax.models.LayerStep`), and per layer what
integer inference makes of it. The per-quantizer-kind knowledge is in two functions:
:func:`weight_lowering` (a layer's weight spec → how its weights lower: float, uniform, pow2,
codeq or binary, with the checks) and :func:`input_grid` (a layer's input spec → its integer
codes and static scale, with the checks); :func:`layer_lowering` combines them. Depends on no
other part of integer inference (no program types)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax import quantizers as qz
from qflax.export._fold import Identity
from qflax.layers import QuantConv, QuantLinear
from qflax.models import MODELS

# The hidden activations (``model.activation``) integer inference and its reference run.
ACTIVATIONS = ("relu", "hardtanh")
# Models (names in qflax.models.MODELS) integer inference runs: those that describe their
# forward as a chain of linear layers (``layer_sequence()``).
INTEGER_MODELS = tuple(name for name, cls in MODELS.items() if hasattr(cls, "layer_sequence"))
# Input quantizers with static uniform codes (a scale per tensor).
UNIFORM_KINDS = ("absmax", "learned_step")
# Input quantizers whose codes are uniform at a static scale: absmax (a scale calibrated by
# static_act_scales) and the learned ones (the scale is a parameter: learned_step's scale,
# LSQ's step, PACT's α/(2^b − 1), GDNSQ's 2^ℓ_s with its lower bound β = 0), and DoReFa's
# fixed grid 1/(2^b − 1) on [0, 1].
_CODE_INPUTS = ("absmax", "learned_step", "lsq", "pact", "gdnsq", "dorefa")
# Learned uniform weight quantizers whose codes (qflax.export.quantize_tensor) are integers at a
# per-tensor / per-channel scale, GDNSQ's with a (non-integer) zero point per channel.
_CODED_WEIGHTS = ("lsq", "dorefa", "gdnsq")
# Weight lowerings whose input is uniform codes at a static scale.
CODE_KINDS = ("uniform", "pow2", "codeq")


@dataclasses.dataclass(frozen=True)
class Step:
    path: str
    layer: Any
    op: str  # "dense" | "conv"
    norm: Any  # a BatchNorm applied after the layer (float reference only), or None
    act: str | None  # the activation after the layer (an ACTIVATIONS name), None for the head
    pool: bool
    flatten: bool  # flatten (batch, -1) before the layer
    prev_act: str | None  # the activation whose output is the layer's input (None: the input)


@dataclasses.dataclass(frozen=True)
class WeightLowering:
    """How a layer's weights lower: ``kind`` ``"float"``, ``"uniform"`` (integer codes; ternary
    and the learned uniform kinds too), ``"pow2"``, ``"codeq"`` or ``"binary"``; ``code_max``
    bounds ``|code|`` when the spec fixes it (None: read it from the codes)."""

    kind: str
    code_max: int | None = None


@dataclasses.dataclass(frozen=True)
class InputGrid:
    """A layer's uniform input codes ``[qmin, qmax]`` and the static scale its quantizer keeps
    as a parameter (None: absmax, calibrated by :func:`~qflax.export.static_act_scales`)."""

    qmin: int
    qmax: int
    learned_scale: float | None


def plan(model: nnx.Module) -> list[Step]:
    """The linear layers of a model in execution order, with what follows each, from its
    ``layer_sequence()``.

    Raises ValueError, naming the value, for a model without that description or whose
    activation is not one of :data:`ACTIVATIONS` (every path of integer inference and its
    reference starts here).
    """
    describe = getattr(model, "layer_sequence", None)
    if describe is None:
        allowed = ", ".join(MODELS[name].__name__ for name in INTEGER_MODELS)
        name = type(model).__name__
        raise ValueError(f"model={name} is not allowed for integer inference; allowed: {allowed}")
    steps, prev = [], None
    for s in describe():
        if s.activation is not None and (
            not isinstance(s.activation, str) or s.activation not in ACTIVATIONS
        ):
            raise ValueError(
                f"model activation={s.activation!r} is not allowed for integer inference; "
                f"allowed: {', '.join(map(repr, ACTIVATIONS))}"
            )
        norm = None if isinstance(s.norm, Identity) else s.norm
        steps.append(Step(s.path, s.layer, s.op, norm, s.activation, s.pool, s.flatten, prev))
        prev = s.activation
    return steps


def inner(layer: Any) -> Any:
    return layer.inner if isinstance(layer, (QuantLinear, QuantConv)) else layer


def is_quant(layer: Any) -> bool:
    return isinstance(layer, (QuantLinear, QuantConv))


def params(layer: Any, role: str) -> dict[str, jax.Array]:
    names = dict(layer.param_names).get(role, ())
    return {name: getattr(layer, f"{role}_{name}")[...] for name in names}


def stats(layer: Any, role: str) -> dict[str, jax.Array]:
    names = dict(getattr(layer, "stat_names", ())).get(role, ())
    return {name: getattr(layer, f"{role}_{name}")[...] for name in names}


def layer_kernel(layer: Any) -> jax.Array:
    kernel = layer.inner.kernel[...]
    mask = getattr(layer.inner, "mask", None)
    return kernel if mask is None else kernel * mask


def act_spec(step: Step):
    layer = step.layer
    if not isinstance(layer, (QuantLinear, QuantConv)):
        return None
    return layer.recipe.act


def is_float_step(step: Step) -> bool:
    layer = step.layer
    return not is_quant(layer) or (layer.recipe.weight is None and layer.recipe.act is None)


def _sign_pairs() -> str:
    return ", ".join(n for n, f in qz.PAIRS.items() if f().forward is qz.sign)


SUPPORTED = (
    "float layers (no quantizer); layers whose weight quantizer is absmax or learned_step "
    "(uniform, symmetric, per tensor or per output channel, <= 8 bits), lsq, dorefa, gdnsq, "
    "pow2 or ternary (per tensor or per output channel) or codeq AND whose input quantizer is "
    "absmax or learned_step (uniform, symmetric), lsq, pact, dorefa or gdnsq (lower bound 0), per "
    "tensor, <= 8 bits; binary layers whose weights AND inputs are signs (kind "
    f"'binary', deterministic, a pair whose forward is sign: {_sign_pairs()}, or a relaxed "
    "pair in the exact state a finished run ends in, hard=1), the weights scaled by mean|w| per "
    "output channel or per tensor or not at all, the inputs not scaled"
)


def _scale_on_output_axis(layer: Any, granularity: str, axis: int) -> bool:
    """Whether a weight scale of ``granularity`` (``"tensor"``, ``"channel"``, or a binary /
    ternary ``scaling`` ``"none"``) is one per tensor or one per output channel (the kernel's
    last axis): the scales integer inference folds into its per-channel multipliers."""
    ndim = inner(layer).kernel[...].ndim
    return granularity in ("tensor", "none") or (
        granularity == "channel" and axis % ndim == ndim - 1
    )


# ---------------------------------------------------------------------------------- binary layers


def sign_valued(spec: Any, role: str) -> bool:
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


def is_binary_step(step: Step) -> bool:
    """A quant layer whose weights are ``α·sign(w)`` (α per output channel, per tensor or 1) and
    whose inputs are ``sign(x)``: integer inference runs it as XNOR/popcount."""
    layer = step.layer
    if not is_quant(layer):
        return False
    recipe = layer.recipe
    if not (sign_valued(recipe.weight, "weight") and sign_valued(recipe.act, "act")):
        return False
    config = _binary_config(recipe.weight)
    return _scale_on_output_axis(layer, config.scaling, config.axis)


def binary_weight(layer: Any) -> tuple[jax.Array, jax.Array]:
    """``(y, α)`` of a binary layer's kernel: ``ŵ = α·y`` with ``y = sign(w)`` (±1 float32;
    ``sign(0) = +1``, as the quantizers and the pairs), α: (C,) or (1,) float32. A relaxed
    pair gives its forward before scaling (:meth:`~qflax.layers.TensorQuant.pair_values`),
    ``sign(w)`` in its exact state. Traceable (the fake-quant reference runs under jit)."""
    kernel = layer_kernel(layer)
    spec = layer.recipe.weight
    alpha = qz.binary_scale(kernel, _binary_config(spec))
    if spec.kind == "pair":
        y, pair_alpha = spec.pair_values(kernel, stats(layer, "weight"))
        alpha = alpha if pair_alpha is None else pair_alpha
    else:
        y = jnp.where(kernel >= 0, jnp.float32(1.0), jnp.float32(-1.0))
    return y.astype(jnp.float32), alpha.astype(jnp.float32).reshape(-1)


def _check_binary(step: Step) -> None:
    recipe = step.layer.recipe
    name = str(recipe)
    for role, spec in (("weight", recipe.weight), ("act", recipe.act)):
        hard = stats(step.layer, role).get("hard")
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
        if not sign_valued(spec, role):
            raise ValueError(
                f"layer {step.path!r} has recipe {name!r} ({role} quantizer {spec}); integer "
                f"inference supports {SUPPORTED}"
            )
    if not is_binary_step(step):
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


# ------------------------------------------------------------------------------ per quantizer kind


def weight_lowering(step: Step) -> WeightLowering:
    """How a quant layer's weights lower, from its weight spec (and, for sign-valued layers, its
    input spec): ValueError (naming the layer, its recipe and what is supported) for weights
    integer inference cannot run. The one place (with :func:`input_grid`) that knows the
    quantizer kinds."""
    recipe = step.layer.recipe
    spec = recipe.weight
    if spec.kind in ("binary", "pair") or recipe.act.kind in ("binary", "pair"):
        _check_binary(step)
        return WeightLowering("binary")
    kind, config = spec.kind, spec.config
    if kind in ("pow2", *_CODED_WEIGHTS):
        # pow2 and the learned uniform weights: a scale per tensor or per output channel
        # (DoReFa has one per tensor and no ``granularity`` field)
        granularity = getattr(config, "granularity", "tensor")
        axis = getattr(config, "axis", -1)
        if not _scale_on_output_axis(step.layer, granularity, axis):
            raise ValueError(
                f"layer {step.path!r} has recipe {str(recipe)!r} (weight quantizer {spec}, "
                f"granularity={granularity!r}, axis={axis}); integer inference supports "
                f"{SUPPORTED}"
            )
        return WeightLowering("pow2" if kind == "pow2" else "uniform")
    if kind == "ternary":  # codes {−1, 0, 1} at the scale α: a uniform layer
        if not _scale_on_output_axis(step.layer, config.scaling, config.axis):
            raise ValueError(
                f"layer {step.path!r} has recipe {str(recipe)!r}: its ternary scale is per "
                f"channel on axis {config.axis}; allowed: the output-channel axis (-1)"
            )
        return WeightLowering("uniform", code_max=1)
    if kind == "codeq":
        return WeightLowering("codeq")
    if (
        kind not in UNIFORM_KINDS
        or not config.symmetric
        or config.bits > 8
        or not _scale_on_output_axis(step.layer, config.granularity, config.axis)
    ):
        raise ValueError(
            f"layer {step.path!r} has recipe {str(recipe)!r} (weight quantizer {spec}); "
            f"integer inference supports {SUPPORTED}"
        )
    return WeightLowering("uniform", code_max=max(abs(config.qmin), config.qmax))


def input_grid(step: Step) -> InputGrid:
    """The uniform input codes of a layer and the static scale its quantizer keeps as a
    parameter (:data:`_CODE_INPUTS`; GDNSQ's code range depends on its learned range, read
    from the layer): ValueError (naming the layer and its recipe) for inputs integer inference
    cannot run on codes."""
    spec = act_spec(step)
    layer = step.layer
    recipe = str(layer.recipe) if is_quant(layer) else "float"
    if spec is None or spec.kind not in _CODE_INPUTS:
        raise ValueError(
            f"layer {step.path!r} has recipe {recipe!r} (input quantizer {spec}); integer "
            f"inference supports {SUPPORTED}"
        )
    kind, config = spec.kind, spec.config
    learned = None
    if kind == "gdnsq":
        lower = float(np.asarray(layer.act_lower[...]))
        if lower != 0.0:
            raise ValueError(
                f"layer {step.path!r} has recipe {recipe!r}: its GDNSQ input has the lower "
                f"bound β={lower:.6g} (a zero point on the inputs); allowed: β = 0 (unsigned "
                "inputs, signed=False: inputs after a ReLU)"
            )
        big = jnp.asarray([-3.0e38, 3.0e38], jnp.float32)
        lo, hi = (int(v) for v in np.asarray(qz.gdnsq_act_codes(big, params(layer, "act"), config)))
        # s = 2^ℓ_s in float32, as the quantizer computes it
        learned = float(jnp.exp2(jnp.asarray(layer.act_log_step[...], jnp.float32)).reshape(()))
    elif kind == "lsq":
        lo, hi = -config.qn, config.qp
        learned = float(np.asarray(layer.act_step[...], np.float32).reshape(()))
    elif kind == "pact":  # levels {0, α/n, ..., α}: codes round(clip(x, 0, α)·n/α)
        lo, hi = 0, config.levels
        alpha = float(np.asarray(layer.act_alpha[...], np.float32).reshape(()))
        learned = alpha / config.levels
    elif kind == "dorefa":  # q_k(clip(x, 0, 1)): codes round(clip(x, 0, 1)·n), n = 2^k − 1
        lo, hi = 0, 2**config.bits - 1
        learned = 1.0 / (2**config.bits - 1)
    else:
        lo, hi = config.qmin, config.qmax
        if kind == "learned_step":
            learned = float(np.asarray(layer.act_scale[...], np.float32).reshape(()))
    if (
        (kind in UNIFORM_KINDS and not config.symmetric)
        or getattr(config, "granularity", "tensor") != "tensor"
        or lo < -128
        or hi > 255
    ):
        raise ValueError(
            f"layer {step.path!r} has recipe {recipe!r} (input config {config}); integer "
            f"inference supports {SUPPORTED}"
        )
    return InputGrid(lo, hi, learned)


def static_input(spec: Any) -> str | None:
    """How the reference applies ``act_scales`` to an input quantizer: ``"required"`` (absmax:
    its scale is dynamic, a static one must be given), ``"optional"`` (learned_step: a given
    scale replaces the learned one), None (the quantizer's own, scales or not)."""
    if spec is None or spec.kind not in UNIFORM_KINDS:
        return None
    return "optional" if spec.kind == "learned_step" else "required"


def layer_lowering(step: Step) -> WeightLowering:
    """A layer's :class:`WeightLowering` (``"float"`` for a float layer), with its input checked
    (:func:`input_grid`) when it runs on codes; ValueError (naming the layer, its recipe and
    what is supported) for a layer integer inference cannot run."""
    if is_float_step(step):
        return WeightLowering("float")
    recipe = step.layer.recipe
    if recipe.weight is None or recipe.act is None:
        raise ValueError(
            f"layer {step.path!r} has recipe {str(recipe)!r} (only one of its weight and "
            f"input quantized); integer inference supports {SUPPORTED}"
        )
    lowering = weight_lowering(step)
    if lowering.kind in CODE_KINDS:
        input_grid(step)
    return lowering
