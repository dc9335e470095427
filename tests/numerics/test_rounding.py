"""Tests of round-half-to-even and of unbiased stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.numerics import NOISE_SOURCES, hash_uniform, round_nearest_even, stochastic_round


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
@pytest.mark.parametrize("noise", NOISE_SOURCES)
def test_stochastic_round_is_unbiased(x, noise):
    x32 = np.float32(x)
    samples = stochastic_round(jnp.full((N,), x32), jax.random.key(0), noise=noise)
    assert samples.dtype == jnp.float32
    lower = np.floor(np.float64(x32))
    f = np.float64(x32) - lower
    sigma = np.sqrt(f * (1 - f))
    mean = np.mean(np.asarray(samples, np.float64) - lower)  # exact: samples are lower or +1
    assert set(np.unique(np.asarray(samples, np.float64) - lower)) <= {0.0, 1.0}
    assert abs(mean - f) <= 5 * sigma / np.sqrt(N), (mean, f)


@pytest.mark.parametrize("noise", NOISE_SOURCES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_stochastic_round_integers_are_unchanged_at_every_magnitude(dtype, noise):
    values = [0.0, -0.0, 1.0, -3.0, 5.0, 255.0, -256.0, 1024.0, 2.0**10 + 1, 2.0**11]
    if dtype == jnp.float32:
        values += [2.0**22, 2.0**22 + 3, 2.0**23 - 1, 2.0**23, 2.0**24, -(2.0**22), 1e7, 3e9]
    x = jnp.tile(jnp.array(values, dtype), 5000)
    for seed in range(3):
        got = stochastic_round(x, jax.random.key(seed), noise=noise)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("noise", NOISE_SOURCES)
def test_stochastic_round_outputs_floor_or_ceil(noise):
    x = jax.random.normal(jax.random.key(1), (4096,)) * 10
    got = stochastic_round(x, jax.random.key(2), noise=noise)
    assert np.all((got == jnp.floor(x)) | (got == jnp.ceil(x)))
    assert np.any(got == jnp.floor(x)) and np.any(got == jnp.ceil(x))


@pytest.mark.parametrize("x, f", [(1.0 + 2.0**-7, 2.0**-7), (100.5, 0.5), (-60.25, 0.75)])
@pytest.mark.parametrize("noise", NOISE_SOURCES)
def test_stochastic_round_bfloat16_is_unbiased(x, f, noise):
    # bfloat16 has 8 significant bits: near 100 its spacing is 0.5, so x + u rounded to bfloat16
    # before the floor would be biased; the implementation must compare u with f instead.
    samples = stochastic_round(jnp.full((N,), x, jnp.bfloat16), jax.random.key(3), noise=noise)
    assert samples.dtype == jnp.bfloat16
    mean = float(jnp.mean(samples.astype(jnp.float32) - np.floor(x)))
    assert abs(mean - f) <= 5 * np.sqrt(f * (1 - f)) / np.sqrt(N)


@pytest.mark.parametrize("noise", NOISE_SOURCES)
def test_stochastic_round_same_key_same_result_different_keys_differ(noise):
    x = jnp.linspace(-4.0, 4.0, 1001) + 0.37
    a = stochastic_round(x, jax.random.key(7), noise=noise)
    b = stochastic_round(x, jax.random.key(7), noise=noise)
    c = stochastic_round(x, jax.random.key(8), noise=noise)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))
    # Legacy uint32 keys work too.
    np.testing.assert_array_equal(
        stochastic_round(x, jax.random.PRNGKey(7), noise=noise),
        stochastic_round(x, jax.random.PRNGKey(7), noise=noise),
    )


@pytest.mark.parametrize("noise", NOISE_SOURCES)
def test_stochastic_round_under_jit_and_vmap(noise):
    x = jnp.array([[0.5, 1.25], [-0.75, 3.0]])
    key = jax.random.key(0)

    def f(x, key):
        return stochastic_round(x, key, noise=noise)

    np.testing.assert_array_equal(jax.jit(f)(x, key), f(x, key))
    keys = jax.random.split(key, 2)
    rows = jax.vmap(f)(x, keys)
    assert rows.shape == x.shape
    np.testing.assert_array_equal(rows[1], f(x[1], keys[1]))
    assert np.all((rows == jnp.floor(x)) | (rows == jnp.ceil(x)))


def test_stochastic_round_refuses_an_unknown_noise():
    with pytest.raises(ValueError, match="noise='philox' is not allowed; allowed: 'threefry'"):
        stochastic_round(jnp.ones(3), jax.random.key(0), noise="philox")


# ------------------------------------------------------------------------------ hash noise


def test_hash_uniform_is_uniform_on_its_grid():
    u = np.asarray(hash_uniform(jax.random.key(0), (1024, 1024)), np.float64)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u * 2**24, np.round(u * 2**24))  # the 2^-24 grid
    n = u.size
    # Moments within 5 standard errors: mean 1/2 (var 1/12), variance 1/12 (var 1/180).
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    # Histogram of 64 bins: chi-square with 63 degrees of freedom (p ~ 1e-6 at 130).
    counts = np.bincount((u * 64).astype(int).ravel(), minlength=64)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 130, chi2
    # Neighbours along each axis, and the same element under two keys, are uncorrelated.
    for a, b in [(u[:, :-1], u[:, 1:]), (u[:-1], u[1:])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)
    v = np.asarray(hash_uniform(jax.random.key(1), (1024, 1024)), np.float64)
    assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < 5 / np.sqrt(n)


def test_hash_uniform_is_uniform_per_element_over_keys():
    """Unbiasedness needs each element's draw uniform over the key (not only over elements)."""
    keys = jax.random.split(jax.random.key(5), 20_000)
    u = np.asarray(jax.vmap(lambda k: hash_uniform(k, (3,)))(keys), np.float64)
    for column in u.T:
        assert abs(column.mean() - 0.5) < 5 * np.sqrt(1 / 12 / len(column))
    samples = jax.vmap(lambda k: stochastic_round(jnp.full((3,), 0.3), k, noise="hash"))(keys)
    assert np.all(np.abs(np.asarray(samples).mean(0) - 0.3) < 5 * np.sqrt(0.21 / len(keys)))


def test_hash_uniform_depends_on_shape_not_on_layout_and_refuses_huge_shapes():
    a = hash_uniform(jax.random.key(2), (6, 4))
    np.testing.assert_array_equal(a.reshape(-1), hash_uniform(jax.random.key(2), (24,)))
    np.testing.assert_array_equal(
        jax.jit(hash_uniform, static_argnums=1)(jax.random.key(2), (6, 4)), a
    )
    assert hash_uniform(jax.random.key(2), ()).shape == ()
    assert hash_uniform(jax.random.key(2), (0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"shape=\(65536, 65536\) has 4294967296 elements"):
        hash_uniform(jax.random.key(2), (2**16, 2**16))


def test_stochastic_round_rejects_integer_input():
    with pytest.raises(TypeError, match="int32"):
        stochastic_round(jnp.array([1, 2]), jax.random.key(0))
