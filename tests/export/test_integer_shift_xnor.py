"""Integer inference of power-of-two (shifts), ternary and binary (XNOR/popcount) layers."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from qflax import quantizers as qz
from qflax.export import export_integer, fake_quant_forward, integer_forward, static_act_scales
from qflax.export.integer._arith import pack_words, padded_columns, unpack_words, xnor_dot
from qflax.layers import (
    QuantConv,
    QuantLinear,
    Recipe,
    Rule,
    TensorQuant,
    first_last_float_rules,
    quantize_model,
    recipes,
)
from qflax.models import CNN, MLP
from tests.export.test_export import build


def _mlp(seed, activation="relu"):
    return build(
        lambda: MLP((16,), 4, hidden=(32, 32), activation=activation, rngs=nnx.Rngs(0)), seed
    )


def _cnn(seed, activation="relu", channels=(8, 16)):
    return build(
        lambda: CNN(
            (8, 8, 1), 10, channels=channels, hidden=32, activation=activation, rngs=nnx.Rngs(0)
        ),
        seed,
    )


def _quant_layers(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, (QuantLinear, QuantConv))]


def _negate_half_gamma(model):
    """γ < 0 on every other channel of conv2's BatchNorm (a decreasing threshold chain)."""
    gamma = np.array(model.conv2_norm.scale[...])
    gamma[::2] *= -1.0
    model.conv2_norm.scale[...] = jnp.asarray(gamma)


def _images(seed, n=256):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.0, (n, 8, 8, 1)), jnp.float32)


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_pack_words_round_trip(n):
    bits = jnp.asarray(np.random.default_rng(n).integers(0, 2, (3, n)), jnp.uint8)
    words = pack_words(bits)
    assert words.dtype == jnp.uint32 and words.shape == (3, -(-n // 32))
    np.testing.assert_array_equal(unpack_words(words, n), bits)
    # bit j of word i is element 32·i + j; the tail bits are 0
    assert int(pack_words(jnp.eye(1, 33, 32, dtype=jnp.uint8))[0, 1]) == 1
    assert int(jnp.sum(lax.population_count(words))) == int(jnp.sum(bits))


def _signs(bits):
    return jnp.where(bits > 0, jnp.float32(1), jnp.float32(-1))


def test_xnor_dense_is_the_plus_minus_one_product():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 2, (5, 70)), jnp.uint8)
    w = jnp.asarray(rng.integers(0, 2, (70, 6)), jnp.uint8)
    words = pack_words(w.T).T
    got = xnor_dot(x, words, (70, 6))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.asarray(_signs(x) @ _signs(w), np.int32))
    # a kernel stored with padding columns (rows off a multiple of 1 KiB): the same product
    assert padded_columns(6) == 6 and padded_columns(1024) == 1040
    padded = jnp.pad(words, ((0, 0), (0, 16)))
    np.testing.assert_array_equal(xnor_dot(x, padded, (70, 6)), got)


@pytest.mark.parametrize(
    "strides, padding, c_in",
    [
        ((1, 1), "SAME", 5),
        ((2, 2), "SAME", 5),
        ((1, 1), "VALID", 5),
        ((2, 1), "SAME", 5),
        ((1, 1), "SAME", 64),  # whole words per tap: the patches of packed pixels
        ((2, 1), "VALID", 32),
    ],
)
def test_xnor_conv_counts_zero_padding_exactly(strides, padding, c_in):
    """The float model pads ±1 inputs with 0 (neither sign); the popcount form corrects for it."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 2, (2, 7, 6, c_in)), jnp.uint8)
    w = jnp.asarray(rng.integers(0, 2, (3, 3, c_in, 4)), jnp.uint8)
    words = pack_words(w.reshape(9 * c_in, 4).T).T
    got = xnor_dot(x, words, (3, 3, c_in, 4), "conv", strides, padding)
    want = lax.conv_general_dilated(
        _signs(x), _signs(w), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_array_equal(got, np.asarray(want, np.int32))


# ------------------------------------------------------------------------------ binary models


def _ops(program, x):
    jaxpr = jax.make_jaxpr(integer_forward)(program, x)
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return names


@pytest.mark.parametrize("pair", [None, "bnn", "bc"])
def test_binary_mlp_equals_fake_quant(pair):
    """All layers binary (inputs and weights ±1, α per channel): bits in, bits between layers
    (thresholds), float32 logits out of the binary head — the fake-quant reference exactly."""
    model, _ = quantize_model(_mlp(0, "hardtanh"), [Rule(".*", recipes.binary(pair))])
    program = export_integer(model)
    kinds = [(type(layer).__name__, layer.epilogue.output) for layer in program.layers]
    assert kinds == [("BinaryLayer", "bits")] * 2 + [("BinaryLayer", "float")]
    assert program.input_bits and all(layer.kernel.dtype == jnp.uint32 for layer in program.layers)
    x = jax.random.normal(jax.random.key(1), (256, 16))
    reference = np.asarray(fake_quant_forward(model, x))
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert len(np.unique(reference.argmax(-1))) > 2
    # the same float32 ops after the exact dot (jit may fuse them: last-bit differences)
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, rtol=1e-6, atol=1e-6)
    # the model's own forward (x̂ @ (α·sign w)) rounds its partial sums: equal up to float32
    np.testing.assert_allclose(reference, np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    ops = _ops(program, x[:2])
    assert "population_count" in ops and "dot_general" not in ops


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_cnn_with_batchnorm_and_pools_equals_fake_quant(seed):
    """The pairs experiment's layout: float stem and head, binary conv2 and dense in a hardtanh
    CNN with BatchNorm (γ < 0 on half of conv2's channels: decreasing thresholds, min-pools) and
    2x2 max-pools: every prediction is the fake-quant model's."""
    model, _ = quantize_model(
        _cnn(seed, "hardtanh"), first_last_float_rules(recipes.binary("bnn+"))
    )
    _negate_half_gamma(model)
    program = export_integer(model)
    kinds = [(type(layer).__name__, layer.epilogue.output) for layer in program.layers]
    assert kinds == [
        ("FloatLayer", "bits"),
        ("BinaryLayer", "bits"),
        ("BinaryLayer", "float"),
        ("FloatLayer", "float"),
    ]
    direction = np.asarray(program.layers[1].epilogue.direction)
    assert (direction == -1).any() and (direction == 1).any()
    x = _images(seed)
    reference = np.asarray(fake_quant_forward(model, x))
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert len(np.unique(reference.argmax(-1))) > 2
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_binary_cnn_all_binary_layers():
    """Every layer binary, input signs from the image: stem, conv2 and dense exchange bits."""
    model, _ = quantize_model(_cnn(2, "hardtanh"), [Rule(".*", recipes.binary(None))])
    program = export_integer(model)
    assert [layer.epilogue.output for layer in program.layers] == ["bits", "bits", "bits", "float"]
    x = _images(2)
    reference = np.asarray(fake_quant_forward(model, x))
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert len(np.unique(reference.argmax(-1))) > 2
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, rtol=1e-6, atol=1e-6)
    ops = _ops(program, x[:2])
    assert "conv_general_dilated" not in ops and "dot_general" not in ops


@pytest.mark.parametrize("pair", ["bnn++", "pc", "proxquant"])
def test_relaxed_pairs_run_in_their_exact_state_only(pair):
    """A relaxed pair (forward not a sign) is refused while hard = 0; a finished run sets
    hard = 1 (sign forward), which runs as XNOR/popcount and equals the model."""
    model, _ = quantize_model(_cnn(3, "hardtanh"), first_last_float_rules(recipes.binary(pair)))
    x = _images(3)
    match = rf"layer 'conv2'.*pair '{re.escape(pair)}' is in its relaxed state \(hard=0\)"
    with pytest.raises(ValueError, match=match):
        export_integer(model)
    for layer in _quant_layers(model):
        layer.set_stat("hard", 1.0)
    program = export_integer(model)
    assert [type(layer).__name__ for layer in program.layers][1:3] == ["BinaryLayer"] * 2
    reference = np.asarray(fake_quant_forward(model, x))
    np.testing.assert_allclose(reference, np.asarray(model(x)), rtol=1e-4, atol=1e-4)
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_binary_layers_after_relu_and_other_activations_are_refused():
    model, _ = quantize_model(_cnn(0, "relu"), first_last_float_rules(recipes.binary("bnn")))
    with pytest.raises(ValueError, match="layer 'conv2' is binary.*follows a ReLU.*hardtanh"):
        export_integer(model)
    stochastic = Recipe(
        weight=TensorQuant(kind="binary", config=qz.BinaryConfig()),
        act=TensorQuant(kind="binary", config=qz.BinaryConfig(stochastic=True)),
    )
    model, _ = quantize_model(_mlp(0, "hardtanh"), [Rule(".*", stochastic)])
    with pytest.raises(ValueError, match="layer 'stem'.*act quantizer.*supports"):
        export_integer(model)


# ------------------------------------------------------------------------------ pow2 and ternary


@pytest.mark.parametrize("activation", ["relu", "hardtanh"])
@pytest.mark.parametrize("bits", [3, 4])
def test_pow2_cnn_shifts_equal_one_integer_kernel_and_fake_quant(bits, activation):
    """Power-of-two weights (per output channel) on int8 activation codes: one ternary product
    per exponent combined by left shifts gives the int32 accumulator of the one-kernel program
    exactly, and the predictions of the fake-quant model."""
    recipe = recipes.pow2(bits, 8, act_levels="uniform")
    model, _ = quantize_model(_cnn(bits, activation), [Rule(".*", recipe)])
    _negate_half_gamma(model)
    x = _images(bits)
    scales = static_act_scales(model, [x[:128], x[128:]])
    shifted = export_integer(model, scales)
    plain = export_integer(model, scales, shifts=False)
    layer = shifted.layers[1]
    assert layer.kernel.dtype == jnp.int8 and layer.kernel.ndim == 5  # (exponents, HWIO)
    assert set(np.unique(np.asarray(layer.kernel))) <= {-1, 0, 1}
    assert 1 < len(layer.shifts) <= 2 ** (bits - 1) and sorted(layer.shifts)[0] == 0
    assert plain.layers[1].shifts == () and plain.layers[1].kernel.ndim == 4
    forward = jax.jit(integer_forward)
    logits = np.asarray(forward(shifted, x))
    np.testing.assert_array_equal(logits, np.asarray(forward(plain, x)))
    reference = np.asarray(fake_quant_forward(model, x, scales))
    assert len(np.unique(reference.argmax(-1))) > 2
    assert np.sum(logits.argmax(-1) != reference.argmax(-1)) == 0
    error = np.abs(logits * shifted.logit_scale - reference) / np.abs(reference).max()
    assert error.max() < 1e-3
    ops = _ops(shifted, x[:2])
    # one integer product per exponent in use (convolutions as products of their patches)
    assert "conv_general_dilated" not in ops
    assert ops.count("dot_general") == sum(max(len(lyr.shifts), 1) for lyr in shifted.layers)
    assert "shift_left" in ops


def test_pow2_recipe_act_levels():
    assert recipes.pow2(4, 8, act_levels="uniform").act.kind == "absmax"
    assert recipes.pow2(4, 4).act.kind == "pow2"
    with pytest.raises(ValueError, match="act_levels='log' is not allowed.*'pow2', 'uniform'"):
        recipes.pow2(4, 8, act_levels="log")
    # power-of-two inputs have no uniform codes: refused, naming the layer
    model, _ = quantize_model(_mlp(0), [Rule(".*", recipes.pow2(4, 4))])
    with pytest.raises(ValueError, match="layer 'stem'.*input quantizer.*supports"):
        export_integer(model)


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_ternary_mlp_equals_fake_quant(scaling):
    recipe = Recipe(
        weight=TensorQuant(kind="ternary", config=qz.TernaryConfig(scaling=scaling)),
        act=recipes.absmax(8, 8).act,
    )
    model, _ = quantize_model(_mlp(4), [Rule(".*", recipe)])
    x = jax.random.normal(jax.random.key(4), (256, 16))
    scales = static_act_scales(model, [x])
    program = export_integer(model, scales)
    assert all(set(np.unique(np.asarray(layer.kernel))) <= {-1, 0, 1} for layer in program.layers)
    reference = np.asarray(fake_quant_forward(model, x, scales))
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert len(np.unique(reference.argmax(-1))) > 1
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    error = np.abs(logits * program.logit_scale - reference) / np.abs(reference).max()
    assert error.max() < 1e-3


@pytest.mark.parametrize("bits", [2, 4])
def test_codeq_dead_zone_cnn_equals_fake_quant(bits):
    """Dead-zone weights ``s·v + z·sign(v)``: at 4 bits two int8 products (codes and signs)
    combined in int32; at 2 bits one ternary plane at the exact level ``s + z``."""
    model, _ = quantize_model(_cnn(5), [Rule(".*", recipes.codeq(bits, 8))])
    for layer in _quant_layers(model):  # dead zone: ~19% of the weights pruned
        layer.weight_theta_d[...] = jnp.full_like(layer.weight_theta_d[...], 1.5)
    x = _images(5)
    scales = static_act_scales(model, [x[:128], x[128:]])
    program = export_integer(model, scales)
    layer = program.layers[1]
    assert layer.kernel.dtype == jnp.int8
    if bits == 2:
        assert layer.coefficients == (1,) and layer.kernel.shape[0] == 1
    else:
        assert len(layer.coefficients) == 2 and layer.coefficients[0] >= 2**8
        assert int(jnp.max(jnp.abs(layer.kernel[0]))) > 1
    assert float(jnp.mean(layer.kernel[0] == 0)) > 0.05  # pruned weights are code 0
    reference = np.asarray(fake_quant_forward(model, x, scales))
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert len(np.unique(reference.argmax(-1))) > 2
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    error = np.abs(logits * program.logit_scale - reference) / np.abs(reference).max()
    if bits == 2:  # exact levels: only the float reference's own rounding
        assert error.max() < 1e-4
    else:  # round(z/s·2^k) moves a rare activation code by one; it propagates to that row
        assert np.median(error) < 1e-5 and np.mean(error.max(-1) > 1e-4) < 0.02
