"""Integer-only inference: exact requantization, and agreement with the fake-quant reference."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from qflax.export import (
    estimate_scale,
    export_integer,
    fake_quant_forward,
    integer_forward,
    quantize_multiplier,
    requantize,
    static_act_scales,
)
from qflax.export.integer import Epilogue, IntegerLayer
from qflax.export.integer._arith import CONV_DIMS
from qflax.export.integer._exec import _accumulate
from qflax.layers import Rule, calibrate, first_last_float_rules, quantize_model, recipes
from qflax.models import CNN, MLP
from qflax.quantizers import UniformConfig
from tests.export.test_export import build


def _exact(a: int, m: int, t: int) -> int:
    r = round(Fraction(int(a) * int(m), 2 ** int(t)))  # Python rounds half to even
    return max(min(r, 2**31 - 1), -(2**31 - 1))


def test_requantize_is_exact_rounding_half_even():
    rng = np.random.default_rng(0)
    n = 3000
    acc = rng.integers(-(2**31) + 1, 2**31 - 1, n)
    acc[: n // 2] >>= rng.integers(0, 30, n // 2)  # small accumulators too
    m0 = rng.integers(2**30, 2**31 - 1, n)
    t = rng.integers(1, 63, n)
    # ties: acc·2^30 / 2^31 = acc / 2, and exact halves with large shifts
    acc[:8] = [1, 3, 5, -1, -3, -5, 7, 0]
    m0[:8], t[:8] = 2**30, 31
    acc[8:12], m0[8:12], t[8:12] = [3, -3, 1, 5], 2**30, [32, 32, 33, 33]
    got = np.asarray(
        jax.jit(requantize)(acc.astype(np.int32), m0.astype(np.int32), t.astype(np.int32))
    )
    want = np.array([_exact(a, m, s) for a, m, s in zip(acc, m0, t, strict=True)])
    np.testing.assert_array_equal(got, want)
    assert got[:8].tolist() == [0, 2, 2, 0, -2, -2, 4, 0]


def test_quantize_multiplier():
    m = np.array([1e-9, 3.7e-4, 0.25, 0.5, 0.999999, 1.0, 3.5, 1000.0])
    m0, t = quantize_multiplier(m)
    assert m0.dtype == np.int32 and t.dtype == np.int32
    assert np.all((m0 >= 2**30) & (m0.astype(np.int64) < 2**31))
    approx = m0.astype(np.float64) * np.exp2(-t.astype(np.float64))
    np.testing.assert_allclose(approx, m, rtol=2.0**-30)
    assert quantize_multiplier(np.array([0.25]))[0].tolist() == [2**30]  # 0.5·2^−1


def _mlp(seed):
    return build(lambda: MLP((16,), 4, hidden=(8, 8), rngs=nnx.Rngs(0)), seed)


def _cnn(seed):
    return build(lambda: CNN((8, 8, 1), 10, channels=(4, 8), hidden=16, rngs=nnx.Rngs(0)), seed)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_fake_quant_forward_with_dynamic_scales_is_the_model(which):
    model = _mlp(0) if which == "mlp" else _cnn(0)
    shape = (6, 16) if which == "mlp" else (6, 8, 8, 1)
    x = jax.random.normal(jax.random.key(0), shape)
    qmodel, _ = quantize_model(model, [Rule(".*", recipes.absmax(4, 6))])
    np.testing.assert_allclose(
        np.asarray(fake_quant_forward(qmodel, x)), np.asarray(qmodel(x)), rtol=1e-6, atol=1e-6
    )


def _power_of_two_mlp():
    """An absmax W8A8 MLP on which the fake-quant reference computes exactly in float32.

    Every weight column is ``codes·2^−k`` with a code ±127 (so its absmax scale is ``2^−k``),
    biases are integer multiples of ``s_in·s_w``, and the static activation scales are powers
    of two: every product and sum of the reference is exact, every requantization multiplier
    is a power of two, so integer and float round the same real numbers (half to even).
    """
    model, _ = quantize_model(_mlp(0), [Rule(".*", recipes.absmax(8, 8))])
    rng = np.random.default_rng(1)
    act_scales = {"stem": 2.0**-5, "blocks.0": 2.0**-4, "head": 2.0**-4}
    for path, layer in (("stem", model.stem), ("blocks.0", model.blocks[0]), ("head", model.head)):
        fan_in, fan_out = layer.inner.kernel.shape
        codes = rng.integers(-127, 128, (fan_in, fan_out))
        codes[rng.integers(0, fan_in, fan_out), np.arange(fan_out)] = 127
        exps = rng.integers(6, 9, fan_out)
        layer.inner.kernel[...] = jnp.asarray(codes * np.exp2(-exps), jnp.float32)
        bias_units = rng.integers(-3000, 3000, fan_out)
        bias = bias_units * act_scales[path] * np.exp2(-exps) / 127.0 * 127.0
        layer.inner.bias[...] = jnp.asarray(bias, jnp.float32)
    return model, act_scales


def test_integer_mlp_equals_fake_quant_exactly():
    model, act_scales = _power_of_two_mlp()
    program = export_integer(model, act_scales)
    assert all(layer.kernel.dtype == jnp.int8 for layer in program.layers)
    x = jax.random.uniform(jax.random.key(3), (64, 16), minval=-4.0, maxval=4.0)
    reference = np.asarray(fake_quant_forward(model, x, act_scales), np.float64)
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert logits.dtype == np.int32
    np.testing.assert_array_equal(logits.astype(np.float64) * program.logit_scale, reference)
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    assert len(np.unique(reference.argmax(-1))) > 1


def test_integer_program_uses_int8_operands():
    model, act_scales = _power_of_two_mlp()
    program = export_integer(model, act_scales)
    jaxpr = jax.make_jaxpr(integer_forward)(program, jnp.zeros((2, 16)))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.int8, jnp.int8]
        assert eqn.outvars[0].aval.dtype == jnp.int32


def test_integer_batch_of_one_is_its_row_of_a_batch():
    """One example runs its integer products on two rows (the second zeros; XLA:CPU widens a
    one-row integer product to int32 × int32): the same logits as in a batch."""
    model, act_scales = _power_of_two_mlp()
    program = export_integer(model, act_scales)
    x = jax.random.uniform(jax.random.key(4), (5, 16), minval=-4.0, maxval=4.0)
    forward = jax.jit(integer_forward)
    batch = np.asarray(forward(program, x))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(forward(program, x[i : i + 1])), batch[i : i + 1])
    jaxpr = jax.make_jaxpr(integer_forward)(program, x[:1])
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3
    for eqn in dots:
        assert eqn.invars[0].aval.shape[0] == 2 and eqn.invars[0].aval.dtype == jnp.int8


@pytest.mark.parametrize(
    "strides, padding",
    [((1, 1), "SAME"), ((2, 2), "SAME"), ((2, 1), "VALID"), ((1, 1), ((1, 0), (2, 1)))],
)
def test_integer_conv_is_the_product_of_its_patches(strides, padding):
    """Integer convolutions run as one int8 product of their im2col patches: the int32
    accumulator of ``conv_general_dilated`` exactly."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.integers(-128, 128, (2, 7, 6, 5)), jnp.int8)
    kernel = jnp.asarray(rng.integers(-127, 128, (3, 3, 5, 4)), jnp.int8)
    layer = IntegerLayer(kernel, Epilogue(), op="conv", strides=strides, padding=padding)
    want = lax.conv_general_dilated(
        h, kernel, strides, padding, dimension_numbers=CONV_DIMS, preferred_element_type=jnp.int32
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(_accumulate)(layer, h)), np.asarray(want))


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_cnn_matches_fake_quant(bits):
    """Integer CNN (BatchNorm folded after quantization) vs the model's fake-quant forward.

    They differ only by rounding: the reference adds the float bias and accumulates in float32,
    the integer program adds ``round(b·2^k/(s_in·s_w))`` to the accumulator shifted by ``k``
    bits and multiplies by a 31-bit ``M0``. With the paper's ``k = 0`` the bias error is up to
    ``M/2`` output codes (``M = s_in·s_w/s_out``), which flips codes near a rounding boundary
    and near-tie argmaxes of this random-weight network at W4A4 (measured: 10 of the 256
    predictions; none at W8A8, whose scales are ~16x finer); the automatic ``k`` (up to 16)
    makes that error 2^k times smaller: no prediction differs.
    """
    model, _ = quantize_model(_cnn(bits), [Rule(".*", recipes.absmax(bits, bits))])
    x = jnp.asarray(np.random.default_rng(bits).uniform(0.0, 1.0, (256, 8, 8, 1)), jnp.float32)
    scales = static_act_scales(model, [x[:128], x[128:]])
    reference = np.asarray(fake_quant_forward(model, x, scales))
    assert len(np.unique(reference.argmax(-1))) > 2  # the inputs are told apart
    forward = jax.jit(integer_forward)
    differ = {}
    for shift in (0, None):
        program = export_integer(model, scales, bias_shift=shift)
        logits = np.asarray(forward(program, x))
        assert logits.dtype == np.int32
        differ[shift] = int(np.sum(logits.argmax(-1) != reference.argmax(-1)))
        if shift is None:
            assert all(layer.epilogue.acc_shift > 0 for layer in program.layers)
            error = np.abs(logits * program.logit_scale - reference) / np.abs(reference).max()
            assert error.max() < 1e-4
    assert differ[None] == 0, differ
    if bits == 4:
        assert differ[0] > 0, differ  # the paper's bias rounding is visible at 4 bits


def _mixed_cnn(seed):
    """The main job's model in small: CNN with BatchNorm, learned_step W4A4, stem and head float,
    scales calibrated on data, and γ < 0 on half of conv2's BatchNorm channels."""
    model = build(lambda: CNN((8, 8, 1), 10, channels=(8, 16), hidden=32, rngs=nnx.Rngs(0)), seed)
    qmodel, _ = quantize_model(model, first_last_float_rules(recipes.learned_step(4, 4)))
    x = jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, (256, 8, 8, 1)), jnp.float32)
    calibrate(qmodel, x[:128])
    gamma = np.array(qmodel.conv2_norm.scale[...])
    gamma[::2] *= -1.0
    qmodel.conv2_norm.scale[...] = jnp.asarray(gamma)
    return qmodel, x


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_first_last_float_equals_fake_quant(seed):
    """Float stem/head, integer conv2/dense: the predictions are the fake-quant model's."""
    qmodel, x = _mixed_cnn(seed)
    program = export_integer(qmodel)  # learned_step: the scales are the model's own
    assert [type(layer).__name__ for layer in program.layers] == [
        "FloatLayer",
        "IntegerLayer",
        "IntegerLayer",
        "FloatLayer",
    ]
    # float stem -> codes, conv2 -> codes, dense -> float (the boundary back), float logits
    assert [layer.epilogue.output for layer in program.layers] == [
        "codes",
        "codes",
        "float",
        "float",
    ]
    assert program.input_scale is None and program.layers[1].epilogue.negate is not None
    reference = np.asarray(nnx.jit(lambda m, x: m(x))(qmodel, x))  # what `qflax eval` computes
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert logits.dtype == np.float32
    assert len(np.unique(reference.argmax(-1))) > 2
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_mixed_program_runs_integer_operands_inside():
    qmodel, x = _mixed_cnn(0)
    program = export_integer(qmodel)
    jaxpr = jax.make_jaxpr(integer_forward)(program, x[:2])
    ops = [e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    dtypes = [([v.aval.dtype for v in e.invars], e.outvars[0].aval.dtype) for e in ops]
    assert dtypes == [
        ([jnp.float32, jnp.float32], jnp.float32),  # stem
        ([jnp.int8, jnp.int8], jnp.int32),  # conv2
        ([jnp.int8, jnp.int8], jnp.int32),  # dense
        ([jnp.float32, jnp.float32], jnp.float32),  # head
    ]
    # The conversions: float -> int8 codes after the stem, int32 -> float after dense.
    stem = program.layers[0].epilogue
    assert stem.out_dtype == "int8" and stem.out_scale is not None
    np.testing.assert_allclose(float(stem.out_scale), float(qmodel.conv2.act_scale[...]), rtol=0)


def test_integer_rejects_unsupported_recipes_and_models():
    model, _ = quantize_model(_mlp(0), [Rule("^head", recipes.pow2(4)), Rule(".*", None)])
    with pytest.raises(ValueError, match=r"layer 'head' has recipe 'w:pow2.*supports float"):
        export_integer(model)
    weight_only, _ = quantize_model(_mlp(0), [Rule("^stem", recipes.absmax(8, None))])
    with pytest.raises(ValueError, match="layer 'stem'.*only one of its weight and input"):
        export_integer(weight_only)
    absmax, _ = quantize_model(_mlp(0), [Rule(".*", recipes.absmax(8, 8))])
    with pytest.raises(ValueError, match="act_scales has no scale for layer 'stem'"):
        export_integer(absmax)
    with pytest.raises(ValueError, match="bias_shift=17 is not allowed"):
        export_integer(absmax, {"stem": 1.0, "blocks.0": 1.0, "head": 1.0}, bias_shift=17)
    with pytest.raises(ValueError, match="allowed: MLP, CNN"):
        export_integer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {})


def test_estimate_scale_and_calibrations():
    x = jnp.asarray([-2.0, -0.5, 0.0, 1.0, 3.0])
    config = UniformConfig(bits=4)  # codes -8..7
    assert estimate_scale(x, config, "absmax") == pytest.approx(3.0 / 7)
    assert estimate_scale(x, config, "minmax") == pytest.approx(max(3.0 / 7, 2.0 / 8))
    y = jnp.asarray([-8.0, 1.0, 2.0])
    assert estimate_scale(y, config, "minmax") == pytest.approx(1.0)  # -8 is code -8 exactly
    big = jnp.concatenate([jnp.linspace(-1.0, 1.0, 9999), jnp.asarray([100.0])])
    assert estimate_scale(big, config, "percentile") < 2.0 / 7  # the outlier is clipped
    assert estimate_scale(big, config, "mse") < 100.0 / 7
    with pytest.raises(ValueError, match="calibration='kl' is not allowed"):
        estimate_scale(x, config, "kl")
    model, _ = quantize_model(_mlp(0), [Rule(".*", recipes.absmax(8, 8))])
    xs = jax.random.normal(jax.random.key(0), (64, 16))
    absmax = static_act_scales(model, [xs])
    mse = static_act_scales(model, [xs[:32], xs[32:]], calibration="mse")
    assert set(absmax) == set(mse) == {"stem", "blocks.0", "head"}
    assert absmax["stem"] == pytest.approx(float(jnp.max(jnp.abs(xs))) / 127, rel=1e-6)
    assert all(mse[k] <= absmax[k] * (1 + 1e-6) for k in absmax)


def test_unsupported_activations_are_refused_before_any_work():
    # relu and hardtanh run (tests/export/test_integer_shift_xnor.py); any other activation
    # must be refused by every path before it calibrates, builds or runs anything
    model = MLP((8, 8, 1), 10, hidden=(16,), rngs=nnx.Rngs(0))
    model, _ = quantize_model(model, [Rule(".*", recipes.absmax(8, 8))])
    model.activation = "gelu"

    def batches():
        raise AssertionError("a batch was read before the activation was checked")
        yield

    match = "activation='gelu' is not allowed.*allowed: 'relu', 'hardtanh'"
    with pytest.raises(ValueError, match=match):
        fake_quant_forward(model, jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match=match):
        static_act_scales(model, batches())
    with pytest.raises(ValueError, match=match):
        export_integer(model, {"stem": 1.0, "head": 1.0})


def test_the_planner_reads_the_models_layer_sequence_not_its_class():
    """Any module that describes its forward (``layer_sequence()``) runs; the class is not
    looked at: a wrapper around an MLP gives the MLP's program and logits."""
    model, _ = quantize_model(_mlp(0), [Rule(".*", recipes.absmax(8, 8))])

    class Wrapper(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def layer_sequence(self):
            return self.inner.layer_sequence()

    x = jax.random.normal(jax.random.key(0), (32, 16))
    scales = static_act_scales(model, [x])
    assert static_act_scales(Wrapper(model), [x]) == scales
    want = integer_forward(export_integer(model, scales), x)
    got = integer_forward(export_integer(Wrapper(model), scales), x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(fake_quant_forward(Wrapper(model), x, scales)),
        np.asarray(fake_quant_forward(model, x, scales)),
    )
