"""The learned-quantizer recipes (LSQ, PACT, DoReFa, GDNSQ) in the layers: each layer computes
exactly its quantizer function, learnable params get gradients, GDNSQ reports continuous and
integer bit-widths, the noise rule's key is drawn per call, and misuse is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import models
from qflax import quantizers as qz
from qflax.layers import QuantLinear, Recipe, TensorQuant, recipes


def _linear(recipe, seed=0):
    return QuantLinear(6, 5, recipe=recipe, rngs=nnx.Rngs(seed))


def _x(seed=1, shape=(4, 6)):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-0.5, maxval=2.0)


def _reference(layer, x, wq, aq):
    kernel = layer.inner.kernel[...]
    return aq(x) @ wq(kernel) + layer.inner.bias[...]


def test_lsq_layer_is_lsq_of_kernel_and_input():
    layer = _linear(recipes.lsq(3, 4))
    x = _x()
    layer.calibrating = True
    layer(x)
    layer.calibrating = False
    w_step, a_step = layer.weight_step[...], layer.act_step[...]
    # the paper's init: 2·mean|x|/√QP (weights signed 3-bit QP=3, inputs unsigned 4-bit QP=15)
    np.testing.assert_allclose(
        w_step, 2 * np.mean(np.abs(layer.inner.kernel[...])) / np.sqrt(3), rtol=1e-6
    )
    np.testing.assert_allclose(a_step, 2 * np.mean(np.abs(x)) / np.sqrt(15), rtol=1e-6)
    wcfg, acfg = qz.LSQConfig(bits=3), qz.LSQConfig(bits=4, signed=False)
    expected = _reference(
        layer,
        x,
        lambda w: qz.lsq(w, {"step": jnp.reshape(w_step, (1, 1))}, wcfg),
        lambda a: qz.lsq(a, {"step": jnp.reshape(a_step, (1, 1))}, acfg),
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert float(jnp.abs(grads.weight_step[...])) > 0
    assert float(jnp.abs(grads.act_step[...])) > 0


def test_pact_and_dorefa_layers_match_their_functions():
    x = _x()
    layer = _linear(recipes.pact(2, 3, init_alpha=1.5))
    assert float(layer.act_alpha[...]) == 1.5
    expected = _reference(
        layer,
        x,
        lambda w: qz.dorefa_weights(w, bits=2),
        lambda a: qz.pact(a, {"alpha": jnp.asarray(1.5)}, qz.PACTConfig(bits=3)),
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    # α gets the gradient of the elements clipped at it (x ≥ α): some inputs are above 1.5
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(layer)
    assert float(jnp.abs(grads.act_alpha[...])) > 0

    layer = _linear(recipes.dorefa(1, 2))
    expected = _reference(
        layer,
        x,
        lambda w: qz.dorefa_weights(w, bits=1),
        lambda a: qz.dorefa_activations(a, bits=2),
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_gdnsq_layer_matches_the_quantizers_and_reports_bits():
    x = jax.nn.relu(_x())
    layer = _linear(recipes.gdnsq(3, 4, init_bits=6.0, backward="ste"))
    layer.calibrating = True
    layer(x)
    layer.calibrating = False
    widths = layer.bit_widths()
    # both start at init_bits exactly; the targets are the recipe's bits
    np.testing.assert_allclose(widths["weight"][0], np.full(5, 6.0), atol=1e-5)
    np.testing.assert_allclose(widths["act"][0], 6.0, atol=1e-5)
    assert (widths["weight"][1], widths["act"][1]) == (3, 4)
    assert layer.used_bits() == {"weight": 6, "act": 6}
    info = layer.quant_info()
    assert (info["weight_bits"], info["act_bits"]) == (6, 6)  # used, not the target
    wcfg, acfg = layer.recipe.weight.config, layer.recipe.act.config
    w_params = {"log_step": layer.weight_log_step[...].reshape(1, 5)}
    a_params = {k: getattr(layer, f"act_{k}")[...] for k in ("log_step", "log_range", "lower")}
    expected = _reference(
        layer,
        x,
        lambda w: qz.gdnsq_weight(w, w_params, wcfg),
        lambda a: qz.gdnsq_act(a, a_params, acfg),
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    # the activation grid covers [0, max x] with 2^6 levels
    assert float(jnp.max(qz.gdnsq_act(x, a_params, acfg))) == pytest.approx(float(jnp.max(x)))
    # a 2^2 larger step: spread/s = 63/4 → max code round(15.75) = 16 → 17 levels → 5 bits;
    # a little more and the codes fit 0..15 → 4 bits (ceil(log2(max − min + 1)))
    layer.weight_log_step[...] = layer.weight_log_step[...] + 2.0
    assert layer.used_bits()["weight"] == 5
    layer.weight_log_step[...] = layer.weight_log_step[...] + 0.1
    assert layer.used_bits()["weight"] == 4
    # the continuous widths are differentiable in the log-steps: d b / d ℓ < 0
    grads = nnx.grad(lambda m: sum(jnp.sum(b) for b, _ in m.bit_widths().values()))(layer)
    assert np.all(np.asarray(grads.weight_log_step[...]) < 0)
    assert float(grads.act_log_step[...]) == pytest.approx(-1.0)
    assert float(grads.act_log_range[...]) == pytest.approx(1.0)


def test_gdnsq_noise_rule_draws_a_new_key_per_call_and_reproduces():
    recipe = recipes.gdnsq(2, 2, backward="noise")
    model = nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)))
    qmodel, _ = ql.quantize_model(model, [ql.Rule(".*", recipe)])
    layer = qmodel.layers[0]
    x = jax.nn.relu(_x())
    key0 = np.asarray(layer.noise_key[...])
    g1 = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qmodel)
    key1 = np.asarray(layer.noise_key[...])
    assert not np.array_equal(key0, key1)  # split on every call
    g2 = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qmodel)
    # a fresh draw changes the log-step gradient (the noise term), not the kernel's
    a = np.asarray(g1.layers[0].weight_log_step[...])
    b = np.asarray(g2.layers[0].weight_log_step[...])
    assert not np.allclose(a, b)
    np.testing.assert_allclose(
        g1.layers[0].inner.kernel[...], g2.layers[0].inner.kernel[...], rtol=1e-6
    )
    # the same path seeds the same key: two quantized copies draw the same noise
    again, _ = ql.quantize_model(model, [ql.Rule(".*", recipe)])
    np.testing.assert_array_equal(again.layers[0].noise_key[...], key0)


def test_gdnsq_in_a_cnn_learns_bits_only_where_quantized():
    model = models.build_model("cnn", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    q, _ = ql.quantize_model(model, list(ql.first_last_float_rules(recipes.gdnsq(2, None))))
    ql.calibrate(q, jax.random.uniform(jax.random.key(0), (4, 8, 8, 1)))
    found = {
        ".".join(map(str, p)): set(n.bit_widths())
        for p, n in nnx.iter_graph(q)
        if isinstance(n, ql.QuantConv | ql.QuantLinear)
    }
    assert found == {"conv2": {"weight"}, "dense": {"weight"}}


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Recipe(weight=TensorQuant(kind="pact")), "weight=pact.* activation quantizer"),
        (
            lambda: Recipe(act=TensorQuant(kind="gdnsq", target_bits=2)),
            "act=gdnsq.* is a weight quantizer",
        ),
        (lambda: TensorQuant(kind="gdnsq"), "target_bits=None is not allowed"),
        (lambda: TensorQuant(kind="lsq", target_bits=2), "target_bits=2 is only used"),
        (lambda: TensorQuant(kind="lsq", config=qz.PACTConfig()), "does not fit kind='lsq'"),
        (lambda: recipes.gdnsq(2, 2, backward="exact"), "backward='exact'"),
        (lambda: recipes.gdnsq(2, 2, init_bits=40.0), "init_bits=40.0 is out of range"),
        (lambda: recipes.dorefa(0, 2), "weight_bits: bits=0"),
    ],
)
def test_misuse_is_refused_naming_the_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_noise_rule_without_key_is_refused():
    spec = recipes.gdnsq(2, 2, backward="noise").weight
    w = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="key=None is not allowed"):
        spec.apply(w, spec.init(w))
