"""Tests of round-half-to-even and of unbiased stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.numerics import round_nearest_even, stochastic_round


def test_round_nearest_even_golden():
    x = jnp.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 1.2, -1.7, 7.0, -0.0])
    want = np.array([0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 0.0, 1.0, -2.0, 7.0, -0.0], np.float32)
    got = round_nearest_even(x)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.5 -> -0.0


def test_round_nearest_even_keeps_dtype_and_works_under_jit():
    x = jnp.array([0.5, 1.5, 2.5], jnp.bfloat16)
    got = jax.jit(round_nearest_even)(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.astype(jnp.float32), [0.0, 2.0, 2.0])


# Stochastic rounding: round(x) is ceil(x) with probability f = x - floor(x), so the N samples
# average to floor(x) + f_hat with f_hat a binomial proportion: mean f, std sqrt(f(1-f)/N).
# The test accepts |mean - x| <= 5 sigma / sqrt(N), sigma^2 = f(1 - f): for a correct
# implementation this fails with probability < 1e-6 per value (and the key is fixed anyway).
N = 200_000


@pytest.mark.parametrize(
    "x",
    [
        0.3,
        0.5,
        0.9,
        2.25,
        -0.3,
        -1.75,
        17.1,
        0.001,
        -(2.0**22) + 0.5,
        2.0**22 + 0.5,
        2.0**20 + 0.25,
    ],
)
def test_stochastic_round_is_unbiased(x):
    x32 = np.float32(x)
    samples = stochastic_round(jnp.full((N,), x32), jax.random.key(0))
    assert samples.dtype == jnp.float32
    lower = np.floor(np.float64(x32))
    f = np.float64(x32) - lower
    sigma = np.sqrt(f * (1 - f))
    mean = np.mean(np.asarray(samples, np.float64) - lower)  # exact: samples are lower or +1
    assert set(np.unique(np.asarray(samples, np.float64) - lower)) <= {0.0, 1.0}
    assert abs(mean - f) <= 5 * sigma / np.sqrt(N), (mean, f)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_stochastic_round_integers_are_unchanged_at_every_magnitude(dtype):
    values = [0.0, -0.0, 1.0, -3.0, 5.0, 255.0, -256.0, 1024.0, 2.0**10 + 1, 2.0**11]
    if dtype == jnp.float32:
        values += [2.0**22, 2.0**22 + 3, 2.0**23 - 1, 2.0**23, 2.0**24, -(2.0**22), 1e7, 3e9]
    x = jnp.tile(jnp.array(values, dtype), 5000)
    for seed in range(3):
        got = stochastic_round(x, jax.random.key(seed))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, x)


def test_stochastic_round_outputs_floor_or_ceil():
    x = jax.random.normal(jax.random.key(1), (4096,)) * 10
    got = stochastic_round(x, jax.random.key(2))
    assert np.all((got == jnp.floor(x)) | (got == jnp.ceil(x)))
    assert np.any(got == jnp.floor(x)) and np.any(got == jnp.ceil(x))


@pytest.mark.parametrize("x, f", [(1.0 + 2.0**-7, 2.0**-7), (100.5, 0.5), (-60.25, 0.75)])
def test_stochastic_round_bfloat16_is_unbiased(x, f):
    # bfloat16 has 8 significant bits: near 100 its spacing is 0.5, so x + u rounded to bfloat16
    # before the floor would be biased; the implementation must compare u with f instead.
    samples = stochastic_round(jnp.full((N,), x, jnp.bfloat16), jax.random.key(3))
    assert samples.dtype == jnp.bfloat16
    mean = float(jnp.mean(samples.astype(jnp.float32) - np.floor(x)))
    assert abs(mean - f) <= 5 * np.sqrt(f * (1 - f)) / np.sqrt(N)


def test_stochastic_round_same_key_same_result_different_keys_differ():
    x = jnp.linspace(-4.0, 4.0, 1001) + 0.37
    a = stochastic_round(x, jax.random.key(7))
    b = stochastic_round(x, jax.random.key(7))
    c = stochastic_round(x, jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))
    # Legacy uint32 keys work too.
    np.testing.assert_array_equal(
        stochastic_round(x, jax.random.PRNGKey(7)), stochastic_round(x, jax.random.PRNGKey(7))
    )


def test_stochastic_round_under_jit_and_vmap():
    x = jnp.array([[0.5, 1.25], [-0.75, 3.0]])
    key = jax.random.key(0)
    np.testing.assert_array_equal(jax.jit(stochastic_round)(x, key), stochastic_round(x, key))
    keys = jax.random.split(key, 2)
    rows = jax.vmap(stochastic_round)(x, keys)
    assert rows.shape == x.shape
    assert np.all((rows == jnp.floor(x)) | (rows == jnp.ceil(x)))


def test_stochastic_round_rejects_integer_input():
    with pytest.raises(TypeError, match="int32"):
        stochastic_round(jnp.array([1, 2]), jax.random.key(0))
