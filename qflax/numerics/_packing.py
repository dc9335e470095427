"""Packing 1-, 2-, 4- and 8-bit integer codes into bytes, and back, exactly.

Codes are stored little-endian within each byte: element ``i`` of a packed group occupies bits
``[i*b, (i+1)*b)`` of its byte. Signed codes are stored as b-bit two's complement and
sign-extended on unpacking. The flat element order is C order of the original shape; the last
byte is zero-padded. Invariant: ``unpack_bits(pack_bits(q, b), b, q.shape, signed) == q`` for
every ``q`` inside the b-bit range.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qflax.numerics._ranges import check_choice

__all__ = ["pack_bits", "unpack_bits", "packed_size", "PACKABLE_BITS"]

PACKABLE_BITS = (1, 2, 4, 8)


def _check_packable_bits(bits) -> int:
    # check_choice alone lets True (== 1) and 2.0 (== 2) through; they then fail obscurely.
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        allowed = ", ".join(map(repr, PACKABLE_BITS))
        raise ValueError(f"bits={bits!r} is not an integer; allowed: {allowed}")
    return check_choice(int(bits), "bits", PACKABLE_BITS)


def packed_size(num_elements: int, bits: int) -> int:
    """Bytes needed to pack ``num_elements`` codes of ``bits`` bits."""
    bits = _check_packable_bits(bits)
    return -(-int(num_elements) * bits // 8)  # exact integer ceil, also beyond 2^53


def pack_bits(q: ArrayLike, bits: int) -> jax.Array:
    """Packs integer codes (any shape, any integer dtype) into a flat ``uint8`` array.

    Each code keeps its low ``bits`` bits (two's complement for negative codes).
    """
    bits = _check_packable_bits(bits)
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise TypeError(f"pack_bits expects integer codes, got dtype {q.dtype}")
    per_byte = 8 // bits
    flat = q.reshape(-1).astype(jnp.int32) & ((1 << bits) - 1)
    pad = (-flat.size) % per_byte
    flat = jnp.pad(flat, (0, pad)).reshape(-1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.int32) * bits
    return jnp.sum(flat << shifts, axis=1).astype(jnp.uint8)


def unpack_bits(packed: ArrayLike, bits: int, shape: tuple[int, ...], signed: bool) -> jax.Array:
    """Inverse of :func:`pack_bits`: returns ``int8`` codes (``uint8`` if unsigned) of ``shape``."""
    bits = _check_packable_bits(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_bits expects uint8 bytes, got dtype {packed.dtype}")
    n = math.prod(shape)
    if packed.size != packed_size(n, bits):
        raise ValueError(
            f"packed has {packed.size} bytes; shape={shape} at bits={bits} needs "
            f"{packed_size(n, bits)}"
        )
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.int32) * bits
    codes = (packed.reshape(-1).astype(jnp.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(-1)[:n]
    if signed:
        codes = jnp.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)
        return codes.astype(jnp.int8).reshape(shape)
    return codes.astype(jnp.uint8).reshape(shape)
