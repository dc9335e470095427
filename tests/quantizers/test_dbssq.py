"""Tests of DBSSQ, differentiable bit-shifting quantization (qflax/quantizers/_dbssq.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.quantizers._dbssq import (
    DBSSQ_EPSILONS,
    DBSSQConfig,
    dbssq,
    dbssq_act,
    dbssq_epsilon_schedule,
    dbssq_level_set,
    dbssq_quantize,
    dbssq_weight,
    dbssq_weight_init,
)

SHAPE = (4, 6)


@st.composite
def configs(draw, **overrides):
    levels = draw(st.sampled_from(["shift", "uniform"]))
    bits = draw(st.integers(0, 6) if levels == "shift" else st.integers(1, 16))
    kwargs = dict(levels=levels, bits=bits, rescale_grad=draw(st.booleans()))
    kwargs.update(overrides)
    return DBSSQConfig(**kwargs)


def _data(seed: int, shape=SHAPE) -> np.ndarray:
    """Log-uniform magnitudes 2^-40..2^3, random signs, plus exact powers of two and zeros."""
    rng = np.random.default_rng(seed)
    mag = np.exp2(rng.uniform(-40.0, 3.0, shape))
    x = np.where(rng.random(shape) < 0.5, -mag, mag).astype(np.float32)
    flat = x.reshape(-1)
    flat[0], flat[1], flat[2] = 0.0, -0.0, 0.5
    flat[3] = -(2.0 ** -int(rng.integers(0, 20)))
    flat[4] = 2.0 ** -int(rng.integers(0, 20))
    return x


def _slow_reference(x: np.ndarray, config: DBSSQConfig) -> np.ndarray:
    """Q(x) by the real-number definition, float64 numpy (log2 and 2**, with the clamps)."""
    x = x.astype(np.float64)
    ax = np.abs(x)
    if config.levels == "shift":
        smallest = 2.0 ** -(2**config.bits - 1)
        with np.errstate(divide="ignore"):
            mag = 2.0 ** np.ceil(np.log2(np.where(ax > 0, ax, 1.0)))
        mag = np.where(ax > 0, mag, smallest)
        mag = np.clip(mag, smallest, 1.0)
    else:
        n = 2.0 ** (config.bits - 1)
        mag = np.clip(np.ceil(ax * n), 1.0, n) / n
    return np.where(x <= 0, -mag, mag)


# --------------------------------------------------------------------------------------------
# The levels.


def test_golden_shift():
    cfg = DBSSQConfig(levels="shift", bits=2)  # magnitudes 1, 1/2, 1/4, 1/8
    x = jnp.array([3.0, 1.0, 0.51, 0.5, 0.49, 0.25, 0.2, 0.125, 0.1, 0.0, -0.3, -1e-9])
    want = [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, -0.125, -0.5, -0.125]
    assert dbssq_quantize(x, cfg).tolist() == want
    assert dbssq_quantize(x, DBSSQConfig(levels="shift", bits=0)).tolist() == [
        1.0 if v > 0 else -1.0 for v in x.tolist()
    ]


def test_golden_uniform():
    cfg = DBSSQConfig(levels="uniform", bits=3)  # magnitudes 1/4, 2/4, 3/4, 1
    x = jnp.array([2.0, 0.8, 0.75, 0.6, 0.26, 0.25, 0.01, 0.0, -0.5])
    want = [1.0, 1.0, 0.75, 0.75, 0.5, 0.25, 0.25, -0.25, -0.5]
    assert dbssq_quantize(x, cfg).tolist() == want


@given(seed=st.integers(0, 2**16), config=configs())
def test_levels_match_slow_reference(seed, config):
    x = _data(seed)
    q = np.asarray(dbssq_quantize(jnp.asarray(x), config), np.float64)
    np.testing.assert_array_equal(q, _slow_reference(x, config))
    assert np.all(np.isin(q, dbssq_level_set(config)))
    if config.levels == "shift":  # exact powers of two: the mantissa bits are zero
        assert np.all(np.frexp(np.abs(q))[0] == 0.5)


def test_level_set_and_nan():
    cfg = DBSSQConfig(levels="shift", bits=1)
    assert dbssq_level_set(cfg).tolist() == [-1.0, -0.5, 0.5, 1.0]
    assert dbssq_level_set(DBSSQConfig(levels="uniform", bits=2)).tolist() == [-1, -0.5, 0.5, 1]
    out = dbssq_quantize(jnp.array([jnp.nan, jnp.inf, -jnp.inf]), cfg)
    assert np.isnan(out[0]) and out[1:].tolist() == [1.0, -1.0]


def test_float64_and_bfloat16():
    cfg = DBSSQConfig(bits=3)
    x = _data(3)
    out16 = dbssq_quantize(jnp.asarray(x, jnp.bfloat16), cfg)
    assert out16.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        out64 = dbssq_quantize(x64, cfg)
        assert out64.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(out64), _slow_reference(x, cfg))


# --------------------------------------------------------------------------------------------
# The blend.


@given(seed=st.integers(0, 2**16), config=configs())
def test_blend_end_points(seed, config):
    x = jnp.asarray(_data(seed))
    np.testing.assert_array_equal(
        np.asarray(dbssq(x, 0.0, config)), np.asarray(dbssq_quantize(x, config))
    )
    np.testing.assert_array_equal(np.asarray(dbssq(x, 1.0, config)), np.asarray(x))


@given(seed=st.integers(0, 2**16), eps=st.floats(0.0, 1.0), config=configs())
def test_blend_value_and_gradient(seed, eps, config):
    x = _data(seed)
    out = dbssq(jnp.asarray(x), jnp.float32(eps), config)
    e = np.float32(eps)
    want = e * x + (np.float32(1) - e) * _slow_reference(x, config).astype(np.float32)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-30)
    g = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    dx, de = jax.grad(
        lambda x_, e_: jnp.sum(dbssq(x_, e_, config) * jnp.asarray(g)), argnums=(0, 1)
    )(jnp.asarray(x), jnp.float32(eps))
    want_dx = g if config.rescale_grad else g * e
    np.testing.assert_allclose(
        np.asarray(dx), want_dx, rtol=0, atol=2e-38
    )  # XLA flushes subnormals
    assert float(de) == 0.0


def test_gradient_at_epsilon_zero():
    x = jnp.asarray(_data(1))
    grad = lambda cfg: jax.grad(lambda x_: jnp.sum(dbssq(x_, 0.0, cfg)))(x)  # noqa: E731
    assert np.all(np.asarray(grad(DBSSQConfig(rescale_grad=True))) == 1.0)  # STE
    assert np.all(np.asarray(grad(DBSSQConfig(rescale_grad=False))) == 0.0)


def test_traced_epsilon_compiles_once():
    cfg = DBSSQConfig(bits=2)
    traces = []

    @jax.jit
    def step(w, eps):
        traces.append(1)
        loss = lambda w_: jnp.sum((dbssq(w_, eps, cfg) - 0.3) ** 2)  # noqa: E731
        return w - 0.1 * jax.grad(loss)(w)

    w = jnp.asarray(_data(2))
    outs = []
    for epoch in range(15):
        w = step(w, dbssq_epsilon_schedule(epoch))
        outs.append(w)
    assert len(traces) == 1
    assert all(np.all(np.isfinite(np.asarray(o))) for o in outs)


def test_vmap():
    cfg = DBSSQConfig(levels="uniform", bits=4)
    xs = jnp.asarray(_data(4))
    eps = jnp.array([0.0, 0.25, 0.5, 1.0])
    mapped = jax.vmap(lambda x, e: dbssq(x, e, cfg))(xs, eps)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(mapped[i]), np.asarray(dbssq(xs[i], eps[i], cfg)))


# --------------------------------------------------------------------------------------------
# Weights and activations.


def test_weight_levels_and_gradient():
    cfg = DBSSQConfig(bits=2)
    rng = np.random.default_rng(0)
    pretrained = (rng.normal(size=(5, 3)) * np.array([0.1, 1.0, 3.0])).astype(np.float32)
    sigma = dbssq_weight_init(jnp.asarray(pretrained))
    assert sigma.shape == (1, 3)
    np.testing.assert_allclose(np.asarray(sigma), pretrained.std(axis=0, keepdims=True), rtol=1e-5)
    w = pretrained * 1.7 + 0.2  # drifted during training: std_c != sigma_c
    out = np.asarray(dbssq_weight(jnp.asarray(w), 0.0, sigma, cfg), np.float64)
    # At ε = 0 every output is 3·σ_c·level.
    levels = out / (3 * np.asarray(sigma, np.float64))
    np.testing.assert_allclose(
        levels, _slow_reference((w - w.mean(0)) / w.std(0) / 3, cfg), rtol=1e-6
    )
    # Gradient: g·σ_c/std_c (rescaled ε-gradient, detached statistics).
    g = rng.normal(size=w.shape).astype(np.float32)
    dw = jax.grad(lambda w_: jnp.sum(dbssq_weight(w_, 0.25, sigma, cfg) * g))(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(dw), g * np.asarray(sigma) / w.std(0), rtol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        dbssq_weight(jnp.asarray(w), 0.0, jnp.ones((3,)), cfg)
    with pytest.raises(ValueError, match="axis"):
        dbssq_weight(jnp.asarray(w), 0.0, sigma, cfg, axis=2)


def test_weight_epsilon_one_is_normalised_identity():
    w = np.random.default_rng(5).normal(size=(3, 3, 2, 4)).astype(np.float32)  # HWIO
    sigma = dbssq_weight_init(jnp.asarray(w))
    assert sigma.shape == (1, 1, 1, 4)
    out = dbssq_weight(jnp.asarray(w), 1.0, sigma, DBSSQConfig())
    np.testing.assert_allclose(np.asarray(out), w - w.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_act():
    cfg = DBSSQConfig(levels="uniform", bits=4)
    x = np.random.default_rng(6).normal(2.0, 5.0, size=(16, 3)).astype(np.float32)
    out = np.asarray(dbssq_act(jnp.asarray(x), 0.0, cfg), np.float64)
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(out, 3 * _slow_reference(x_hat / 3, cfg), rtol=1e-6)
    ident = dbssq_act(jnp.asarray(x), 1.0, cfg)
    np.testing.assert_allclose(np.asarray(ident), x_hat, rtol=1e-4, atol=1e-5)
    dx = jax.grad(lambda x_: jnp.sum(dbssq_act(x_, 0.5, cfg) ** 2))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(dx)))
    with pytest.raises(ValueError, match="axes"):
        dbssq_act(jnp.ones((4,)), 0.5, cfg)


# --------------------------------------------------------------------------------------------
# Schedule and validation.


def test_schedule_golden_15_epochs():
    want = [1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 1 / 16, 1 / 16]
    want += [1 / 32, 1 / 64, 1 / 128]
    assert list(DBSSQ_EPSILONS) == want
    assert [float(dbssq_epsilon_schedule(e, 15)) for e in range(15)] == want
    assert float(dbssq_epsilon_schedule(15, 15)) == 0.0
    assert float(dbssq_epsilon_schedule(40, 15)) == 0.0
    assert float(dbssq_epsilon_schedule(-1, 15)) == 1.0


def test_schedule_stretched_and_fractional():
    got = [float(dbssq_epsilon_schedule(e, 30)) for e in range(30)]
    assert got == [v for v in DBSSQ_EPSILONS for _ in range(2)]
    assert float(dbssq_epsilon_schedule(0.99, 15)) == 1.0
    assert float(dbssq_epsilon_schedule(1.0, 15)) == 0.5
    assert float(dbssq_epsilon_schedule(jnp.float32(14.5), 15)) == 1 / 128
    jitted = jax.jit(dbssq_epsilon_schedule, static_argnums=1)
    assert float(jitted(jnp.float32(3.2), 5)) == DBSSQ_EPSILONS[9]  # 3.2·15/5 = 9.6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(levels="log"), "levels"),
        (dict(levels="shift", bits=7), "bits"),
        (dict(levels="shift", bits=-1), "bits"),
        (dict(levels="uniform", bits=0), "bits"),
        (dict(levels="uniform", bits=17), "bits"),
        (dict(bits=2.0), "bits"),
        (dict(rescale_grad=1), "rescale_grad"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DBSSQConfig(**kwargs)


def test_bad_epsilon_and_schedule():
    cfg = DBSSQConfig()
    with pytest.raises(ValueError, match="epsilon"):
        dbssq(jnp.ones(3), 1.5, cfg)
    with pytest.raises(ValueError, match="epsilon"):
        dbssq(jnp.ones(3), jnp.ones(2), cfg)
    with pytest.raises(ValueError, match="total_epochs"):
        dbssq_epsilon_schedule(0, 0)


@pytest.mark.parametrize("levels", ["shift", "uniform"])
def test_subnormal_inputs_keep_their_sign_under_jit_and_vmap(levels):
    # XLA:CPU flushes subnormals to zero in arithmetic; the sign is read from the bits instead.
    config = DBSSQConfig(levels=levels, bits=2)
    smallest = float(np.min(np.abs(dbssq_level_set(config))))
    x = jnp.asarray([1e-40, 1e-45, -1e-40, -1e-45, 0.0, -0.0], jnp.float32)
    want = [smallest, smallest, -smallest, -smallest, -smallest, -smallest]
    quantize = lambda x_: dbssq_quantize(x_, config)  # noqa: E731
    for f in (quantize, jax.jit(quantize), jax.vmap(quantize), jax.jit(jax.vmap(quantize))):
        np.testing.assert_array_equal(np.asarray(f(x)), want)
    blend = jax.jit(dbssq, static_argnums=2)(x, jnp.float32(0.0), config)  # ε = 0: exactly Q
    np.testing.assert_array_equal(np.asarray(blend), want)
