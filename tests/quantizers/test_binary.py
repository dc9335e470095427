"""Tests of the binary sign and ternary quantizers (qflax/quantizers/_binary.py, METHODS.md §9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.quantizers._binary import (
    BinaryConfig,
    TernaryConfig,
    binary,
    binary_codes,
    binary_init,
    binary_scale,
    ternary,
    ternary_codes,
    ternary_init,
    ternary_scale,
)

SHAPE = (3, 4)
GRADIENTS = ["ste", "clipped_ste", "true"]
# (scaling, axis) on a (3, 4) tensor.
SCALINGS = [("none", -1), ("tensor", -1), ("channel", 0), ("channel", -1)]


def _data(seed: int, spread: float = 1.5) -> np.ndarray:
    """Uniform on [-spread, spread], with an exact 0, ±1 and a value just outside 1 planted."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-spread, spread, SHAPE).astype(np.float32)
    idx = rng.permutation(x.size)[:4]
    x.flat[idx] = [0.0, 1.0, -1.0, np.nextafter(np.float32(1), np.float32(2))]
    return x


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed)


def _mean_abs(x: np.ndarray, scaling: str, axis: int) -> np.ndarray:
    """sg(mean|x|) per tensor or per channel, computed here in float64, broadcast to x."""
    a = np.abs(x.astype(np.float64))
    if scaling == "none":
        return np.ones_like(a)
    if scaling == "tensor":
        return np.broadcast_to(a.mean(), a.shape)
    ax = axis % x.ndim
    other = tuple(i for i in range(x.ndim) if i != ax)
    return np.broadcast_to(a.mean(axis=other, keepdims=True), a.shape)


def _mask(x: np.ndarray, gradient: str) -> np.ndarray:
    if gradient == "ste":
        return np.ones(x.shape)
    if gradient == "clipped_ste":
        return (np.abs(x.astype(np.float64)) <= 1.0).astype(np.float64)
    return np.zeros(x.shape)


# ----------------------------------------------------------------------------------------------
# Binary: values.


@st.composite
def binary_configs(draw, **overrides):
    """Any valid config over scaling × gradient × stochastic."""
    scaling, axis = draw(st.sampled_from(SCALINGS))
    kwargs = dict(
        stochastic=draw(st.booleans()),
        scaling=scaling,
        axis=axis,
        gradient=draw(st.sampled_from(GRADIENTS)),
    )
    kwargs.update(overrides)
    return BinaryConfig(**kwargs)


@given(config=binary_configs(), seed=st.integers(0, 2**16))
def test_binary_values_on_levels(config, seed):
    x = _data(seed)
    y = binary(jnp.asarray(x), {}, config, key=_key(seed))
    assert y.dtype == jnp.float32 and y.shape == x.shape
    alpha = _mean_abs(x, config.scaling, config.axis)
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.abs(y), alpha, rtol=1e-6)
    sign = np.sign(y)
    if not config.stochastic:
        np.testing.assert_array_equal(sign, np.where(x >= 0, 1.0, -1.0))  # sign(0) = +1
    else:  # probabilities 0 and 1 outside [-1, 1]
        assert np.all(sign[x >= 1] == 1) and np.all(sign[x <= -1] == -1)
    codes = binary_codes(jnp.asarray(x), {}, config, key=_key(seed))
    assert codes.dtype == jnp.int32
    np.testing.assert_array_equal(codes, (sign > 0).astype(np.int32))
    scale = binary_scale(jnp.asarray(x), config)
    np.testing.assert_array_equal(
        y, np.asarray(scale, np.float64) * (2.0 * np.asarray(codes) - 1.0)
    )


@given(config=binary_configs(scaling="none", axis=-1), seed=st.integers(0, 2**16))
def test_binary_idempotent_without_scaling(config, seed):
    once = binary(jnp.asarray(_data(seed)), {}, config, key=_key(seed))
    twice = binary(once, {}, config, key=_key(seed + 1))
    np.testing.assert_array_equal(twice, once)


def test_binary_golden():
    x = jnp.array([[0.5, -0.0, -2.0, 0.25], [-1.0, 3.0, 0.0, -0.25]])
    np.testing.assert_array_equal(binary(x, {}, BinaryConfig()), [[1, 1, -1, 1], [-1, 1, 1, -1]])
    # mean|x| = 7/8 = 0.875 per tensor; per row (axis 0) 0.6875 and 1.0625.
    np.testing.assert_array_equal(
        binary(x, {}, BinaryConfig(scaling="tensor")),
        0.875 * np.array([[1, 1, -1, 1], [-1, 1, 1, -1]]),
    )
    np.testing.assert_array_equal(
        binary(x, {}, BinaryConfig(scaling="channel", axis=0)),
        [[0.6875, 0.6875, -0.6875, 0.6875], [-1.0625, 1.0625, 1.0625, -1.0625]],
    )
    # Per column (axis -1): mean|x| = 0.75, 1.5, 1.0, 0.25.
    np.testing.assert_array_equal(
        binary(x, {}, BinaryConfig(scaling="channel", axis=-1)),
        [[0.75, 1.5, -1.0, 0.25], [-0.75, 1.5, 1.0, -0.25]],
    )
    np.testing.assert_array_equal(binary_codes(x, {}, BinaryConfig()), [[1, 1, 0, 1], [0, 1, 1, 0]])


def test_binary_nan_and_dtype():
    x = jnp.array([np.nan, -0.5, 0.5], jnp.bfloat16)
    y = binary(x, {}, BinaryConfig(scaling="tensor"))
    assert y.dtype == jnp.bfloat16 and np.isnan(float(y[0]))
    y = binary(x, {}, BinaryConfig(stochastic=True), key=_key(0))
    assert y.dtype == jnp.bfloat16 and np.isnan(float(y[0]))


@pytest.mark.parametrize("noise", ["threefry", "hash"])
def test_stochastic_binary_is_unbiased(noise):
    # Mean over 40_000 keys: the standard error is sqrt((1 - p^2)/n) <= 0.005; tolerance 0.03
    # is 6 standard errors (the key is fixed, so the test is deterministic).
    x = jnp.array([-1.7, -1.0, -0.6, -0.1, 0.0, 0.3, 0.8, 1.0, 2.5], jnp.float32)
    keys = jax.random.split(jax.random.key(1234), 40_000)
    config = BinaryConfig(stochastic=True, noise=noise)
    draws = jax.jit(jax.vmap(lambda k: binary(x, {}, config, key=k)))(keys)
    assert set(np.unique(np.asarray(draws)).tolist()) <= {-1.0, 1.0}
    mean = np.asarray(draws, np.float64).mean(axis=0)
    np.testing.assert_allclose(mean, np.clip(np.asarray(x, np.float64), -1, 1), atol=0.03)
    # Outside [-1, 1] the draw is certain.
    np.testing.assert_array_equal(mean[[0, 1, 7, 8]], [-1, -1, 1, 1])


@pytest.mark.parametrize("noise", ["threefry", "hash"])
def test_stochastic_binary_needs_a_key_and_uses_it(noise):
    config = BinaryConfig(stochastic=True, noise=noise)
    x = jnp.asarray(_data(0, spread=0.9))
    with pytest.raises(ValueError, match="key=None"):
        binary(x, {}, config)
    with pytest.raises(ValueError, match="key=None"):
        binary_codes(x, {}, config)
    a = binary(x, {}, config, key=_key(1))
    np.testing.assert_array_equal(a, binary(x, {}, config, key=_key(1)))
    assert not np.array_equal(a, binary(x, {}, config, key=_key(2)))
    # Raw uint32 keys work too; deterministic mode ignores a key.
    binary(x, {}, config, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(
        binary(x, {}, BinaryConfig(), key=_key(5)), binary(x, {}, BinaryConfig())
    )
    other = BinaryConfig(stochastic=True, noise="threefry" if noise == "hash" else "hash")
    assert not np.array_equal(a, binary(x, {}, other, key=_key(1)))  # other draws per key
    with pytest.raises(ValueError, match=r"noise='philox' is not allowed; allowed"):
        BinaryConfig(noise="philox")


# ----------------------------------------------------------------------------------------------
# Binary: gradients.


@given(config=binary_configs(), seed=st.integers(0, 2**16))
def test_binary_gradient_matches_formula(config, seed):
    x = _data(seed)
    w = np.random.default_rng(seed + 1).standard_normal(SHAPE).astype(np.float32)
    dx = jax.grad(lambda x: jnp.sum(binary(x, {}, config, key=_key(seed)) * w))(jnp.asarray(x))
    # d/dx [sg(alpha)·b(x)] = alpha·mask(x)·w, the mask computed from the BNN rule.
    expected = _mean_abs(x, config.scaling, config.axis) * _mask(x, config.gradient) * w
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=0)


def test_binary_clipped_ste_bounds():
    above, below = np.nextafter(np.float32(1), np.float32(2)), np.nextafter(np.float32(1), 0)
    x = np.array([1, -1, above, -above, below], np.float32)
    dx = jax.grad(lambda x: binary(x, {}, BinaryConfig()).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(dx, [1, 1, 0, 0, 1])


# ----------------------------------------------------------------------------------------------
# Ternary.


@st.composite
def ternary_configs(draw, **overrides):
    """Any valid config over threshold × scaling × gradient."""
    scaling, axis = draw(st.sampled_from(SCALINGS))
    kwargs = dict(
        threshold=draw(st.floats(0.05, 1.5)),
        scaling=scaling,
        axis=axis,
        gradient=draw(st.sampled_from(GRADIENTS)),
    )
    for name, value in overrides.items():
        kwargs[name] = draw(value) if isinstance(value, st.SearchStrategy) else value
    return TernaryConfig(**kwargs)


def _ternary_reference(x: np.ndarray, config: TernaryConfig):
    """(t, alpha, ambiguous): TWN in float64; `ambiguous` marks |x| within 1e-5 of Δ."""
    scaling = "tensor" if config.scaling == "none" else config.scaling
    a = np.abs(x.astype(np.float64))
    delta = config.threshold * _mean_abs(x, scaling, config.axis)
    t = np.sign(x) * (a > delta)
    ambiguous = np.abs(a - delta) <= 1e-5 * delta
    if config.scaling == "none":
        return t, np.ones_like(a), ambiguous
    kept = (a > delta).astype(np.float64)
    if config.scaling == "tensor":
        axes = tuple(range(x.ndim))
    else:
        axes = tuple(i for i in range(x.ndim) if i != config.axis % x.ndim)
    total = (a * kept).sum(axis=axes, keepdims=True)
    count = kept.sum(axis=axes, keepdims=True)
    alpha = np.broadcast_to(total / np.maximum(count, 1), a.shape)
    return t, alpha, ambiguous


@given(config=ternary_configs(), seed=st.integers(0, 2**16))
def test_ternary_matches_twn(config, seed):
    x = _data(seed)
    t_ref, alpha, ambiguous = _ternary_reference(x, config)
    codes = ternary_codes(jnp.asarray(x), {}, config)
    assert codes.dtype == jnp.int32
    assert set(np.unique(np.asarray(codes)).tolist()) <= {-1, 0, 1}
    clear = ~ambiguous
    np.testing.assert_array_equal(np.asarray(codes)[clear], t_ref[clear])
    y = ternary(jnp.asarray(x), {}, config)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    if not ambiguous.any():
        np.testing.assert_allclose(y, alpha * t_ref, rtol=1e-6, atol=0)
    scale = np.asarray(ternary_scale(jnp.asarray(x), config))
    np.testing.assert_array_equal(y, scale * np.asarray(codes, np.float32))


@given(
    config=ternary_configs(scaling="none", axis=-1, threshold=st.floats(0.05, 0.99)),
    seed=st.integers(0, 2**16),
)
def test_ternary_idempotent_without_scaling(config, seed):
    # t in {-1, 0, 1} has mean|t| <= 1, so Δ' = threshold·mean|t| < 1 keeps every ±1.
    once = ternary(jnp.asarray(_data(seed)), {}, config)
    np.testing.assert_array_equal(ternary(once, {}, config), once)


def test_ternary_golden():
    x = jnp.array([1.0, -0.2, 0.3, -2.0])
    # mean|x| = 0.875, Δ = 0.6125; kept |x| = 1, 2 -> α = 1.5.
    np.testing.assert_array_equal(ternary(x, {}, TernaryConfig()), [1.5, 0.0, 0.0, -1.5])
    np.testing.assert_array_equal(ternary_codes(x, {}, TernaryConfig()), [1, 0, 0, -1])
    np.testing.assert_array_equal(
        ternary(x, {}, TernaryConfig(scaling="none", threshold=0.25)), [1, 0, 1, -1]
    )
    # Strict inequality at the threshold: mean|x| = 1, Δ = 0.5 exactly.
    x = jnp.array([0.5, -0.5, 1.5, -1.5, 0.0, 2.0])
    np.testing.assert_array_equal(
        ternary_codes(x, {}, TernaryConfig(threshold=0.5)), [0, 0, 1, -1, 0, 1]
    )
    np.testing.assert_array_equal(  # α = mean(1.5, 1.5, 2) = 5/3
        ternary(x, {}, TernaryConfig(threshold=0.5)),
        np.float32(5 / 3) * np.array([0, 0, 1, -1, 0, 1], np.float32),
    )
    # Per channel (axis 0): row means 1.0 and 0.25 -> Δ = 0.7, 0.175; α = 1.5, 0.45.
    x = jnp.array([[1.0, -2.0, 0.5, 0.5], [0.4, -0.1, 0.0, -0.5]])
    config = TernaryConfig(scaling="channel", axis=0, threshold=0.7)
    np.testing.assert_allclose(
        ternary(x, {}, config), [[1.5, -1.5, 0, 0], [0.45, 0, 0, -0.45]], rtol=1e-7
    )


def test_ternary_all_zero_and_nan():
    y = ternary(jnp.zeros(SHAPE), {}, TernaryConfig())
    np.testing.assert_array_equal(y, np.zeros(SHAPE))
    np.testing.assert_array_equal(ternary_scale(jnp.zeros(SHAPE), TernaryConfig()), [[0.0]])
    y = ternary(jnp.array([np.nan, 1.0]), {}, TernaryConfig(scaling="none"))
    assert np.isnan(y[0])


@given(config=ternary_configs(), seed=st.integers(0, 2**16))
def test_ternary_gradient_matches_formula(config, seed):
    x = _data(seed)
    w = np.random.default_rng(seed + 1).standard_normal(SHAPE).astype(np.float32)
    dx = jax.grad(lambda x: jnp.sum(ternary(x, {}, config) * w))(jnp.asarray(x))
    _, alpha, ambiguous = _ternary_reference(x, config)
    if ambiguous.any():
        return  # α depends on which side of Δ an element falls; covered by the golden tests
    np.testing.assert_allclose(dx, alpha * _mask(x, config.gradient) * w, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# Both: transformations, params, bad input.


def test_jit_vmap_grad():
    xs = jnp.asarray(np.stack([_data(i) for i in range(4)]))
    keys = jax.random.split(jax.random.key(0), 4)
    bcfg = BinaryConfig(stochastic=True, scaling="channel", axis=-1)
    f = jax.jit(jax.vmap(lambda x, k: binary(x, binary_init(x, bcfg), bcfg, key=k)))
    out = f(xs, keys)
    for i in range(4):
        np.testing.assert_array_equal(out[i], binary(xs[i], {}, bcfg, key=keys[i]))
    g = jax.jit(jax.vmap(jax.grad(lambda x, k: binary(x, {}, bcfg, key=k).sum())))(xs, keys)
    for i in range(4):
        x = np.asarray(xs[i])
        expected = _mean_abs(x, "channel", -1) * _mask(x, "clipped_ste")
        np.testing.assert_allclose(g[i], expected, rtol=1e-6)
    tcfg = TernaryConfig(scaling="channel", axis=0)
    out = jax.jit(jax.vmap(lambda x: ternary(x, ternary_init(x, tcfg), tcfg)))(xs)
    for i in range(4):
        np.testing.assert_array_equal(out[i], ternary(xs[i], {}, tcfg))
    g = jax.jit(jax.grad(lambda x: ternary(x, {}, tcfg).sum()))(xs[0])
    np.testing.assert_allclose(g, np.asarray(ternary_scale(xs[0], tcfg)) * np.ones(SHAPE))


def test_params_must_be_empty():
    x = jnp.ones(SHAPE)
    assert binary_init(x, BinaryConfig()) == {} and ternary_init(x, TernaryConfig()) == {}
    with pytest.raises(ValueError, match="params=.*allowed"):
        binary(x, {"scale": jnp.ones(())}, BinaryConfig())
    with pytest.raises(ValueError, match="params=.*allowed"):
        ternary(x, {"scale": jnp.ones(())}, TernaryConfig())
    with pytest.raises(TypeError, match="floating"):
        binary(jnp.ones(SHAPE, jnp.int32), {}, BinaryConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(stochastic="yes"), "stochastic"),
        (dict(stochastic=1), "stochastic"),
        (dict(scaling="layer"), "scaling"),
        (dict(axis=0.5), "axis"),
        (dict(axis=True), "axis"),
        (dict(gradient="bnn"), "gradient"),
    ],
)
def test_bad_binary_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        BinaryConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=-0.7), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(threshold=float("inf")), "threshold"),
        (dict(threshold="0.7"), "threshold"),
        (dict(threshold=True), "threshold"),
        (dict(scaling="row"), "scaling"),
        (dict(axis="0"), "axis"),
        (dict(gradient="twn"), "gradient"),
    ],
)
def test_bad_ternary_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        TernaryConfig(**kwargs)


def test_axis_out_of_range_raises_at_trace_time():
    x = jnp.ones(SHAPE)
    bcfg = BinaryConfig(scaling="channel", axis=2)
    tcfg = TernaryConfig(scaling="channel", axis=-3)
    for fn in (
        lambda x: binary(x, {}, bcfg),
        lambda x: binary_init(x, bcfg),
        lambda x: binary_codes(x, {}, bcfg),
        lambda x: ternary(x, {}, tcfg),
        lambda x: ternary_codes(x, {}, tcfg),
        lambda x: ternary_init(x, tcfg),
    ):
        with pytest.raises(ValueError, match="axis=.* is out of range"):
            jax.jit(fn)(x)
    # The axis is only checked where it is used.
    binary(x, {}, BinaryConfig(scaling="tensor", axis=5))
