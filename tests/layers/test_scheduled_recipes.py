"""DBSSQ, CoDeQ and annealed pairs in the layers: each layer computes exactly its quantizer,
the scheduled state (ε, μ, σ) lives in QuantStats that can be set without retracing, and the
learned CoDeQ bit-width and sparsity reach the summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import quantizers as qz
from qflax.layers import QuantLinear, Recipe, TensorQuant, recipes


def _x(seed=1, shape=(8, 6)):
    return jax.random.normal(jax.random.key(seed), shape)


def _layer(recipe):
    return QuantLinear(6, 5, recipe=recipe, rngs=nnx.Rngs(0))


def test_dbssq_layer_blends_and_is_exact_at_epsilon_zero():
    layer = _layer(recipes.dbssq(2, 2))
    kernel = layer.inner.kernel[...]
    sigma = qz.dbssq_weight_init(kernel, axis=-1)
    np.testing.assert_allclose(layer.weight_sigma[...], np.ravel(sigma), rtol=1e-6)
    assert float(layer.weight_epsilon[...]) == float(layer.act_epsilon[...]) == 1.0
    x = _x()
    cfg = qz.DBSSQConfig(levels="shift", bits=2)
    start = (jnp.zeros(6), jnp.ones(6))  # running statistics before any training step
    for eps in (1.0, 0.25, 0.0):
        assert layer.set_stat("epsilon", eps) == ["act", "weight"]
        w_q = qz.dbssq_weight(kernel, eps, sigma, cfg)
        expected = qz.dbssq_act(x, eps, cfg, running=start) @ w_q + layer.inner.bias[...]
        np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)  # eval mode
        np.testing.assert_allclose(layer.act_mean[...], 0.0)  # not updated outside training
        layer.train()
        expected = qz.dbssq_act(x, eps, cfg) @ w_q + layer.inner.bias[...]
        np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)  # batch stats
        layer.eval()
        layer.act_mean[...], layer.act_var[...] = start
    # at ε = 0 every weight is ±3σ_c·2^−k: shift levels only
    w = np.asarray(layer.quantized_kernel()) / (3 * np.asarray(sigma))
    levels = {1.0, 0.5, 0.25, 0.125}
    assert set(np.round(np.abs(w), 6).ravel()) <= levels
    info = layer.quant_info()
    assert (info["weight_bits"], info["act_bits"]) == (3, 3)  # 4 magnitudes and a sign


def test_dbssq_activations_track_running_statistics_in_training_mode():
    """model.train(): each call normalises with the batch and moves the running statistics by
    PyTorch's rule; model.eval(): the running ones, so one example's output does not depend on
    the batch it comes in (the authors' BatchNorm2d in eval mode)."""
    layer = _layer(recipes.dbssq(2, 2))
    x = 2.0 + 3.0 * _x(shape=(64, 6))
    layer.train()
    mean, var = jnp.zeros(6), jnp.ones(6)
    for _ in range(3):
        layer(x)
        mean, var = qz.dbssq_running_stats(x, mean, var)
    np.testing.assert_allclose(layer.act_mean[...], mean, rtol=1e-6)
    np.testing.assert_allclose(layer.act_var[...], var, rtol=1e-6)
    unbiased = np.var(np.asarray(x), axis=0, ddof=1)
    np.testing.assert_allclose(var, 0.9**3 + (1 - 0.9**3) * unbiased, rtol=1e-5)
    for _ in range(120):  # the running statistics converge to the data's
        layer(x)
    np.testing.assert_allclose(layer.act_mean[...], np.mean(np.asarray(x), 0), rtol=1e-3)
    layer.eval()
    one = layer(x[:1])
    np.testing.assert_allclose(layer(x)[:1], one, rtol=1e-6)
    layer.train()  # batch statistics of a single example: a different output
    assert not np.allclose(layer(x[:1]), one)


def test_dbssq_running_statistics_need_matching_shapes():
    x = _x(shape=(4, 3))
    with pytest.raises(ValueError, match=r"running mean has shape \(4,\); allowed .* \(3,\)"):
        qz.dbssq_act(x, 0.0, qz.DBSSQConfig(), running=(jnp.zeros(4), jnp.ones(3)))
    with pytest.raises(ValueError, match=r"momentum=1.5 is out of range"):
        qz.dbssq_running_stats(x, jnp.zeros(3), jnp.ones(3), momentum=1.5)


def test_setting_a_stat_does_not_retrace():
    layer = _layer(recipes.dbssq(2, None))
    traces = []

    @nnx.jit
    def forward(m, x):
        traces.append(1)
        return m(x)

    x = _x()
    a = forward(layer, x)
    layer.set_stat("epsilon", 0.0)
    b = forward(layer, x)
    assert len(traces) == 1
    assert not np.allclose(a, b)


def test_codeq_layer_prunes_and_reports_learned_bits_and_sparsity():
    layer = _layer(recipes.codeq(None, None))
    assert (float(layer.weight_theta_d[...]), float(layer.weight_theta_b[...])) == (3.0, 3.0)
    x = _x()
    cfg = qz.CoDeQConfig()
    params = {"theta_d": layer.weight_theta_d[...], "theta_b": layer.weight_theta_b[...]}
    expected = x @ qz.codeq(layer.inner.kernel[...], params, cfg) + layer.inner.bias[...]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert layer.quant_info()["weight_bits"] == 8
    # a smaller θ_d widens the dead zone, a smaller θ_b lowers the bits
    layer.weight_theta_d[...] = jnp.asarray(0.3)
    layer.weight_theta_b[...] = jnp.asarray(0.2)
    info = layer.quant_info()
    bits = int(qz.codeq_bits({"theta_d": 0.3, "theta_b": jnp.asarray(0.2)}, cfg))
    assert info["weight_bits"] == bits == 3
    assert info["sparsity"] > 0.3
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert float(grads.weight_theta_d[...]) != 0.0


def test_pair_mu_is_state_and_matches_the_factory():
    layer = _layer(recipes.binary("bnn++", scaling="none", mu=2.0))
    x = _x()
    assert float(layer.weight_mu[...]) == float(layer.act_mu[...]) == 2.0
    for mu in (2.0, 40.0):
        layer.set_stat("mu", mu)
        pair = qz.PAIRS["bnn++"](mu=mu)
        expected = pair(x) @ pair(layer.inner.kernel[...]) + layer.inner.bias[...]
        np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    # a callable gets the role's TensorQuant (to read the recipe's start value)
    layer.set_stat("mu", lambda tq: 3 * dict(tq.config.kwargs)["mu"])
    assert float(layer.weight_mu[...]) == 6.0
    # pairs without μ keep no state
    assert _layer(recipes.binary("bnn")).stat_names == ()


@pytest.mark.parametrize("pair", ["bnn++", "pc", "proxquant"])
def test_relaxed_pair_hard_stat_switches_to_the_exact_sign_forward(pair):
    layer = _layer(recipes.binary(pair, scaling="channel"))
    assert "hard" in dict(layer.stat_names)["weight"] and float(layer.weight_hard[...]) == 0.0
    x = _x()
    relaxed = layer(x)
    layer.set_stat("hard", 1.0)
    kernel = layer.inner.kernel[...]
    alpha = qz.binary_scale(kernel, qz.BinaryConfig(scaling="channel"))
    expected = qz.sign(x) @ (alpha * qz.sign(kernel)) + layer.inner.bias[...]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(relaxed, expected, atol=1e-3)
    # while relaxed (hard = 0) the gradient is the pair's
    layer.set_stat("hard", 0.0)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert float(jnp.abs(grads.inner.kernel[...]).sum()) > 0.0
    # pairs whose forward is a sign have nothing to switch
    assert not recipes.binary("bnn+").weight.config.relaxed


def test_normalized_pair_acts_on_the_scaled_tensor_and_keeps_its_gradient():
    tq = recipes.binary("bnn++", scaling="channel", normalize=True, mu=50.0).weight
    w = 0.03 * jax.random.normal(jax.random.key(1), (16, 4))  # latent weights' size
    alpha = jnp.mean(jnp.abs(w), axis=0, keepdims=True)
    pair = qz.PAIRS["bnn++"](mu=50.0)
    np.testing.assert_allclose(tq.apply(w), alpha * pair(w / alpha), rtol=1e-5, atol=1e-7)
    # scale-free: far nearer a sign than the plain pair at the same μ
    plain = recipes.binary("bnn++", scaling="channel", mu=50.0).weight.apply(w)
    assert jnp.mean(jnp.abs(jnp.abs(tq.apply(w)) - alpha)) < 0.2 * jnp.mean(
        jnp.abs(jnp.abs(plain) - alpha)
    )
    # d/dw [α·F(w/α)] with α under stop_gradient = B′(w/α) (the custom VJP of the pair)
    g = jax.grad(lambda w: jnp.sum(tq.apply(w)))(w)
    expected = jax.vmap(jax.grad(lambda v: qz.sign_swish(v, 50.0)))(jnp.ravel(w / alpha))
    np.testing.assert_allclose(g, expected.reshape(w.shape), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        recipes.binary(None, normalize=True)
    with pytest.raises(TypeError, match="normalize"):  # a pair's option (PairConfig) only
        TensorQuant(kind="binary", normalize=True)


def test_binary_recipe_drops_unset_pair_arguments():
    assert recipes.binary("bnn", mu=None).weight.config.kwargs == ()
    with pytest.raises(ValueError, match="not arguments of pair 'bnn'; allowed: none"):
        recipes.binary("bnn", mu=3.0)  # bnn takes no μ
    with pytest.raises(ValueError, match="allowed: beta"):
        recipes.binary("bnn+", mu=3.0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TensorQuant(kind="dbssq"), "role=None"),
        (lambda: TensorQuant(kind="codeq", role="weight"), "role='weight' is only used"),
        (lambda: Recipe(act=TensorQuant(kind="codeq")), "is a weight quantizer"),
        (
            lambda: Recipe(weight=TensorQuant(kind="dbssq", role="act")),
            "activation quantizer",
        ),
        (lambda: recipes.dbssq(2, levels="log"), "levels='log'"),
        (lambda: recipes.codeq(9), "weight_bits: fixed_bits=9"),
    ],
)
def test_misuse_is_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()
