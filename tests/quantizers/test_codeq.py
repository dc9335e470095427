"""Tests of the CoDeQ dead-zone quantizer (qflax/quantizers/_codeq.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.quantizers._codeq import (
    CoDeQConfig,
    codeq,
    codeq_bits,
    codeq_codes,
    codeq_deadzone,
    codeq_init,
    codeq_sparsity,
)

N = 64
thetas = st.floats(-4.0, 4.0).filter(lambda t: abs(t) > 0.05)


def _weights(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,)).astype(np.float32)


def _params(theta_d: float, theta_b: float) -> dict[str, jax.Array]:
    return {"theta_d": jnp.float32(theta_d), "theta_b": jnp.float32(theta_b)}


def _reference(w: np.ndarray, theta_d: float, theta_b: float, config: CoDeQConfig) -> dict:
    """The forward written out in float64 numpy, independently of the module."""
    w = w.astype(np.float64)
    a = float(np.quantile(np.abs(w), config.quantile))
    if config.fixed_bits is None:
        bits = float(np.round(6 * abs(math.tanh(theta_b)) + 2))
    else:
        bits = float(config.fixed_bits)
    d = 2 * a * (1 - abs(math.tanh(theta_d)))
    q_max = 2 ** (bits - 1) - 1
    s = (a - d / 2) / (q_max - 0.5) + 1e-8
    shift = d / 2 - s / 2
    u = np.sign(w) * np.maximum(np.abs(w) - shift, 0) / s
    q = np.clip(np.round(u), -q_max, q_max)
    return dict(
        a=a, bits=bits, d=d, Q=q_max, s=s, shift=shift, u=u, q=q, out=s * q + shift * np.sign(q)
    )


# --------------------------------------------------------------------------------------------
# Forward.


def test_golden_values():
    w = jnp.array([-1.0, -0.5, -0.01, 0.0, 0.3, 1.0])
    cfg = CoDeQConfig(fixed_bits=2, quantile=1.0)  # Q = 1: levels 0 and ±a = ±1
    out = codeq(w, _params(0.5, 0.0), cfg)
    np.testing.assert_allclose(np.asarray(out), [-1.0, 0.0, 0.0, 0.0, 0.0, 1.0], atol=1e-6)
    assert codeq_codes(w, _params(0.5, 0.0), cfg).tolist() == [-1, 0, 0, 0, 0, 1]
    # d = 2a(1 - tanh 0.5) with a = 1.
    np.testing.assert_allclose(
        float(codeq_deadzone(w, _params(0.5, 0.0), cfg)), 2 * (1 - math.tanh(0.5)), rtol=1e-6
    )


def test_golden_three_bits():
    # a = 1 (quantile 1.0), theta_d = atanh(0.5): d = 1, Q = 3, s = 0.5/2.5 = 0.2, shift = 0.4.
    w = jnp.array([0.49, 0.51, 0.65, 0.75, 1.0, -0.71])
    cfg = CoDeQConfig(fixed_bits=3, quantile=1.0)
    out = codeq(w, _params(math.atanh(0.5), 0.0), cfg)
    np.testing.assert_allclose(np.asarray(out), [0.0, 0.6, 0.6, 0.8, 1.0, -0.8], atol=1e-6)


@given(seed=st.integers(0, 2**16), theta_d=thetas, theta_b=thetas)
def test_dead_zone_is_exactly_zero(seed, theta_d, theta_b):
    cfg = CoDeQConfig()
    w = _weights(seed)
    out = np.asarray(codeq(jnp.asarray(w), _params(theta_d, theta_b), cfg))
    half = float(codeq_deadzone(jnp.asarray(w), _params(theta_d, theta_b), cfg)) / 2
    inside = np.abs(w) < half * (1 - 1e-5)
    outside = np.abs(w) > half * (1 + 1e-5) + 1e-6
    assert np.all(out[inside] == 0.0)
    assert not np.any(np.signbit(out[inside]))  # +0.0, not -0.0
    assert np.all(out[outside] != 0.0)
    assert np.all(np.sign(out[outside]) == np.sign(w[outside]))


@given(theta_b=st.floats(-1e6, 1e6, allow_nan=False))
def test_bits_stay_in_range(theta_b):
    bits = float(codeq_bits(_params(0.0, theta_b), CoDeQConfig()))
    assert 2.0 <= bits <= 8.0 and bits == round(bits)
    assert bits == np.round(6 * abs(math.tanh(theta_b)) + 2)


def test_fixed_bits():
    cfg = CoDeQConfig(fixed_bits=3)
    assert float(codeq_bits(_params(0.0, 3.0), cfg)) == 3.0
    w = jnp.asarray(_weights(1))
    codes = codeq_codes(w, _params(3.0, 3.0), cfg)
    assert codes.dtype == jnp.int32 and int(jnp.max(jnp.abs(codes))) == 3


@given(
    seed=st.integers(0, 2**16),
    theta_d=thetas,
    theta_b=thetas,
    fixed=st.sampled_from([None, 2, 3, 4, 8]),
)
def test_outputs_on_grid(seed, theta_d, theta_b, fixed):
    cfg = CoDeQConfig(fixed_bits=fixed)
    w = _weights(seed)
    ref = _reference(w, theta_d, theta_b, cfg)
    out = np.asarray(codeq(jnp.asarray(w), _params(theta_d, theta_b), cfg), np.float64)
    codes = np.asarray(codeq_codes(jnp.asarray(w), _params(theta_d, theta_b), cfg))
    assert codes.dtype == np.int32
    assert np.all(np.abs(codes) <= ref["Q"])
    # Every output is s·q + shift·sign(q) for its own code.
    grid = ref["s"] * codes + ref["shift"] * np.sign(codes)
    np.testing.assert_allclose(out, grid, rtol=1e-5, atol=1e-6)
    # The codes equal the float64 reference away from rounding ties.
    frac = np.abs(np.abs(ref["u"]) - np.floor(np.abs(ref["u"])) - 0.5)
    clear = frac > 1e-3
    np.testing.assert_array_equal(codes[clear], ref["q"][clear])
    # The top code's level is a.
    top = np.abs(codes) == ref["Q"]
    np.testing.assert_allclose(np.abs(out[top]), ref["a"], rtol=1e-5)


def test_larger_decay_widens_dead_zone():
    cfg = CoDeQConfig(fixed_bits=4)
    w = jnp.asarray(_weights(7, 512))
    thetas_d = [3.0, 2.0, 1.0, 0.5, 0.2, 0.05]  # decay pulls theta_d toward 0
    widths = [float(codeq_deadzone(w, _params(t, 0.0), cfg)) for t in thetas_d]
    sparsity = [float(codeq_sparsity(w, _params(t, 0.0), cfg)) for t in thetas_d]
    assert np.all(np.diff(widths) > 0)
    assert np.all(np.diff(sparsity) >= 0)
    assert sparsity[0] < 0.05 and sparsity[-1] > 0.8


def test_sparsity_counts_exact_zeros():
    cfg = CoDeQConfig(fixed_bits=4)
    w = jnp.asarray(_weights(3, 256))
    p = _params(0.6, 0.0)
    out = codeq(w, p, cfg)
    assert float(codeq_sparsity(w, p, cfg)) == float(jnp.mean(out == 0))


def test_init():
    p = codeq_init(jnp.ones((3, 4)), CoDeQConfig())
    assert set(p) == {"theta_d", "theta_b"}
    assert p["theta_d"].dtype == jnp.float32 and p["theta_d"].shape == ()
    assert float(p["theta_d"]) == 3.0 and float(p["theta_b"]) == 3.0
    assert float(codeq_bits(p, CoDeQConfig())) == 8.0


def test_dtype_and_shape_preserved():
    w = jnp.asarray(_weights(2).reshape(8, 8)).astype(jnp.bfloat16)
    out = codeq(w, codeq_init(w, CoDeQConfig()), CoDeQConfig())
    assert out.shape == (8, 8) and out.dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# Gradients.


def _expected_grads(w, g, theta_d, theta_b, cfg):
    """The module docstring's STE formulas, computed in float64 numpy."""
    r = _reference(w, theta_d, theta_b, cfg)
    u, q, s, shift, a, d, Q, bits = (r[k] for k in ("u", "q", "s", "shift", "a", "d", "Q", "bits"))
    w64 = w.astype(np.float64)
    if cfg.gradient == "ste":
        m_c = np.ones_like(w64)
        m = np.ones_like(w64)
    else:
        m_c = (np.abs(u) <= Q).astype(np.float64)
        m = m_c * (np.abs(w64) > shift)
    dw = g * m
    g_s = np.sum(g * (q - m_c * u))
    g_shift = np.sum(g * (np.sign(q) - m * np.sign(w64)))
    ds_dd = -1 / (2 * (Q - 0.5))
    dl_dd = g_s * ds_dd + g_shift * (0.5 - 0.5 * ds_dd)
    dl_dq = (g_s - 0.5 * g_shift) * (-(a - d / 2) / (Q - 0.5) ** 2)
    t_d, t_b = math.tanh(theta_d), math.tanh(theta_b)
    dl_dtheta_d = dl_dd * (-2 * a * np.sign(theta_d) * (1 - t_d**2))
    if cfg.fixed_bits is None:
        dl_dtheta_b = dl_dq * math.log(2) * 2 ** (bits - 1) * 6 * np.sign(theta_b) * (1 - t_b**2)
    else:
        dl_dtheta_b = 0.0
    return dw, dl_dtheta_d, dl_dtheta_b


@given(
    seed=st.integers(0, 2**16),
    theta_d=st.floats(0.1, 2.0) | st.floats(-2.0, -0.1),
    theta_b=st.floats(0.1, 1.0) | st.floats(-1.0, -0.1),
    gradient=st.sampled_from(["ste", "clipped_ste"]),
    fixed=st.sampled_from([None, 3]),
)
def test_gradients_match_formulas(seed, theta_d, theta_b, gradient, fixed):
    cfg = CoDeQConfig(gradient=gradient, fixed_bits=fixed)
    w = _weights(seed)
    g = np.random.default_rng(seed + 1).normal(size=w.shape).astype(np.float32)
    ref = _reference(w, theta_d, theta_b, cfg)
    if np.min(np.abs(np.abs(ref["u"]) - np.floor(np.abs(ref["u"])) - 0.5)) < 1e-3:
        return  # a code within float error of a rounding tie: float32 may round either way

    def loss(w_, p):
        return jnp.sum(codeq(w_, p, cfg) * jnp.asarray(g))

    dw, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(w), _params(theta_d, theta_b))
    want_w, want_d, want_b = _expected_grads(w, g.astype(np.float64), theta_d, theta_b, cfg)
    np.testing.assert_allclose(np.asarray(dw), want_w, rtol=1e-6, atol=1e-6)
    scale = np.sum(np.abs(g)) * ref["a"]  # the size of a sum of N terms
    np.testing.assert_allclose(float(dp["theta_d"]), want_d, rtol=1e-3, atol=1e-5 * scale)
    np.testing.assert_allclose(float(dp["theta_b"]), want_b, rtol=1e-3, atol=1e-5 * scale)
    if fixed is not None:
        assert float(dp["theta_b"]) == 0.0


def test_ste_gradient_to_w_is_identity():
    cfg = CoDeQConfig()
    w = jnp.asarray(_weights(5))
    dw = jax.grad(lambda w_: jnp.sum(codeq(w_, codeq_init(w_, cfg), cfg)))(w)
    assert np.all(np.asarray(dw) == 1.0)


def test_clipped_ste_masks_dead_zone_and_saturation():
    cfg = CoDeQConfig(gradient="clipped_ste", fixed_bits=2, quantile=0.5)
    w = _weights(9)
    dw = np.asarray(jax.grad(lambda w_: jnp.sum(codeq(w_, _params(0.3, 0.0), cfg)))(w))
    ref = _reference(w, 0.3, 0.0, cfg)
    relu_off = np.abs(w) < ref["shift"] * 0.999
    saturated = np.abs(ref["u"]) > ref["Q"] * 1.001
    assert relu_off.any() and saturated.any()
    assert np.all(dw[relu_off] == 0) and np.all(dw[saturated] == 0)
    np.testing.assert_array_equal(dw[~relu_off & ~saturated], 1.0)


def test_thetas_get_gradients_at_init():
    cfg = CoDeQConfig()
    w = jnp.asarray(_weights(11))
    p = _params(1.0, 0.3)
    dp = jax.grad(lambda p_: jnp.sum((codeq(w, p_, cfg) - w) ** 2))(p)
    assert float(dp["theta_d"]) != 0.0 and float(dp["theta_b"]) != 0.0
    assert np.isfinite(float(dp["theta_d"])) and np.isfinite(float(dp["theta_b"]))


# --------------------------------------------------------------------------------------------
# Transformations and validation.


def test_jit_vmap_grad():
    cfg = CoDeQConfig()
    ws = jnp.asarray(np.stack([_weights(s) for s in range(3)]))
    p = _params(1.0, 0.5)
    eager = np.stack([np.asarray(codeq(w, p, cfg)) for w in ws])
    jitted = jax.jit(codeq, static_argnums=2)
    np.testing.assert_allclose(np.asarray(jitted(ws[0], p, cfg)), eager[0], atol=1e-6)
    mapped = jax.vmap(lambda w: codeq(w, p, cfg))(ws)  # one quantile (a) per mapped tensor
    np.testing.assert_allclose(np.asarray(mapped), eager, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p_: jnp.sum(jax.vmap(lambda w: codeq(w, p_, cfg))(ws))))(p)
    assert np.isfinite(float(grads["theta_d"]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(fixed_bits=1), "fixed_bits"),
        (dict(fixed_bits=9), "fixed_bits"),
        (dict(fixed_bits=2.5), "fixed_bits"),
        (dict(fixed_bits=True), "fixed_bits"),
        (dict(quantile=0.0), "quantile"),
        (dict(quantile=1.5), "quantile"),
        (dict(quantile="high"), "quantile"),
        (dict(gradient="true"), "gradient"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CoDeQConfig(**kwargs)


def test_bad_params():
    w = jnp.ones((4,))
    cfg = CoDeQConfig()
    with pytest.raises(ValueError, match="params"):
        codeq(w, {"theta_d": jnp.float32(1.0)}, cfg)
    with pytest.raises(ValueError, match="theta_b"):
        codeq(w, {"theta_d": jnp.float32(1.0), "theta_b": jnp.ones((2,))}, cfg)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_selection_quantile_equals_jnp_quantile_under_jit(q, n):
    """The sort-free order statistic behind the dead-zone's `a` equals jnp.quantile (1 ulp)."""
    from qflax.quantizers._codeq import _abs_quantile

    key = jax.random.PRNGKey(n)
    a = jnp.abs(jax.random.normal(key, (n,)))
    a = a.at[: n // 3].set(0.5)  # ties
    got = _abs_quantile(a, jnp.asarray(q))
    want = jax.jit(jnp.quantile)(a, jnp.asarray(q))
    np.testing.assert_array_max_ulp(np.asarray(got), np.asarray(want), maxulp=1)
