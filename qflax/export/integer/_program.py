"""The program integer inference runs: :class:`IntegerProgram`, a chain of
:class:`IntegerLayer` (integer codes), :class:`BinaryLayer` (bits) and :class:`FloatLayer`
(float32), each a product followed by one :class:`Epilogue`. Pytrees (arrays as data, the op
description as static fields); depends on nothing else of integer inference."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

# What an epilogue outputs: the next layer's codes, int32 logits (the last integer layer),
# float32 values (the next layer is float, or the float logits), uint8 bits (the next layer is
# binary).
OUTPUTS = ("codes", "logits", "float", "bits")


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What follows a layer's product ``acc`` (int32 for integer and binary layers, float32 for
    float layers), one of three forms chosen by the fields that are set:

    * requantization (``multiplier`` set; integer layers followed by a quantized layer or
      last): ``out = clip(requantize((±acc << acc_shift) + acc_bias, multiplier, shift),
      out_min, out_max)`` (``−acc`` on the channels where ``negate``: a BatchNorm with ``γ < 0``
      folded in), ``max(out, 0)`` for a ReLU (a hardtanh is in ``out_min``/``out_max``: the
      codes of ±1), cast to ``out_dtype``, 2x2 max-pool if ``pool``. ``output`` is ``"codes"``
      (the next layer's input codes, real value ``s_out·out``) or ``"logits"`` (int32, no
      activation, at the program's common logit scale).
    * threshold (``threshold`` set; binary layers followed by a binary layer): the folded
      ``sign(pool(act(BN(α·dot + b))))`` as ``[pool(direction·acc) ≥ threshold]`` (uint8 bits;
      :func:`~qflax.export.integer._arith.threshold_bits`); ``output="bits"``.
    * float32 (otherwise): ``y = float32(acc)·scale`` (``scale``: ``s_in·s_w`` of an integer
      layer with BatchNorm folded, ``α`` of a binary layer; None for a float layer), ``+ bias``,
      the eval-mode BatchNorm ``(y − mean)·rsqrt(var + ε)·scale + bias`` when ``norm_mean`` is
      set (flax's formula), the activation, 2x2 max-pool; then by ``output``: ``"float"`` (the
      float32 values), ``"codes"`` (the next layer's input codes ``clip(round(y / out_scale),
      out_min, out_max)`` as ``out_dtype``: the boundary to integer) or ``"bits"`` (the next
      layer's input signs ``y ≥ 0`` as uint8).
    """

    # requantization
    multiplier: jax.Array | None = None  # int32 M0 per output channel, (out,)
    shift: jax.Array | None = None  # int32 t per output channel (round(acc·M0/2^t)), (out,)
    acc_bias: jax.Array | None = None  # int32 bias at scale s_in·s_w[c]·2^−acc_shift, (out,)
    negate: jax.Array | None = None  # bool (out,): channels whose folded BN factor is < 0
    # threshold
    threshold: jax.Array | None = None  # int32 T per output channel, (out,)
    direction: jax.Array | None = None  # int32 ±1 per output channel, (out,)
    # float32
    scale: jax.Array | None = None  # float32 factor of the product, (out,), or None
    bias: jax.Array | None = None  # float32 (out,)
    norm_mean: jax.Array | None = None  # BatchNorm running mean (out,), or None: no BatchNorm
    norm_var: jax.Array | None = None  # BatchNorm running variance (out,)
    norm_scale: jax.Array | None = None  # BatchNorm γ (out,) (ones when the norm has none)
    norm_bias: jax.Array | None = None  # BatchNorm β (out,) (zeros when the norm has none)
    out_scale: jax.Array | None = None  # float32 (): the next layer's input scale (codes)
    # static
    activation: str | None = None  # "relu" | "hardtanh" | None
    pool: bool = False
    norm_epsilon: float = 0.0
    acc_shift: int = 0  # bits the accumulator is shifted left before the bias is added
    out_min: int = -128
    out_max: int = 127
    out_dtype: str = "int8"
    output: str = "float"  # one of OUTPUTS


jax.tree_util.register_dataclass(
    Epilogue,
    data_fields=[
        "multiplier",
        "shift",
        "acc_bias",
        "negate",
        "threshold",
        "direction",
        "scale",
        "bias",
        "norm_mean",
        "norm_var",
        "norm_scale",
        "norm_bias",
        "out_scale",
    ],
    meta_fields=[
        "activation",
        "pool",
        "norm_epsilon",
        "acc_shift",
        "out_min",
        "out_max",
        "out_dtype",
        "output",
    ],
)

# The op description every layer type carries (static).
_OP_FIELDS = ["op", "strides", "padding", "flatten"]


@dataclasses.dataclass(frozen=True)
class IntegerLayer:
    """One quantized layer of integer inference (a pytree; the op description is static).

    ``acc = op(x, kernel)`` on integer codes with int32 accumulation (``x`` int8, or int16/int32
    for wider codes) — for power-of-two weights (``shifts`` set) ``acc = Σ_j op(x, kernel[j]) <<
    shifts[j]`` over one ternary mask per exponent, no weight multiply — for dead-zone (CoDeQ)
    weights ``acc = Σ_j coefficients[j]·op(x, kernel[j])`` over the codes and their signs, for
    weights with a zero point ``acc = coefficients[0]·op(x, kernel[0]) + input_sum·op(x, 1)`` —
    then the :class:`Epilogue`: requantized to the next layer's codes (``"codes"``) or to int32
    logits (``"logits"``, the last layer); ``float32(acc)·scale + bias`` with the activation and
    pool (``"float"``: the next layer is float; ``"bits"``: the next layer is binary).
    """

    kernel: jax.Array  # integer weight codes (int8), the layer's kernel layout; (E, ...) masks
    epilogue: Epilogue
    # Weights with a zero point: int32 R per output channel; acc += R·(x summed over the window).
    input_sum: jax.Array | None = None
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    flatten: bool = False
    # Power-of-two weights: kernel[j] is the ternary mask of exponent K − shifts[j]; () for one
    # integer kernel.
    shifts: tuple[int, ...] = ()
    # Dead-zone (CoDeQ) weights: kernel[j] is a plane (the codes v, their signs) whose int32
    # product is multiplied by coefficients[j] (``(2^k, round(z/s·2^k))``); () otherwise.
    coefficients: tuple[int, ...] = ()


jax.tree_util.register_dataclass(
    IntegerLayer,
    data_fields=["kernel", "epilogue", "input_sum"],
    meta_fields=[*_OP_FIELDS, "shifts", "coefficients"],
)


@dataclasses.dataclass(frozen=True)
class BinaryLayer:
    """A binary layer (±1 inputs and weights) of integer inference: XNOR/popcount (a pytree).

    ``dot = Σ sign(x)·sign(w)`` in int32 from packed bits
    (:func:`~qflax.export.integer._arith.xnor_dot`; convolutions with the exact SAME-padding
    correction), then the :class:`Epilogue`: the folded thresholds (``"bits"``, the next layer
    is binary) or ``float32(dot)·α`` and the float ops after the product (bias, eval-mode
    BatchNorm, activation, pool, and the next layer's codes or the float32 logits).
    """

    # uint32 (words, out'): the weight signs (1 ↔ +1), (kh, kw, c_in) packed; out' ≥ out columns
    # (:func:`~qflax.export.integer._arith.padded_columns`; the columns past out are 0)
    kernel: jax.Array
    epilogue: Epilogue
    kernel_shape: tuple[int, ...] = ()  # the float kernel's shape ((n, out) or HWIO)
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    flatten: bool = False


jax.tree_util.register_dataclass(
    BinaryLayer,
    data_fields=["kernel", "epilogue"],
    meta_fields=["kernel_shape", *_OP_FIELDS],
)


@dataclasses.dataclass(frozen=True)
class FloatLayer:
    """One float layer of a mixed program (a pytree), computed as the model computes it:
    ``op(x, kernel)`` in float32, then the float32 :class:`Epilogue` (bias, BatchNorm,
    activation, pool, and the conversion to the next layer's codes or bits when it is
    quantized: the codes of the uniform quantizer the fake-quant model applies there)."""

    kernel: jax.Array  # float32 kernel, the layer's layout
    epilogue: Epilogue
    op: str = "dense"
    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    flatten: bool = False


jax.tree_util.register_dataclass(
    FloatLayer, data_fields=["kernel", "epilogue"], meta_fields=_OP_FIELDS
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
