"""Integer ranges of b-bit codes and the checks every config uses."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["int_range", "num_levels", "smallest_int_dtype", "check_bits", "check_choice"]

MIN_BITS = 1
MAX_BITS = 32


def check_bits(bits: Any, field: str = "bits", lo: int = MIN_BITS, hi: int = MAX_BITS) -> int:
    """Returns ``bits`` as an int, or raises ValueError naming the field and the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"{field}={bits!r} is not an integer; allowed: integers {lo}..{hi}")
    if not lo <= int(bits) <= hi:
        raise ValueError(f"{field}={bits!r} is out of range; allowed: integers {lo}..{hi}")
    return int(bits)


def check_choice(value: Any, field: str, allowed: tuple[Any, ...]) -> Any:
    """Returns ``value`` if it is one of ``allowed``, else raises ValueError naming both."""
    if value not in allowed:
        allowed_text = ", ".join(map(repr, allowed))
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {allowed_text}")
    return value


def int_range(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """The integer codes ``[qmin, qmax]`` of a b-bit quantizer.

    Signed: ``[-2^(b-1), 2^(b-1) - 1]``, narrow: ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric).
    Unsigned: ``[0, 2^b - 1]``, narrow: ``[0, 2^b - 2]``. A narrow 1-bit range (one level) raises.

    >>> int_range(8, True), int_range(8, True, True), int_range(4, False)
    ((-128, 127), (-127, 127), (0, 15))
    """
    bits = check_bits(bits)
    if signed:
        if narrow_range and bits == 1:
            raise ValueError(
                "narrow_range=True with bits=1 and signed=True leaves one level; "
                "allowed: bits >= 2 for a narrow signed range"
            )
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if narrow_range else -(2 ** (bits - 1))
    else:
        if narrow_range and bits == 1:
            raise ValueError(
                "narrow_range=True with bits=1 and signed=False leaves one level; "
                "allowed: bits >= 2 for a narrow unsigned range"
            )
        qmin = 0
        qmax = 2**bits - 1 - (1 if narrow_range else 0)
    return qmin, qmax


def num_levels(bits: int, signed: bool, narrow_range: bool = False) -> int:
    """The number of integer codes, ``qmax - qmin + 1``."""
    qmin, qmax = int_range(bits, signed, narrow_range)
    return qmax - qmin + 1


def smallest_int_dtype(bits: int, signed: bool) -> np.dtype:
    """The narrowest numpy integer dtype that holds every b-bit code."""
    bits = check_bits(bits)
    for width in (8, 16, 32):
        if bits <= width:
            return np.dtype(f"int{width}" if signed else f"uint{width}")
    raise AssertionError("unreachable: bits <= 32")
