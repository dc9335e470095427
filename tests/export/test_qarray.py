"""QArray: exact dequantization of every quantizer kind, exact pack/unpack, byte counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax import quantizers as qz
from qflax.export import (
    QArray,
    container_bits,
    dequantize,
    nbytes,
    pack,
    quantize_binary,
    quantize_codeq,
    quantize_pow2,
    quantize_ternary,
    quantize_uniform,
    unpack,
)
from qflax.numerics import int_range


def _x(seed, shape=(6, 5)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 2.0


def _assert_same(a: QArray, b: QArray):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert la.dtype == lb.dtype and la.shape == lb.shape
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


def _roundtrip(q: QArray) -> QArray:
    p = pack(q)
    assert p.packed and p.values.dtype == jnp.uint8 or q.bits > 8
    assert pack(p) is p
    u = unpack(p)
    _assert_same(u, q)
    np.testing.assert_array_equal(np.asarray(dequantize(p)), np.asarray(dequantize(q)))
    return p


@given(
    bits=st.integers(1, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    seed=st.integers(0, 3),
)
def test_uniform_dequantize_exact_and_roundtrip(bits, signed, symmetric, granularity, seed):
    if symmetric and not signed and bits == 1:
        signed = True
    group = {"group_size": 3, "axis": 0} if granularity == "group" else {}
    config = qz.UniformConfig(
        bits=bits, signed=signed, symmetric=symmetric, granularity=granularity, **group
    )
    x = _x(seed)
    params = qz.uniform_init(x, config)
    if symmetric:
        params = {"scale": params["scale"]}
    q = quantize_uniform(x, params, config)
    qmin, qmax = int_range(bits, signed)
    v = np.asarray(q.values)
    assert v.min() >= qmin and v.max() <= qmax
    assert q.values.dtype == (jnp.int8 if signed else jnp.uint8)
    expected = qz.uniform(x, params, config)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(expected))
    p = _roundtrip(q)
    width = container_bits(bits)
    assert p.values.size == -(-x.size * width // 8)
    zp = 0 if symmetric else params["scale"].size * 4
    assert nbytes(p) == p.values.size + params["scale"].size * 4 + zp


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero", [True, False])
def test_pow2(bits, zero):
    config = qz.PowerOfTwoConfig(bits=bits, zero=zero, granularity="channel", axis=-1)
    x = _x(bits)
    params = qz.pow2_init(x, config)
    q = quantize_pow2(x, params, config)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(qz.pow2(x, params, config)))
    _roundtrip(q)


@pytest.mark.parametrize("scaling", ["none", "tensor", "channel"])
def test_binary_eight_per_byte(scaling):
    config = qz.BinaryConfig(scaling=scaling)
    x = _x(1, (4, 16))
    q = quantize_binary(x, config)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(qz.binary(x, {}, config)))
    p = _roundtrip(q)
    assert p.values.size == 64 // 8


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_ternary_four_per_byte(scaling):
    config = qz.TernaryConfig(scaling=scaling)
    x = _x(2, (4, 16))
    q = quantize_ternary(x, config)
    assert set(np.unique(np.asarray(q.values)).tolist()) <= {-1, 0, 1}
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(qz.ternary(x, {}, config)))
    p = _roundtrip(q)
    assert p.values.size == 64 // 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codeq(bits):
    config = qz.CoDeQConfig(fixed_bits=bits)
    x = _x(3, (8, 8))
    params = {"theta_d": jnp.array(1.0), "theta_b": jnp.array(0.0)}
    q = quantize_codeq(x, params, config)
    assert q.bits == bits and (np.asarray(q.values) == 0).any()
    np.testing.assert_array_equal(
        np.asarray(dequantize(q)), np.asarray(qz.codeq(x, params, config))
    )
    _roundtrip(q)


def test_int4_two_per_byte_golden():
    q = QArray(
        values=jnp.array([[-8, 7, 1], [0, -1, 3]], jnp.int8),
        scale=jnp.full((1, 3), 0.5, jnp.float32),
        zero_point=None,
        bits=4,
        signed=True,
        shape=(2, 3),
        packed=False,
        kind="uniform",
        granularity="channel",
    )
    p = pack(q)
    # little-endian nibbles: (-8 -> 0x8, 7 -> 0x7) -> 0x78; (1, 0) -> 0x01; (-1 -> 0xF, 3) -> 0x3F
    assert np.asarray(p.values).tolist() == [0x78, 0x01, 0x3F]
    assert nbytes(p) == 3 + 12
    assert dequantize(p).tolist() == [[-4.0, 3.5, 0.5], [0.0, -0.5, 1.5]]


def test_wide_codes_keep_their_dtype():
    config = qz.UniformConfig(bits=12)
    x = _x(0)
    q = quantize_uniform(x, {"scale": qz.uniform_init(x, config)["scale"]}, config)
    assert q.values.dtype == jnp.int16
    p = _roundtrip(q)
    assert nbytes(p) == x.size * 2 + 4


def test_qarray_is_a_pytree_under_jit():
    config = qz.UniformConfig(bits=4, granularity="channel")
    x = _x(5)
    q = pack(quantize_uniform(x, qz.uniform_init(x, config), config))
    out = jax.jit(dequantize)(q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(q)))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2  # values, scale (no zero point when symmetric)
    _assert_same(jax.tree_util.tree_unflatten(treedef, leaves), q)
    with pytest.raises(ValueError, match="kind='foo'"):
        dataclasses.replace(q, kind="foo")
