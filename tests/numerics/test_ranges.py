"""Tests of integer ranges and the config checks every module uses."""

import numpy as np
import pytest

from qflax.numerics import (
    MAX_BITS,
    MIN_BITS,
    check_bits,
    check_choice,
    int_range,
    num_levels,
    smallest_int_dtype,
)

# bits: (signed, signed narrow, unsigned, unsigned narrow); None: raises (one level).
GOLDEN = {
    1: ((-1, 0), None, (0, 1), None),
    2: ((-2, 1), (-1, 1), (0, 3), (0, 2)),
    3: ((-4, 3), (-3, 3), (0, 7), (0, 6)),
    4: ((-8, 7), (-7, 7), (0, 15), (0, 14)),
    5: ((-16, 15), (-15, 15), (0, 31), (0, 30)),
    6: ((-32, 31), (-31, 31), (0, 63), (0, 62)),
    7: ((-64, 63), (-63, 63), (0, 127), (0, 126)),
    8: ((-128, 127), (-127, 127), (0, 255), (0, 254)),
    16: ((-32768, 32767), (-32767, 32767), (0, 65535), (0, 65534)),
    32: ((-(2**31), 2**31 - 1), (-(2**31) + 1, 2**31 - 1), (0, 2**32 - 1), (0, 2**32 - 2)),
}
CASES = [(True, False), (True, True), (False, False), (False, True)]


@pytest.mark.parametrize("bits", sorted(GOLDEN))
@pytest.mark.parametrize("case", range(4))
def test_int_range_golden(bits, case):
    signed, narrow = CASES[case]
    want = GOLDEN[bits][case]
    if want is None:
        with pytest.raises(ValueError, match="narrow_range=True with bits=1"):
            int_range(bits, signed, narrow)
        return
    got = int_range(bits, signed, narrow)
    assert got == want
    assert all(type(v) is int for v in got)
    assert num_levels(bits, signed, narrow) == want[1] - want[0] + 1


def test_int_range_default_is_not_narrow():
    assert int_range(8, True) == (-128, 127)
    assert int_range(np.int64(4), False) == (0, 15)


@pytest.mark.parametrize(
    "bits, signed, dtype",
    [
        (1, True, "int8"),
        (8, True, "int8"),
        (8, False, "uint8"),
        (9, True, "int16"),
        (16, False, "uint16"),
        (17, True, "int32"),
        (32, False, "uint32"),
    ],
)
def test_smallest_int_dtype(bits, signed, dtype):
    assert smallest_int_dtype(bits, signed) == np.dtype(dtype)
    qmin, qmax = int_range(bits, signed)
    info = np.iinfo(smallest_int_dtype(bits, signed))
    assert info.min <= qmin and qmax <= info.max


@pytest.mark.parametrize("fn", [int_range, num_levels, smallest_int_dtype])
@pytest.mark.parametrize("bits, message", [(0, "bits=0 is out of range"), (33, "bits=33")])
def test_out_of_range_bits_raise(fn, bits, message):
    with pytest.raises(ValueError, match=message) as info:
        fn(bits, True)
    assert "allowed: integers 1..32" in str(info.value)


def test_narrow_signed_one_bit_raises():
    with pytest.raises(ValueError, match="narrow_range=True with bits=1") as info:
        int_range(1, True, True)
    assert "allowed" in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 33, 2.5, 8.0, True, "8", None])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match="allowed: integers 1..32") as info:
        check_bits(bad)
    assert f"bits={bad!r}" in str(info.value)


def test_check_bits_accepts_and_names_the_field():
    assert (MIN_BITS, MAX_BITS) == (1, 32)
    assert check_bits(1) == 1 and check_bits(32) == 32
    value = check_bits(np.int32(4))
    assert value == 4 and type(value) is int
    with pytest.raises(ValueError, match=r"act_bits=9 is out of range; allowed: integers 2..8"):
        check_bits(9, "act_bits", lo=2, hi=8)


def test_check_choice():
    assert check_choice("group", "granularity", ("tensor", "group")) == "group"
    with pytest.raises(ValueError) as info:
        check_choice("row", "granularity", ("tensor", "group"))
    assert str(info.value) == "granularity='row' is not allowed; allowed: 'tensor', 'group'"
