"""Tests of bit packing: exact round trips, byte layout, sizes and errors."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.numerics import PACKABLE_BITS, int_range, pack_bits, packed_size, unpack_bits


def test_packable_bits():
    assert PACKABLE_BITS == (1, 2, 4, 8)


@pytest.mark.parametrize(
    "codes, bits, want",
    [
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, [0b00001101, 0b00000001]),  # little-endian in a byte
        ([-1, 0, 0, 0, 0, 0, 0, 0], 1, [0b00000001]),  # signed 1-bit: -1 is the bit 1
        ([-1, 1], 2, [0b0111]),  # -1 -> 0b11 at bits 0..1, 1 -> 0b01 at bits 2..3; padded
        ([3, 2, 1, 0, 1], 2, [0b00011011, 0b00000001]),
        ([-8, 7, 3], 4, [0x78, 0x03]),
        ([15, 0], 4, [0x0F]),
        ([-1, -128, 127, 0], 8, [255, 128, 127, 0]),
    ],
)
def test_pack_bits_golden(codes, bits, want):
    packed = pack_bits(jnp.array(codes, jnp.int32), bits)
    assert packed.dtype == jnp.uint8 and packed.ndim == 1
    np.testing.assert_array_equal(packed, np.array(want, np.uint8))


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("length", [1, 3, 8, 9, 13])
def test_round_trip_every_code_at_odd_lengths(bits, signed, length):
    qmin, qmax = int_range(bits, signed)
    codes = (np.arange(length) % (qmax - qmin + 1) + qmin).astype(np.int32)
    packed = pack_bits(codes, bits)
    assert packed.shape == (packed_size(length, bits),)
    got = unpack_bits(packed, bits, (length,), signed)
    assert got.dtype == (jnp.int8 if signed else jnp.uint8)
    np.testing.assert_array_equal(got, codes)
    # Padding is zero: unpacking a whole number of bytes shows zeros after the codes.
    full = packed_size(length, bits) * 8 // bits
    padded = unpack_bits(packed, bits, (full,), signed)
    np.testing.assert_array_equal(padded[length:], 0)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32])
def test_pack_accepts_any_integer_dtype(dtype):
    qmin, qmax = int_range(4, signed=np.issubdtype(dtype, np.signedinteger))
    codes = np.arange(qmin, qmax + 1).astype(dtype)
    got = unpack_bits(pack_bits(codes, 4), 4, codes.shape, signed=qmin < 0)
    np.testing.assert_array_equal(np.asarray(got, np.int64), codes.astype(np.int64))


@st.composite
def shapes_and_codes(draw):
    bits = draw(st.sampled_from(PACKABLE_BITS))
    signed = draw(st.booleans())
    qmin, qmax = int_range(bits, signed)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    codes = draw(hnp.arrays(np.int32, shape, elements=st.integers(qmin, qmax)))
    return bits, signed, codes


@given(shapes_and_codes())
def test_round_trip_property(case):
    bits, signed, codes = case
    packed = pack_bits(codes, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (packed_size(codes.size, bits),)
    got = unpack_bits(packed, bits, codes.shape, signed)
    assert got.shape == codes.shape
    np.testing.assert_array_equal(np.asarray(got, np.int64), codes.astype(np.int64))


@pytest.mark.parametrize(
    "n, bits, want",
    [
        (0, 1, 0),
        (1, 1, 1),
        (8, 1, 1),
        (9, 1, 2),
        (10, 2, 3),
        (10, 4, 5),
        (10, 8, 10),
        (7, 4, 4),
        (2**60 + 1, 1, 2**57 + 1),  # exact integer arithmetic beyond 2^53
    ],
)
def test_packed_size(n, bits, want):
    assert packed_size(n, bits) == want


def test_packing_works_under_jit():
    codes = jnp.array([[-2, 1, 0], [1, -1, -2]], jnp.int8)
    pack = jax.jit(pack_bits, static_argnums=1)
    unpack = jax.jit(unpack_bits, static_argnums=(1, 2, 3))
    packed = pack(codes, 2)
    np.testing.assert_array_equal(packed, pack_bits(codes, 2))
    np.testing.assert_array_equal(unpack(packed, 2, (2, 3), True), codes)


def test_unpack_accepts_packed_bytes_of_any_shape():
    codes = jnp.arange(16, dtype=jnp.int32) % 4
    packed = pack_bits(codes, 2).reshape(1, 4)
    np.testing.assert_array_equal(unpack_bits(packed, 2, (16,), False), codes)


@pytest.mark.parametrize("bits", [0, 3, 5, 16, 32, 2.0, True, "4", None])
def test_bad_bits_raise(bits):
    for call in (
        lambda: packed_size(8, bits),
        lambda: pack_bits(jnp.zeros(8, jnp.int32), bits),
        lambda: unpack_bits(jnp.zeros(1, jnp.uint8), bits, (8,), True),
    ):
        with pytest.raises(ValueError, match="allowed: 1, 2, 4, 8") as info:
            call()
        assert f"bits={bits!r}" in str(info.value)


def test_bad_dtypes_raise():
    with pytest.raises(TypeError, match="integer codes"):
        pack_bits(jnp.zeros(8, jnp.float32), 4)
    with pytest.raises(TypeError, match="integer codes"):
        pack_bits(jnp.zeros(8, jnp.bool_), 1)
    with pytest.raises(TypeError, match="uint8 bytes"):
        unpack_bits(jnp.zeros(4, jnp.int8), 4, (8,), True)


@pytest.mark.parametrize(
    "size, shape, bits", [(3, (8,), 4), (5, (8,), 4), (1, (9,), 1), (0, (1,), 8)]
)
def test_wrong_packed_size_raises(size, shape, bits):
    with pytest.raises(ValueError, match=f"packed has {size} bytes") as info:
        unpack_bits(jnp.zeros(size, jnp.uint8), bits, shape, False)
    assert f"needs {packed_size(int(np.prod(shape)), bits)}" in str(info.value)
