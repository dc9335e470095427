"""export_model / save_packed / load_packed / import_model, and BatchNorm folding."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import quantizers as qz
from qflax.export import (
    Identity,
    QArray,
    dequantize,
    export_model,
    fold_batchnorm,
    fold_model_batchnorm,
    identity_variance,
    import_model,
    load_packed,
    packed_model_bytes,
    quantize_tensor,
    save_packed,
    unpack,
)
from qflax.layers import Rule, TensorQuant, layer_summaries, quantize_model, recipes
from qflax.models import CNN, MLP, ResNet20


@nnx.jit(static_argnames="train")
def _call(model, x, train=False):
    return model(x, train=train)


def build(constructor, seed=0):
    """A model with random parameters and BatchNorm statistics, without eager initialisation
    (which compiles every initializer op by op: seconds per layer on a loaded CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(constructor))
    rng = np.random.default_rng(seed)

    def fill(path, v):
        if path[-1] in ("var", "scale"):  # BatchNorm variance and γ; statistics not (0, 1)
            return v.replace(jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype))
        std = 0.2 if path[-1] == "mean" else 0.4
        return v.replace(jnp.asarray(rng.normal(0.0, std, v.shape), v.dtype))

    state = jax.tree.map_with_path(
        lambda path, v: fill(tuple(getattr(k, "key", k) for k in path), v),
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    return nnx.merge(graphdef, state)


def _cnn(seed=0, channels=(4, 8)):
    return build(lambda: CNN((8, 8, 1), 10, channels=channels, hidden=16, rngs=nnx.Rngs(0)), seed)


def _x(seed=0, shape=(16, 8, 8, 1)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _bn_bytes(model):
    return sum(
        16 * node.mean[...].size
        for _, node in nnx.iter_graph(model)
        if isinstance(node, nnx.BatchNorm)
    )


@pytest.mark.parametrize(
    "spec",
    [
        TensorQuant(kind="absmax", config=qz.UniformConfig(bits=4, granularity="channel")),
        TensorQuant(kind="pow2", config=qz.PowerOfTwoConfig(bits=4, granularity="channel")),
        TensorQuant(kind="binary", config=qz.BinaryConfig(scaling="channel")),
        TensorQuant(kind="ternary", config=qz.TernaryConfig(scaling="channel")),
        TensorQuant(kind="pair", config=qz.PairConfig(pair="bnn", scaling="channel")),
    ],
    ids=str,
)
def test_quantize_tensor_matches_layer_quantizer(spec):
    w = _x(1, (12, 6))
    q = quantize_tensor(spec, w)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(spec.apply(w)))


def test_non_sign_pair_has_no_codes():
    spec = TensorQuant(kind="pair", config=qz.PairConfig(pair="bnn++", kwargs={"mu": 1.0}))
    with pytest.raises(ValueError, match="not a sign"):
        quantize_tensor(spec, _x(1, (4, 3)))


@pytest.mark.parametrize("pair", ["bnn++", "proxquant", "pc"])
def test_relaxed_pair_in_its_exact_state_stores_binary_codes(pair):
    spec = TensorQuant(kind="pair", config=qz.PairConfig(pair=pair, scaling="channel"))
    w = _x(1, (12, 6))
    stats = {**spec.stats_init(w), "hard": jnp.ones((), jnp.float32)}
    q = quantize_tensor(spec, w, {}, stats)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(spec.apply(w, stats=stats)))
    assert set(np.unique(np.asarray(q.values)).tolist()) == {0, 1}


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_export_save_load_import(tmp_path, weight_bits):
    model, _ = quantize_model(
        _cnn(0), [Rule("^stem", None), Rule(".*", recipes.absmax(weight_bits, 8))]
    )
    x = _x()
    expected = _call(model, x)
    tree = export_model(model)
    kernel = tree["conv2"]["inner"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.packed and kernel.bits == weight_bits
    assert kernel.values.size == 3 * 3 * 4 * 8 * weight_bits // 8
    assert not isinstance(tree["stem"]["kernel"], QArray)  # a float layer stays float
    # Array bytes = the layers' packed_bytes (kernels, biases, scales) + the BatchNorm arrays,
    # which layer summaries do not count (4 arrays of C float32 per BatchNorm).
    total = packed_model_bytes(tree)
    assert total == sum(s["packed_bytes"] for s in layer_summaries(model)) + _bn_bytes(model)

    path = save_packed(tree, tmp_path / "export")
    assert not any(p.name.endswith(".orbax-checkpoint-tmp") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="exists"):
        save_packed(tree, tmp_path / "export")
    loaded = load_packed(path)
    assert packed_model_bytes(loaded) == total
    on_disk = int(
        subprocess.run(
            ["du", "-sb", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    assert total < on_disk < total + 100_000  # orbax metadata: tens of kB, independent of size
    for a, b in zip(
        jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(loaded), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(loaded)

    fresh, _ = quantize_model(
        _cnn(7), [Rule("^stem", None), Rule(".*", recipes.absmax(weight_bits, 8))]
    )
    import_model(fresh, loaded)
    got = _call(fresh, x)
    np.testing.assert_array_equal(np.asarray(got.argmax(-1)), np.asarray(expected.argmax(-1)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # the layer re-quantizes ŵ to ŵ (its recomputed absmax scale may differ by one ulp)
    np.testing.assert_allclose(
        np.asarray(fresh.conv2.quantized_kernel()),
        np.asarray(dequantize(unpack(kernel))),
        rtol=1e-6,
    )


def test_import_rejects_other_architecture():
    model, _ = quantize_model(_cnn(0), [Rule(".*", recipes.absmax(4, 4))])
    tree = export_model(model)
    other, _ = quantize_model(
        _cnn(0, channels=(4, 6)),
        [Rule(".*", recipes.absmax(4, 4))],
    )
    with pytest.raises(ValueError, match="shape"):
        import_model(other, tree)
    with pytest.raises(ValueError, match="no entry"):
        import_model(_cnn(0), tree)


def test_mlp_learned_step_exports_scales():
    model, _ = quantize_model(
        build(lambda: MLP((4,), 3, hidden=(8,), rngs=nnx.Rngs(0))),
        [Rule(".*", recipes.learned_step(2, 8))],
    )
    tree = export_model(model)
    assert tree["stem"]["act_scale"].shape == ()
    assert tree["stem"]["inner"]["kernel"].bits == 2
    assert "weight_scale" not in tree["stem"]  # stored once, as the QArray's scale
    total = packed_model_bytes(tree)
    assert total == sum(s["packed_bytes"] for s in layer_summaries(model))
    x = _x(2, (5, 4))
    fresh, _ = quantize_model(
        build(lambda: MLP((4,), 3, hidden=(8,), rngs=nnx.Rngs(0)), 1),
        [Rule(".*", recipes.learned_step(2, 8))],
    )
    import_model(fresh, tree)
    np.testing.assert_allclose(
        np.asarray(fresh.stem.weight_scale[...]), np.asarray(model.stem.weight_scale[...])
    )
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(model(x)), atol=1e-6)


def test_fold_batchnorm_formula():
    w = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    b = jnp.array([0.5, -0.5])
    gamma, beta = jnp.array([2.0, -1.0]), jnp.array([0.1, 0.2])
    mean, var, eps = jnp.array([1.0, 0.0]), jnp.array([3.0, 0.0]), 1.0
    w_f, b_f = fold_batchnorm(w, b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(w_f, [[1.0, -2.0], [3.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(b_f, [0.1 + (0.5 - 1.0) * 1.0, 0.2 + 0.5], rtol=1e-6)
    w_n, b_n = fold_batchnorm(w, None, None, None, mean, var, eps)
    np.testing.assert_allclose(b_n, [-0.5, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="mean has shape"):
        fold_batchnorm(w, b, gamma, beta, jnp.zeros(3), var, eps)


def test_identity_variance():
    for eps in (1e-5, 1e-3, 1e-6):
        v = identity_variance(eps)
        assert np.float32(v + np.float32(eps)) == 1.0


@pytest.mark.parametrize("remove", [False, True])
@pytest.mark.parametrize("which", ["cnn", "resnet20"])
def test_folded_model_equals_original(which, remove):
    if which == "cnn":
        model, x = _cnn(0), _x()
    else:
        model = build(
            lambda: ResNet20(
                (8, 8, 3),
                10,
                width=0.25,
                blocks_per_stage=1,
                shortcut="projection",
                rngs=nnx.Rngs(0),
            )
        )
        x = _x(1, (8, 8, 8, 3))
    folded = fold_model_batchnorm(model, remove=remove)
    norms = [n for _, n in nnx.iter_graph(folded) if isinstance(n, nnx.BatchNorm)]
    if remove:
        assert not norms and any(isinstance(n, Identity) for _, n in nnx.iter_graph(folded))
    else:
        assert norms and all(float(jnp.abs(n.mean[...]).max()) == 0.0 for n in norms)
    before, after = _call(model, x), _call(folded, x)
    assert float(jnp.abs(before).max()) > 0.1
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=2e-5, rtol=1e-4)
    # the original is untouched
    assert any(
        isinstance(n, nnx.BatchNorm) and float(jnp.abs(n.mean[...]).max()) > 0
        for _, n in nnx.iter_graph(model)
    )


def test_fold_quantized_cnn_per_channel():
    model = _cnn(0)
    x = _x()
    qmodel, _ = quantize_model(model, [Rule(".*", recipes.absmax(8, 8))])
    folded = fold_model_batchnorm(qmodel, remove=True)
    np.testing.assert_array_equal(
        np.asarray(_call(folded, x).argmax(-1)), np.asarray(_call(qmodel, x).argmax(-1))
    )
