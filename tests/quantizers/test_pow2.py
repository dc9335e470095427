"""Tests of the power-of-two (logarithmic) quantizer (qflax/quantizers/_pow2.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.quantizers._pow2 import (
    PowerOfTwoConfig,
    pow2,
    pow2_codes,
    pow2_dequantize,
    pow2_init,
    pow2_levels,
)
from tests.quantizers._reference import reduce_axes as _reduce_axes
from tests.quantizers._reference import view as _view

SHAPE = (3, 4)
# (granularity, axis, group_size) on a (3, 4) tensor.
GRANULARITIES = [
    ("tensor", -1, None),
    ("channel", 0, None),
    ("channel", -1, None),
    ("group", -1, 2),
    ("group", 0, 3),
]
TINY = 2.0**-126  # float32's smallest normal; XLA:CPU flushes anything below it to zero


@st.composite
def configs(draw, **overrides):
    """Any valid config over bits 2..8 × zero × granularity × gradient."""
    granularity, axis, group_size = draw(st.sampled_from(GRANULARITIES))
    kwargs = dict(
        bits=draw(st.integers(2, 8)),
        zero=draw(st.booleans()),
        granularity=granularity,
        axis=axis,
        group_size=group_size,
        gradient=draw(st.sampled_from(["ste", "clipped_ste", "true"])),
    )
    kwargs.update(overrides)
    return PowerOfTwoConfig(**kwargs)


def _data(seed: int) -> np.ndarray:
    """Log-uniform magnitudes over 2^-24..2^6 with random signs, plus an exact zero."""
    rng = np.random.default_rng(seed)
    mag = np.exp2(rng.uniform(-24.0, 6.0, SHAPE))
    x = (np.where(rng.random(SHAPE) < 0.5, -mag, mag)).astype(np.float32)
    x.flat[rng.integers(x.size)] = 0.0
    return x


def _scale_view(x: np.ndarray, scale, config: PowerOfTwoConfig) -> np.ndarray:
    """The scale broadcast to the full shape of x (float64)."""
    s = np.broadcast_to(np.asarray(scale, np.float64), _view(x, config).shape)
    return s.reshape(x.shape)


def _reference(x: np.ndarray, scale, config: PowerOfTwoConfig) -> np.ndarray:
    """Slow reference: sign(x)·s·2**clip(round(log2(|x|/s)), -(K-1), 0) with the zero rule.

    Exact in float64 (|x|/s is exact for a power-of-two s, and no float32 lies on a log-domain
    tie). Outputs below float32's smallest normal are flushed to zero as XLA:CPU does.
    """
    x = np.asarray(x, np.float64)
    s = _scale_view(x, scale, config)
    k_count = 2 ** (config.bits - 1) - (1 if config.zero else 0)
    v = np.abs(x) / s
    with np.errstate(divide="ignore"):
        e = np.clip(np.round(np.log2(v)), -(k_count - 1), 0)
    out = np.where(x < 0, -1.0, 1.0) * s * 2.0**e
    if config.zero:
        out = np.where(v < 0.5 * 2.0 ** -(k_count - 1), 0.0, out)
    out = np.where(np.abs(out) < TINY, 0.0, out)
    return out.astype(np.float32)


def _random_pow2_scale(x: np.ndarray, config: PowerOfTwoConfig, seed: int) -> jax.Array:
    """A power-of-two scale per slice, 2^-4..2^4 times the init scale (so some elements clip)."""
    init = np.asarray(pow2_init(x, config)["scale"])
    rng = np.random.default_rng(seed)
    return jnp.asarray(init * np.exp2(rng.integers(-4, 5, init.shape)).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Values.


@given(config=configs(), seed=st.integers(0, 2**16), perturb=st.booleans())
def test_matches_slow_reference(config, seed, perturb):
    x = _data(seed)
    scale = _random_pow2_scale(x, config, seed) if perturb else pow2_init(x, config)["scale"]
    got = np.asarray(pow2(jnp.asarray(x), {"scale": scale}, config))
    np.testing.assert_array_equal(got, _reference(x, scale, config))


@given(config=configs(), seed=st.integers(0, 2**16))
def test_outputs_on_levels_and_in_range(config, seed):
    x = _data(seed)
    scale = _random_pow2_scale(x, config, seed)
    y = pow2(jnp.asarray(x), {"scale": scale}, config)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    y = np.asarray(y, np.float64)
    s = _scale_view(x, scale, config)
    assert np.all(np.abs(y) <= s)
    k_count = 2 ** (config.bits - 1) - (1 if config.zero else 0)
    nonzero = y != 0
    ratio = np.abs(y[nonzero]) / s[nonzero]
    k = -np.log2(ratio)
    np.testing.assert_array_equal(k, np.round(k))  # exact powers of two
    assert np.all((k >= 0) & (k <= k_count - 1))
    if not config.zero:  # zeros only where the smallest level underflows float32
        assert np.all(s[~nonzero] * 2.0 ** -(k_count - 1) < TINY)
    np.testing.assert_array_equal(np.sign(y[nonzero]), np.sign(x[nonzero]) + (x[nonzero] == 0))


@given(config=configs(), seed=st.integers(0, 2**16))
def test_idempotent(config, seed):
    x = jnp.asarray(_data(seed))
    params = {"scale": _random_pow2_scale(np.asarray(x), config, seed)}
    once = pow2(x, params, config)
    np.testing.assert_array_equal(pow2(once, params, config), once)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("zero", [True, False])
def test_exact_number_of_levels(bits, zero):
    config = PowerOfTwoConfig(bits=bits, zero=zero)
    s = 1024.0  # keeps every level of bits=8 inside float32's normal range
    k_count = 2 ** (bits - 1) - (1 if zero else 0)
    # A dense sweep in the log domain, both signs, from far below the smallest level to above s.
    # A fixed length (one compilation for every config): >= 14 points per octave.
    mags = np.exp2(np.linspace(np.log2(s) - k_count - 3, np.log2(s) + 2, 2000))
    x = np.concatenate([-mags, [0.0], mags]).astype(np.float32)
    y = np.asarray(pow2(jnp.asarray(x), {"scale": jnp.full((1,), s)}, config))
    levels = np.unique(y)
    assert levels.size == (2**bits - 1 if zero else 2**bits)
    expected = s * 2.0 ** -np.arange(k_count)
    expected = np.sort(np.concatenate([-expected, expected, [0.0] if zero else []]))
    np.testing.assert_array_equal(levels, expected)
    np.testing.assert_array_equal(pow2_levels(s, config), expected)


def test_golden_log_domain_ties_and_zero_rule():
    # bits=3, zero=True, s=1: levels ±1, ±1/2, ±1/4 and 0; ties at 2^-1/2, 2^-3/2; zero below 1/8.
    config = PowerOfTwoConfig(bits=3)
    below_tie = np.float32(2**-0.5)  # float32 rounds 2^-1/2 down: 0.70710677 < 0.7071067811...
    above_tie = np.nextafter(below_tie, np.float32(1))
    assert np.float64(below_tie) < 2**-0.5 < np.float64(above_tie)
    x = np.array(
        [0.9, above_tie, below_tie, 0.3536, 0.3535, 0.126, 0.125, 0.1249, 0.0, -0.0, -5.0, -0.3],
        np.float32,
    )
    expected = [1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0, 0, 0, -1, -0.25]
    np.testing.assert_array_equal(pow2(x, {"scale": jnp.ones((1,))}, config), expected)


def test_golden_no_zero_level():
    # bits=2, zero=False, s=2: levels ±2, ±1; 0 and -0.0 go to +1 (sign(0) = +1).
    config = PowerOfTwoConfig(bits=2, zero=False)
    x = np.array([0.0, -0.0, 0.1, -0.1, 1.5, 1.4, 3.0, -1e30, np.inf, -np.inf], np.float32)
    expected = [1, 1, 1, -1, 2, 1, 2, -2, 2, -2]
    np.testing.assert_array_equal(pow2(x, {"scale": jnp.full((1,), 2.0)}, config), expected)


def test_golden_bottom_of_bits8():
    # The smallest levels of bits=8 sit near float32's smallest normal; s=4 keeps them normal.
    s = 4.0
    no_zero = PowerOfTwoConfig(bits=8, zero=False)  # smallest level s·2^-127 = 2^-125
    # |x|/s crosses the tie 2^-126.5 between the two smallest levels below the normal range.
    x = [0.0, 2.0**-125.9, 2.0**-124.6, 2.0**-124.4, 2.0**-124, -(2.0**-124.6)]
    x = np.array(x, np.float32)
    expected = [2.0**-125, 2.0**-125, 2.0**-125, 2.0**-124, 2.0**-124, -(2.0**-125)]
    np.testing.assert_array_equal(pow2(x, {"scale": jnp.full((1,), s)}, no_zero), expected)
    with_zero = PowerOfTwoConfig(bits=8, zero=True)  # smallest 2^-124, zero below 2^-125
    just_below = np.nextafter(np.float32(2.0**-125), np.float32(0))
    x = np.array([2.0**-125, just_below, -(2.0**-125), 2.0**-124.4, 2.0**-123.4], np.float32)
    expected = [2.0**-124, 0.0, -(2.0**-124), 2.0**-124, 2.0**-123]
    np.testing.assert_array_equal(pow2(x, {"scale": jnp.full((1,), s)}, with_zero), expected)


def test_golden_per_channel_and_group():
    x = np.array([[0.3, -0.7, 0.9, 0.12], [0.05, 0.4, -0.33, 0.2]], np.float32)
    channel = PowerOfTwoConfig(bits=3, granularity="channel", axis=0)
    params = pow2_init(x, channel)
    np.testing.assert_array_equal(params["scale"], [[1.0], [0.5]])  # 2^round(log2 0.9, log2 0.4)
    np.testing.assert_array_equal(
        pow2(x, params, channel), [[0.25, -0.5, 1.0, 0.0], [0.0, 0.5, -0.25, 0.25]]
    )
    group = PowerOfTwoConfig(bits=3, granularity="group", axis=-1, group_size=2)
    params = pow2_init(x, group)
    np.testing.assert_array_equal(params["scale"], [[[0.5], [1.0]], [[0.5], [0.25]]])
    np.testing.assert_array_equal(
        pow2(x, params, group), [[0.25, -0.5, 1.0, 0.0], [0.0, 0.5, -0.25, 0.25]]
    )


def test_nan_propagates_and_dtype_is_kept():
    config = PowerOfTwoConfig(bits=4)
    x = jnp.array([np.nan, 0.3, -0.6], jnp.float32)
    y = pow2(x, {"scale": jnp.ones((1,))}, config)
    assert np.isnan(y[0]) and y[1] == 0.25 and y[2] == -0.5
    xb = jnp.array([0.3, -0.6, 3.0, 0.001], jnp.bfloat16)
    yb = pow2(xb, {"scale": jnp.ones((1,))}, config)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        yb.astype(jnp.float32), pow2(xb.astype(jnp.float32), {"scale": jnp.ones((1,))}, config)
    )


# ----------------------------------------------------------------------------------------------
# Init.


def test_init_golden_and_guards():
    config = PowerOfTwoConfig()
    sqrt2 = np.float32(np.sqrt(2.0))  # float32 rounds sqrt(2) down
    cases = [
        ([0.3, -1.3, 0.5], 1.0),
        ([1.5], 2.0),
        ([sqrt2], 1.0),
        ([np.nextafter(sqrt2, np.float32(2))], 2.0),
        ([-0.75, 0.1], 1.0),
        ([0.7], 0.5),
        ([3e-5], 2.0**-15),
        ([0.0, -0.0], 1.0),
    ]
    for x, s in cases:
        scale = pow2_init(jnp.asarray(x, jnp.float32), config)["scale"]
        assert scale.dtype == jnp.float32 and scale.shape == (1,)
        assert float(scale[0]) == s, (x, s, scale)


@given(config=configs(), seed=st.integers(0, 2**16))
def test_init_shape_and_value(config, seed):
    x = _data(seed)
    scale = np.asarray(pow2_init(jnp.asarray(x), config)["scale"])
    view = _view(x, config)
    absmax = np.max(np.abs(view), axis=_reduce_axes(config, x.ndim), keepdims=True)
    assert scale.shape == absmax.shape and scale.dtype == np.float32
    with np.errstate(divide="ignore"):
        expected = np.where(absmax > 0, 2.0 ** np.round(np.log2(absmax.astype(np.float64))), 1.0)
    np.testing.assert_array_equal(scale, expected)


# ----------------------------------------------------------------------------------------------
# Codes.


@given(config=configs(), seed=st.integers(0, 2**16))
def test_codes_round_trip(config, seed):
    x = jnp.asarray(_data(seed))
    params = {"scale": _random_pow2_scale(np.asarray(x), config, seed)}
    codes = pow2_codes(x, params, config)
    assert codes.dtype == jnp.int32 and codes.shape == x.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**config.bits - 1
    np.testing.assert_array_equal(pow2_dequantize(codes, params, config), pow2(x, params, config))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("zero", [True, False])
def test_codes_are_a_bijection_onto_levels(bits, zero):
    config = PowerOfTwoConfig(bits=bits, zero=zero)
    params = {"scale": jnp.full((1,), 1024.0)}
    half = 2 ** (bits - 1)
    codes = np.arange(2**bits, dtype=np.int32)
    if zero:  # the negative-zero code 2^bits - 1 is not canonical
        codes = codes[codes != 2**bits - 1]
    codes = np.resize(codes, 256)  # one shape for every config (repeats the codes)
    values = np.asarray(pow2_dequantize(jnp.asarray(codes), params, config), np.float64)
    # Independent decoding of the documented encoding: sign·2^(bits-1) + k.
    k, sign = codes % half, np.where(codes >= half, -1.0, 1.0)
    expected = np.where(zero & (k == half - 1), 0.0, sign * 1024.0 * 2.0 ** -k.astype(np.float64))
    np.testing.assert_array_equal(values, expected)
    assert np.unique(values).size == np.unique(codes).size
    recoded = pow2_codes(jnp.asarray(values, jnp.float32), params, config)
    np.testing.assert_array_equal(recoded, codes)


def test_codes_golden():
    config = PowerOfTwoConfig(bits=3)
    x = jnp.array([1.0, 0.5, 0.25, 0.0, -1.0, -0.5, -0.25, -0.01, 7.0])
    codes = pow2_codes(x, {"scale": jnp.ones((1,))}, config)
    np.testing.assert_array_equal(codes, [0, 1, 2, 3, 4, 5, 6, 3, 0])
    no_zero = PowerOfTwoConfig(bits=2, zero=False)
    codes = pow2_codes(jnp.array([1.0, 0.5, -1.0, -0.5, 0.0]), {"scale": jnp.ones((1,))}, no_zero)
    np.testing.assert_array_equal(codes, [0, 1, 2, 3, 1])


def test_dequantize_reads_low_bits_and_dtype():
    config = PowerOfTwoConfig(bits=3)
    params = {"scale": jnp.ones((1,))}
    y = pow2_dequantize(jnp.array([1, 8 + 1, 7], jnp.int8), params, config, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y.astype(jnp.float32), [0.5, 0.5, 0.0])


# ----------------------------------------------------------------------------------------------
# Gradients.


def _boundary_data(scale: np.ndarray, config: PowerOfTwoConfig, seed: int) -> np.ndarray:
    """Elements at ±s, one float inside and outside it, deep inside and far outside."""
    rng = np.random.default_rng(seed)
    s = _scale_view(np.zeros(SHAPE, np.float32), scale, config).astype(np.float32)
    one = np.float32(1)
    factors = np.array(
        [1, -1, np.nextafter(one, 2 * one), np.nextafter(one, 0 * one), 0.3, -3, 0, 1.0001],
        np.float32,
    )
    f = rng.choice(factors, SHAPE)
    return (s * f).astype(np.float32)


@given(config=configs(), seed=st.integers(0, 2**16))
def test_gradient_matches_formula(config, seed):
    scale = _random_pow2_scale(_data(seed), config, seed)
    x = _boundary_data(np.asarray(scale), config, seed)
    w = np.random.default_rng(seed + 1).standard_normal(SHAPE).astype(np.float32)

    def loss(x, scale):
        return jnp.sum(pow2(x, {"scale": scale}, config) * w)

    dx, dscale = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), scale)
    s = _scale_view(x, scale, config)
    if config.gradient == "ste":
        expected = w
    elif config.gradient == "clipped_ste":
        expected = np.where(np.abs(x.astype(np.float64)) <= s, w, 0.0)
    else:
        expected = np.zeros_like(w)
    np.testing.assert_array_equal(dx, expected)
    assert dscale.shape == scale.shape
    np.testing.assert_array_equal(dscale, np.zeros(scale.shape))


def test_clipped_ste_mask_at_the_bound():
    config = PowerOfTwoConfig(bits=4, gradient="clipped_ste")
    s = np.float32(0.5)
    x = np.array(
        [s, -s, np.nextafter(s, 1), -np.nextafter(s, 1), np.nextafter(s, 0), 0.0, 9.0], np.float32
    )
    dx = jax.grad(lambda x: pow2(x, {"scale": jnp.full((1,), s)}, config).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(dx, [1, 1, 0, 0, 1, 1, 0])


# ----------------------------------------------------------------------------------------------
# Transformations.


def test_jit_vmap_grad():
    config = PowerOfTwoConfig(bits=4, granularity="channel", axis=-1, gradient="clipped_ste")
    xs = jnp.asarray(np.stack([_data(i) for i in range(5)]))
    params = jax.vmap(lambda x: pow2_init(x, config))(xs)
    assert params["scale"].shape == (5, 1, 4)
    batched = jax.jit(jax.vmap(lambda x, p: pow2(x, p, config)))(xs, params)
    for i in range(5):
        p = {"scale": params["scale"][i]}
        np.testing.assert_array_equal(batched[i], pow2(xs[i], p, config))
    jitted = jax.jit(pow2, static_argnums=2)(xs[0], {"scale": params["scale"][0]}, config)
    np.testing.assert_array_equal(jitted, pow2(xs[0], {"scale": params["scale"][0]}, config))
    grads = jax.jit(jax.vmap(jax.grad(lambda x, p: pow2(x, p, config).sum())))(xs, params)
    s = np.asarray(params["scale"])
    np.testing.assert_array_equal(grads, (np.abs(np.asarray(xs)) <= s).astype(np.float32))
    codes = jax.jit(jax.vmap(lambda x, p: pow2_codes(x, p, config)))(xs, params)
    back = jax.vmap(lambda c, p: pow2_dequantize(c, p, config))(codes, params)
    np.testing.assert_array_equal(back, batched)


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(bits=4.0), "bits"),
        (dict(bits=True), "bits"),
        (dict(zero="yes"), "zero"),
        (dict(zero=1), "zero"),
        (dict(granularity="row"), "granularity"),
        (dict(granularity="group", group_size=0), "group_size"),
        (dict(group_size=4), "group_size"),
        (dict(axis=1.0), "axis"),
        (dict(gradient="identity"), "gradient"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        PowerOfTwoConfig(**kwargs)


def test_bad_shapes_raise_at_trace_time():
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="axis=5"):
        pow2_init(x, PowerOfTwoConfig(granularity="channel", axis=5))
    with pytest.raises(ValueError, match="axis=-3"):
        jax.jit(
            lambda x: pow2(
                x, {"scale": jnp.ones((1, 1))}, PowerOfTwoConfig(granularity="channel", axis=-3)
            )
        )(x)
    with pytest.raises(ValueError, match="group_size=3"):
        pow2_init(x, PowerOfTwoConfig(granularity="group", axis=-1, group_size=3))
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(1, 4\)"):
        jax.jit(lambda x: pow2(x, {"scale": jnp.ones((1, 4))}, PowerOfTwoConfig()))(x)
    with pytest.raises(ValueError, match="'scale'"):
        pow2(x, {"step": jnp.ones((1, 1))}, PowerOfTwoConfig())
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape"):
        pow2_dequantize(jnp.zeros(SHAPE, jnp.int32), {"scale": jnp.ones((3,))}, PowerOfTwoConfig())
    with pytest.raises(TypeError, match="floating"):
        pow2(jnp.ones(SHAPE, jnp.int32), {"scale": jnp.ones((1, 1))}, PowerOfTwoConfig())
    with pytest.raises(TypeError, match="integer codes"):
        pow2_dequantize(jnp.ones(SHAPE), {"scale": jnp.ones((1, 1))}, PowerOfTwoConfig())


def test_pow2_init_refuses_empty_data():
    with pytest.raises(ValueError, match=r"^pow2_init: x has shape \(2, 0\) with no elements"):
        pow2_init(jnp.zeros((2, 0), jnp.float32), PowerOfTwoConfig())
