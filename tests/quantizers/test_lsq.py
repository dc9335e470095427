"""Tests of LSQ (qflax/quantizers/_lsq.py, METHODS.md §2)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax.quantizers._lsq import LSQConfig, lsq, lsq_init, lsq_numel
from tests.quantizers._reference import reduce_axes as _axes
from tests.quantizers._reference import view as _view

SHAPE = (4, 8)
GRANULARITIES = [
    ("tensor", -1, None),
    ("channel", 0, None),
    ("channel", -1, None),
    ("group", -1, 4),
]


@st.composite
def configs(draw):
    granularity, axis, group_size = draw(st.sampled_from(GRANULARITIES))
    return LSQConfig(
        bits=draw(st.integers(1, 8)),
        signed=draw(st.booleans()),
        granularity=granularity,
        axis=axis,
        group_size=group_size,
        grad_scale=draw(st.booleans()),
    )


def _data(seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(SHAPE)).astype(np.float32)


def _bounds(config: LSQConfig) -> tuple[int, int]:
    b = config.bits
    return (2 ** (b - 1), 2 ** (b - 1) - 1) if config.signed else (0, 2**b - 1)


def _params(config: LSQConfig, x: np.ndarray, seed: int) -> dict[str, jax.Array]:
    """Init, shrunk by a random factor so that some elements clip."""
    step = lsq_init(x, config)["step"]
    factor = np.random.default_rng(seed).uniform(0.3, 1.0, step.shape).astype(np.float32)
    return {"step": step * factor}


# --------------------------------------------------------------------------------------------
# Forward.


@given(config=configs(), seed=st.integers(0, 2**16))
def test_on_grid_in_range_and_idempotent(config, seed):
    x = _data(seed)
    params = _params(config, x, seed)
    s = np.asarray(params["step"], np.float64)
    xhat = np.asarray(lsq(x, params, config))
    qn, qp = _bounds(config)
    k = _view(xhat.astype(np.float64), config) / s
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert np.round(k).min() >= -qn and np.round(k).max() <= qp
    # Reference in float64.
    v = _view(x.astype(np.float64), config) / s
    np.testing.assert_allclose(
        _view(xhat, config), s * np.round(np.clip(v, -qn, qp)), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(np.asarray(lsq(xhat, params, config)), xhat)
    # Inside the range the error is at most half a step.
    inside = (v > -qn) & (v < qp)
    err = np.abs(_view(xhat, config) - _view(x, config))
    assert np.all(err[inside] <= np.broadcast_to(s * 0.5 + 1e-6, err.shape)[inside])


def test_golden_signed_3bit():
    config = LSQConfig(bits=3)  # codes -4..3
    x = jnp.array([-9.0, -0.25, 0.25, 0.75, 1.3, 9.0])
    out = lsq(x, {"step": jnp.full((1,), 0.5)}, config)
    # v = -18, -0.5, 0.5, 1.5, 2.6, 18 -> -4, -0 (tie to even), 0, 2, 3, 3
    np.testing.assert_array_equal(np.asarray(out), [-2.0, 0.0, 0.0, 1.0, 1.5, 1.5])


def test_golden_init_per_channel():
    config = LSQConfig(bits=3, signed=False, granularity="channel", axis=0)  # QP = 7
    x = jnp.array([[1.0, -3.0], [0.0, 0.0]])
    step = lsq_init(x, config)["step"]
    assert step.shape == (2, 1) and step.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(step[0, 0]), 2 * 2.0 / math.sqrt(7), rtol=1e-6)
    assert float(step[1, 0]) > 0  # floored


@given(config=configs(), seed=st.integers(0, 2**16))
def test_init_formula(config, seed):
    x = _data(seed)
    step = np.asarray(lsq_init(x, config)["step"])
    want = 2 * np.mean(np.abs(_view(x, config)), axis=_axes(config, 2), keepdims=True)
    want = want / math.sqrt(max(_bounds(config)[1], 1))
    np.testing.assert_allclose(step, want, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Gradients.


@given(config=configs(), seed=st.integers(0, 2**16))
def test_gradients_equal_the_formulas(config, seed):
    x = _data(seed, scale=2.0)
    params = _params(config, x, seed)
    cot = np.random.default_rng(seed + 7).standard_normal(SHAPE).astype(np.float32)
    _, vjp = jax.vjp(lambda x, p: lsq(x, p, config), jnp.asarray(x), params)
    dx, dp = vjp(jnp.asarray(cot))

    qn, qp = _bounds(config)
    s = np.asarray(params["step"], np.float64)
    v = _view(x.astype(np.float64), config) / s
    below, above = v <= -qn, v >= qp
    inside = ~(below | above)
    g = _view(cot.astype(np.float64), config)
    np.testing.assert_array_equal(_view(np.asarray(dx), config), np.where(inside, g, 0.0))
    numel = x.size // s.size
    assert lsq_numel(SHAPE, config) == numel
    gamma = 1 / math.sqrt(numel * max(qp, 1)) if config.grad_scale else 1.0
    per_elem = np.where(inside, np.round(v) - v, np.where(below, -qn, qp))
    want = gamma * np.sum(g * per_elem, axis=_axes(config, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(dp["step"]), want, rtol=1e-4, atol=1e-5)


def test_gradient_scale_by_hand():
    # 4 elements share one step; QP = 7; gamma = 1/sqrt(28).
    x = jnp.array([0.3, -0.3, 0.1, 10.0])
    step = {"step": jnp.ones((1,))}
    cfg = LSQConfig(bits=4)
    ds = jax.grad(lambda p: jnp.sum(lsq(x, p, cfg)))(step)["step"]
    # (round(v) - v): -0.3, 0.3, -0.1; v = 10 >= QP -> 7.
    np.testing.assert_allclose(np.asarray(ds), [(-0.3 + 0.3 - 0.1 + 7) / math.sqrt(28)], rtol=1e-6)
    cfg = LSQConfig(bits=4, grad_scale=False)
    ds = jax.grad(lambda p: jnp.sum(lsq(x, p, cfg)))(step)["step"]
    np.testing.assert_allclose(np.asarray(ds), [6.9], rtol=1e-6)


def test_bounds_are_outside_for_the_mask():
    cfg = LSQConfig(bits=2, grad_scale=False)  # codes -2..1
    x = jnp.array([-2.0, 1.0, 0.5])
    dx, ds = jax.grad(lambda x, p: jnp.sum(lsq(x, p, cfg)), argnums=(0, 1))(
        x, {"step": jnp.ones((1,))}
    )
    np.testing.assert_array_equal(np.asarray(dx), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(np.asarray(ds["step"]), [-2.0 + 1.0 + (0.0 - 0.5)])


# --------------------------------------------------------------------------------------------
# Transformations and bad input.


@pytest.mark.parametrize("granularity, axis, group_size", GRANULARITIES)
def test_jit_vmap_grad(granularity, axis, group_size):
    config = LSQConfig(bits=3, granularity=granularity, axis=axis, group_size=group_size)
    xs = jnp.asarray(np.stack([_data(i, scale=i + 1.0) for i in range(3)]))
    params = jax.vmap(functools.partial(lsq_init, config=config))(xs)

    def loss(x, p):
        return jnp.sum(lsq(x, p, config) * x)

    batched = jax.jit(jax.vmap(functools.partial(lsq, config=config)))(xs, params)
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(xs, params)
    for i in range(3):
        p = jax.tree.map(lambda a, i=i: a[i], params)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(lsq(xs[i], p, config)))
        want = jax.grad(loss, argnums=(0, 1))(xs[i], p)
        for got, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=0), "bits"),
        (dict(bits=33), "bits"),
        (dict(signed="no"), "signed"),
        (dict(grad_scale=1), "grad_scale"),
        (dict(granularity="row"), "granularity"),
        (dict(granularity="group", group_size=None), "group_size"),
    ],
)
def test_bad_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*allowed"):
        LSQConfig(**kwargs)


def test_bad_params_raise():
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"needs shape \(4, 1\)"):
        lsq(x, {"step": jnp.ones((1, 1))}, LSQConfig(granularity="channel", axis=0))
    with pytest.raises(ValueError, match="step"):
        lsq(x, {"scale": jnp.ones((1, 1))}, LSQConfig())
    with pytest.raises(ValueError, match="group_size=3"):
        lsq_init(x, LSQConfig(granularity="group", group_size=3))


def test_lsq_init_refuses_empty_and_non_finite_data():
    with pytest.raises(ValueError, match=r"^lsq_init: x has shape \(0,\) with no elements"):
        lsq_init(jnp.zeros((0,), jnp.float32), LSQConfig(bits=4))
    with pytest.raises(ValueError, match=r"^lsq_init: x holds 1 non-finite value"):
        lsq_init(jnp.array([1.0, -np.inf], jnp.float32), LSQConfig(bits=4))
