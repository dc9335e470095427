"""Tests of DoReFa (qflax/quantizers/_dorefa.py, METHODS.md §2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from qflax.quantizers._dorefa import (
    dorefa_activations,
    dorefa_gradients,
    dorefa_quantize_k,
    dorefa_weight_transform,
    dorefa_weights,
)

SHAPE = (4, 6)


def _data(seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(SHAPE)).astype(np.float32)


def _qk(r, k):
    n = 2**k - 1
    return np.round(r * n) / n


# --------------------------------------------------------------------------------------------
# Weights.


@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_weights_forward_grid_and_reference(bits, seed):
    w = _data(seed)
    out = np.asarray(dorefa_weights(w, bits=bits))
    t = np.tanh(w.astype(np.float64))
    ref = 2 * _qk(t / (2 * np.abs(t).max()) + 0.5, bits) - 1
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    k = (out.astype(np.float64) + 1) / 2 * (2**bits - 1)
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    # The extreme weight maps to ±1 exactly.
    i = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    assert abs(out[i]) == pytest.approx(1.0)


@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_weights_gradient_is_the_transform_gradient(bits, seed):
    w = jnp.asarray(_data(seed))
    cot = jnp.asarray(_data(seed + 1))
    _, vjp = jax.vjp(lambda w: dorefa_weights(w, bits=bits), w)
    _, vjp_t = jax.vjp(dorefa_weight_transform, w)
    np.testing.assert_allclose(
        np.asarray(vjp(cot)[0]), 2 * np.asarray(vjp_t(cot)[0]), rtol=1e-5, atol=1e-6
    )


def test_weight_transform_smooth_gradients():
    w = jnp.asarray(_data(3))  # distinct magnitudes: no ties in the max
    check_grads(
        dorefa_weight_transform, (w.astype(jnp.float32),), order=1, modes=("rev",), eps=1e-3
    )
    # And by hand: d/dw of tanh(w)/(2M) + 1/2 for an element that is not the max.
    w = jnp.array([0.3, -2.0])
    g = jax.grad(lambda w: dorefa_weight_transform(w)[0])(w)
    m = np.tanh(2.0)
    np.testing.assert_allclose(np.asarray(g[0]), (1 - np.tanh(0.3) ** 2) / (2 * m), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(g[1]), np.tanh(0.3) / (2 * m**2) * (1 - m**2), rtol=1e-5
    )  # through max|tanh w| (w1 < 0: |tanh| = -tanh)


def test_binary_weights():
    w = jnp.array([-2.0, 0.0, 1.0, 0.5])
    out = dorefa_weights(w, bits=1)
    np.testing.assert_allclose(np.asarray(out), [-0.875, 0.875, 0.875, 0.875])
    cot = jnp.array([1.0, 2.0, 3.0, 4.0])
    _, vjp = jax.vjp(lambda w: dorefa_weights(w, bits=1), w)
    np.testing.assert_array_equal(np.asarray(vjp(cot)[0]), np.asarray(cot))


# --------------------------------------------------------------------------------------------
# Activations and q_k.


@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_activations(bits, seed):
    x = _data(seed)
    x[0, :2] = [0.0, 1.0]
    out = np.asarray(dorefa_activations(x, bits=bits))
    np.testing.assert_allclose(out, _qk(np.clip(x.astype(np.float64), 0, 1), bits), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dorefa_activations(out, bits=bits)), out)
    cot = _data(seed + 1)
    _, vjp = jax.vjp(lambda x: dorefa_activations(x, bits=bits), jnp.asarray(x))
    np.testing.assert_array_equal(
        np.asarray(vjp(jnp.asarray(cot))[0]), np.where((x >= 0) & (x <= 1), cot, 0)
    )


def test_quantize_k_golden_and_ste():
    out = dorefa_quantize_k(jnp.array([0.1, 0.5, 0.9, 1 / 6]), bits=2)
    np.testing.assert_allclose(np.asarray(out), [0, 2 / 3, 1, 0], rtol=1e-6)  # 0.5 -> tie to even
    g = jax.grad(lambda x: jnp.sum(dorefa_quantize_k(x, bits=3) * jnp.arange(3.0)))(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(g), [0.0, 1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Gradients.


def _grad_of(x, cot, bits, key):
    _, vjp = jax.vjp(lambda x: dorefa_gradients(x, bits=bits, key=key), x)
    return vjp(cot)[0]


@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_gradients_formula(bits, seed):
    x = jnp.asarray(_data(seed))
    cot = _data(seed + 1) * 10 ** (np.arange(4)[:, None] - 2.0)  # very different sample scales
    cot[2] = 0.0  # an all-zero sample
    key = jax.random.key(seed)
    assert np.array_equal(np.asarray(dorefa_gradients(x, bits=bits, key=key)), np.asarray(x))
    got = np.asarray(_grad_of(x, jnp.asarray(cot, jnp.float32), bits, key))
    n = 2**bits - 1
    noise = np.asarray(jax.random.uniform(key, SHAPE, jnp.float32, -0.5, 0.5)) / n
    m = np.abs(cot).max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cot / (2 * m) + 0.5 + noise, 0, 1)
        want = np.where(m > 0, 2 * m * (_qk(r, bits) - 0.5), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * m.max())
    # On the per-sample grid: got/(2m) + 1/2 is a multiple of 1/n.
    for i in (0, 1, 3):
        k = (got[i] / (2 * m[i]) + 0.5) * n
        np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    np.testing.assert_array_equal(got[2], 0.0)


def test_gradients_are_nearly_unbiased():
    cot = jnp.asarray(_data(5)) * 0.3
    keys = jax.random.split(jax.random.key(0), 400)
    grads = jax.jit(jax.vmap(lambda k: _grad_of(jnp.zeros(SHAPE), cot, 2, k)))(keys)
    m = np.abs(np.asarray(cot)).max(axis=1, keepdims=True)
    # Unbiased where the clip is inactive (|g| ≤ m(1 − 1/n)); std of the mean ≤ m/(3·20).
    mean = np.asarray(grads).mean(0)
    inner = np.abs(np.asarray(cot)) <= m * (1 - 1 / 3)
    assert np.all(np.abs(mean - np.asarray(cot))[inner] < np.broadcast_to(m / 10, SHAPE)[inner])
    # Same key, same gradient; different keys differ.
    assert np.array_equal(
        np.asarray(grads[0]), np.asarray(_grad_of(jnp.zeros(SHAPE), cot, 2, keys[0]))
    )
    assert not np.array_equal(np.asarray(grads[0]), np.asarray(grads[1]))


def test_jit_vmap_grad_and_raw_keys():
    x = jnp.asarray(_data(0))

    def loss(x, key):
        return jnp.sum(dorefa_gradients(dorefa_weights(x, bits=3), bits=4, key=key) ** 2)

    key = jax.random.PRNGKey(1)  # raw uint32 keys work too
    g = jax.jit(jax.grad(loss))(x, key)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(loss)(x, key)), rtol=1e-6)
    xs = jnp.stack([x, 2 * x])
    out = jax.vmap(lambda x: dorefa_activations(x, bits=2))(xs)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(dorefa_activations(2 * x, bits=2)))
    ws = jax.jit(jax.vmap(lambda w: dorefa_weights(w, bits=2)))(xs)
    np.testing.assert_array_equal(np.asarray(ws[1]), np.asarray(dorefa_weights(2 * x, bits=2)))


@pytest.mark.parametrize("bits", [0, 25, 2.0, True])
def test_bad_bits_raise(bits):
    for fn in (dorefa_weights, dorefa_activations, dorefa_quantize_k):
        with pytest.raises(ValueError, match=r"bits=.*allowed"):
            fn(jnp.zeros(3), bits=bits)
    with pytest.raises(ValueError, match=r"bits=.*allowed"):
        dorefa_gradients(jnp.zeros(3), bits=bits, key=jax.random.key(0))


def test_missing_key_raises():
    with pytest.raises(ValueError, match=r"key=None.*allowed"):
        dorefa_gradients(jnp.zeros(3), bits=4, key=None)
