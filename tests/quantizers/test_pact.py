"""Tests of PACT (qflax/quantizers/_pact.py, METHODS.md §2)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.quantizers._pact import PACTConfig, pact, pact_init, pact_l2

SHAPE = (3, 8)


def _data(seed: int) -> np.ndarray:
    return (3 * np.random.default_rng(seed).standard_normal(SHAPE)).astype(np.float32)


@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16), alpha=st.floats(0.25, 4.0))
def test_on_grid_in_range_and_idempotent(bits, seed, alpha):
    config = PACTConfig(bits=bits)
    x = _data(seed)
    params = {"alpha": jnp.asarray(alpha, jnp.float32)}
    y = np.asarray(pact(x, params, config))
    a = np.float32(alpha)
    n = 2**bits - 1
    assert y.min() >= 0 and y.max() <= a * (1 + 1e-6)
    k = y.astype(np.float64) * n / a
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    ref = np.round(np.clip(x.astype(np.float64), 0, a) * n / a) * a / n
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pact(y, params, config)), y, rtol=1e-6, atol=1e-7)
    inside = (x >= 0) & (x <= a)
    assert np.all(np.abs(y - x)[inside] <= a / n / 2 + 1e-5)


def test_golden_2bit():
    out = pact(
        jnp.array([-1.0, 0.0, 0.4, 1.0, 2.0, 3.0]), {"alpha": jnp.asarray(2.0)}, PACTConfig(bits=2)
    )
    # steps of 2/3: 0.4 -> 0.6 -> 1; 1.0 -> 1.5 -> 2 (tie to even).
    np.testing.assert_allclose(np.asarray(out), [0, 0, 2 / 3, 4 / 3, 2, 2], rtol=1e-6)


@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_gradients_equal_the_formulas(bits, seed):
    config = PACTConfig(bits=bits)
    x = _data(seed)
    x[0, :3] = [0.0, 1.5, -0.0]  # bounds: 0 and alpha exactly
    params = {"alpha": jnp.asarray(1.5, jnp.float32)}
    cot = np.random.default_rng(seed + 1).standard_normal(SHAPE).astype(np.float32)
    _, vjp = jax.vjp(lambda x, p: pact(x, p, config), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(cot))
    np.testing.assert_array_equal(np.asarray(dx), np.where((x >= 0) & (x < 1.5), cot, 0))
    np.testing.assert_allclose(
        np.asarray(dp["alpha"]), np.sum(np.where(x >= 1.5, cot, 0)), rtol=1e-5, atol=1e-6
    )


def test_alpha_mask_at_x_equal_alpha():
    config = PACTConfig(bits=3)
    x = jnp.array([2.0, 1.0, 3.0, 0.0, -1.0])
    dx, dp = jax.grad(lambda x, p: jnp.sum(pact(x, p, config)), argnums=(0, 1))(
        x, {"alpha": jnp.asarray(2.0)}
    )
    np.testing.assert_array_equal(np.asarray(dx), [0.0, 1.0, 0.0, 1.0, 0.0])
    assert float(dp["alpha"]) == 2.0  # x = 2 (= alpha) and x = 3


def test_init_and_l2():
    x = jnp.array([-5.0, 1.0, 3.5])
    assert float(pact_init(x, PACTConfig())["alpha"]) == 10.0
    p = pact_init(x, PACTConfig(init_alpha=None))
    assert p["alpha"].shape == () and p["alpha"].dtype == jnp.float32
    assert float(p["alpha"]) == 3.5
    assert float(pact_init(-x * 0 - 1, PACTConfig(init_alpha=None))["alpha"]) > 0
    assert float(pact_l2({"alpha": jnp.asarray(3.0)}, 0.1)) == pytest.approx(0.9)
    g = jax.grad(lambda p: pact_l2(p, 0.1))({"alpha": jnp.asarray(3.0)})
    assert float(g["alpha"]) == pytest.approx(0.6)


def test_jit_vmap_grad():
    config = PACTConfig(bits=3)
    xs = jnp.asarray(np.stack([_data(i) for i in range(3)]))
    alphas = {"alpha": jnp.array([1.0, 2.0, 3.0])}

    def loss(x, p):
        return jnp.sum(pact(x, p, config) * x)

    out = jax.jit(jax.vmap(functools.partial(pact, config=config)))(xs, alphas)
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(xs, alphas)
    for i in range(3):
        p = {"alpha": alphas["alpha"][i]}
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(pact(xs[i], p, config)))
        want = jax.grad(loss, argnums=(0, 1))(xs[i], p)
        np.testing.assert_allclose(np.asarray(grads[0][i]), np.asarray(want[0]), rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(grads[1]["alpha"][i]), np.asarray(want[1]["alpha"]), rtol=1e-5
        )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=0), "bits"),
        (dict(bits=25), "bits"),
        (dict(init_alpha=0.0), "init_alpha"),
        (dict(init_alpha="ten"), "init_alpha"),
    ],
)
def test_bad_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        PACTConfig(**kwargs)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="shape"):
        pact(jnp.zeros(3), {"alpha": jnp.ones(3)}, PACTConfig())
    with pytest.raises(ValueError, match="alpha"):
        pact(jnp.zeros(3), {"scale": jnp.ones(())}, PACTConfig())
