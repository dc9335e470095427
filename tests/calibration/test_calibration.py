"""Tests of the range estimators: golden values, optimality of the MSE search, EMA, invariants."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qflax.calibration as cal
from qflax.numerics import int_range

# Rows: [-1, 0.5, 2, 0.25] and [0.25, -3, 1, -0.5]; max|x| = 3, min = -3, max = 2.
X = np.array([[-1.0, 0.5, 2.0, 0.25], [0.25, -3.0, 1.0, -0.5]], np.float32)

GRANULARITIES = [
    dict(granularity="tensor"),
    dict(granularity="channel", axis=0),
    dict(granularity="channel", axis=-1),
    dict(granularity="group", axis=-1, group_size=2),
    dict(granularity="group", axis=0, group_size=3),
]


def fake_quant_np(x, scale, zero_point, qmin, qmax):
    """The module's convention, written independently in float64 numpy."""
    x, scale, zero_point = (np.asarray(v, np.float64) for v in (x, scale, zero_point))
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return scale * (q - zero_point)


def view_np(x, granularity, axis=-1, group_size=None):
    """The granularity view of x and its reduction axes (independent of qflax)."""
    if granularity == "tensor":
        return x, tuple(range(x.ndim))
    a = axis % x.ndim
    if granularity == "channel":
        return x, tuple(i for i in range(x.ndim) if i != a)
    shape = x.shape[:a] + (x.shape[a] // group_size, group_size) + x.shape[a + 1 :]
    return x.reshape(shape), (a + 1,)


def mse_np(x, scale, zero_point, qmin, qmax, axes):
    view = np.asarray(x, np.float64)
    return np.mean((fake_quant_np(view, scale, zero_point, qmin, qmax) - view) ** 2, axis=axes)


# --------------------------------------------------------------------------------- golden values


@pytest.mark.parametrize(
    "gran, bits, signed, expected",
    [
        (dict(granularity="tensor"), 8, True, [[3.0 / 127]]),
        (dict(granularity="tensor"), 4, True, [[3.0 / 7]]),
        (dict(granularity="tensor"), 8, False, [[2.0 / 255]]),
        (dict(granularity="channel", axis=0), 8, True, [[2.0 / 127], [3.0 / 127]]),
        (dict(granularity="channel", axis=-1), 8, True, [[1 / 127, 3 / 127, 2 / 127, 0.5 / 127]]),
        (
            dict(granularity="group", axis=-1, group_size=2),
            8,
            True,
            [[[1 / 127], [2 / 127]], [[3 / 127], [1 / 127]]],
        ),
    ],
)
def test_absmax_golden(gran, bits, signed, expected):
    scale, zero_point = cal.absmax(X, bits=bits, signed=signed, **gran)
    assert scale.dtype == zero_point.dtype == jnp.float32
    np.testing.assert_allclose(scale, np.array(expected, np.float32), rtol=1e-6)
    np.testing.assert_array_equal(zero_point, np.zeros_like(expected))


def test_absmax_narrow_range_keeps_qmax():
    scale, _ = cal.absmax(X, bits=8, narrow_range=True)
    np.testing.assert_allclose(scale, [[3.0 / 127]], rtol=1e-6)


@pytest.mark.parametrize(
    "gran, bits, signed, expected_scale, expected_zero",
    [
        (dict(granularity="tensor"), 4, True, [[1 / 3]], [[1.0]]),
        (dict(granularity="tensor"), 8, True, [[5 / 255]], [[25.0]]),
        (dict(granularity="tensor"), 8, False, [[5 / 255]], [[153.0]]),
        (dict(granularity="channel", axis=0), 4, True, [[0.2], [4 / 15]], [[-3.0], [3.0]]),
        (
            dict(granularity="group", axis=-1, group_size=2),
            4,
            True,
            [[[0.1], [2 / 15]], [[3.25 / 15], [0.1]]],
            [[[2.0], [-8.0]], [[6.0], [-3.0]]],
        ),
    ],
)
def test_minmax_golden(gran, bits, signed, expected_scale, expected_zero):
    scale, zero_point = cal.minmax(X, bits=bits, signed=signed, **gran)
    assert scale.dtype == zero_point.dtype == jnp.float32
    np.testing.assert_allclose(scale, np.array(expected_scale, np.float32), rtol=1e-6)
    np.testing.assert_array_equal(zero_point, np.array(expected_zero, np.float32))


def test_minmax_range_always_contains_zero():
    # All-positive data: the range is [0, 2], so z = qmin and 0 is code qmin.
    scale, zero_point = cal.minmax(jnp.array([0.5, 2.0]), bits=8)
    np.testing.assert_allclose(scale, [2.0 / 255], rtol=1e-6)
    np.testing.assert_array_equal(zero_point, [-128.0])
    # All-negative data: the range is [-2, 0], so z = qmax.
    scale, zero_point = cal.minmax(jnp.array([-0.5, -2.0]), bits=8, signed=False)
    np.testing.assert_allclose(scale, [2.0 / 255], rtol=1e-6)
    np.testing.assert_array_equal(zero_point, [255.0])


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("gran", GRANULARITIES[:4])
def test_minmax_maps_min_and_max_to_qmin_qmax_and_zero_exactly(bits, signed, gran):
    rng = np.random.default_rng(bits)
    x = rng.normal(0.3, 2.0, size=(6, 4)).astype(np.float32)
    qmin, qmax = int_range(bits, signed)
    scale, zero_point = cal.minmax(x, bits=bits, signed=signed, **gran)
    view, axes = view_np(x, **gran)
    lo = np.minimum(view.min(axis=axes, keepdims=True), 0.0)
    hi = np.maximum(view.max(axis=axes, keepdims=True), 0.0)
    s, z = np.asarray(scale, np.float64), np.asarray(zero_point, np.float64)
    assert np.all(np.abs(lo / s + z - qmin) <= 0.5 + 1e-4)
    assert np.all(np.abs(hi / s + z - qmax) <= 0.5 + 1e-4)
    np.testing.assert_array_equal(z, np.round(z))  # zero lands on an integer code ...
    np.testing.assert_array_equal(fake_quant_np(np.zeros_like(view), s, z, qmin, qmax), 0.0)


def test_percentile_golden():
    x = jnp.arange(1.0, 101.0)
    scale, zero_point = cal.percentile(x, percentile=90.0, bits=8)
    np.testing.assert_allclose(scale, [90.1 / 127], rtol=1e-6)  # index 0.9 * 99 = 89.1
    np.testing.assert_array_equal(zero_point, [0.0])
    x = jnp.arange(-50.0, 50.0)  # 10th and 90th percentiles: -40.1 and 39.1
    scale, zero_point = cal.percentile(x, percentile=90.0, symmetric=False, bits=8)
    np.testing.assert_allclose(scale, [79.2 / 255], rtol=1e-6)
    np.testing.assert_array_equal(zero_point, [-128.0 + 129.0])  # round(-40.1 / s) = -129


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_per_channel_matches_numpy(symmetric):
    x = np.random.default_rng(0).standard_t(3, size=(5, 64)).astype(np.float32)
    scale, zero_point = cal.percentile(
        x, percentile=95.0, symmetric=symmetric, bits=8, granularity="channel", axis=0
    )
    if symmetric:
        bound = np.percentile(np.abs(x), 95.0, axis=1, keepdims=True)
        np.testing.assert_allclose(scale, bound / 127, rtol=1e-5)
        np.testing.assert_array_equal(zero_point, 0.0)
    else:
        lo = np.minimum(np.percentile(x, 5.0, axis=1, keepdims=True), 0)
        hi = np.maximum(np.percentile(x, 95.0, axis=1, keepdims=True), 0)
        np.testing.assert_allclose(scale, (hi - lo) / 255, rtol=1e-5)
        np.testing.assert_array_equal(zero_point, -128 - np.round(lo / np.asarray(scale)))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("gran", GRANULARITIES)
def test_percentile_100_is_absmax_and_minmax(signed, gran):
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    for symmetric, reference in ((True, cal.absmax), (False, cal.minmax)):
        got = cal.percentile(x, percentile=100, symmetric=symmetric, bits=4, signed=signed, **gran)
        want = reference(x, bits=4, signed=signed, **gran)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_all_zero_tensor_gives_tiny_positive_scale():
    x = jnp.zeros((4, 3))
    results = [
        cal.absmax(x, bits=8),
        cal.absmax(x, bits=4, signed=False, granularity="channel", axis=0),
        cal.minmax(x, bits=8),
        cal.percentile(x, bits=8),
        cal.percentile(x, symmetric=False, bits=8),
        cal.mse(x, bits=8),
        cal.mse(x, symmetric=False, bits=3, granularity="group", axis=0, group_size=2),
        cal.ema_scale(cal.ema_init(x), bits=8),
        cal.ema_scale(cal.ema_update(cal.ema_init(x), x), bits=8, symmetric=False),
    ]
    for scale, zero_point in results:
        assert np.all(np.isfinite(scale)) and np.all(np.isfinite(zero_point))
        np.testing.assert_array_equal(scale, cal.MIN_SCALE)
        assert cal.MIN_SCALE > 0


# ----------------------------------------------------------------------------------- MSE search


def heavy_tailed(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(2.5, size=shape)
    x.reshape(-1)[rng.choice(x.size, size=max(2, x.size // 200), replace=False)] *= 10.0
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("gran", [dict(granularity="tensor"), dict(granularity="channel", axis=0)])
def test_mse_beats_absmax_and_minmax_on_heavy_tails(bits, gran):
    x = heavy_tailed((4, 512))
    qmin, qmax = int_range(bits, True)
    view, axes = view_np(x, **gran)
    for symmetric, reference in ((True, cal.absmax), (False, cal.minmax)):
        searched = cal.mse(x, symmetric=symmetric, bits=bits, **gran)
        err_mse = mse_np(view, *searched, qmin, qmax, axes)
        err_ref = mse_np(view, *reference(x, bits=bits, **gran), qmin, qmax, axes)
        assert np.all(err_mse <= err_ref * (1 + 1e-6))
        assert np.all(err_mse < 0.9 * err_ref)  # clipping the outliers pays off, by a margin


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_mse_is_the_best_candidate_per_slice(symmetric, signed):
    """Brute force in numpy: one slice at a time, one candidate at a time."""
    x = heavy_tailed((3, 16, 2), seed=1)
    bits, num_candidates, min_ratio = 3, 9, 0.2
    qmin, qmax = int_range(bits, signed)
    gran = dict(granularity="channel", axis=-1)
    scale, zero_point = cal.mse(
        x,
        symmetric=symmetric,
        num_candidates=num_candidates,
        min_ratio=min_ratio,
        bits=bits,
        signed=signed,
        **gran,
    )
    assert scale.shape == zero_point.shape == (1, 1, 2)
    for c in range(2):
        xc = x[..., c].astype(np.float64)
        candidates = []
        for r in np.linspace(1.0, min_ratio, num_candidates):
            if symmetric:
                bound = np.abs(xc).max() if signed else max(xc.max(), 0)
                s, z = r * bound / qmax, 0.0
            else:
                lo, hi = r * min(xc.min(), 0), r * max(xc.max(), 0)
                s = (hi - lo) / (qmax - qmin)
                z = qmin - np.round(lo / s)
            err = np.mean((fake_quant_np(xc, s, z, qmin, qmax) - xc) ** 2)
            candidates.append((err, s, z))
        best_err = min(e for e, _, _ in candidates)
        s_got, z_got = float(scale[0, 0, c]), float(zero_point[0, 0, c])
        err_got = np.mean((fake_quant_np(xc, s_got, z_got, qmin, qmax) - xc) ** 2)
        assert err_got <= best_err * (1 + 1e-5)
        assert min(abs(s_got - s) / s for _, s, _ in candidates) < 1e-5  # one of the candidates


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_keeps_the_full_range_on_uniform_data(symmetric):
    x = jax.random.uniform(jax.random.key(0), (4096,), minval=-1.0, maxval=1.0)
    if not symmetric:
        x = 0.6 * x + 0.4  # uniform on [-0.2, 1]
    reference = cal.absmax if symmetric else cal.minmax
    num_candidates, min_ratio = 64, 0.05
    step = (1 - min_ratio) / (num_candidates - 1)
    scale, _ = cal.mse(x, symmetric=symmetric, bits=8)
    ratio = float(scale[0] / reference(x, bits=8)[0][0])
    assert 1 - 2 * step <= ratio <= 1 + 1e-6


def test_mse_large_tensor_runs_in_candidate_batches():
    # 2^19 elements x 64 candidates exceeds the batch budget, so the search runs in chunks of
    # candidates; repeating each column 1024 times keeps every column's error curve, so the
    # chunked search must pick the same scales as the one-batch search on the small tensor.
    x = heavy_tailed((8, 64), seed=2)
    big = np.tile(x, (1024, 1))  # same per-column distribution, 2^19 elements
    small = cal.mse(x, bits=4, granularity="channel", axis=-1)
    large = cal.mse(big, bits=4, granularity="channel", axis=-1)
    np.testing.assert_allclose(large[0], small[0], rtol=1e-6)


# ---------------------------------------------------------------------------------------- EMA


@pytest.mark.parametrize(
    "gran, shape",
    [
        (dict(granularity="tensor"), (1, 1)),
        (dict(granularity="channel", axis=-1), (1, 4)),
        (dict(granularity="group", axis=-1, group_size=2), (6, 2, 1)),
    ],
)
def test_ema_init_shapes(gran, shape):
    state = cal.ema_init(jnp.ones((6, 4)), **gran)
    assert state.min.shape == state.max.shape == shape
    assert state.min.dtype == jnp.float32 and state.count.dtype == jnp.int32
    assert int(state.count) == 0
    assert cal.ema_init(jax.ShapeDtypeStruct((6, 4), jnp.bfloat16), **gran).min.shape == shape


@pytest.mark.parametrize("gran", GRANULARITIES)
def test_ema_first_update_is_the_batch_range(gran):
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    state = cal.ema_update(cal.ema_init(x, **gran), x, decay=0.9)
    view, axes = view_np(x, **gran)
    np.testing.assert_array_equal(state.min, view.min(axis=axes, keepdims=True))
    np.testing.assert_array_equal(state.max, view.max(axis=axes, keepdims=True))
    assert int(state.count) == 1
    # ...so the EMA scales of one batch are absmax / minmax of that batch.
    for symmetric, reference in ((True, cal.absmax), (False, cal.minmax)):
        got = cal.ema_scale(state, bits=4, symmetric=symmetric)
        want = reference(x, bits=4, **gran)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_array_equal(got[1], want[1])


def test_ema_update_golden():
    a = jnp.array([[-1.0, 2.0], [-3.0, 0.5]])
    b = jnp.array([[1.0, 4.0], [-1.0, 2.0]])
    state = cal.ema_init(a, granularity="channel", axis=0)
    state = cal.ema_update(state, a, decay=0.9)  # [[-1], [-3]], [[2], [0.5]]
    state = cal.ema_update(state, b, decay=0.9)
    state = cal.ema_update(state, b, decay=0.9)  # 0.81 * range(a) + 0.19 * range(b)
    want_min = [[0.81 * -1 + 0.19 * 1], [0.81 * -3 + 0.19 * -1]]
    want_max = [[0.81 * 2 + 0.19 * 4], [0.81 * 0.5 + 0.19 * 2]]
    np.testing.assert_allclose(state.min, want_min, rtol=1e-6)
    np.testing.assert_allclose(state.max, want_max, rtol=1e-6)
    assert int(state.count) == 3
    # decay = 0 keeps only the latest batch.
    np.testing.assert_array_equal(cal.ema_update(state, a, decay=0.0).min, [[-1.0], [-3.0]])


def test_ema_converges_to_the_stationary_range():
    lo, hi = -1.0, 3.0
    update = functools.partial(cal.ema_update, decay=0.95)

    def step(state, key):
        x = jax.random.uniform(key, (512, 2), minval=lo, maxval=hi)
        return update(state, x), None

    init = cal.ema_init(jnp.zeros((512, 2)), granularity="channel", axis=-1)
    init = update(init, jnp.zeros((512, 2)))  # a bad first batch, forgotten at rate 0.95^n
    state, _ = jax.jit(lambda s: jax.lax.scan(step, s, jax.random.split(jax.random.key(0), 400)))(
        init
    )
    # E[min of 512 uniforms] = lo + (hi - lo) / 513; the EMA averages ~40 batches.
    np.testing.assert_allclose(state.min, lo + 4.0 / 513, atol=0.01)
    np.testing.assert_allclose(state.max, hi - 4.0 / 513, atol=0.01)
    scale, zero_point = cal.ema_scale(state, bits=8, symmetric=False)
    np.testing.assert_allclose(scale, (hi - lo) / 255, rtol=0.01)
    assert np.all(zero_point == -128 - np.round(np.asarray(state.min) / np.asarray(scale)))


def test_ema_update_accepts_a_different_batch_size_and_rejects_other_shapes():
    state = cal.ema_init(jnp.zeros((8, 4)), granularity="channel", axis=-1)
    state = cal.ema_update(state, jnp.ones((3, 4)))
    np.testing.assert_array_equal(state.max, np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"x.shape=\(3, 5\)"):
        cal.ema_update(state, jnp.ones((3, 5)))
    grouped = cal.ema_init(jnp.zeros((2, 6)), granularity="group", axis=-1, group_size=3)
    with pytest.raises(ValueError, match="does not match"):
        cal.ema_update(grouped, jnp.ones((2, 5)))


# ------------------------------------------------------------------------------- jit / vmap


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (cal.absmax, dict(bits=4)),
        (cal.minmax, dict(bits=3, signed=False)),
        (cal.percentile, dict(bits=4, percentile=99.0, symmetric=False)),
        (cal.mse, dict(bits=4, num_candidates=16)),
        (cal.mse, dict(bits=2, symmetric=False, num_candidates=16)),
    ],
)
@pytest.mark.parametrize("gran", [GRANULARITIES[1], GRANULARITIES[3]])
def test_estimators_work_under_jit(fn, kwargs, gran):
    x = heavy_tailed((6, 4), seed=4)
    eager = fn(x, **kwargs, **gran)
    jitted = jax.jit(functools.partial(fn, **kwargs, **gran))(x)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    np.testing.assert_array_equal(jitted[1], eager[1])


def test_ema_and_vmap_work_under_jit():
    x = heavy_tailed((6, 4), seed=5)
    state = cal.ema_init(x, granularity="channel", axis=0)
    update = jax.jit(functools.partial(cal.ema_update, decay=0.5))
    scale = jax.jit(functools.partial(cal.ema_scale, bits=4, symmetric=False))
    got = scale(update(update(state, x), 2 * x))
    want = cal.ema_scale(
        cal.ema_update(cal.ema_update(state, x, decay=0.5), 2 * x, decay=0.5),
        bits=4,
        symmetric=False,
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # vmap over a stack of tensors = one per-tensor calibration each.
    stacked = jax.vmap(functools.partial(cal.absmax, bits=8))(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(stacked[0][:, 0, 0], np.abs(x).max() * np.array([1, 2]) / 127)


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: cal.absmax(X, bits=0), "bits=0"),
        (lambda: cal.absmax(X, bits=33), "bits=33"),
        (lambda: cal.absmax(X, bits=2.5), "bits=2.5"),
        (lambda: cal.absmax(X, bits=1), "bits=1"),  # signed 1-bit has no positive code
        (lambda: cal.minmax(X, bits=1, narrow_range=True), "narrow_range=True"),
        (lambda: cal.minmax(X, bits=4, signed="yes"), "signed='yes'"),
        (lambda: cal.minmax(X, bits=4, granularity="row"), "granularity='row'"),
        (lambda: cal.minmax(X, bits=4, granularity="group"), "group_size=None"),
        (lambda: cal.minmax(X, bits=4, granularity="group", group_size=3), "group_size=3"),
        (lambda: cal.minmax(X, bits=4, granularity="channel", axis=2), "axis=2"),
        (lambda: cal.percentile(X, bits=4, percentile=0), "percentile=0"),
        (lambda: cal.percentile(X, bits=4, percentile=100.5), "percentile=100.5"),
        (lambda: cal.percentile(X, bits=4, percentile=30, symmetric=False), "percentile=30"),
        (lambda: cal.percentile(X, bits=4, symmetric=None), "symmetric=None"),
        (lambda: cal.percentile(X, bits=1), "bits=1"),
        (lambda: cal.mse(X, bits=4, num_candidates=1), "num_candidates=1"),
        (lambda: cal.mse(X, bits=4, num_candidates=8.0), "num_candidates=8.0"),
        (lambda: cal.mse(X, bits=4, min_ratio=0.0), "min_ratio=0.0"),
        (lambda: cal.mse(X, bits=4, min_ratio=1.5), "min_ratio=1.5"),
        (lambda: cal.mse(X, bits=1), "bits=1"),
        (lambda: cal.ema_init(X, granularity="row"), "granularity='row'"),
        (lambda: cal.ema_update(cal.ema_init(X), X, decay=1.0), "decay=1.0"),
        (lambda: cal.ema_update(cal.ema_init(X), X, decay=-0.1), "decay=-0.1"),
        (lambda: cal.ema_scale(cal.ema_init(X), bits=0), "bits=0"),
        (lambda: cal.ema_scale(cal.ema_init(X), bits=1), "bits=1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match="allowed") as info:
        call()
    assert field in str(info.value)


def test_asymmetric_signed_one_bit_is_allowed():
    scale, zero_point = cal.minmax(jnp.array([-1.0, 0.2]), bits=1)  # codes {-1, 0}
    np.testing.assert_allclose(scale, [1.2])
    np.testing.assert_array_equal(zero_point, [0.0])  # grid {-1.2, 0}


# ------------------------------------------------------------------ reconstruction property


def calibrate(estimator, x, bits, signed, gran):
    if estimator == "absmax":
        return cal.absmax(x, bits=bits, signed=signed, **gran)
    if estimator == "minmax":
        return cal.minmax(x, bits=bits, signed=signed, **gran)
    if estimator.startswith("percentile"):
        sym = estimator.endswith("sym")
        return cal.percentile(x, percentile=90, symmetric=sym, bits=bits, signed=signed, **gran)
    if estimator.startswith("mse"):
        sym = estimator.endswith("sym")
        return cal.mse(x, symmetric=sym, num_candidates=8, bits=bits, signed=signed, **gran)
    state = cal.ema_update(cal.ema_init(x, **gran), x)
    return cal.ema_scale(state, bits=bits, signed=signed, symmetric=estimator.endswith("sym"))


def clip_range(estimator, view, axes, scale, zero_point, signed, qmin, qmax):
    """The range [lo, hi] each estimator promises to cover, computed independently of qflax."""
    symmetric = estimator.endswith("sym") or estimator == "absmax"
    if estimator.startswith("percentile"):
        base = np.abs(view) if signed else view
        if symmetric:
            bound = np.maximum(np.percentile(base, 90, axis=axes, keepdims=True), 0)
            return (-bound if signed else 0 * bound), bound
        lo = np.percentile(view, 10, axis=axes, keepdims=True)
        hi = np.percentile(view, 90, axis=axes, keepdims=True)
        return np.minimum(lo, 0), np.maximum(hi, 0)
    if symmetric:
        bound = np.maximum((np.abs(view) if signed else view).max(axis=axes, keepdims=True), 0)
        lo, hi = (-bound if signed else 0 * bound), bound
        if estimator.startswith("mse"):  # the chosen ratio r = s * qmax / bound
            ratio = np.where(bound > 0, scale * qmax / np.maximum(bound, 1e-30), 1.0)
            assert np.all((ratio >= 0.05 - 1e-5) & (ratio <= 1 + 1e-5))
            lo, hi = ratio * lo, ratio * hi
        return lo, hi
    lo = np.minimum(view.min(axis=axes, keepdims=True), 0)
    hi = np.maximum(view.max(axis=axes, keepdims=True), 0)
    if estimator.startswith("mse"):  # the chosen ratio r = s * (qmax - qmin) / (hi - lo)
        ratio = np.where(hi > lo, scale * (qmax - qmin) / np.maximum(hi - lo, 1e-30), 1.0)
        assert np.all((ratio >= 0.05 - 1e-5) & (ratio <= 1 + 1e-5))
        lo, hi = ratio * lo, ratio * hi
    return lo, hi


ESTIMATORS = [
    "absmax",
    "minmax",
    "percentile_sym",
    "percentile_asym",
    "mse_sym",
    "mse_asym",
    "ema_sym",
    "ema_asym",
]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@given(
    x=hnp.arrays(
        np.float32,
        (6, 4),
        elements=st.floats(-100, 100, width=32, allow_subnormal=False),
    ),
    bits=st.integers(1, 8),
    signed=st.booleans(),
    gran=st.sampled_from(GRANULARITIES),
)
def test_every_element_in_the_calibrated_range_is_within_half_a_step(
    estimator, x, bits, signed, gran
):
    qmin, qmax = int_range(bits, signed)
    symmetric = estimator.endswith("sym") or estimator == "absmax"
    if symmetric and signed and bits == 1:
        with pytest.raises(ValueError, match="bits=1"):
            calibrate(estimator, x, bits, signed, gran)
        return
    scale, zero_point = calibrate(estimator, x, bits, signed, gran)
    view, axes = view_np(x, **gran)
    stat_shape = np.max(view, axis=axes, keepdims=True).shape
    assert scale.shape == zero_point.shape == stat_shape
    assert scale.dtype == zero_point.dtype == jnp.float32
    s, z = np.asarray(scale, np.float64), np.asarray(zero_point, np.float64)
    assert np.all(np.isfinite(s) & (s > 0))
    np.testing.assert_array_equal(z, np.round(z))
    assert np.all((qmin <= z) & (z <= qmax))
    if symmetric:
        np.testing.assert_array_equal(z, 0.0)
    lo, hi = clip_range(estimator, view.astype(np.float64), axes, s, z, signed, qmin, qmax)
    inside = (view >= lo) & (view <= hi)
    error = np.abs(fake_quant_np(view, s, z, qmin, qmax) - view)
    bound = s / 2 * (1 + 1e-4) + 1e-6 * np.abs(view)
    assert np.all(np.where(inside, error <= bound, True)), (error, bound, inside)


_ESTIMATORS = {
    "absmax": lambda x: cal.absmax(x, bits=8),
    "minmax": lambda x: cal.minmax(x, bits=8),
    "percentile": lambda x: cal.percentile(x, bits=8),
    "mse": lambda x: cal.mse(x, bits=8, num_candidates=2),
    "ema_update": lambda x: cal.ema_update(cal.ema_init(jnp.ones((1, 1))), x),
}


@pytest.mark.parametrize("name", sorted(_ESTIMATORS))
def test_estimators_refuse_non_finite_and_empty_data(name):
    estimate = _ESTIMATORS[name]
    with pytest.raises(ValueError, match=rf"^{name}: x holds 2 non-finite value\(s\) .* of 3, "):
        estimate(jnp.array([1.0, np.inf, np.nan], jnp.float32))
    with pytest.raises(ValueError, match=rf"^{name}: x has shape \(0, 2\) with no elements"):
        estimate(jnp.zeros((0, 2), jnp.float32))


def test_ema_init_refuses_an_empty_shape():
    with pytest.raises(ValueError, match=r"^ema_init: x has shape \(0, 2\) with no elements"):
        cal.ema_init(jax.ShapeDtypeStruct((0, 2), jnp.float32))
