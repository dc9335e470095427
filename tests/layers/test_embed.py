"""QuantEmbed: the quantized token embedding (per-token scales), its tied ``attend``, rules,
summaries, export, and a tiny model that learns through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import quantizers as qz
from qflax.export import export_model, import_model
from qflax.layers import QuantEmbed, QuantParam, Rule, recipes

V, D = 12, 8


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def embed(recipe=None, seed: int = 0) -> QuantEmbed:
    return QuantEmbed(
        V, D, recipe=recipes.absmax(4, 8) if recipe is None else recipe, rngs=rngs(seed)
    )


IDS = jnp.array([[0, 3, 11, 3], [5, -1, 2, 7]])


def test_lookup_is_the_row_of_the_per_token_quantized_table():
    layer = embed()
    table = np.asarray(layer.inner.embedding[...])
    y = np.asarray(layer(IDS))
    assert y.shape == (2, 4, D) and y.dtype == np.float32
    # One absmax scale per token (row): each row's codes are integers in [-7, 7] and its
    # largest magnitude maps to 7 exactly.
    expected = np.asarray(
        qz.uniform(
            jnp.asarray(table.T),
            {
                "scale": qz.uniform_init(
                    jnp.asarray(table.T), qz.UniformConfig(bits=4, granularity="channel")
                )["scale"]
            },
            qz.UniformConfig(bits=4, granularity="channel"),
        )
    ).T
    np.testing.assert_array_equal(y, expected[np.asarray(IDS)])
    scale = np.abs(table).max(axis=1, keepdims=True) / 7
    codes = expected / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(np.round(codes)).max() == 7 and (np.abs(np.round(codes)).max(axis=1) == 7).all()
    # Negative ids index from the end, like nnx.Embed; out-of-range ids give NaN rows.
    np.testing.assert_array_equal(y[1, 1], expected[-1])
    assert np.isnan(np.asarray(layer(jnp.array([V])))).all()
    # A float recipe is exactly nnx.Embed.
    fl = QuantEmbed.from_module(layer.inner, ql.Recipe())
    np.testing.assert_array_equal(fl(IDS), jnp.take(layer.inner.embedding[...], IDS, axis=0))


def test_lookup_edge_tables_zeros_huge_and_ties():
    layer = embed()
    table = np.zeros((V, D), np.float32)
    table[1] = 3e38  # huge, finite
    table[2, :2] = (1.0, 0.5 / 7 * 1.0)  # a tie at half a step: rounds to even (0)
    table[3, 0] = 1e-40  # subnormal alone in its row
    layer.inner.embedding[...] = jnp.asarray(table)
    y = np.asarray(layer(jnp.arange(4)))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)  # an all-zero row stays zero (no 0/0)
    np.testing.assert_allclose(y[1], 3e38, rtol=1e-6)
    assert y[2, 0] == 1.0 and y[2, 1] == 0.0


def test_gradient_is_straight_through_and_summed_over_repeated_ids():
    layer = embed()
    cot = jax.random.normal(jax.random.key(1), IDS.shape + (D,))

    def loss(layer):
        return jnp.sum(layer(IDS) * cot)

    grads = nnx.jit(nnx.grad(loss))(layer)
    g = np.asarray(grads["inner"]["embedding"][...])
    expected = np.zeros((V, D), np.float32)
    np.add.at(expected, np.asarray(IDS) % V, np.asarray(cot))
    # absmax's backward (METHODS.md §1): identity inside the range, which holds every element.
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(g[3]).sum() > 0 and np.all(g[[1, 4, 6, 8, 9, 10]] == 0)


def test_jit_and_vmap_agree_with_eager():
    layer = embed()
    eager = layer(IDS)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(layer, IDS), eager)
    per_row = nnx.vmap(lambda m, ids: m(ids), in_axes=(None, 0))(layer, IDS)
    np.testing.assert_array_equal(per_row, eager)


def test_attend_is_the_quantized_tied_projection():
    layer = embed(recipes.absmax(4, 8))
    q = jax.random.normal(jax.random.key(2), (3, D))
    y = layer.attend(q)
    qq = qz.uniform(
        q,
        {"scale": qz.uniform_init(q, qz.UniformConfig(bits=8))["scale"]},
        qz.UniformConfig(bits=8),
    )
    np.testing.assert_allclose(y, qq @ layer.quantized_kernel(), rtol=1e-5, atol=1e-5)
    assert layer.quant_info()["macs"] == D * V  # one query row: D·V multiply-accumulates
    layer(IDS)
    assert layer.quant_info()["macs"] == 0  # a lookup has none
    # A gradient quantizer (8-bit per-sample stochastic) changes only the backward.
    fqt = ql.with_grad(recipes.absmax(4, 8), kind="psq", bits=8)
    g_layer = QuantEmbed.from_module(layer.inner, fqt)
    np.testing.assert_array_equal(g_layer.attend(q), y)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="dtype float32.*integer token ids"):
        embed()(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="module=Linear.*nnx.Embed"):
        QuantEmbed.from_module(nnx.Linear(2, 3, rngs=rngs()), recipes.absmax(8, 8))
    with pytest.raises(ValueError, match="rngs=None"):
        QuantEmbed(V, D, recipe=recipes.absmax(8, 8))


class _Bag(nnx.Module):
    """Mean of token embeddings, then a linear head: the smallest token model."""

    def __init__(self, r: nnx.Rngs):
        self.tokens = nnx.Embed(V, D, rngs=r)
        self.head = nnx.Linear(D, 2, rngs=r)

    def __call__(self, ids):
        return self.head(self.tokens(ids).mean(axis=1))


def test_rules_summaries_and_export_round_trip():
    model, report = ql.quantize_model(_Bag(rngs()), [Rule("^tokens", recipes.learned_step(4, 8))])
    assert isinstance(model.tokens, QuantEmbed) and type(model.head) is nnx.Linear
    assert [(line.path, line.module_type) for line in report.lines] == [
        ("tokens", "Embed"),
        ("head", "Linear"),
    ]
    # Calibration sets the per-token learned steps from the table (no activations to see).
    assert ql.calibrate(model, IDS) == ["tokens"]
    assert model.tokens.weight_scale[...].shape == (V,)
    rows = {s["path"]: s for s in ql.layer_summaries(model, ql.count_macs(model, IDS))}
    assert rows["tokens"]["weights"] == V * D and rows["tokens"]["macs"] == 0
    # Codes packed at 4 bits, one float32 step per token and the query's step (for attend).
    assert rows["tokens"]["packed_bytes"] == V * D // 2 + 4 * (V + 1)
    assert rows["head"]["macs"] == D * 2
    # A float embedding is counted too (params, 32 bits).
    float_rows = ql.layer_summaries(_Bag(rngs()))
    assert float_rows[0]["path"] == "tokens" and float_rows[0]["params"] == V * D
    # Export: the table's codes, transposed as the quantizer sees them; import gives the
    # same forward in a fresh model.
    tree = export_model(model)
    q = tree["tokens"]["inner"]["embedding"]
    assert isinstance(q, qz.QArray) and tuple(q.shape) == (D, V)
    assert "weight_scale" not in tree["tokens"]
    fresh, _ = ql.quantize_model(_Bag(rngs(7)), [Rule("^tokens", recipes.learned_step(4, 8))])
    import_model(fresh, tree)
    np.testing.assert_allclose(fresh(IDS), model(IDS), rtol=1e-6, atol=1e-6)


def test_a_tiny_token_model_learns_through_a_2_bit_embedding():
    """Parity of the token ids (a per-token fact only the embedding can carry)."""
    model, _ = ql.quantize_model(_Bag(rngs()), [Rule("^tokens", recipes.learned_step(2, 8))])
    ids = jax.random.randint(jax.random.key(3), (64, 1), 0, V)
    labels = ids[:, 0] % 2
    ql.calibrate(model, ids)
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Any(nnx.Param, QuantParam))

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(ids), labels).mean()

        loss, grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, QuantParam))
        )(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's step counts mix int and float
            optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(60)]
    accuracy = float(jnp.mean(jnp.argmax(model(ids), -1) == labels))
    assert losses[-1] < 0.5 * losses[0] and accuracy >= 0.95, (losses[0], losses[-1], accuracy)
