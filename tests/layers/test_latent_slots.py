"""Latent slots in models: quantize_model puts the rule's latent quantizer in a Latent slot (and
leaves it float without one), and latent_summaries counts codes, utilisation, bits and bytes
from the codes themselves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import models
from qflax import quantizers as qz
from qflax.numerics import pack_bits

X = np.random.default_rng(0).uniform(size=(12, 8, 8, 1)).astype(np.float32)


def _split_cnn():
    return models.SplitCNN((8, 8, 1), 10, channels=(4, 8), hidden=16, split_dim=3, rngs=nnx.Rngs(0))


def test_rules_put_latent_quantizers_in_slots_and_float_otherwise():
    model = _split_cnn()
    quantized, report = ql.quantize_model(
        model, [ql.Rule("^split$", ql.recipes.latent("split", levels=4)), ql.Rule(".*", None)]
    )
    assert isinstance(quantized.split, ql.QuantLatent) and isinstance(model.split, ql.Latent)
    line = next(line for line in report.lines if line.path == "split")
    assert (line.module_type, line.recipe, line.rule) == ("Latent", "a:split4", 0)
    # a weight-only recipe has nothing for a slot: it stays float (and the layers are quantized)
    weights_only, report = ql.quantize_model(model, [ql.Rule(".*", ql.recipes.absmax(8, None))])
    assert isinstance(weights_only.split, ql.Latent)
    assert isinstance(weights_only.dense, ql.QuantLinear)
    assert next(line for line in report.lines if line.path == "split").recipe == "float"
    # a slot's width must match a vector quantizer's
    with pytest.raises(ValueError, match="features=3 does not match"):
        ql.quantize_model(model, [ql.Rule("^split$", ql.recipes.latent("fsq", levels=(4, 4)))])
    with pytest.raises(ValueError, match="dim=0 is not allowed"):
        ql.Latent(0)


def test_split_summary_counts_the_packed_payload():
    model, _ = ql.quantize_model(
        _split_cnn(), [ql.Rule("^split$", ql.recipes.latent("split", levels=4))]
    )
    codes = ql.latent_codes(model, X, batch_size=5)["split"]  # 5, 5, 2: a padded last batch
    cut = nnx.jit(lambda m, x: m.front(x))(model, jnp.asarray(X))
    expected, mu, sigma = qz.split_codes(cut, qz.SplitConfig(levels=4))
    np.testing.assert_array_equal(codes, expected)
    (row,) = ql.latent_summaries(model, X, batch_size=5)
    assert row["codes_per_sample"] == 2 * 2 * 3 and row["code_bits"] == 2.0
    assert row["bytes_per_sample"] == pack_bits(codes[0], 2).size + mu[:1].nbytes + sigma[:1].nbytes
    counts = np.bincount(codes.ravel(), minlength=4) / codes.size
    p = counts[counts > 0]
    assert row["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert row["utilisation"] == pytest.approx(row["perplexity"] / 4, rel=1e-6)
    assert row["usage"] == np.unique(codes).size / 4


def test_vector_and_residual_summaries():
    ae = models.ConvAutoencoder((8, 8, 1), channels=(4, 8), latent_dim=4, rngs=nnx.Rngs(0))
    vq, _ = ql.quantize_model(
        ae, [ql.Rule("^latent$", ql.recipes.latent("vq", codebook_size=8, dim=4))]
    )
    ql.calibrate(vq, jnp.asarray(X))
    (row,) = ql.latent_summaries(vq, X)
    codes = ql.latent_codes(vq, X)["latent"]
    assert codes.shape == (12, 2, 2) and row["codes_per_sample"] == 4
    assert (row["code_bits"], row["bits_per_sample"], row["bytes_per_sample"]) == (3.0, 12.0, 2)
    rvq, _ = ql.quantize_model(
        ae, [ql.Rule("^latent$", ql.recipes.latent("rvq", stages=2, codebook_size=4, dim=4))]
    )
    ql.calibrate(rvq, jnp.asarray(X))
    (row,) = ql.latent_summaries(rvq, X)
    codes = ql.latent_codes(rvq, X)["latent"]
    assert codes.shape == (12, 2, 2, 2) and row["codes_per_sample"] == 4
    per_stage = [float(qz.code_perplexity(jnp.asarray(codes[..., s]), 4)) for s in range(2)]
    assert row["utilisation"] == pytest.approx(np.mean(per_stage) / 4, rel=1e-5)
    used = [np.unique(codes[..., s]).size / 4 for s in range(2)]
    assert row["usage"] == pytest.approx(np.mean(used)) and 0 < row["usage"] <= 1
    assert row["code_bits"] == 4.0 and row["bits_per_sample"] == 16.0
    assert ql.latent_summaries(ae, X) == [] and ql.latent_codes(ae, X) == {}
    # the float model's output is unchanged by recording codes (inference mode)
    before = nnx.jit(lambda m, x: m(x))(vq, jnp.asarray(X))
    ql.latent_codes(vq, X)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(vq, jnp.asarray(X)), before)
    assert jax.tree.leaves(nnx.state(vq, nnx.Intermediate)) == []
