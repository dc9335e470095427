"""Numerics: rounding, integer ranges, exact powers of two, bit packing and input checks — pure
``jax.numpy``, no quantizer logic."""

from qflax.numerics._checks import check_finite, check_nonempty, check_positive, is_concrete
from qflax.numerics._packing import PACKABLE_BITS, pack_bits, packed_size, unpack_bits
from qflax.numerics._powers import exp2, pow2_int, times_pow2
from qflax.numerics._ranges import (
    MAX_BITS,
    MIN_BITS,
    check_bits,
    check_choice,
    int_range,
    num_levels,
    smallest_int_dtype,
)
from qflax.numerics._rounding import (
    NOISE_SOURCES,
    hash_uniform,
    round_nearest_even,
    stochastic_round,
    uniform_noise,
)

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "NOISE_SOURCES",
    "PACKABLE_BITS",
    "check_bits",
    "check_choice",
    "check_finite",
    "check_nonempty",
    "check_positive",
    "exp2",
    "hash_uniform",
    "int_range",
    "is_concrete",
    "num_levels",
    "pack_bits",
    "packed_size",
    "pow2_int",
    "round_nearest_even",
    "smallest_int_dtype",
    "stochastic_round",
    "times_pow2",
    "uniform_noise",
    "unpack_bits",
]
