"""Tests of the ProxConnect++ forward/backward pairs (qflax/quantizers/_pairs.py).

References are computed independently here in float64 NumPy from the METHODS.md formulas (§4, §9)
and compared with the float32 JAX results.
"""

import doctest
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.test_util import check_grads

from qflax.quantizers import _pairs
from qflax.quantizers._pairs import (
    BACKWARDS,
    FORWARDS,
    PAIRS,
    QuantizerPair,
    approx_sign,
    bc,
    bnn,
    bnn_plus,
    bnn_plus_plus,
    hardtanh,
    identity,
    pair,
    pc,
    poly_sign,
    prox,
    proxquant,
    sign,
    sign_swish,
)

# ------------------------------------------------------------------------------------------------
# Independent float64 references.


def _sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _sign_swish(x, beta):
    z = beta * x
    s = _sigmoid(z)
    return 2 * s * (1 + z * (1 - s)) - 1


def _sign_swish_prime(x, beta):
    """larq's closed form: β[2 − βx·tanh(βx/2)] / (1 + cosh βx)."""
    z = beta * x
    with np.errstate(over="ignore"):  # cosh overflows to inf for large βx: the derivative is 0
        return beta * (2 - z * np.tanh(z / 2)) / (1 + np.cosh(z))


def _prox(x, mu):
    return (x + mu * _sign(x)) / (1 + mu)


def _poly_sign(x):
    inside = np.where(x < 0, 2 * x + x**2, 2 * x - x**2)
    return np.where(x < -1, -1.0, np.where(x >= 1, 1.0, inside))


def _poly_sign_prime(x):
    return np.where(np.abs(x) < 1, 2 - 2 * np.abs(x), 0.0)


MU = 3.0
BETA = 2.0


def _staircase(x, bits):
    m = 2.0**bits - 1
    k = np.clip(np.floor((np.clip(x, -1, 1) + 1) / 2 * m + 0.5), 0, m)
    return (2 * k - m) / m


def _soft_staircase_prime(x, bits, beta):
    """d/dx of the per-interval tanh steps: ½β·sech²(β(r − ½))/tanh(β/2) on [−1, 1], else 0."""
    m = 2.0**bits - 1
    v = (np.clip(x, -1, 1) + 1) / 2 * m
    r = v - np.clip(np.floor(v), 0, m - 1)
    inside = 0.5 * beta / np.cosh(beta * (r - 0.5)) ** 2 / np.tanh(beta / 2)
    return np.where(np.abs(x) <= 1, inside, 0.0)


# name -> (factory kwargs, F(x), B'(x), (backward function, its kwargs)).
CASES = {
    "bc": ({}, _sign, np.ones_like, (identity, {})),
    "pc": ({"mu": MU}, lambda x: _prox(x, MU), np.ones_like, (identity, {})),
    "proxquant": (
        {"mu": MU},
        lambda x: x,
        lambda x: np.full_like(x, 1 / (1 + MU)),
        (prox, {"mu": MU}),
    ),
    "bnn": ({}, _sign, lambda x: (np.abs(x) <= 1).astype(np.float64), (hardtanh, {})),
    "bnn+": (
        {"beta": BETA},
        _sign,
        lambda x: _sign_swish_prime(x, BETA),
        (sign_swish, {"beta": BETA}),
    ),
    "bnn++": (
        {"mu": MU},
        lambda x: _sign_swish(x, MU),
        lambda x: _sign_swish_prime(x, MU),
        (sign_swish, {"beta": MU}),
    ),
    "approx_sign": ({}, _sign, _poly_sign_prime, (poly_sign, {})),
    "multibit": (
        {"bits": 2, "beta": BETA},
        lambda x: _staircase(x, 2),
        lambda x: _soft_staircase_prime(x, 2, BETA),
        (_pairs.soft_staircase, {"bits": 2, "beta": BETA}),
    ),
}
# The built-in catalogue (user code may register more names in the same process).
CATALOGUE = {"bc", "pc", "proxquant", "bnn", "bnn+", "bnn++", "approx_sign", "multibit"}

# Points with every edge case: the ±1 bounds, signed zeros, the ±0.5 interior, the outside.
EDGES = np.array([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0], np.float32)
G_EDGES = np.array([0.5, -1.0, 2.0, 1.5, -0.25, 3.0, -2.0, 1.0], np.float32)
# Smooth points (no 0, no ±1). Most tests use 8 elements: eager JAX compiles once per shape.
SMOOTH = np.array([-1.7, -0.6, -0.35, -0.1, 0.15, 0.3, 0.9, 1.4], np.float32)
# |x| >= 0.1, where sign is far from its jump.
AWAY = jnp.concatenate([jnp.linspace(-3.0, -0.1, 30), jnp.linspace(0.1, 3.0, 30)])

# No subnormals: XLA on CPU flushes them to zero, so sign(−1e−45) is +1 there.
floats8 = st.lists(st.floats(-3, 3, width=32, allow_subnormal=False), min_size=8, max_size=8).map(
    lambda v: np.array(v, np.float32)
)
grads8 = st.lists(st.floats(-2, 2, width=32), min_size=8, max_size=8).map(
    lambda v: np.array(v, np.float32)
)


def _value_and_vjp(q, x, g):
    y, vjp = jax.vjp(q, jnp.asarray(x))
    (g_x,) = vjp(jnp.asarray(g))
    return np.asarray(y), np.asarray(g_x)


def _check_case(name, x, g):
    kwargs, f_ref, b_prime_ref, (backward, backward_kwargs) = CASES[name]
    q = PAIRS[name](**kwargs)
    y, g_x = _value_and_vjp(q, x, g)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, f_ref(x64), rtol=1e-5, atol=1e-6)
    assert y.dtype == np.float32 and y.shape == x.shape
    # The gradient against the closed form ...
    np.testing.assert_allclose(g_x, g * b_prime_ref(x64), rtol=1e-5, atol=1e-5)
    # ... and against autodiff of the backward function alone.
    b_prime = jax.vmap(jax.grad(lambda v: backward(v, **backward_kwargs)))(jnp.asarray(x))
    np.testing.assert_allclose(g_x, g * np.asarray(b_prime), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Catalogue pairs: value F(x), VJP g·B'(x).


def test_cases_cover_the_catalogue():
    assert set(CASES) == CATALOGUE and CATALOGUE <= set(PAIRS)
    assert PAIRS["bnn+"] is bnn_plus and PAIRS["bnn++"] is bnn_plus_plus


@pytest.mark.parametrize("name", sorted(CASES))
def test_pair_value_and_gradient_at_edges(name):
    _check_case(name, EDGES, G_EDGES)


@pytest.mark.parametrize("name", sorted(CASES))
@given(x=floats8, g=grads8)
def test_pair_value_and_gradient_property(name, x, g):
    _check_case(name, x, g)


def test_pair_gradients_golden():
    x = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0])
    grad = lambda q: jax.grad(lambda v: jnp.sum(q(v)))(x).tolist()  # noqa: E731
    assert grad(bc()) == [1.0] * 8
    assert grad(bnn()) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert grad(approx_sign()) == [0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 0.0]
    assert grad(pc(mu=1.0)) == [1.0] * 8
    assert grad(proxquant(mu=1.0)) == [0.5] * 8
    assert grad(proxquant(mu=3.0)) == [0.25] * 8


def test_factory_defaults():
    x, x64 = jnp.asarray(SMOOTH), SMOOTH.astype(np.float64)
    np.testing.assert_allclose(pc()(x), _prox(x64, 1.0), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(proxquant()(v)))(x), np.full(8, 0.5), rtol=1e-6
    )
    g = jax.grad(lambda v: jnp.sum(bnn_plus()(v)))(x)
    np.testing.assert_allclose(g, _sign_swish_prime(x64, 5.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bnn_plus_plus()(x), _sign_swish(x64, 5.0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Catalogue functions: golden values.


def test_sign_golden():
    x = jnp.array([-2.0, -0.5, -0.0, 0.0, 1e-30, 0.5, 1.0, 2.0])
    assert sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert jax.vmap(jax.grad(sign))(x).tolist() == [0.0] * 8


def test_hardtanh_golden_and_bound_derivative():
    x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0])
    assert hardtanh(x).tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0, 1.0]
    # Exactly 1 on the bounds (jnp.clip would give 0.5 there).
    assert jax.vmap(jax.grad(hardtanh))(x).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert jax.grad(lambda v: jnp.clip(v, -1.0, 1.0))(1.0) == 0.5  # why hardtanh is explicit


def test_sign_swish_golden():
    x = jnp.array([-2.0, -1.0, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0])
    # Hand-computed from 2σ(βx)[1 + βx(1 − σ(βx))] − 1 (Python math module, 6 decimals).
    want1 = [-1.181568, -0.855341, -0.24742, 0.0, 0.24742, 0.479922, 0.855341, 1.181568]
    want5 = [-1.000817, -1.053095, -0.987362, 0.0, 0.987362, 1.198802, 1.053095, 1.000817]
    np.testing.assert_allclose(sign_swish(x, beta=1.0), want1, atol=2e-6)
    np.testing.assert_allclose(sign_swish(x, beta=5.0), want5, atol=2e-6)
    np.testing.assert_allclose(sign_swish(x), want5, atol=2e-6)  # default β = 5


def test_prox_golden():
    x = jnp.array([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0])
    assert prox(x, mu=1.0).tolist() == [-1.5, -1.0, -0.75, 0.5, 0.5, 0.75, 1.0, 1.5]
    assert prox(x, mu=3.0).tolist() == [-1.25, -1.0, -0.875, 0.75, 0.75, 0.875, 1.0, 1.25]
    assert prox(x).tolist() == prox(x, mu=1.0).tolist()  # ±1 are fixed points


def test_prox_tends_to_sign():
    errors = [
        float(jnp.max(jnp.abs(prox(AWAY, mu=mu) - sign(AWAY)))) for mu in (1.0, 10.0, 1e3, 1e6)
    ]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5
    assert errors[-1] < 1e-5


def test_poly_sign_golden():
    x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0])
    want = [-1.0, -1.0, -0.75, 0.0, 0.4375, 0.75, 0.9375, 1.0]
    np.testing.assert_allclose(poly_sign(x), want, atol=1e-7)
    np.testing.assert_allclose(poly_sign(x), _poly_sign(np.asarray(x, np.float64)), atol=1e-7)
    g = jax.vmap(jax.grad(poly_sign))(x)
    assert g.tolist() == [0.0, 0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 0.0]


def test_nan_propagates():
    x = jnp.asarray(EDGES).at[3].set(jnp.nan)
    for fn in (sign, hardtanh, prox, poly_sign, sign_swish, bnn()):
        assert np.isnan(fn(x)).tolist() == [False] * 3 + [True] + [False] * 4, fn


# ------------------------------------------------------------------------------------------------
# Derivatives of the smooth backward functions.


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 5.0, 10.0])
def test_sign_swish_derivative_is_larq_formula(beta):
    x = np.linspace(-3.0, 3.0, 41).astype(np.float32)
    got = jax.vmap(jax.grad(lambda v: sign_swish(v, beta=beta)))(jnp.asarray(x))
    want = _sign_swish_prime(x.astype(np.float64), beta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * beta)


def test_sign_swish_derivative_large_beta_is_finite():
    x = jnp.array([-1.0, -1e-2, -1e-3, 0.0, 1e-4, 1e-3, 2e-3, 1.0])
    g = jax.vmap(jax.grad(lambda v: sign_swish(v, beta=1000.0)))(x)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, _sign_swish_prime(np.asarray(x, np.float64), 1000.0), rtol=1e-3)


def test_check_grads_sign_swish():
    x = jnp.asarray(SMOOTH).at[3].set(0.0)
    check_grads(lambda v: sign_swish(v, beta=2.0), (x,), order=2, eps=1e-3, atol=2e-2, rtol=2e-2)


def test_check_grads_prox_off_zero():
    x = jnp.asarray(SMOOTH)
    # Order 1: prox is affine on each side of 0, so its second derivative is 0 there.
    check_grads(lambda v: prox(v, mu=2.0), (x,), order=1, eps=1e-3, atol=2e-2, rtol=2e-2)
    # Also in μ (prox itself is differentiable in its hyperparameter).
    check_grads(lambda m: prox(x, mu=m), (jnp.float32(2.0),), order=1, eps=1e-3, rtol=2e-2)


def test_check_grads_poly_sign_inside():
    x = jnp.array([-0.8, -0.45, -0.2, -0.1, 0.15, 0.3, 0.5, 0.85])
    check_grads(poly_sign, (x,), order=2, eps=1e-3, atol=2e-2, rtol=2e-2)


def test_check_grads_bnn_plus_plus_pair():
    # F = B, so the pair's custom VJP must agree with finite differences of its own value.
    x = jnp.asarray(SMOOTH)
    check_grads(bnn_plus_plus(mu=2.0), (x,), order=2, modes=["rev"], eps=1e-3, rtol=2e-2)


# ------------------------------------------------------------------------------------------------
# BNN++ annealing and traced hyperparameters.


def test_bnn_plus_plus_forward_tends_to_sign():
    errors = [
        float(jnp.max(jnp.abs(bnn_plus_plus(mu=mu)(AWAY) - sign(AWAY))))
        for mu in (1.0, 10.0, 100.0, 1000.0)
    ]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 0.5  # far from sign at μ = 1
    assert errors[-1] < 1e-5  # stated tolerance at μ = 1000


@pytest.mark.parametrize("name", ["pc", "proxquant", "bnn+", "bnn++"])
def test_traced_hyperparameter_compiles_once(name):
    kwargs, _, _, _ = CASES[name]
    (field,) = kwargs
    traces = []

    @jax.jit
    def step(x, g, value):
        traces.append(None)  # runs only while tracing
        q = PAIRS[name](**{field: value})
        y, vjp = jax.vjp(q, x)
        return y, vjp(g)[0]

    x, g = jnp.asarray(EDGES), jnp.asarray(G_EDGES)
    x64 = EDGES.astype(np.float64)
    results = []
    for value in (0.5, 2.0, 8.0):
        y, g_x = step(x, g, jnp.float32(value))
        f_ref, b_ref = _refs(name, value)  # the references for this value
        np.testing.assert_allclose(y, f_ref(x64), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_x, G_EDGES * b_ref(x64), rtol=1e-5, atol=1e-5)
        results.append(np.asarray(jnp.concatenate([y, g_x])))
    assert len(traces) == 1
    assert not np.allclose(results[0], results[-1])  # the value did reach the computation


def _refs(name, v):
    return {
        "pc": (lambda x: _prox(x, v), np.ones_like),
        "proxquant": (lambda x: x, lambda x: np.full_like(x, 1 / (1 + v))),
        "bnn+": (_sign, lambda x: _sign_swish_prime(x, v)),
        "bnn++": (lambda x: _sign_swish(x, v), lambda x: _sign_swish_prime(x, v)),
    }[name]


def test_pair_with_traced_kwargs_compiles_once():
    traces = []

    @jax.jit
    def loss_grad(x, mu):
        traces.append(None)
        q = pair(prox, prox, forward_kwargs={"mu": mu}, backward_kwargs={"mu": mu})
        return jax.grad(lambda v: jnp.sum(q(v)))(x)

    x = jnp.asarray(SMOOTH)
    for mu in (1.0, 3.0, 9.0):
        np.testing.assert_allclose(loss_grad(x, jnp.float32(mu)), [1 / (1 + mu)] * 8, rtol=1e-6)
    assert len(traces) == 1


def test_hyperparameters_get_zero_gradient():
    x = jnp.asarray(SMOOTH)
    for make in (pc, proxquant, bnn_plus_plus):
        g_mu = jax.grad(lambda m, make=make: jnp.sum(make(m)(x)))(jnp.float32(2.0))
        assert float(g_mu) == 0.0


# ------------------------------------------------------------------------------------------------
# Transformations and dtypes.


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_vmap_grad(name):
    kwargs = CASES[name][0]
    q = PAIRS[name](**kwargs)
    x = jnp.asarray(EDGES).reshape(2, 4)
    loss = lambda v: jnp.sum(q(v) * jnp.asarray(G_EDGES).reshape(2, 4))  # noqa: E731
    # Fusion under jit may change the last bit of smooth functions.
    np.testing.assert_allclose(jax.jit(q)(x), q(x), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(q)(x), q(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jax.grad(loss)(x), rtol=1e-6)
    per_row = jax.vmap(jax.grad(lambda row, g: jnp.sum(q(row) * g)))(
        x, jnp.asarray(G_EDGES).reshape(2, 4)
    )
    np.testing.assert_allclose(per_row, jax.grad(loss)(x), rtol=1e-6)


def test_vmap_over_hyperparameter():
    x = jnp.asarray(EDGES)
    mus = jnp.array([1.0, 3.0])
    batched = jax.vmap(lambda m: pc(m)(x))(mus)
    np.testing.assert_allclose(batched[0], pc(1.0)(x), rtol=1e-6)
    np.testing.assert_allclose(batched[1], pc(3.0)(x), rtol=1e-6)
    g = jax.vmap(lambda m: jax.grad(lambda v: jnp.sum(proxquant(m)(v)))(x))(mus)
    np.testing.assert_allclose(g, [[0.5] * 8, [0.25] * 8], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_keeps_dtype(name):
    q = PAIRS[name](**CASES[name][0])
    x = jnp.asarray(EDGES, jnp.bfloat16)
    y, vjp = jax.vjp(q, x)
    (g_x,) = vjp(jnp.ones_like(y))
    assert y.dtype == jnp.bfloat16 and g_x.dtype == jnp.bfloat16


def test_every_forward_with_every_backward():
    x, g = jnp.asarray(EDGES), jnp.asarray(G_EDGES)
    for f_name, forward in FORWARDS.items():
        for b_name, backward in BACKWARDS.items():
            y, g_x = _value_and_vjp(pair(forward, backward), x, g)
            np.testing.assert_array_equal(y, forward(x), err_msg=f"{f_name}/{b_name}")
            np.testing.assert_allclose(
                g_x,
                g * jax.vmap(jax.grad(backward))(x),
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"{f_name}/{b_name}",
            )


def test_user_pair_sign_tanh():
    q = pair(jnp.sign, lambda x: jnp.tanh(3 * x))
    x = np.array([-1.0, -0.2, 0.0, 0.1, 0.3, 0.7, 1.0, 2.0], np.float32)
    g = np.array([2.0, -1.0, 0.5, 1.0, -0.5, -3.0, 0.75, 1.0], np.float32)
    y, g_x = _value_and_vjp(q, x, g)
    assert y.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # jnp.sign(0) = 0
    want = g * 3 * (1 - np.tanh(3 * x.astype(np.float64)) ** 2)
    np.testing.assert_allclose(g_x, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda v: jnp.sum(q(v) * g)))(x), want, rtol=1e-5, atol=1e-6
    )


def test_user_pair_with_kwargs_and_repr():
    q = pair(sign, sign_swish, backward_kwargs={"beta": 3.0})
    assert isinstance(q, QuantizerPair)
    assert repr(q) == "QuantizerPair(forward=sign(x), backward=sign_swish(x, beta=3.0))"
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(q(v)))(jnp.asarray(SMOOTH)),
        _sign_swish_prime(SMOOTH.astype(np.float64), 3.0),
        rtol=1e-5,
        atol=1e-6,
    )
    hash(q)  # usable as a static jit argument


# ------------------------------------------------------------------------------------------------
# Registries and errors.


def test_registries_are_read_only():
    for mapping in (PAIRS, FORWARDS, BACKWARDS):
        with pytest.raises(TypeError):
            mapping["new"] = identity
    built_in = {"identity", "sign", "hardtanh", "sign_swish", "prox", "poly_sign"}
    assert built_in | {"staircase", "soft_staircase"} <= set(FORWARDS)
    assert built_in - {"sign"} | {"soft_staircase"} <= set(BACKWARDS)
    for name, backward in BACKWARDS.items():  # every backward passes some gradient
        assert float(jax.grad(backward)(0.1)) > 0, name


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda v: pc(mu=v), "mu"),
        (lambda v: proxquant(mu=v), "mu"),
        (lambda v: bnn_plus(beta=v), "beta"),
        (lambda v: bnn_plus_plus(mu=v), "mu"),
        (lambda v: prox(jnp.ones(2), mu=v), "mu"),
        (lambda v: sign_swish(jnp.ones(2), beta=v), "beta"),
    ],
)
@pytest.mark.parametrize(
    "bad", [0, 0.0, -1.0, math.inf, math.nan, True, "1.0", None, np.array([1.0, -1.0])]
)
def test_bad_hyperparameters_raise(make, field, bad):
    with pytest.raises(ValueError, match=rf"^{field}="):
        make(bad)


def test_good_hyperparameter_types_accepted():
    for value in (1, 2.5, np.float32(2.0), np.int64(3), np.array([1.0, 2.0]), jnp.float32(4.0)):
        pc(mu=value)
        bnn_plus(beta=value)


def test_bad_pair_arguments_raise():
    with pytest.raises(ValueError, match="^forward="):
        pair(1.0, identity)
    with pytest.raises(ValueError, match="^backward="):
        pair(sign, "identity")
    with pytest.raises(ValueError, match="^forward_kwargs="):
        pair(sign, identity, forward_kwargs=[("mu", 1.0)])
    with pytest.raises(ValueError, match="^backward_kwargs="):
        pair(sign, identity, backward_kwargs={1: 2.0})


def test_non_elementwise_functions_raise():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="^forward=.*shape"):
        pair(jnp.sum, identity)(x)
    q = pair(sign, lambda v: jnp.sum(v, axis=0))
    with pytest.raises(ValueError, match="^backward=.*shape"):
        jax.grad(lambda v: jnp.sum(q(v)))(x)


def test_docstring_examples():
    result = doctest.testmod(_pairs, extraglobs={"jax": jax, "jnp": jnp})
    assert result.attempted >= 6 and result.failed == 0


@pytest.mark.parametrize("beta", [5.0, 1e3, 1e30])
def test_sign_swish_is_finite_where_beta_x_overflows(beta):
    x = jnp.array([1e38, -1e38, np.inf, -np.inf, 3e38, -3e38], jnp.float32)
    f = lambda t: sign_swish(t, beta=beta)  # noqa: E731
    for g in (f, jax.jit(f), jax.vmap(f)):
        np.testing.assert_array_equal(np.asarray(g(x)), [1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    grad = jax.jit(jax.vmap(jax.grad(f)))(x)
    np.testing.assert_array_equal(np.abs(np.asarray(grad)), 0.0)
    # BNN+ (sign forward, SignSwish backward) passes a zero, not NaN, gradient there.
    q = bnn_plus(beta)
    dx = jax.grad(lambda t: jnp.sum(q(t)))(x)
    np.testing.assert_array_equal(np.abs(np.asarray(dx)), 0.0)
    assert np.isnan(float(f(jnp.float32(np.nan))))  # NaN stays NaN


def test_sign_swish_unchanged_for_finite_beta_x():
    x = jnp.linspace(-30.0, 30.0, 61, dtype=jnp.float32)
    z = np.asarray(x, np.float64) * 2.0
    sig = 1.0 / (1.0 + np.exp(-z))
    want = 2 * sig * (1 + z * (1 - sig)) - 1
    np.testing.assert_allclose(np.asarray(sign_swish(x, beta=2.0)), want, atol=2e-6)
    check_grads(lambda t: sign_swish(t, beta=2.0), (jnp.array([-1.3, 0.2, 0.9]),), order=1)
