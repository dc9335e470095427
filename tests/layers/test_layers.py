"""Quant layers, recipes, quantize_model, calibrate and summaries.

Models are built with an ``rbg`` PRNG key (its initialisers compile faster on CPU), shapes are
tiny, and each model compiles one jitted step: compilation dominates these tests.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from qflax import layers as ql
from qflax import models
from qflax import quantizers as qz
from qflax.layers import (
    QuantConv,
    QuantEinsum,
    QuantLinear,
    QuantParam,
    Recipe,
    Rule,
    TensorQuant,
    recipes,
)
from tests.ops.test_ops import count_primitive


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def normal(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def absmax_ref(x, bits, granularity="tensor"):
    config = qz.UniformConfig(bits=bits, granularity=granularity)
    return qz.uniform(x, {"scale": qz.uniform_init(x, config)["scale"]}, config)


# ------------------------------------------------------------------------------ specs, recipes


def test_tensor_quant_validation_names_the_field():
    with pytest.raises(ValueError, match="kind='int4'"):
        TensorQuant(kind="int4")
    with pytest.raises(ValueError, match="config=.*does not fit kind='pow2'"):
        TensorQuant(kind="pow2", config=qz.UniformConfig())
    with pytest.raises(ValueError, match="learn_scale=False"):
        TensorQuant(kind="learned_step", config=qz.UniformConfig())
    with pytest.raises(ValueError, match="kind='absmax'"):
        TensorQuant(kind="absmax", config=qz.UniformConfig(learn_scale=True))
    with pytest.raises(ValueError, match="pair='nope'"):
        TensorQuant(kind="pair", config=qz.PairConfig(pair="nope"))
    with pytest.raises(ValueError, match="kind='nope' is not allowed; allowed: absmax"):
        TensorQuant(kind="nope")
    with pytest.raises(ValueError, match="role='weight' is only used"):
        TensorQuant(kind="absmax", role="weight")
    with pytest.raises(ValueError, match="recipe='int9'"):
        recipes.build("int9")
    with pytest.raises(ValueError, match="weight_bits.*bits=40"):
        recipes.absmax(40, 8)
    with pytest.raises(ValueError, match="grad.kind='learned_step'"):
        Recipe(grad=TensorQuant(kind="learned_step"))


def test_recipes_are_hashable_values_and_describe_themselves():
    a, b = recipes.learned_step(2, 4), recipes.build("learned_step", weight_bits=2, act_bits=4)
    assert a == b and hash(a) == hash(b)
    assert len({recipes.binary(pair="bnn++", mu=3.0), recipes.binary(pair="bnn++", mu=3.0)}) == 1
    assert str(a) == "w:learned_step2/channel a:learned_step4"
    assert str(recipes.binary()) == "w:pair:bnn1/channel a:pair:bnn1"
    assert (a.weight_bits, a.act_bits) == (2, 4)
    # bits None or 32 -> float for that tensor.
    for r in (recipes.absmax(32, None), recipes.absmax(None, 32), recipes.build("float")):
        assert r.weight is None and r.act is None and str(r) == "float"
    assert (recipes.pow2(4).weight.bits, recipes.ternary().weight.bits) == (4, 2)
    assert set(ql.RECIPES) >= {  # (and any a user registered)
        "float",
        "absmax",
        "learned_step",
        "pow2",
        "binary",
        "ternary",
        "lsq",
        "pact",
        "dorefa",
        "gdnsq",
        "dbssq",
        "codeq",
    }


@pytest.mark.parametrize(
    "spec",
    [
        TensorQuant(kind="absmax", config=qz.UniformConfig(bits=3, granularity="channel")),
        TensorQuant(kind="pow2", config=qz.PowerOfTwoConfig(bits=3)),
        TensorQuant(kind="binary", config=qz.BinaryConfig(scaling="channel")),
        TensorQuant(kind="ternary"),
        TensorQuant(kind="pair", config=qz.PairConfig(pair="bnn", scaling="channel")),
    ],
    ids=str,
)
def test_stateless_specs_match_the_quantizers(spec):
    x = normal(0, (6, 4))
    assert spec.init(x) == {}
    got = spec.apply(x)
    if spec.kind == "absmax":
        want = absmax_ref(x, 3, "channel")
    elif spec.kind == "pow2":
        want = qz.pow2(x, qz.pow2_init(x, spec.config), spec.config)
    elif spec.kind == "binary":
        want = qz.binary(x, {}, spec.config)
    elif spec.kind == "ternary":
        want = qz.ternary(x, {}, spec.config)
    else:
        x_np = np.asarray(x)
        want = np.mean(np.abs(x_np), axis=0, keepdims=True) * np.where(x_np >= 0, 1.0, -1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # numpy sums in another order


def test_learned_step_params_are_compact_and_rank_free():
    per_tensor = TensorQuant(kind="learned_step", config=qz.UniformConfig(bits=4, learn_scale=True))
    x2, x3 = normal(1, (5, 3)), normal(2, (2, 5, 3))
    params = per_tensor.init(x2)
    assert params["scale"].shape == ()
    np.testing.assert_allclose(params["scale"], np.max(np.abs(x2)) / 7, rtol=1e-6)
    assert per_tensor.apply(x3, params).shape == x3.shape  # same scale, another rank
    per_channel = TensorQuant(
        kind="learned_step",
        config=qz.UniformConfig(bits=4, learn_scale=True, granularity="channel"),
    )
    p = per_channel.init(x2)
    assert p["scale"].shape == (3,)
    np.testing.assert_array_equal(
        per_channel.apply(x3, p),
        qz.uniform(x3, {"scale": p["scale"].reshape(1, 1, 3)}, per_channel.config),
    )
    with pytest.raises(ValueError, match=r"does not fit a tensor of shape \(5, 4\)"):
        per_channel.apply(normal(3, (5, 4)), p)
    # The scale gets the LSQ-style gradient.
    g = jax.grad(lambda s: jnp.sum(per_channel.apply(x2, {"scale": s}) ** 2))(p["scale"])
    assert g.shape == (3,) and np.abs(g).sum() > 0


# ------------------------------------------------------------------------------ layers

X_LINEAR = normal(10, (5, 6))
X_CONV = normal(11, (2, 5, 5, 3))
X_EINSUM = normal(12, (2, 4, 6))


def linear_layer(recipe, **kw):
    return QuantLinear(6, 4, recipe=recipe, rngs=rngs(1), **kw)


def conv_layer(recipe, **kw):
    return QuantConv(3, 4, (3, 3), recipe=recipe, padding="SAME", rngs=rngs(2), **kw)


def einsum_layer(recipe, **kw):
    return QuantEinsum("btd,dh->bth", (6, 4), (4,), recipe=recipe, rngs=rngs(3), **kw)


LAYERS = {
    "linear": (linear_layer, X_LINEAR),
    "conv": (conv_layer, X_CONV),
    "einsum": (einsum_layer, X_EINSUM),
}


def reference(kind: str, layer, x, bits_w: int, bits_a: int):
    """The wrapped float layer applied to the absmax-quantized input with a quantized kernel."""
    inner = layer.inner
    kernel = absmax_ref(inner.kernel[...], bits_w, "channel")
    x_hat = absmax_ref(x, bits_a)
    if kind == "linear":
        y = lax.dot_general(x_hat, kernel, (((1,), (0,)), ((), ())))
    elif kind == "conv":
        y = lax.conv_general_dilated(
            x_hat, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    else:
        y = jnp.einsum("btd,dh->bth", x_hat, kernel)
    return y + inner.bias[...]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_equals_reference_eager_and_jitted(kind):
    make, x = LAYERS[kind]
    layer = make(recipes.absmax(3, 5))
    want = reference(kind, layer, x, 3, 5)
    np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)
    traces = []

    @nnx.jit
    def forward(layer, x):
        traces.append(1)
        return layer(x)

    for _ in range(2):
        np.testing.assert_allclose(forward(layer, x), want, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1  # the second call compiles nothing new
    assert layer.inner.kernel.shape == layer.quantized_kernel().shape
    # The hook is restored after every call: the graph definition does not change.
    assert getattr(layer.inner, type(layer)._hook_name) is type(layer)._default_hook


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gradients_reach_kernel_input_and_quantizer_params(kind):
    """The AQT conv anchor: kernels must get gradients (and inputs, and learned scales)."""
    make, x = LAYERS[kind]
    layer = make(recipes.learned_step(3, 5))
    ql.calibrate(layer, x)

    def loss(layer, x):
        return jnp.sum(layer(x) ** 2)

    grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    flat = dict(nnx.to_flat_state(grads))
    assert set(flat) >= {("inner", "kernel"), ("weight_scale",), ("act_scale",)}
    for path, value in flat.items():
        assert np.abs(value[...]).sum() > 0, path
    assert isinstance(flat[("act_scale",)], QuantParam)
    assert np.abs(dx).sum() > 0


def test_quantized_dense_forward_has_exactly_one_dot_general():
    layer = linear_layer(recipes.learned_step(4, 4))
    graphdef, state = nnx.split(layer)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, X_LINEAR)
    assert count_primitive(jaxpr.jaxpr, "dot_general") == 1


def test_grad_recipe_changes_only_the_backward():
    plain = linear_layer(recipes.absmax(8, 8))
    coarse = linear_layer(recipes.absmax(8, 8, grad_bits=2))

    def run(layer):
        return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(X_LINEAR))))(layer)

    (y1, g1), (y2, g2) = run(plain), run(coarse)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(g1["inner"]["kernel"][...], g2["inner"]["kernel"][...])


def test_from_module_keeps_the_module_and_refuses_custom_hooks():
    linear = nnx.Linear(6, 4, rngs=rngs(1))
    wrapped = QuantLinear.from_module(linear, Recipe())
    assert wrapped.inner is linear
    np.testing.assert_array_equal(wrapped(X_LINEAR), linear(X_LINEAR))
    custom = nnx.Linear(6, 4, dot_general=lambda *a, **k: lax.dot_general(*a, **k), rngs=rngs(1))
    with pytest.raises(ValueError, match="custom hook"):
        QuantLinear.from_module(custom, Recipe())
    with pytest.raises(ValueError, match="allowed: an nnx.Conv"):
        QuantConv.from_module(linear, Recipe())
    with pytest.raises(ValueError, match="recipe="):
        QuantLinear(2, 2, recipe="absmax", rngs=rngs(0))


def test_quant_einsum_with_call_time_equation():
    layer = QuantEinsum("btd,dh->bth", (6, 4), recipe=recipes.absmax(4, None), rngs=rngs(3))
    y = layer(X_EINSUM[:, 0], einsum_str="bd,dh->bh")
    kernel = absmax_ref(layer.inner.kernel[...], 4, "channel")
    np.testing.assert_allclose(y, X_EINSUM[:, 0] @ kernel, rtol=1e-6)
    assert layer.quant_info()["macs"] == 6 * 4


def test_quant_info_golden_numbers():
    layer = QuantLinear(3, 4, recipe=recipes.absmax(4, 8), rngs=rngs(0))
    assert layer.quant_info()["macs"] == 0  # before the first call
    kernel = jnp.array([[1.0, 0.0, 0.04, 2.0], [-1.0, 0.0, 1.0, 0.1], [0.5, 0.0, -2.0, 0.0]])
    layer.inner.kernel[...] = kernel
    layer(jnp.ones((5, 3)))
    info = layer.quant_info()
    # 12 weights at 4 bits = 6 bytes; bias 4 + absmax scales 4 (one per output channel) floats.
    assert info == {
        "weight_bits": 4,
        "act_bits": 8,
        "params": 16,
        "weights": 12,
        "packed_bytes": 6 + 4 * (4 + 4),
        # Zeros: column 1 (3), 0.04 (< half a step of 2/7), 0.1 and 0.0 in column 3.
        "sparsity": 6 / 12,
        "macs": 12,
        "recipe": "w:absmax4/channel a:absmax8",
        "grad": "float",
    }
    layer(jnp.ones((5, 7, 3)))  # per example: 7 positions x 3 x 4
    assert layer.quant_info()["macs"] == 84
    learned = QuantLinear(3, 4, recipe=recipes.learned_step(2, 8), use_bias=False, rngs=rngs(0))
    # 12 weights at 2 bits = 3 bytes; 4 weight scales + 1 act scale (QuantParams), no bias.
    assert learned.quant_info()["packed_bytes"] == 3 + 4 * 5
    three_bit = QuantLinear(3, 4, recipe=recipes.absmax(3, 8), rngs=rngs(0))
    assert three_bit.quant_info()["packed_bytes"] == 6 + 4 * 8  # 3-bit codes stored in 4 bits
    conv = QuantConv(2, 3, (3, 3), recipe=recipes.absmax(8, 8), rngs=rngs(0))
    conv(jnp.ones((4, 5, 5, 2)))
    assert conv.quant_info()["macs"] == 25 * 3 * 3 * 3 * 2


# ------------------------------------------------------------------------------ models

MODEL_CASES = {
    "mlp": ((8, 8, 1), dict(hidden=(16, 8))),
    "cnn": ((8, 8, 1), dict(channels=(4, 8), hidden=16)),
    "resnet20": ((8, 8, 3), dict(width=0.25, blocks_per_stage=1)),
    "resnet20_projection": ((8, 8, 3), dict(width=0.25, blocks_per_stage=1, shortcut="projection")),
    "resnet18": ((8, 8, 3), dict(width=0.0625)),
    "vit": ((8, 8, 3), dict(patch=4, dim=8, depth=1, num_heads=2)),
    "char_transformer": ((6,), dict(dim=8, depth=1, num_heads=2)),
}
NUM_CLASSES = 5


def make_input(name: str, input_shape):
    if name == "char_transformer":
        return jax.random.randint(jax.random.key(0), (2, *input_shape), 0, NUM_CLASSES)
    return normal(0, (2, *input_shape))


def build(name: str, **factories):
    input_shape, kwargs = MODEL_CASES[name]
    return models.build_model(
        name.split("_projection")[0],
        input_shape=input_shape,
        num_classes=NUM_CLASSES,
        rngs=rngs(),
        **kwargs,
        **factories,
    )


def make_train_step(graphdef, traces: list):
    @jax.jit
    def step(state, x):
        traces.append(1)
        model = nnx.merge(graphdef, state)

        def loss(model):
            logits = model(x, train=True)
            labels = jnp.zeros(logits.shape[:-1], jnp.int32)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        value, grads = nnx.value_and_grad(loss)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.01 * g, params, grads))
        return nnx.state(model), value, grads

    return step


def quant_model(name: str, recipe: Recipe) -> nnx.Module:
    return build(
        name,
        linear=functools.partial(QuantLinear, recipe=recipe),
        conv=functools.partial(QuantConv, recipe=recipe),
    )


# Models whose training step is compiled and run. ResNet-20 with projection shortcuts covers
# both shortcut kinds; plain ResNet-20 is quantized by rules below; ResNet-18 (ResNet-20's
# blocks) and the char transformer (ViT's blocks) are traced abstractly, to keep the suite fast.
COMPILED = ["mlp", "cnn", "resnet20_projection", "vit"]
ABSTRACT = ["resnet18", "char_transformer"]


@pytest.mark.parametrize("name", COMPILED)
def test_quant_layers_as_model_factories(name):
    model = quant_model(name, recipes.learned_step(4, 4))
    x = make_input(name, MODEL_CASES[name][0])
    assert ql.calibrate(model, x)  # learned activation scales get data-dependent values
    graphdef, state = nnx.split(model)
    traces: list = []
    step = make_train_step(graphdef, traces)
    state, loss, grads = step(state, x)
    state, loss2, _ = step(state, x)
    assert len(traces) == 1  # the second step compiles nothing new
    assert np.isfinite(float(loss)) and np.isfinite(float(loss2))
    flat = nnx.to_flat_state(grads)
    kinds = {type(v) for _, v in flat}
    assert QuantParam in kinds and nnx.Param in kinds
    for path, value in flat:
        value = np.asarray(value[...])
        assert np.all(np.isfinite(value)) and np.abs(value).sum() > 0, path


@pytest.mark.parametrize("name", ABSTRACT)
def test_quant_layers_as_model_factories_abstractly(name):
    """The training step traced abstractly: every Param and QuantParam gets a gradient."""
    model = quant_model(name, recipes.learned_step(4, 4))
    x = make_input(name, MODEL_CASES[name][0])
    graphdef, state = nnx.split(model)
    _, loss, grads = jax.eval_shape(make_train_step(graphdef, []), state, x)
    assert loss.shape == ()
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    flat = dict(nnx.to_flat_state(grads))
    layers = 21 if name == "resnet18" else 7  # 20 convs + head; 6 block linears + head
    assert len(params) == len(flat) and sum(type(v) is QuantParam for _, v in params) == 2 * layers
    for path, value in params:
        assert flat[path].shape == value.shape, path


# ------------------------------------------------------------------------------ quantize_model


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_quantize_model_first_last_float(name):
    model = build(name)
    x = make_input(name, MODEL_CASES[name][0])
    forward = nnx.jit(lambda m, x: m(x))  # one compile per graph; faster than eager dispatch
    y_float = forward(model, x)
    kernels = {
        ".".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if p[-1] == "kernel"
    }
    rules = ql.first_last_float_rules(recipes.absmax(8, 8)) + [Rule("^nothing$", None)]
    qmodel, report = ql.quantize_model(model, rules)
    # Stem and head stay float, of their exact classes; everything else is wrapped.
    assert type(qmodel.stem) in (nnx.Conv, nnx.Linear) and type(qmodel.head) is nnx.Linear
    wrapped = [line.path for line in report.lines if line.recipe != "float"]
    assert wrapped and all(not re.match("^(stem|head)", p) for p in wrapped)
    for line in report.lines:
        module = functools.reduce(
            lambda n, k: n[int(k)] if k.isdigit() else getattr(n, k), line.path.split("."), qmodel
        )
        is_quant = isinstance(module, (QuantLinear, QuantConv))
        assert is_quant == (line.recipe != "float"), line.path
        path = line.path + (".inner.kernel" if is_quant else ".kernel")
        np.testing.assert_array_equal(
            functools.reduce(
                lambda n, k: n[int(k)] if k.isdigit() else getattr(n, k), path.split("."), qmodel
            )[...],
            kernels[line.path + ".kernel"],
        )
    assert report.unmatched_rules == (rules[-1],)
    text = str(report)
    assert "stem" in text and "float" in text and "unmatched rules: 3: '^nothing$'" in text
    # The original model is untouched; 8-bit outputs are close to float ones.
    np.testing.assert_array_equal(forward(model, x), y_float)
    y8 = forward(qmodel, x)
    assert not np.array_equal(y8, y_float)
    np.testing.assert_allclose(y8, y_float, rtol=0.1, atol=0.1 * np.abs(y_float).max())
    # A float recipe wraps every layer but computes exactly the float model.
    fmodel, _ = ql.quantize_model(model, [Rule(".*", Recipe())])
    np.testing.assert_array_equal(forward(fmodel, x), y_float)


def test_quantize_model_containers_and_errors():
    class Net(nnx.Module):
        def __init__(self, r):
            self.items = nnx.data([nnx.Linear(4, 4, rngs=r), nnx.Linear(4, 4, rngs=r)])
            self.table = nnx.Dict({"a": nnx.Einsum("bd,dh->bh", (4, 4), rngs=r)})

        def __call__(self, x):
            for layer in self.items:
                x = layer(x)
            return self.table["a"](x)

    net = Net(rngs(0))
    qnet, report = ql.quantize_model(net, [Rule(r"^items\.1$", None), (".", recipes.absmax(4, 4))])
    assert [(line.path, line.rule) for line in report.lines] == [
        ("items.0", 1),
        ("items.1", 0),
        ("table.a", 1),
    ]
    assert isinstance(qnet.items[0], QuantLinear) and type(qnet.items[1]) is nnx.Linear
    assert isinstance(qnet.table["a"], QuantEinsum)
    assert qnet(jnp.ones((2, 4))).shape == (2, 4)
    # Already-quantized layers are not wrapped twice (their inner Linear is skipped).
    again, report2 = ql.quantize_model(qnet, [Rule(".*", recipes.absmax(4, 4))])
    assert [line.path for line in report2.lines] == ["items.1"]
    assert isinstance(again.items[0].inner, nnx.Linear)
    frozen = nnx.Module()
    frozen.layers = nnx.data((nnx.Linear(2, 2, rngs=rngs(0)),))
    with pytest.raises(ValueError, match="immutable tuple"):
        ql.quantize_model(frozen, [Rule(".*", Recipe())])
    with pytest.raises(ValueError, match=r"pattern='\(unclosed'"):
        ql.quantize_model(net, [("(unclosed", None)])
    with pytest.raises(ValueError, match=r"pattern='\[a-'"):
        Rule("[a-", None)


def test_calibrate_sets_act_scale_from_real_inputs():
    recipe = recipes.learned_step(4, 6)
    model = build("mlp", linear=functools.partial(QuantLinear, recipe=recipe))
    x = make_input("mlp", MODEL_CASES["mlp"][0])
    assert float(model.blocks[0].act_scale[...]) == 1.0  # placeholder before calibration
    paths = ql.calibrate(model, x)
    assert paths == ["stem", "blocks.0", "head"]
    flat = x.reshape(2, -1)
    np.testing.assert_allclose(model.stem.act_scale[...], np.max(np.abs(flat)) / 31, rtol=1e-6)
    # blocks.0 sees relu(stem(x)) computed with the (just calibrated) quantized stem.
    h = jax.nn.relu(model.stem(flat))
    np.testing.assert_allclose(model.blocks[0].act_scale[...], np.max(np.abs(h)) / 31, rtol=1e-6)
    kernel = model.head.inner.kernel[...]
    np.testing.assert_allclose(
        model.head.weight_scale[...], np.max(np.abs(kernel), axis=0) / 7, rtol=1e-6
    )
    assert not model.stem.calibrating


def test_summaries_count_macs_and_totals():
    model = build("mlp")  # 64 -> 16 -> 8 -> 5
    qmodel, _ = ql.quantize_model(model, ql.first_last_float_rules(recipes.absmax(2, 4)))
    x = make_input("mlp", MODEL_CASES["mlp"][0])
    macs = ql.count_macs(qmodel, x)
    assert macs == {"stem": 64 * 16, "blocks.0": 16 * 8, "head": 8 * 5}
    assert ql.count_macs(model, x) == macs  # float layers are counted too
    assert int(qmodel.blocks[0].macs[...]) == 0  # count_macs modified nothing
    rows = ql.layer_summaries(qmodel, macs)
    assert [(r["path"], r["type"], r["weight_bits"], r["act_bits"]) for r in rows] == [
        ("stem", "Linear", 32, 32),
        ("blocks.0", "QuantLinear", 2, 4),
        ("head", "Linear", 32, 32),
    ]
    total = ql.totals(rows)
    params = (64 * 16 + 16) + (16 * 8 + 8) + (8 * 5 + 5)
    packed = 4 * (64 * 16 + 16) + (16 * 8 * 2 // 8 + 4 * (8 + 8)) + 4 * (8 * 5 + 5)
    assert total["params"] == params and total["packed_bytes"] == packed
    assert total["float32_bytes"] == 4 * params
    assert total["compression"] == pytest.approx(4 * params / packed)
    assert total["bops"] == 64 * 16 * 32 * 32 + 16 * 8 * 2 * 4 + 8 * 5 * 32 * 32
    assert total["avg_weight_bits"] == pytest.approx(
        (32 * (64 * 16 + 16) + 2 * (16 * 8 + 8) + 32 * (8 * 5 + 5)) / params
    )
    assert total["avg_act_bits"] == pytest.approx((32 * 1024 + 4 * 128 + 32 * 40) / 1192)

    # Without count_macs, only quant layers that were called know their MACs.
    def macs_by_path():
        return {r["path"]: r["macs"] for r in ql.layer_summaries(qmodel)}

    assert macs_by_path() == {"stem": 0, "blocks.0": 0, "head": 0}
    qmodel(x)
    assert macs_by_path() == {"stem": 0, "blocks.0": 128, "head": 0}


def test_summaries_of_an_abstract_model():
    """`nnx.eval_shape` models (no weights) still give sizes and MACs; sparsity is unknown."""
    recipe = recipes.absmax(4, 8)
    model = nnx.eval_shape(
        lambda: build(
            "cnn",
            linear=functools.partial(QuantLinear, recipe=recipe),
            conv=functools.partial(QuantConv, recipe=recipe),
        )
    )
    x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    rows = ql.layer_summaries(model, ql.count_macs(model, x))
    assert [r["path"] for r in rows] == ["stem", "conv2", "dense", "head"]
    assert rows[0]["macs"] == 8 * 8 * 9 * 4 and rows[0]["packed_bytes"] == 18 + 4 * 4
    assert all(np.isnan(r["sparsity"]) for r in rows)


def test_calibrate_refuses_a_non_finite_batch_and_non_modules():
    model = nnx.Linear(2, 2, rngs=rngs(0))  # refused before any forward pass
    with pytest.raises(ValueError, match=r"^calibrate: batch holds 1 non-finite value\(s\)"):
        ql.calibrate(model, jnp.array([[1.0, np.nan]], jnp.float32))
    with pytest.raises(TypeError, match=r"^calibrate: model=int is not allowed"):
        ql.calibrate(42, jnp.ones((1, 2)))
    with pytest.raises(TypeError, match=r"^quantize_model: model=int is not allowed; allowed: an"):
        ql.quantize_model(42, [(".", None)])
