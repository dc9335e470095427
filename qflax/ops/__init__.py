"""Quantized ops: ``dot_general`` / ``conv_general_dilated`` / ``einsum`` with quantizer slots.

Each takes the arguments of its ``jax.lax`` / ``jnp`` counterpart plus keyword-only
``lhs_quantizer``, ``rhs_quantizer`` (forward operands) and ``grad_quantizer`` (the output
cotangent before the two backward products; a pair quantizes them independently; a
:func:`with_operands` quantizer also reads the forward operands); ``dot_general`` and
``einsum`` also take ``forward_dtype="int8"``: the forward product on the int8 codes of two
:func:`int8_operand` slots, int32 accumulation, one rescale.
"""

from qflax.ops._ops import (
    FORWARD_DTYPES,
    GradQuantizer,
    Int8Operand,
    OperandGradQuantizer,
    Quantizer,
    int8_operand,
    quantized_conv_general_dilated,
    quantized_dot_general,
    quantized_einsum,
    with_operands,
)

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
