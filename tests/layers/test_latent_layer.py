"""QuantLatent (qflax/layers/_latent.py): a generic layer holding any family's params and state,
calibrated from the first batch, updating its state and writing its auxiliary loss in training,
and a tiny VQ autoencoder that trains and uses its codebook."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import quantizers as qz
from qflax.train import aux_loss


def _clusters(seed=0, n=128, k=4, dim=2, spread=4.0, noise=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-spread, spread, (k, dim)).astype(np.float32)
    x = centres[np.arange(n) % k] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return jnp.asarray(x), centres


def test_fsq_layer_is_the_quantizer_with_codes_and_no_params():
    spec = ql.TensorQuant(kind="fsq", config=qz.FSQConfig(levels=(8, 5, 5, 5)))
    layer = ql.QuantLatent(spec)
    z = jax.random.normal(jax.random.key(0), (3, 5, 4))
    y = layer(z, train=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(qz.fsq(z, spec.config)))
    assert float(layer.aux_loss[...]) == 0.0
    assert not jax.tree.leaves(nnx.state(layer, ql.QuantParam))
    idx = layer.indices(z)
    assert idx.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(layer.from_indices(idx)), np.asarray(y))
    info = layer.quant_info()
    assert info["family"] == "fsq" and info["codebook_size"] == 1000 and info["vector_dim"] == 4
    assert info["bits_per_vector"] == pytest.approx(np.log2(1000)) and info["act_bits"] == 3
    assert ql.calibrate(layer, z) == []  # nothing to set from data


def test_vq_ema_layer_calibrates_updates_and_writes_its_commitment_loss():
    config = qz.VQConfig(codebook_size=4, dim=2, decay=0.9, restart_threshold=0.0, kmeans_iters=5)
    layer = ql.QuantLatent(ql.TensorQuant(kind="vq", config=config))
    assert set(layer.stat_names) == {"codebook", "cluster_size", "embed_sum"}
    x, centres = _clusters()
    assert ql.calibrate(layer, x) == [""]
    want = qz.kmeans_codebook(x, 4, key=jax.random.fold_in(jax.random.key(0), 0), iters=5)
    np.testing.assert_allclose(np.asarray(layer.stat_codebook[...]), np.asarray(want), rtol=1e-6)
    found = np.linalg.norm(np.asarray(want)[:, None] - centres[None], axis=-1).min(axis=0)
    assert found.max() < 0.1  # the codebook found the four clusters
    before = qz.vq_ema_init(layer.stat_codebook[...])
    z = x + 0.01
    y = layer(z, train=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(qz.vq(z, before["codebook"], config)))
    idx = qz.vq_indices(z, before["codebook"], config)
    after = qz.vq_ema_update(before, z, idx, config)
    for name in after:
        np.testing.assert_allclose(
            np.asarray(getattr(layer, f"stat_{name}")[...]), np.asarray(after[name]), rtol=1e-6
        )
    commitment = 0.25 * np.mean((np.asarray(z) - np.asarray(y)) ** 2)
    assert float(layer.aux_loss[...]) == pytest.approx(commitment, rel=1e-5)
    frozen = {n: np.asarray(getattr(layer, f"stat_{n}")[...]) for n in layer.stat_names}
    layer(z)  # inference: no state update
    for name, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(getattr(layer, f"stat_{name}")[...]), value)


def test_vq_param_codebook_learns_from_the_codebook_loss():
    config = qz.VQConfig(codebook_size=4, dim=2, ema=False, kmeans_iters=2)
    layer = ql.QuantLatent(ql.TensorQuant(kind="vq", config=config))
    assert isinstance(layer.param_codebook, ql.QuantParam) and not layer.stat_names
    placeholder = np.asarray(layer.param_codebook[...])
    x, _ = _clusters(1)
    ql.calibrate(layer, x)
    assert not np.array_equal(np.asarray(layer.param_codebook[...]), placeholder)

    def loss(layer):
        layer(x + 0.3, train=True)
        return layer.aux_loss[...]

    grads = nnx.grad(loss)(layer)
    g = np.asarray(grads["param_codebook"][...])
    assert np.abs(g).sum() > 0  # the codebook loss reaches the codebook
    q = np.asarray(layer.from_indices(layer.indices(x + 0.3)))
    total = 1.25 * np.mean((np.asarray(x) + 0.3 - q) ** 2)  # codebook + 0.25·commitment
    assert float(layer.aux_loss[...]) == pytest.approx(total, rel=1e-5)
    assert layer.quant_info()["params"] == 8


def test_a_quant_linear_with_a_vq_input_quantizer_calibrates_its_codebook():
    spec = ql.TensorQuant(kind="vq", config=qz.VQConfig(codebook_size=4, dim=2, kmeans_iters=2))
    layer = ql.QuantLinear(2, 3, recipe=ql.Recipe(act=spec), rngs=nnx.Rngs(0))
    placeholder = np.asarray(layer.act_codebook[...])
    x, _ = _clusters(2)
    ql.calibrate(layer, x)
    assert not np.array_equal(np.asarray(layer.act_codebook[...]), placeholder)
    q = qz.vq(x, layer.act_codebook[...], spec.config)
    want = q @ layer.inner.kernel[...] + layer.inner.bias[...]
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="quant=.*allowed: a qflax TensorQuant"):
        ql.QuantLatent(qz.FSQConfig())
    with pytest.raises(ValueError, match="quantizes weight tensors; allowed: a spec whose"):
        ql.QuantLatent(ql.TensorQuant(kind="codeq"))
    spec = ql.TensorQuant(kind="fsq", config=qz.FSQConfig(levels=(3, 3)))
    with pytest.raises(ValueError, match="features=3 does not match.*allowed: 2"):
        ql.QuantLatent(spec, features=3)


class _AutoEncoder(nnx.Module):
    def __init__(self, spec, rngs):
        self.enc = nnx.Linear(8, 4, rngs=rngs)
        self.quant = ql.QuantLatent(spec)
        self.dec = nnx.Linear(4, 8, rngs=rngs)

    def __call__(self, x, train=False):
        return self.dec(self.quant(self.enc(x), train=train))


def test_a_vq_autoencoder_trains_and_uses_its_codebook():
    """From the uncalibrated placeholder codebook (few codes in use), MSE + the commitment loss,
    the EMA codebook and dead-code restarts raise the utilisation to near all codes (without
    restarts it stalls near 0.6 here; after k-means calibration it starts at 1)."""
    k = 16
    x, _ = _clusters(3, n=256, k=k, dim=8, spread=1.0, noise=0.02)
    config = qz.VQConfig(codebook_size=k, dim=4, decay=0.8)
    model = _AutoEncoder(ql.TensorQuant(kind="vq", config=config), nnx.Rngs(0))
    start = float(qz.code_utilisation(model.quant.indices(model.enc(x)), k))
    assert start < 0.4
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x):
        traces.append(1)

        def loss_fn(model):
            mse = jnp.mean(jnp.square(model(x, train=True) - x))
            return mse + aux_loss(model), mse

        (_, mse), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's step counts mix int and float
            optimizer.update(model, grads)
        return mse

    first = float(step(model, optimizer, x))
    for _ in range(149):
        mse = step(model, optimizer, x)
    assert len(traces) == 1  # the graph (state included) is stable: one compile
    assert float(mse) < 0.3 * first
    idx = model.quant.indices(model.enc(x))
    assert float(qz.code_utilisation(idx, k)) > 0.85
    assert float(model.quant.aux_loss[...]) > 0
