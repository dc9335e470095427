"""Tests of the GDNSQ quantizers (qflax/quantizers/_gdnsq.py, METHODS.md §3)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from qflax.quantizers._gdnsq import (
    GDNSQActConfig,
    GDNSQWeightConfig,
    gdnsq_act,
    gdnsq_act_bits,
    gdnsq_act_codes,
    gdnsq_act_init,
    gdnsq_used_bits,
    gdnsq_weight,
    gdnsq_weight_bits,
    gdnsq_weight_codes,
    gdnsq_weight_init,
)

SHAPE = (6, 4)  # axis -1: 4 output channels of 6 weights
LN2 = math.log(2.0)
NOISE = 0.5 / math.sqrt(3.0)
WEIGHT_LAYOUTS = [("channel", -1), ("channel", 0), ("tensor", -1)]


def _wcfg(**kwargs):
    """A weight config; ``backward="ste"`` unless given (the default, ``"noise"``, needs a key
    even where a test reads only the forward)."""
    kwargs.setdefault("backward", "ste")
    return GDNSQWeightConfig(**kwargs)


def _acfg(**kwargs):
    """An activation config; ``backward="ste"`` unless given."""
    kwargs.setdefault("backward", "ste")
    return GDNSQActConfig(**kwargs)


def test_the_default_rule_is_the_papers_noise_rule_and_needs_a_key():
    assert GDNSQWeightConfig().backward == "noise" and GDNSQActConfig().backward == "noise"
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    params = gdnsq_weight_init(w, GDNSQWeightConfig())
    with pytest.raises(
        ValueError, match="key=None is not allowed for gdnsq_weight with backward='noise'"
    ):
        gdnsq_weight(w, params, GDNSQWeightConfig())
    # The forward does not depend on the key or the rule.
    np.testing.assert_array_equal(
        gdnsq_weight(w, params, GDNSQWeightConfig(), key=jax.random.key(0)),
        gdnsq_weight(w, params, _wcfg()),
    )


def _data(seed: int, shape=SHAPE, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _axes(granularity: str, axis: int, ndim: int) -> tuple[int, ...]:
    if granularity == "tensor":
        return tuple(range(ndim))
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _log_steps(config: GDNSQWeightConfig, seed: int) -> dict[str, jax.Array]:
    shape = gdnsq_weight_init(np.zeros(SHAPE, np.float32), config)["log_step"].shape
    rng = np.random.default_rng(seed)
    return {"log_step": jnp.asarray(rng.integers(-4, 1, shape).astype(np.float32))}


def _per_element_dlog(fn, x, params, name):
    """∂x̂_i/∂params[name] for every element i (one one-hot cotangent per element)."""
    out, vjp = jax.vjp(lambda p: fn(x, p), params)
    eye = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
    rows = jax.jit(jax.vmap(lambda c: vjp(c)[0][name]))(eye)
    return np.asarray(rows).reshape((out.size, -1)).sum(axis=1).reshape(out.shape)


# --------------------------------------------------------------------------------------------
# Weights: forward.


@given(layout=st.sampled_from(WEIGHT_LAYOUTS), seed=st.integers(0, 2**16))
def test_weight_forward_grid_error_idempotence(layout, seed):
    config = _wcfg(granularity=layout[0], axis=layout[1])
    w = _data(seed)
    params = _log_steps(config, seed)
    s = np.exp2(np.asarray(params["log_step"], np.float64))
    z = w.min(axis=_axes(*layout, 2), keepdims=True).astype(np.float64)
    out = np.asarray(gdnsq_weight(w, params, config))
    k = (out - z) / s
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert np.round(k).min() == 0  # the minimum sits on the grid's origin
    assert np.all(np.abs(out - w) <= s / 2 + 1e-6)  # no clip: error ≤ s/2 everywhere
    np.testing.assert_allclose(out, s * np.round((w - z) / s) + z, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gdnsq_weight(out, params, config)), out, atol=1e-6)
    codes = np.asarray(gdnsq_weight_codes(w, params, config))
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, np.round(k))


def test_weight_golden_per_channel():
    w = jnp.array([[0.1, -1.0], [0.9, 0.0], [1.3, 2.0]])
    params = {"log_step": jnp.array([[-1.0, 0.0]])}  # s = 0.5 and 1
    out = gdnsq_weight(w, params, _wcfg())
    # channel 0: z = 0.1, v = 0, 1.6, 2.4 -> 0, 2, 2; channel 1: z = -1, v = 0, 1, 3.
    np.testing.assert_allclose(np.asarray(out), [[0.1, -1.0], [1.1, 0.0], [1.1, 2.0]], atol=1e-7)
    bits = gdnsq_weight_bits(w, params, _wcfg())
    np.testing.assert_allclose(
        np.asarray(bits), [[math.log2(1.2 + 0.5) + 1, math.log2(3.0 + 1.0)]], rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Weights: gradients.


@pytest.mark.parametrize("backward", ["ste", "lsq"])
@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
def test_weight_gradients_equal_the_formulas(backward, layout):
    config = _wcfg(granularity=layout[0], axis=layout[1], backward=backward)
    for seed in range(3):
        w = _data(seed)
        params = _log_steps(config, seed)
        cot = _data(seed + 10)
        _, vjp = jax.vjp(lambda w, p: gdnsq_weight(w, p, config), jnp.asarray(w), params)
        dw, dp = vjp(jnp.asarray(cot))
        np.testing.assert_array_equal(np.asarray(dw), cot)  # ∂ŵ/∂w = 1
        s = np.exp2(np.asarray(params["log_step"], np.float64))
        z = w.min(axis=_axes(*layout, 2), keepdims=True).astype(np.float64)
        v = (w - z) / s
        n = np.round(v) - v
        rho = 0.0 if backward == "ste" else n
        want = LN2 * s * np.sum(cot * (n + s * rho), axis=_axes(*layout, 2), keepdims=True)
        np.testing.assert_allclose(np.asarray(dp["log_step"]), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("noise", ["threefry", "hash"])
def test_weight_noise_rule_per_element_factor(noise):
    config = _wcfg(backward="noise", noise=noise)
    w = jnp.asarray(_data(1))
    params = {"log_step": jnp.array([[-1.0, -2.0, 0.0, -3.0]])}
    key = jax.random.key(3)
    fn = lambda w, p: gdnsq_weight(w, p, config, key=key)  # noqa: E731
    per = _per_element_dlog(fn, w, params, "log_step")  # ln2·s·(n + s·ρ) per element
    s = np.exp2(np.asarray(params["log_step"], np.float64))
    wn = np.asarray(w, np.float64)
    v = (wn - wn.min(axis=0, keepdims=True)) / s
    n = np.round(v) - v
    rho = (per / (LN2 * s) - n) / s
    np.testing.assert_allclose(np.abs(rho), NOISE, rtol=1e-4)
    # Gradient to w is still exactly the cotangent.
    g = jax.grad(lambda w: jnp.sum(fn(w, params) * jnp.arange(24.0).reshape(SHAPE)))(w)
    np.testing.assert_array_equal(np.asarray(g), np.arange(24.0).reshape(SHAPE))


@pytest.mark.parametrize("noise", ["threefry", "hash"])
def test_weight_noise_scale_gradient_has_the_stated_distribution(noise):
    # One weight per channel: n = 0, so dℓ_c = ln2·s²·g·ρ_c exposes ρ_c directly.
    config = _wcfg(backward="noise", axis=-1, noise=noise)
    count = 8192
    w = jnp.asarray(_data(0, shape=(1, count)))
    params = {"log_step": jnp.full((1, count), -1.0)}
    grad = jax.jit(jax.grad(lambda p, k: jnp.sum(gdnsq_weight(w, p, config, key=k))))(
        params, jax.random.key(42)
    )["log_step"]
    rho = np.asarray(grad, np.float64) / (LN2 * 0.25)
    np.testing.assert_allclose(np.abs(rho), NOISE, rtol=1e-5)  # only the values ±½/√3
    share = np.mean(rho > 0)
    assert abs(share - 0.5) < 4 * 0.5 / math.sqrt(count)  # each with frequency ≈ ½
    again = jax.grad(lambda p: jnp.sum(gdnsq_weight(w, p, config, key=jax.random.key(42))))(params)
    np.testing.assert_array_equal(np.asarray(again["log_step"]), np.asarray(grad))
    other = jax.grad(lambda p: jnp.sum(gdnsq_weight(w, p, config, key=jax.random.key(7))))(params)
    assert not np.array_equal(np.asarray(other["log_step"]), np.asarray(grad))


def test_noise_rule_needs_a_key():
    w = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"key=None.*allowed"):
        gdnsq_weight(w, gdnsq_weight_init(w, _wcfg()), _wcfg(backward="noise"))
    config = _acfg(backward="noise")
    with pytest.raises(ValueError, match=r"key=None.*allowed"):
        gdnsq_act(w, gdnsq_act_init(None, config), config)


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
def test_weight_bits_formula_and_smooth_gradients(layout):
    config = _wcfg(granularity=layout[0], axis=layout[1])
    w = _data(5)
    params = _log_steps(config, 5)
    axes = _axes(*layout, 2)
    ell = np.asarray(params["log_step"], np.float64)
    want = np.log2(w.max(axis=axes, keepdims=True) - w.min(axis=axes, keepdims=True) + 2**ell) - ell
    np.testing.assert_allclose(np.asarray(gdnsq_weight_bits(w, params, config)), want, rtol=1e-5)
    if layout != WEIGHT_LAYOUTS[0]:
        return  # check_grads once (it compiles many times); the formula above covers all layouts
    check_grads(
        lambda w, ell: gdnsq_weight_bits(w, {"log_step": ell}, config),
        (jnp.asarray(w), params["log_step"]),
        order=1,
        modes=("rev",),
        eps=1e-3,
        atol=1e-2,
        rtol=1e-2,
    )


def test_weight_init():
    p = gdnsq_weight_init(jnp.zeros((3, 5)), _wcfg())
    assert p["log_step"].shape == (1, 5) and p["log_step"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p["log_step"]), -12.0)
    # At init (s = 2^-12) the bit-width of a unit-range channel is log2(1 + s) + 12 ≈ 12.
    bits = gdnsq_weight_bits(
        jnp.array([[0.0], [1.0]]),
        gdnsq_weight_init(jnp.zeros((2, 1)), _wcfg()),
        _wcfg(),
    )
    np.testing.assert_allclose(np.asarray(bits), [[12.0 + math.log2(1 + 2**-12)]], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Activations.


def _act_params(log_step, log_range, lower):
    return {
        "log_step": jnp.asarray(log_step, jnp.float32),
        "log_range": jnp.asarray(log_range, jnp.float32),
        "lower": jnp.asarray(lower, jnp.float32),
    }


@given(
    signed=st.booleans(),
    log_step=st.integers(-4, 0),
    bits=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_act_forward_grid_range_idempotence(signed, log_step, bits, seed):
    config = _acfg(signed=signed)
    lower = -(2.0 ** (log_step + bits - 1)) if signed else 0.0
    params = _act_params(log_step, log_step + bits, lower)
    x = _data(seed, scale=2.0 ** (log_step + bits - 1))
    out = np.asarray(gdnsq_act(x, params, config))
    s, hi = 2.0**log_step, lower + 2.0 ** (log_step + bits) - 2.0**log_step
    assert out.min() >= lower and out.max() <= hi
    k = (out - lower) / s
    np.testing.assert_allclose(k, np.round(k), atol=1e-5)
    ref = s * np.round((np.clip(x.astype(np.float64), lower, hi) - lower) / s) + lower
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(gdnsq_act(out, params, config)), out)
    codes = np.asarray(gdnsq_act_codes(x, params))
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert int(gdnsq_used_bits(codes)) <= bits  # b_a = ℓ_q − ℓ_s bounds the used width
    assert float(gdnsq_act_bits(params)) == bits


def test_act_golden():
    p = _act_params(-1.0, 1.0, 0.0)  # s = 0.5, range [0, 1.5]
    out = gdnsq_act(jnp.array([-1.0, 0.25, 0.3, 0.8, 1.5, 5.0]), p, _acfg())
    np.testing.assert_allclose(np.asarray(out), [0.0, 0.0, 0.5, 1.0, 1.5, 1.5])  # 0.5 ties to 0


@pytest.mark.parametrize("backward", ["ste", "lsq"])
@pytest.mark.parametrize("signed", [False, True])
def test_act_gradients_equal_the_formulas(backward, signed):
    config = _acfg(signed=signed, backward=backward)
    params = _act_params(-2.0, 1.0, -1.0 if signed else 0.0)  # s = 1/4, Q = 2
    x = _data(3, scale=1.5)
    lo = float(params["lower"])
    hi = lo + 2.0 - 0.25
    x[0, :2] = [lo, hi]  # exactly on the bounds: inside
    cot = _data(4)
    _, vjp = jax.vjp(lambda x, p: gdnsq_act(x, p, config), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(cot))
    xn = x.astype(np.float64)
    below, above = xn < lo, xn > hi
    np.testing.assert_array_equal(np.asarray(dx), np.where(below | above, 0.0, cot))
    v = (np.clip(xn, lo, hi) - lo) / 0.25
    n = np.round(v) - v
    rho = 0.0 if backward == "ste" else n
    np.testing.assert_allclose(
        float(dp["log_step"]), LN2 * 0.25 * np.sum(cot * (n + 0.25 * rho - above)), rtol=1e-5
    )
    np.testing.assert_allclose(float(dp["log_range"]), LN2 * 2.0 * np.sum(cot * above), rtol=1e-5)
    want_lower = np.sum(cot * (below | above)) if signed else 0.0
    np.testing.assert_allclose(float(dp["lower"]), want_lower, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", ["threefry", "hash"])
def test_act_noise_rule_per_element_factor(noise):
    config = _acfg(backward="noise", noise=noise)
    params = _act_params(-2.0, 1.0, 0.0)
    x = jnp.asarray(_data(8, shape=(5, 7)))
    key = jax.random.key(11)
    per = _per_element_dlog(lambda x, p: gdnsq_act(x, p, config, key=key), x, params, "log_step")
    xn = np.asarray(x, np.float64)
    hi = 2.0 - 0.25
    v = np.clip(xn, 0, hi) / 0.25
    n = np.round(v) - v
    rho = ((per / (LN2 * 0.25)) + (xn > hi) - n) / 0.25
    np.testing.assert_allclose(np.abs(rho), NOISE, rtol=1e-4)
    assert 0 < np.mean(rho > 0) < 1


def test_act_init():
    x = jnp.array([-3.0, 0.5, 5.0])
    p = gdnsq_act_init(x, _acfg())
    assert all(v.shape == () and v.dtype == jnp.float32 for v in p.values())
    assert (float(p["log_step"]), float(p["log_range"]), float(p["lower"])) == (-10, 10, 0)
    assert float(gdnsq_act_init(None, _acfg(signed=True))["lower"]) == -512.0
    p = gdnsq_act_init(x, _acfg(signed=True, init_log_range=None))
    hi = float(p["lower"]) + 2.0 ** float(p["log_range"]) - 2.0 ** float(p["log_step"])
    assert float(p["lower"]) == -3.0 and hi == pytest.approx(5.0, abs=1e-4)
    p = gdnsq_act_init(x, _acfg(init_log_range=None))
    assert float(p["lower"]) == 0.0
    assert float(p["log_range"]) == pytest.approx(math.log2(5.0 + 2**-10), rel=1e-6)
    with pytest.raises(ValueError, match=r"x=None.*allowed"):
        gdnsq_act_init(None, _acfg(init_log_range=None))
    g = jax.grad(lambda p: gdnsq_act_bits(p))(p)
    assert (float(g["log_range"]), float(g["log_step"])) == (1.0, -1.0)


# --------------------------------------------------------------------------------------------
# Used bit-width.


def test_used_bits_golden():
    codes = jnp.array([[0, 0, 0, 3], [1, 1, 1, 3], [2, 0, 1, 3], [5, 7, 2, 3]])
    # per column (axis=-1): distinct counts 4, 3, 3, 1 -> 2, 2, 2, 0
    np.testing.assert_array_equal(np.asarray(gdnsq_used_bits(codes, axis=-1)), [2, 2, 2, 0])
    # per row (axis=0): 2, 2, 4, 4 -> 1, 1, 2, 2
    np.testing.assert_array_equal(np.asarray(gdnsq_used_bits(codes, axis=0)), [1, 1, 2, 2])
    assert int(gdnsq_used_bits(codes)) == 3  # {0, 1, 2, 3, 5, 7}: 6 levels
    assert int(gdnsq_used_bits(jnp.arange(8.0))) == 3 and int(gdnsq_used_bits(jnp.arange(9))) == 4
    assert int(jax.jit(gdnsq_used_bits)(jnp.zeros(5))) == 0


def test_used_bits_of_weight_codes_meet_the_continuous_width():
    config = _wcfg()
    w = _data(2, shape=(64, 3))
    params = {"log_step": jnp.array([[-1.0, -2.0, -3.0]])}
    used = np.asarray(gdnsq_used_bits(gdnsq_weight_codes(w, params, config), axis=-1))
    cont = np.asarray(gdnsq_weight_bits(w, params, config))[0]
    # max code = round(range/s) ≤ range/s + ½ ⇒ levels ≤ range/s + 1 ≤ 2^b_c + ½.
    assert np.all(used <= np.ceil(cont + 1e-6)) and np.all(used >= 1)


def test_used_bits_bad_axis():
    with pytest.raises(ValueError, match=r"axis=2.*allowed"):
        gdnsq_used_bits(jnp.zeros((2, 2)), axis=2)


# --------------------------------------------------------------------------------------------
# Transformations and bad input.


@pytest.mark.parametrize("backward", ["ste", "noise", "lsq"])
def test_jit_vmap_grad(backward):
    wconfig = _wcfg(backward=backward)
    aconfig = _acfg(signed=True, backward=backward)
    ws = jnp.asarray(np.stack([_data(i) for i in range(3)]))
    wparams = {"log_step": jnp.full((3, 1, 4), -2.0)}
    aparams = jax.tree.map(lambda a: jnp.stack([a] * 3), _act_params(-3.0, 1.0, -1.0))
    keys = jax.random.split(jax.random.key(0), 3)

    def loss(w, wp, ap, key):
        k1, k2 = jax.random.split(key)
        h = gdnsq_act(w, ap, aconfig, key=k2)
        return jnp.sum(gdnsq_weight(w, wp, wconfig, key=k1) * h) + jnp.sum(
            gdnsq_weight_bits(w, wp, wconfig)
        )

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(ws, wparams, aparams, keys)
    for i in range(3):
        take = functools.partial(jax.tree.map, lambda a, i=i: a[i])
        want = jax.grad(loss, argnums=(0, 1, 2))(ws[i], take(wparams), take(aparams), keys[i])
        for got, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (GDNSQWeightConfig, dict(granularity="group"), "granularity"),
        (GDNSQWeightConfig, dict(axis="0"), "axis"),
        (GDNSQWeightConfig, dict(backward="ewgs"), "backward"),
        (GDNSQWeightConfig, dict(init_log_step=float("nan")), "init_log_step"),
        (GDNSQActConfig, dict(signed=1), "signed"),
        (GDNSQActConfig, dict(backward="STE"), "backward"),
        (GDNSQActConfig, dict(init_log_step="x"), "init_log_step"),
        (GDNSQActConfig, dict(init_log_range=True), "init_log_range"),
    ],
)
def test_bad_configs_raise(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        cls(**kwargs)


def test_bad_params_raise():
    w = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"needs shape \(1, 4\)"):
        gdnsq_weight(w, {"log_step": jnp.zeros((6, 1))}, _wcfg())
    with pytest.raises(ValueError, match=r"needs shape \(1, 4\)"):
        jax.jit(lambda w, p: gdnsq_weight(w, p, _wcfg())).lower(w, {"log_step": jnp.zeros((4,))})
    with pytest.raises(ValueError, match="log_step"):
        gdnsq_weight(w, {"scale": jnp.zeros((1, 4))}, _wcfg())
    with pytest.raises(ValueError, match=r"needs shape \(\)"):
        gdnsq_act(w, {"log_step": jnp.zeros(1), "log_range": 1.0, "lower": 0.0}, _acfg())
    with pytest.raises(ValueError, match="lower"):
        gdnsq_act(w, {"log_step": 0.0, "log_range": 1.0}, _acfg())
    with pytest.raises(ValueError, match=r"axis=2"):
        gdnsq_weight(w, {"log_step": jnp.zeros((1, 4))}, _wcfg(axis=2))


def test_min_bits_floor_keeps_two_levels_and_leaves_the_penalty_unfloored():
    w = jax.random.normal(jax.random.key(3), (16, 4))
    cfg = _wcfg(min_bits=1.0)
    huge = {"log_step": jnp.full((1, 4), 10.0)}  # a step far wider than any channel
    out = np.asarray(gdnsq_weight(w, huge, cfg))
    for c in range(4):
        assert len(np.unique(out[:, c])) == 2  # min and max of the channel, not one constant
    assert len(np.unique(np.asarray(gdnsq_weight(w, huge, _wcfg()))[:, 0])) == 1
    codes = np.asarray(gdnsq_weight_codes(w, huge, cfg))
    assert codes.min() == 0 and codes.max() == 1
    # floored: the task gradient does not reach ℓ; the bit-width (the penalty's) is unfloored
    g = jax.grad(lambda p: jnp.sum(gdnsq_weight(w, p, cfg) ** 2))(huge)
    assert not np.any(np.asarray(g["log_step"]))
    assert np.all(np.asarray(gdnsq_weight_bits(w, huge, cfg)) < 1.0)

    acfg = _acfg(min_bits=1.0)
    p = {"log_step": jnp.asarray(0.0), "log_range": jnp.asarray(-3.0), "lower": jnp.asarray(0.0)}
    x = jnp.linspace(0.0, 3.0, 31)
    assert set(np.asarray(gdnsq_act(x, p, acfg)).tolist()) == {0.0, 1.0}  # 2 levels, step 1
    assert set(np.asarray(gdnsq_act_codes(x, p, acfg)).tolist()) == {0, 1}
    assert float(gdnsq_act_bits(p)) == -3.0  # what the penalty sees


@pytest.mark.parametrize("value", [0.0, 9.0, "1"])
def test_min_bits_is_checked(value):
    with pytest.raises(ValueError, match="min_bits="):
        _wcfg(min_bits=value)


# --------------------------------------------------------------------------------------------
# Edge values: 2^ℓ is exact at integer ℓ (XLA:CPU's jnp.exp2(13.0) is 8192.0005, which rounded
# ties and clipped bounds the wrong way), and its gradient stays ln2·2^ℓ.

_INTEGER_LOGS = (-15.0, -13.0, 13.0, 15.0)


@pytest.mark.parametrize("log_step", _INTEGER_LOGS)
def test_weight_grid_points_and_ties_are_exact_at_integer_log_step(log_step):
    s = 2.0**log_step
    w = jnp.asarray(np.array([[0.0], [1.5], [2.5], [3.0], [-0.5]]) * s, jnp.float32)
    params = {"log_step": jnp.full((1, 1), log_step, jnp.float32)}
    config = _wcfg(granularity="tensor")
    z = -0.5  # min w, in steps: the codes count from it
    # (w − z)/s = 0.5, 2, 3, 3.5, 0: the ties 0.5 and 3.5 round to even (0 and 4).
    want_codes = np.array([[0.0], [2.0], [3.0], [4.0], [0.0]])
    for f in (gdnsq_weight, jax.jit(gdnsq_weight, static_argnums=2)):
        np.testing.assert_array_equal(np.asarray(f(w, params, config)), (want_codes + z) * s)
    np.testing.assert_array_equal(np.asarray(gdnsq_weight_codes(w, params, config)), want_codes)


@pytest.mark.parametrize("log_step", (-13.0, 13.0))
def test_act_bound_and_ties_are_exact_at_integer_logs(log_step):
    s = 2.0**log_step
    params = {
        "log_step": jnp.asarray(log_step, jnp.float32),
        "log_range": jnp.asarray(log_step + 3.0, jnp.float32),  # 8 levels
        "lower": jnp.asarray(0.0, jnp.float32),
    }
    hi = 7 * s
    x = jnp.asarray([hi, 1.5 * s, 2.5 * s, 0.0], jnp.float32)
    config = _acfg()
    for f in (gdnsq_act, jax.jit(gdnsq_act, static_argnums=2)):
        np.testing.assert_array_equal(np.asarray(f(x, params, config)), [hi, 2 * s, 2 * s, 0.0])
    np.testing.assert_array_equal(np.asarray(gdnsq_act_codes(x, params)), [7, 2, 2, 0])
    # x = hi is inside the clip (bounds included): it passes its gradient.
    dx = jax.jit(jax.grad(lambda x_: jnp.sum(gdnsq_act(x_, params, config))))(x)
    np.testing.assert_array_equal(np.asarray(dx), [1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("log_step", (13.0, -2.6))
def test_weight_log_step_gradient_matches_the_formula(log_step):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 1)) * 2.0**log_step * 5, jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).normal(size=(8, 1)), jnp.float32)
    params = {"log_step": jnp.full((1, 1), log_step, jnp.float32)}
    config = _wcfg(granularity="tensor")
    got = jax.grad(lambda p: jnp.sum(gdnsq_weight(w, {"log_step": p}, config) * g))(
        params["log_step"]
    )
    s = np.float64(2.0**log_step)
    v = (np.asarray(w, np.float64) - np.min(np.asarray(w, np.float64))) / s
    want = math.log(2.0) * s * np.sum(np.asarray(g, np.float64) * (np.round(v) - v))
    np.testing.assert_allclose(float(got[0, 0]), want, rtol=2e-4, atol=1e-6 * s)


def test_weight_bits_gradient_in_log_step_is_smooth_and_exact_at_integers():
    w = jnp.asarray([[0.0], [3.0]], jnp.float32)
    config = _wcfg(granularity="tensor")
    bits = lambda ell: gdnsq_weight_bits(w, {"log_step": ell}, config)  # noqa: E731
    check_grads(bits, (jnp.full((1, 1), -0.4, jnp.float32),), order=1, modes=["fwd", "rev"])
    # d/dℓ [log2(3 + 2^ℓ) − ℓ] = 2^ℓ/(3 + 2^ℓ) − 1; at ℓ = 0: −3/4.
    got = jax.grad(lambda ell: jnp.sum(bits(ell)))(jnp.zeros((1, 1), jnp.float32))
    np.testing.assert_allclose(float(got[0, 0]), -0.75, rtol=1e-6)


def test_hash_noise_differs_from_threefry_and_is_checked():
    """``noise="hash"``: other draws than threefry for one key (so the default stays threefry:
    earlier runs reproduce), the same draws for the same key, and a bad name is refused."""
    count = 4096
    w = jnp.asarray(_data(0, shape=(1, count)))
    params = {"log_step": jnp.full((1, count), -1.0)}

    def rho(noise):
        config = _wcfg(backward="noise", axis=-1, noise=noise)
        f = lambda p: jnp.sum(gdnsq_weight(w, p, config, key=jax.random.key(5)))  # noqa: E731
        return np.asarray(jax.grad(f)(params)["log_step"])

    assert not np.array_equal(rho("hash"), rho("threefry"))
    np.testing.assert_array_equal(rho("hash"), rho("hash"))
    with pytest.raises(ValueError, match=r"noise='philox' is not allowed; allowed"):
        _wcfg(noise="philox")
    with pytest.raises(ValueError, match=r"noise='philox' is not allowed; allowed"):
        _acfg(noise="philox")
    assert _wcfg().noise == _acfg().noise == "threefry"
