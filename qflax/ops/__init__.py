"""Quantized ops: ``dot_general`` / ``conv_general_dilated`` / ``einsum`` with quantizer slots.

Each takes the arguments of its ``jax.lax`` / ``jnp`` counterpart plus keyword-only
``lhs_quantizer``, ``rhs_quantizer`` (forward operands) and ``grad_quantizer`` (the output
cotangent before the two backward products; a pair quantizes them independently; a
:func:`with_operands` quantizer also reads the forward operands).
"""

from qflax.ops._ops import (
    GradQuantizer,
    OperandGradQuantizer,
    Quantizer,
    quantized_conv_general_dilated,
    quantized_dot_general,
    quantized_einsum,
    with_operands,
)

__all__ = [
    "GradQuantizer",
    "OperandGradQuantizer",
    "Quantizer",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
    "quantized_einsum",
    "with_operands",
]
