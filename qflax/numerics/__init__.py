"""Numerics: rounding, integer ranges and bit packing — pure ``jax.numpy``, no quantizer logic."""

from qflax.numerics._packing import PACKABLE_BITS, pack_bits, packed_size, unpack_bits
from qflax.numerics._ranges import (
    MAX_BITS,
    MIN_BITS,
    check_bits,
    check_choice,
    int_range,
    num_levels,
    smallest_int_dtype,
)
from qflax.numerics._rounding import round_nearest_even, stochastic_round

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "PACKABLE_BITS",
    "check_bits",
    "check_choice",
    "int_range",
    "num_levels",
    "pack_bits",
    "packed_size",
    "round_nearest_even",
    "smallest_int_dtype",
    "stochastic_round",
    "unpack_bits",
]
