"""The family registry: built-in families register like a user's, and a user's family and pair
work in layers, summaries, the optimizer's tags and export with no edit to qflax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import quantizers as qz
from qflax import studies
from qflax.export import dequantize, export_model, import_model, quantize_tensor
from qflax.train import default_config, make_optimizer
from tests.fixtures import user_quantizers as user

BUILT_IN = (
    "absmax",
    "learned_step",
    "pow2",
    "binary",
    "ternary",
    "pair",
    "lsq",
    "pact",
    "dorefa",
    "gdnsq",
    "dbssq",
    "codeq",
)


def test_every_built_in_family_is_registered_as_a_family_object():
    for name in BUILT_IN:
        family = qz.FAMILIES[name]
        assert isinstance(family, qz.QuantizerFamily)
        assert family.name == name
        assert qz.get_family(name) is family
    with pytest.raises(ValueError, match="kind='nope' is not allowed; allowed: absmax"):
        qz.get_family("nope")


def test_register_family_refuses_duplicates_and_non_families():
    class Other(qz.QuantizerFamily):
        name = "absmax"

    with pytest.raises(ValueError, match="'absmax' is already registered"):
        qz.register_family(Other())
    with pytest.raises(ValueError, match="an instance of qflax.quantizers.QuantizerFamily"):
        qz.register_family(object())
    # the same class re-created (a config file imported again) replaces the entry
    qz.register_family(user.ClipUniformFamily())
    assert isinstance(qz.FAMILIES["clip_uniform"], user.ClipUniformFamily)


def test_specs_ask_the_family():
    spec = ql.TensorQuant(kind="clip_uniform", config=user.ClipUniformConfig(bits=3))
    assert spec.bits == 3 and spec.learnable and spec.param_tags == {"clip": ("clip",)}
    assert str(spec) == "clip_uniform3"
    with pytest.raises(ValueError, match="does not fit kind='clip_uniform'"):
        ql.TensorQuant(kind="clip_uniform", config=qz.UniformConfig())
    with pytest.raises(ValueError, match="target_bits=4 is only used by families that learn"):
        ql.TensorQuant(kind="clip_uniform", target_bits=4)
    # a family's roles are checked by the recipe: PACT quantizes activations only
    with pytest.raises(ValueError, match="weight=pact4 is an activation quantizer"):
        ql.Recipe(weight=ql.TensorQuant(kind="pact"))


def _x(seed=0, shape=(6, 5)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_user_family_values_gradients_jit_vmap():
    spec = ql.TensorQuant(kind="clip_uniform", config=user.ClipUniformConfig(bits=3))
    x = _x() * 2
    params = spec.init(x)
    y = spec.apply(x, params)
    c = float(params["clip"])
    levels = np.round(np.clip(np.asarray(x) / c, -1, 1) * 3) * c / 3
    np.testing.assert_allclose(y, levels, rtol=1e-6)
    # straight-through inside the clip, zero outside; the clip gets the LSQ-style gradient
    gx, gp = jax.grad(lambda x, p: jnp.sum(spec.apply(x, p)), argnums=(0, 1))(x, params)
    np.testing.assert_array_equal(gx, (np.abs(np.asarray(x)) < c).astype(np.float32))
    assert np.isfinite(float(gp["clip"]))
    np.testing.assert_allclose(jax.jit(spec.apply)(x, params), y, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda r: spec.apply(r, params))(x), y, rtol=1e-6)


def test_user_family_trains_summarises_and_exports():
    model = ql.QuantLinear(
        5, 3, recipe=ql.recipes.build("user_clip", weight_bits=3), rngs=nnx.Rngs(0)
    )
    rows = ql.layer_summaries(model)
    assert rows[0]["weight_bits"] == 3 and rows[0]["recipe"] == "w:clip_uniform3 a:clip_uniform4"
    # the optimizer finds the learned clips by their tag: quant.clip_decay reaches them
    config = default_config()
    config.quant.clip_decay = 0.5
    config.quant.max_update = 0.0
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(config, params, steps_per_epoch=1)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["weight_clip"][...]) != 0.0  # L2 on the clip only
    assert float(jnp.abs(updates["inner"]["kernel"][...]).sum()) == 0.0
    # codes at rest decode to the forward's values; import restores the kernel and the clip
    kernel = model.inner.kernel[...]
    q = quantize_tensor(model.recipe.weight, kernel, model._params("weight"))
    np.testing.assert_allclose(dequantize(q), model.quantized_kernel(), rtol=1e-6, atol=1e-7)
    tree = export_model(model)
    other = ql.QuantLinear(5, 3, recipe=model.recipe, rngs=nnx.Rngs(1))
    import_model(other, tree)
    x = _x(2, (4, 5))
    np.testing.assert_allclose(other(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_family_without_codes_is_refused_by_name():
    class NoCodes(qz.QuantizerFamily):
        name = "test_no_codes"
        config_types = ()

        def apply(self, spec, x, params, *, key=None, stats=None):
            return jnp.round(x)

        def bits(self, spec):
            return 8

    qz.register_family(NoCodes(), replace=True)
    spec = ql.TensorQuant(kind="test_no_codes")
    np.testing.assert_array_equal(spec.apply(jnp.array([0.4, 1.6])), [0.0, 2.0])
    with pytest.raises(qz.NotExportable, match="kind='test_no_codes' defines no integer codes"):
        quantize_tensor(spec, jnp.ones((2, 2)))


def test_pair_config_named_composed_and_user_pairs():
    named = qz.PairConfig(pair="bnn+", kwargs={"beta": 3.0})
    composed = qz.PairConfig(forward="sign", backward="sign_swish", kwargs={"beta": 3.0})
    x = _x()
    g = jax.grad(lambda v: jnp.sum(named.make()(v)))(x)
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(composed.make()(v)))(x), g)
    assert not named.relaxed and qz.PairConfig(pair="bnn++").relaxed
    assert qz.PairConfig(forward="prox", backward="identity").defaults() == {"mu": 1.0}
    with pytest.raises(ValueError, match="not both"):
        qz.PairConfig(pair="bnn", forward="sign", backward="identity")
    with pytest.raises(ValueError, match="backward='sign' is not allowed"):
        qz.PairConfig(forward="sign", backward="sign")
    with pytest.raises(ValueError, match="not arguments of pair 'sign/identity'"):
        qz.PairConfig(forward="sign", backward="identity", kwargs={"mu": 2.0})
    # the user's pair (registered by tests/fixtures/user_quantizers.py) is a catalogue name now
    y = ql.recipes.binary("tanh_sign", scaling="none").weight.apply(x)
    np.testing.assert_array_equal(y, np.where(np.asarray(x) >= 0, 1.0, -1.0))
    spec = ql.recipes.binary("tanh_sign", scaling="none").weight
    expected = jax.grad(lambda v: jnp.sum(jnp.tanh(3 * v)))(x)
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(spec.apply(v)))(x), expected, rtol=1e-6)
    assert studies.pair_criterion(qz.PAIRS["tanh_sign"]())["holds"]


def test_optimizer_tags_replace_attribute_names():
    # CoDeQ's θ_d/θ_b and PACT's α are found by their family's tags, not their names
    layer = ql.QuantLinear(4, 3, recipe=ql.recipes.codeq(4), rngs=nnx.Rngs(0))
    assert layer.weight_theta_d.get_metadata()["tags"] == ("deadzone",)
    assert layer.weight_theta_b.get_metadata()["tags"] == ("bits",)
    pact = ql.QuantLinear(4, 3, recipe=ql.recipes.pact(4, 4), rngs=nnx.Rngs(0))
    assert pact.act_alpha.get_metadata()["tags"] == ("clip",)
    assert optax is not None


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("learn_scale", [False, True])
def test_multibit_pair_codes_levels_and_learned_scale(bits, learn_scale):
    cfg = qz.PairConfig(
        pair="multibit", kwargs={"bits": bits}, scaling="channel", learn_scale=learn_scale
    )
    spec = ql.TensorQuant(kind="pair", config=cfg)
    assert spec.bits == bits and spec.learnable == learn_scale and not cfg.relaxed
    x = _x(3, (16, 4)) * 0.05
    params = spec.init(x)
    y = spec.apply(x, params)
    # at most 2^bits levels per channel, symmetric: α·(2k − m)/m
    for c in range(4):
        assert len(np.unique(np.asarray(y[:, c]))) <= 2**bits
    q = quantize_tensor(spec, x, params)
    assert q.bits == bits
    np.testing.assert_allclose(dequantize(q), y, rtol=0, atol=1e-7)
    if learn_scale:  # the scale gets a gradient through the pair: F(x/α) − (x/α)·B′(x/α)
        g = jax.grad(lambda p: jnp.sum(spec.apply(x, p) ** 2))(params)
        assert g["scale"].shape == (4,) and bool(jnp.all(jnp.isfinite(g["scale"])))
        assert float(jnp.abs(g["scale"]).sum()) > 0
