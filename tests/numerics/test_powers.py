"""Tests of the exact powers of two: exact at integer exponents, the gradient ln2·2^x."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from qflax.numerics import exp2, pow2_int, times_pow2

_NORMAL = np.arange(-126, 128)  # every integer exponent of a normal float32


def test_pow2_int_is_exact_over_the_normal_range_eager_and_jit():
    want = np.ldexp(np.float32(1), _NORMAL).astype(np.float32)
    e = jnp.asarray(_NORMAL, jnp.float32)
    np.testing.assert_array_equal(np.asarray(pow2_int(e)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(pow2_int)(e)), want)


def test_pow2_int_edges():
    got = pow2_int(jnp.array([128.0, 1e9, -127.0, -1e9, np.nan], jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), [np.inf, np.inf, 0.0, 0.0, np.nan])


def test_exp2_is_exact_at_integers_under_jit_and_vmap():
    want = np.ldexp(np.float32(1), _NORMAL).astype(np.float32)
    e = jnp.asarray(_NORMAL, jnp.float32)
    for f in (exp2, jax.jit(exp2), jax.vmap(exp2)):
        np.testing.assert_array_equal(np.asarray(f(e)), want)


def test_exp2_off_integers_matches_float64():
    x = np.linspace(-20.0, 20.0, 1001, dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(exp2(jnp.asarray(x))), np.exp2(x.astype(np.float64)), rtol=2e-7
    )


def test_exp2_non_finite():
    got = exp2(jnp.array([np.inf, -np.inf, np.nan], jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), [np.inf, 0.0, np.nan])


def test_exp2_gradient_is_ln2_times_the_value():
    x = jnp.array([-13.0, -2.7, 0.0, 0.3, 3.0, 13.0], jnp.float32)
    grad = jax.vmap(jax.grad(exp2))(x)
    np.testing.assert_allclose(
        np.asarray(grad), math.log(2.0) * np.exp2(np.asarray(x, np.float64)), rtol=1e-6
    )
    check_grads(exp2, (jnp.array([0.3, -2.7, 1.5]),), order=2, modes=["fwd", "rev"])


def test_times_pow2_equals_ldexp_wherever_the_result_is_normal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -120, 120, 4000
    )
    e = rng.integers(-250, 251, 4000)
    want = np.ldexp(x.astype(np.float64), e)
    normal = (np.abs(want) >= np.finfo(np.float32).tiny) & (
        np.abs(want) <= np.finfo(np.float32).max
    )
    got = np.asarray(jax.jit(times_pow2)(jnp.asarray(x), jnp.asarray(e, jnp.int32)), np.float64)
    np.testing.assert_array_equal(got[normal], want[normal])  # exact
    assert normal.sum() > 1000
    # Beyond the float range: ±inf; below it: 0 (XLA:CPU flushes subnormals); zero stays zero.
    edges = times_pow2(jnp.array([1.0, -1.0, 1.0, 0.0]), jnp.array([200, 200, -200, 250]))
    np.testing.assert_array_equal(np.asarray(edges), [np.inf, -np.inf, 0.0, 0.0])
    # A per-row exponent broadcast against a matrix; a factor 2^±130 alone would not exist.
    rows = times_pow2(jnp.full((2, 3), 2.0**100), jnp.array([[-130], [-100]]))
    np.testing.assert_array_equal(np.asarray(rows), [[2.0**-30] * 3, [1.0] * 3])
