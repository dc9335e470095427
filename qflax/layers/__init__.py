"""Quantized Flax NNX layers, recipes, model-wide quantization by regex rules, and summaries.

* :class:`TensorQuant` (one tensor's quantizer) and :class:`Recipe` (a layer's weight / input
  activation / gradient quantizers); factories in :data:`recipes` and :data:`RECIPES`.
* :class:`QuantLinear`, :class:`QuantConv`, :class:`QuantEinsum`: own a wrapped ``nnx.Linear`` /
  ``nnx.Conv`` / ``nnx.Einsum`` (``.inner``) and inject the quantized ops of :mod:`qflax.ops`
  through its own hook; learnable quantizer params are :class:`QuantParam`.
  :class:`QuantEmbed`: an ``nnx.Embed`` whose table is quantized (one scale per token), with a
  quantized ``attend`` for tied output projections.
* :class:`QuantLatent`: quantizes a latent tensor with any family (FSQ, Q2D2, VQ, RVQ, ...),
  training its state (EMA codebooks) and auxiliary losses (:class:`AuxLoss`); codes per vector.
* :func:`quantize_model` with :class:`Rule` s (regex on "."-joined module paths) and its
  :class:`QuantReport`; :func:`first_last_float_rules`; :func:`calibrate`; :func:`is_quant_layer`.
* :func:`layer_summaries`, :func:`count_macs`, :func:`totals`: sizes, bits, BOPs, sparsity.
"""

from qflax.layers._latent import QuantLatent, latent_codes, latent_summaries
from qflax.layers._layers import (
    COMPUTE_DTYPES,
    QuantConv,
    QuantEinsum,
    QuantEmbed,
    QuantLinear,
    calibrate,
    is_quant_layer,
    set_compute_dtype,
)
from qflax.layers._recipes import (
    GRAD_KEYWORDS,
    RECIPE_KEYWORDS,
    RECIPES,
    Recipe,
    TensorQuant,
    recipes,
    register_recipe,
    with_grad,
)
from qflax.layers._rules import (
    QuantReport,
    Rule,
    count_macs,
    first_last_float_rules,
    layer_summaries,
    quantize_model,
    totals,
)
from qflax.layers._slots import Latent
from qflax.layers._variables import AuxLoss, QuantParam, QuantStat

__all__ = [
    "COMPUTE_DTYPES",
    "AuxLoss",
    "GRAD_KEYWORDS",
    "RECIPE_KEYWORDS",
    "Latent",
    "RECIPES",
    "register_recipe",
    "set_compute_dtype",
    "QuantConv",
    "QuantEinsum",
    "QuantEmbed",
    "QuantLatent",
    "QuantLinear",
    "QuantParam",
    "QuantReport",
    "QuantStat",
    "Recipe",
    "Rule",
    "TensorQuant",
    "calibrate",
    "count_macs",
    "first_last_float_rules",
    "is_quant_layer",
    "latent_codes",
    "latent_summaries",
    "layer_summaries",
    "quantize_model",
    "recipes",
    "totals",
    "with_grad",
]
