"""Integer inference of the learned uniform quantizers: LSQ, PACT (DoReFa weights), DoReFa and
GDNSQ (a zero point per weight channel), as the mnist5k table trains them (first/last float)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax.export import export_integer, fake_quant_forward, integer_forward, static_act_scales
from qflax.layers import calibrate, first_last_float_rules, quantize_model, recipes
from qflax.models import CNN
from tests.export.test_export import build

RECIPES = {
    "lsq": lambda: recipes.lsq(4, 4),
    "lsq-channel-8bit": lambda: recipes.lsq(8, 8, weight_granularity="channel"),
    "pact": lambda: recipes.pact(4, 4, init_alpha=None),
    "dorefa": lambda: recipes.dorefa(4, 4),
    "gdnsq": lambda: recipes.gdnsq(4, 4, init_bits=4.0),
    "gdnsq-8bit": lambda: recipes.gdnsq(8, 8),
}


def _model(name, seed=0):
    model = build(lambda: CNN((8, 8, 1), 10, channels=(8, 16), hidden=32, rngs=nnx.Rngs(0)), seed)
    model, _ = quantize_model(model, first_last_float_rules(RECIPES[name]()))
    x = jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, (256, 8, 8, 1)), jnp.float32)
    calibrate(model, x[:128])
    return model, x


@pytest.mark.parametrize("name", list(RECIPES))
def test_learned_uniform_cnn_equals_the_model(name):
    """conv2 and dense on integer codes; the learned input scales are static, so the reference
    is the model itself (what `qflax eval` computes): the same predictions."""
    model, x = _model(name)
    scales = static_act_scales(model, [x[:128]])
    assert set(scales) == {"conv2", "dense"}
    program = export_integer(model, scales)
    kinds = [(type(layer).__name__, layer.epilogue.output) for layer in program.layers]
    assert kinds == [
        ("FloatLayer", "codes"),
        ("IntegerLayer", "codes"),
        ("IntegerLayer", "float"),
        ("FloatLayer", "float"),
    ]
    conv2 = program.layers[1]
    assert jnp.issubdtype(conv2.kernel.dtype, jnp.integer)
    # GDNSQ: a zero point z = min w per channel (Σx term); DoReFa's n/2 folds into the codes
    assert (conv2.input_sum is not None) == name.startswith("gdnsq")
    reference = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    np.testing.assert_allclose(
        np.asarray(fake_quant_forward(model, x, scales)), reference, rtol=1e-5, atol=1e-5
    )
    logits = np.asarray(jax.jit(integer_forward)(program, x))
    assert len(np.unique(reference.argmax(-1))) > 2
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    error = np.abs(logits - reference) / np.abs(reference).max()
    if name == "gdnsq-8bit":  # 8-bit codes leave k = 8 fraction bits for z/s (2^-9 of a step)
        assert np.median(error) < 5e-5
    else:
        assert np.median(error) < 1e-5 and np.mean(error.max(-1) > 1e-4) < 0.02


def test_gdnsq_inputs_with_a_zero_point_are_refused():
    model, x = _model("gdnsq")
    model.dense.act_lower[...] = jnp.asarray(0.25, jnp.float32)
    with pytest.raises(ValueError, match=r"layer 'dense'.*lower bound β=0.25.*allowed: β = 0"):
        export_integer(model, {})
