"""The plan of integer inference: a model's chain of linear layers (read from its
``layer_sequence()`` description, :class:`~qflax.models.LayerStep`), and per layer what
integer inference makes of it. It knows no quantizer kind: each layer's weight and input
specs are asked through their family (:meth:`~qflax.quantizers.QuantizerFamily.weight_lowering`,
``input_lowering``, ``sign_values``) how they lower — an integer format (uniform, pow2, codeq,
binary) or a refusal with the reason — and the planner checks what the engine needs (scales per
tensor or output channel, code ranges, sign inputs not after a ReLU). Depends on no other part
of integer inference (no program types)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
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
    names = []
    for name in qz.PAIRS:
        try:
            if not qz.PairConfig(pair=name).relaxed and qz.PairConfig(pair=name).bits == 1:
                names.append(name)
        except ValueError:
            continue
    return ", ".join(names)


def _supported() -> str:
    return (
        "float layers (no quantizer); layers whose families lower their weights to integer "
        "codes (uniform per tensor or per output channel <= 8 bits: absmax, learned_step, lsq, "
        "dorefa, gdnsq, ternary; pow2; codeq) AND their inputs to codes per tensor (absmax or "
        "learned_step symmetric, lsq, pact, dorefa, gdnsq with lower bound 0); binary layers "
        "whose weights AND inputs are signs (kind 'binary', deterministic, a pair whose forward "
        f"is sign: {_sign_pairs()}, or a relaxed pair in the exact state a finished run ends "
        "in, hard=1), the weights scaled per output channel, per tensor or not at all, the "
        "inputs not scaled; and any registered family that defines weight_lowering and "
        "input_lowering"
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


_ROLE_NAMES = {"weight": "weight quantizer", "act": "input quantizer, the act quantizer"}


def _refusal(step: Step, role: str, spec: Any, error: Exception) -> ValueError:
    layer = step.layer
    recipe = str(layer.recipe) if is_quant(layer) else "float"
    return ValueError(
        f"layer {step.path!r} has recipe {recipe!r}: its {_ROLE_NAMES[role]} {spec} (family "
        f"{getattr(spec, 'kind', None)!r}) cannot run in integer inference: {error}; "
        f"integer inference supports {_supported()}"
    )


def _weight(step: Step) -> qz.WeightLowering:
    """The family's weight lowering of a quant layer (ValueError naming layer and reason)."""
    layer = step.layer
    spec = layer.recipe.weight
    try:
        return spec.family.weight_lowering(spec, params(layer, "weight"), stats(layer, "weight"))
    except qz.NotExportable as e:
        raise _refusal(step, "weight", spec, e) from None


def _input(step: Step, spec: Any) -> qz.InputLowering:
    """The family's input lowering of a layer's input spec (ValueError naming the reason)."""
    layer = step.layer
    if spec is None:
        raise _refusal(step, "act", spec, ValueError("its input is float"))
    try:
        return spec.family.input_lowering(spec, params(layer, "act"), stats(layer, "act"))
    except qz.NotExportable as e:
        raise _refusal(step, "act", spec, e) from None


def sign_valued(spec: Any, role: str, layer: Any = None) -> bool:
    """Whether ``spec`` maps a tensor to ``α·sign`` (weights) or to ``sign`` (inputs), as its
    family's lowering says (a relaxed pair only in its exact state: ``layer``'s ``hard``)."""
    if spec is None:
        return False
    p = {} if layer is None else params(layer, role)
    s = {"hard": 1.0} if layer is None else stats(layer, role)
    try:
        if role == "weight":
            return spec.family.weight_lowering(spec, p, s).kind == "binary"
        return spec.family.input_lowering(spec, p, s).kind == "sign"
    except qz.NotExportable:
        return False


def is_binary_step(step: Step) -> bool:
    """A quant layer whose weights are ``α·sign(w)`` (α per output channel, per tensor or 1) and
    whose inputs are ``sign(x)``: integer inference runs it as XNOR/popcount."""
    layer = step.layer
    if not is_quant(layer):
        return False
    recipe = layer.recipe
    if not (sign_valued(recipe.weight, "weight") and sign_valued(recipe.act, "act")):
        return False
    lowering = _weight(step)
    return _scale_on_output_axis(layer, lowering.granularity, lowering.axis)


def binary_weight(layer: Any) -> tuple[jax.Array, jax.Array]:
    """``(y, α)`` of a binary layer's kernel: ``ŵ = α·y`` with ``y = ±1`` (float32; the
    family's :meth:`~qflax.quantizers.QuantizerFamily.sign_values`, e.g. a relaxed pair's sign
    in its exact state), α: (C,) or (1,) float32 (1 when unscaled). Traceable (the fake-quant
    reference runs under jit)."""
    kernel = layer_kernel(layer)
    spec = layer.recipe.weight
    y, alpha = spec.family.sign_values(
        spec, kernel, params(layer, "weight"), stats(layer, "weight")
    )
    if alpha is None:
        alpha = jnp.ones((1,), jnp.float32)
    return y.astype(jnp.float32), jnp.asarray(alpha, jnp.float32).reshape(-1)


def _check_binary(step: Step) -> None:
    recipe = step.layer.recipe
    name = str(recipe)
    lowering = _weight(step)
    if lowering.kind != "binary":
        raise _refusal(step, "weight", recipe.weight, ValueError("its weights are not signs"))
    if _input(step, recipe.act).kind != "sign":
        raise _refusal(step, "act", recipe.act, ValueError("its inputs are not signs"))
    if not _scale_on_output_axis(step.layer, lowering.granularity, lowering.axis):
        raise ValueError(
            f"layer {step.path!r} has recipe {name!r}: its weight scale is per channel on axis "
            f"{lowering.axis}; allowed: the output-channel axis (-1)"
        )
    if step.prev_act == "relu":
        raise ValueError(
            f"layer {step.path!r} is binary (recipe {name!r}: its input is quantized by sign) "
            "but follows a ReLU (model activation='relu'): sign(relu(x)) = +1 for every x, so "
            "the layer sees a constant input; allowed: a model built with activation='hardtanh'"
        )


# ------------------------------------------------------------------------------ asking families


def weight_lowering(step: Step) -> qz.WeightLowering:
    """How a quant layer's weights lower, as its weight family says (and, for sign-valued
    layers, its input family): ValueError (naming the layer, its recipe, the family's reason and
    what is supported) for weights integer inference cannot run."""
    recipe = step.layer.recipe
    lowering = _weight(step)
    act_sign = False
    try:
        act_sign = _input(step, recipe.act).kind == "sign"
    except ValueError:
        pass
    if lowering.kind == "binary" or act_sign:
        _check_binary(step)
        return lowering
    if lowering.kind not in CODE_KINDS:
        raise _refusal(
            step, "weight", recipe.weight, ValueError(f"unknown lowering {lowering.kind!r}")
        )
    if lowering.kind != "codeq" and not _scale_on_output_axis(
        step.layer, lowering.granularity, lowering.axis
    ):
        raise ValueError(
            f"layer {step.path!r} has recipe {str(recipe)!r} (weight quantizer {recipe.weight}, "
            f"granularity={lowering.granularity!r}, axis={lowering.axis}); integer inference "
            f"supports {_supported()}"
        )
    return lowering


def input_grid(step: Step) -> InputGrid:
    """The uniform input codes of a layer and the static scale its quantizer keeps as a
    parameter, as its input family says: ValueError (naming the layer, its recipe and the
    reason) for inputs integer inference cannot run on codes."""
    spec = act_spec(step)
    lowering = _input(step, spec)
    if lowering.kind != "codes" or lowering.qmin < -128 or lowering.qmax > 255:
        raise _refusal(
            step,
            "act",
            spec,
            ValueError(f"its inputs lower to {lowering}, not to 8-bit codes"),
        )
    return InputGrid(lowering.qmin, lowering.qmax, lowering.scale)


def static_input(spec: Any, layer: Any = None) -> str | None:
    """How the reference applies ``act_scales`` to an input quantizer, as its family says:
    ``"required"`` (absmax: its scale is dynamic, a static one must be given), ``"optional"``
    (learned_step: a given scale replaces the learned one), None (the quantizer's own)."""
    if spec is None:
        return None
    p = {} if layer is None else params(layer, "act")
    s = {} if layer is None else stats(layer, "act")
    try:
        return spec.family.input_lowering(spec, p, s).static
    except (qz.NotExportable, KeyError, TypeError):  # TypeError: a traced value read as float
        return None


def layer_lowering(step: Step) -> qz.WeightLowering:
    """A layer's :class:`WeightLowering` (``"float"`` for a float layer), with its input checked
    (:func:`input_grid`) when it runs on codes; ValueError (naming the layer, its recipe and
    what is supported) for a layer integer inference cannot run."""
    if is_float_step(step):
        return qz.WeightLowering("float")
    recipe = step.layer.recipe
    if recipe.weight is None or recipe.act is None:
        raise ValueError(
            f"layer {step.path!r} has recipe {str(recipe)!r} (only one of its weight and "
            f"input quantized); integer inference supports {_supported()}"
        )
    lowering = weight_lowering(step)
    if lowering.kind in CODE_KINDS:
        input_grid(step)
    return lowering
