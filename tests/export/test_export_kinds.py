"""quantize_tensor / export_model for LSQ, DoReFa, PACT, GDNSQ and DBSSQ: codes that decode to the
layer's forward (exactly, or within the bound each quantize_* function documents)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import quantizers as qz
from qflax.export import (
    QArray,
    dequantize,
    export_model,
    import_model,
    pack,
    packed_model_bytes,
    quant_layers,
    quantize_tensor,
    unpack,
)
from qflax.layers import Rule, TensorQuant, layer_summaries, quantize_model, recipes
from qflax.models import MLP
from qflax.numerics import int_range
from tests.export.test_export import build

ULP1 = 2.0**-23  # one float32 ulp of 1
SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 8)}


def _x(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.5


def _dbssq(levels, bits, role="weight"):
    return TensorQuant(kind="dbssq", config=qz.DBSSQConfig(levels=levels, bits=bits), role=role)


def _lsq(bits, **config):
    return TensorQuant(kind="lsq", config=qz.LSQConfig(bits=bits, **config))


# name: (spec, shape, the QArray it is stored as: (kind, bits, signed), error bound: None = exact).
# bits None: a learned bit-width (GDNSQ). Most cases share the dense shape (compiled once); the
# conv cases check per-channel params of a 4-D kernel.
_D, _C = "dense", "conv"
CASES = {
    "lsq4": (recipes.lsq(4, 4).weight, _D, ("uniform", 4, True), None),
    "lsq2-channel": (
        recipes.lsq(2, weight_granularity="channel").weight,
        _C,
        ("uniform", 2, True),
        None,
    ),
    "lsq1": (_lsq(1), _D, ("uniform", 1, True), None),
    "lsq3-group": (_lsq(3, granularity="group", group_size=4), _D, ("uniform", 3, True), None),
    "dorefa1": (recipes.dorefa(1).weight, _D, ("binary", 1, False), None),
    "dorefa4": (recipes.dorefa(4).weight, _D, ("uniform", 4, False), "dorefa"),
    "dorefa3-act": (recipes.dorefa(4, 3).act, _D, ("uniform", 3, False), "dorefa-act"),
    "pact4-act": (recipes.pact(4, 4, init_alpha=None).act, _D, ("uniform", 4, False), "pact"),
    "gdnsq4": (recipes.gdnsq(4).weight, _C, ("uniform", None, False), "gdnsq"),
    "gdnsq-tensor": (
        recipes.gdnsq(2, weight_granularity="tensor", init_bits=3.0, min_bits=None).weight,
        _D,
        ("uniform", None, False),
        "gdnsq",
    ),
    "gdnsq-code-init": (
        recipes.gdnsq(2, init_bits=None).weight,
        _D,
        ("uniform", None, False),
        "gdnsq",
    ),
    "gdnsq4-act": (recipes.gdnsq(4, 4).act, _D, ("uniform", None, False), None),
    "gdnsq4-act-signed": (
        recipes.gdnsq(4, 4, act_signed=True).act,
        _D,
        ("uniform", None, False),
        "gdnsq",
    ),
    "dbssq-shift0": (_dbssq("shift", 0), _D, ("binary", 1, False), None),
    "dbssq-shift2": (recipes.dbssq(2).weight, _C, ("pow2", 3, False), None),
    "dbssq-shift6": (_dbssq("shift", 6), _D, ("pow2", 7, False), None),
    "dbssq-uniform1": (recipes.dbssq(1, levels="uniform").weight, _D, ("binary", 1, False), None),
    "dbssq-uniform4": (_dbssq("uniform", 4), _D, ("uniform", 5, True), None),
    "dbssq-shift2-act": (_dbssq("shift", 2, "act"), _D, ("pow2", 3, False), None),
}


def _stats(spec, x):
    stats = spec.stats_init(x)
    if spec.kind == "dbssq":
        stats["epsilon"] = jnp.zeros((), jnp.float32)  # the exact model training ends in
    return stats


def _bound(name, spec, ref, params):
    """The documented bound on |dequantize − apply| (elementwise, broadcast against ref)."""
    which = CASES[name][3]
    ref = np.abs(np.asarray(ref, np.float64))
    if which == "dorefa":
        return ULP1
    if which == "dorefa-act":
        return ULP1 / 2
    if which == "pact":
        return 2.0**-21 * float(params["alpha"])
    if isinstance(spec.config, qz.GDNSQActConfig):  # max(|β|, max|x̂|)
        return 2.0**-21 * max(abs(float(params["lower"])), float(ref.max()))
    axes = tuple(range(ref.ndim - 1)) if spec.config.granularity == "channel" else None
    return 2.0**-21 * ref.max(axis=axes, keepdims=axes is not None)  # per channel


def _assert_same(a: QArray, b: QArray):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert la.dtype == lb.dtype and la.shape == lb.shape
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


@jax.jit
def _roundtrip(q: QArray) -> tuple[QArray, QArray, jax.Array]:
    p = pack(q)
    return p, unpack(p), dequantize(p)


def _assert_codes_in_range(q: QArray):
    v = np.asarray(q.values).astype(np.int64)
    if q.kind == "uniform":
        lo, hi = int_range(q.bits, q.signed)
    elif q.kind == "pow2":
        lo, hi = 0, 2**q.bits - 1
    else:
        assert q.kind == "binary"
        lo, hi = 0, 1
    assert lo <= v.min() and v.max() <= hi, (q.kind, q.bits, v.min(), v.max())


@pytest.mark.parametrize("name", list(CASES))
def test_quantize_tensor_decodes_to_the_forward(name):
    spec, shape, (kind, bits, signed), which = CASES[name]
    shape = SHAPES[shape]
    x = _x(list(CASES).index(name), shape)
    params = spec.init(x) if spec.learnable else {}
    stats = _stats(spec, x)
    q = quantize_tensor(spec, x, params, stats)
    key = jax.random.key(0) if spec.needs_key else None  # GDNSQ's noise rule: backward only
    ref = np.asarray(spec.apply(x, params, key=key, stats=stats))
    got = np.asarray(dequantize(q))
    assert got.shape == ref.shape == shape and got.dtype == np.float32
    assert (q.kind, q.signed) == (kind, signed) and q.shape == shape and not q.packed
    if bits is not None:
        assert q.bits == bits
    elif isinstance(spec.config, qz.GDNSQWeightConfig):  # the largest code present
        assert q.bits == max(1, int(np.asarray(q.values).max()).bit_length())
        assert q.bits == int(spec.used_bits(x, params))
    else:  # activations: the codes of the whole clip range
        assert q.bits == int(spec.used_bits(x, params))
    _assert_codes_in_range(q)
    if which is None:
        np.testing.assert_array_equal(got, ref)
    else:
        bound = _bound(name, spec, ref, params)
        err = np.abs(got.astype(np.float64) - ref)
        assert np.all(err <= bound), (float(err.max()), np.max(bound))
    assert len(np.unique(np.asarray(q.values))) > 1  # a real tensor, not one constant code
    p, u, decoded = _roundtrip(q)  # pack, unpack (one compiled function)
    assert p.packed and (p.values.dtype == jnp.uint8 or q.bits > 8)
    _assert_same(u, q)
    np.testing.assert_array_equal(np.asarray(decoded), got)


def test_dorefa_bound_holds_for_every_code():
    """Every code of a k-bit DoReFa weight / activation against the quantizer's own q_k."""
    size = 2**16  # one shape for every k (codes above 2^k − 1 repeat the top one)
    for k in (2, 3, 4, 8, 16):
        n = 2**k - 1
        codes = jnp.minimum(jnp.arange(size, dtype=jnp.int32), n)
        levels = codes.astype(jnp.float32) / float(n)  # round(n·levels) = codes
        for spec, want in (
            (recipes.dorefa(k).weight, 2.0 * qz.dorefa_quantize_k(levels, bits=k) - 1.0),
            (recipes.dorefa(4, k).act, qz.dorefa_quantize_k(levels, bits=k)),
        ):
            q = quantize_tensor(spec, jnp.linspace(-1.0, 1.0, 8))  # the scale and zero point
            q = dataclasses.replace(q, values=codes.astype(q.values.dtype), shape=(size,))
            err = np.abs(np.asarray(dequantize(q)) - np.asarray(want))
            assert err.max() <= (ULP1 if spec.config.role == "weight" else ULP1 / 2), k


def test_pact_bound_holds_for_every_code():
    for bits in (2, 5, 8):
        spec = recipes.pact(4, bits).act
        n = 2**bits - 1
        for alpha in (0.3, 6.1):
            p = {"alpha": jnp.asarray(alpha, jnp.float32)}
            x = jnp.minimum(jnp.arange(256, dtype=jnp.float32), n) * (alpha / n)  # every code
            q = quantize_tensor(spec, x, p)
            np.testing.assert_array_equal(np.asarray(q.values), np.minimum(np.arange(256), n))
            err = np.abs(np.asarray(dequantize(q)) - np.asarray(spec.apply(x, p)))
            assert err.max() <= 2.0**-21 * alpha


def test_dbssq_relaxed_blend_has_no_codes():
    spec = recipes.dbssq(2).weight
    x = _x(0, (16, 8))
    stats = {**spec.stats_init(x), "epsilon": jnp.asarray(0.25, jnp.float32)}
    with pytest.raises(ValueError, match=r"epsilon=0\.25.*allowed: epsilon=0"):
        quantize_tensor(spec, x, {}, stats)
    with pytest.raises(ValueError, match=r"epsilon=1\.0"):  # stats=None: ε = 1, as apply
        quantize_tensor(spec, x)


def test_dbssq_dead_channel_keeps_the_sign_of_zero():
    """σ_c = 0 (a constant pretrained channel): the forward is ±0, and so is the QArray."""
    for spec in (recipes.dbssq(2).weight, _dbssq("uniform", 3), _dbssq("shift", 0)):
        x = _x(3, (16, 8))
        stats = _stats(spec, x)
        stats["sigma"] = stats["sigma"].at[2].set(0.0)
        ref = np.asarray(spec.apply(x, {}, stats=stats))
        got = np.asarray(dequantize(quantize_tensor(spec, x, {}, stats)))
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))
        assert np.all(ref[:, 2] == 0) and np.any(np.signbit(ref[:, 2]))


def test_unknown_kind_is_a_value_error():
    spec = dataclasses.replace(recipes.lsq(4).weight)  # a copy
    object.__setattr__(spec, "kind", "bogus")  # past TensorQuant's own validation
    with pytest.raises(ValueError, match="kind='bogus'.*allowed: .*lsq"):
        quantize_tensor(spec, _x(0, (4, 3)))


# ------------------------------------------------------------------------------------- models

# In this order, layer i of _model(tuple(RECIPES)) has kernel shape (16, 8) for even i (as the
# dense CASES, so their compiled ops are reused), (8, 16) for odd i and (8, 3) for the head.
RECIPES = {
    "dbssq-w2": lambda: recipes.dbssq(2),
    "dorefa-w2a2": lambda: recipes.dorefa(2, 2),
    "gdnsq-w4a4": lambda: recipes.gdnsq(4, 4),
    "pact-w4a4": lambda: recipes.pact(4, 4, init_alpha=None),
    "lsq-w4a4": lambda: recipes.lsq(4, 4),
    "lsq-w2a2-channel": lambda: recipes.lsq(2, 2, weight_granularity="channel"),
}
_X = jax.random.normal(jax.random.key(5), (6, 16), jnp.float32)


@nnx.jit
def _call(model, x):
    return model(x)


@functools.cache
def _model(names: tuple[str, ...], seed: int = 0) -> nnx.Module:
    """An MLP whose i-th dense layer (stem, blocks/*, head) is quantized with RECIPES[names[i]],
    at DBSSQ's exact state (ε = 0). Cached: import into a clone, not into it."""
    hidden = (8, 16) * (len(names) // 2) + (8,)
    hidden = hidden[: len(names) - 1]
    mlp = build(lambda: MLP((16,), 3, hidden=hidden, rngs=nnx.Rngs(0)), seed)
    paths = ["^stem$", *(rf"^blocks\.{i}$" for i in range(len(names) - 2)), "^head$"]
    rules = [Rule(p, RECIPES[n]()) for p, n in zip(paths, names, strict=True)]
    model, _ = quantize_model(mlp, rules)
    for _, layer in quant_layers(model):
        layer.set_stat("epsilon", 0.0)
    return model


def _node(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def test_export_model_of_every_recipe():
    """One MLP with a layer per recipe: packed QArray kernels that decode to the layers'
    quantized kernels; the bytes are the layer summaries' (DoReFa k > 1: + s and z)."""
    model = _model(tuple(RECIPES))
    tree = export_model(model)
    extra = 0  # DoReFa k > 1 stores s and z, which layer summaries do not count (fixed levels)
    layers = quant_layers(model)
    assert sorted(str(layer.recipe) for _, layer in layers) == sorted(
        str(r()) for r in RECIPES.values()
    )
    for path, layer in layers:
        node = _node(tree, path)
        q = node["inner"]["kernel"]
        assert isinstance(q, QArray) and q.packed and q.values.dtype == jnp.uint8
        learned = dict(layer.param_names).get("weight", ())
        assert not any(f"weight_{n}" in node for n in learned)  # stored once, in the QArray
        got = np.asarray(dequantize(q))
        want = np.asarray(layer.quantized_kernel())
        spec = layer.recipe.weight
        if spec.kind in ("dorefa", "gdnsq") and q.kind == "uniform":
            np.testing.assert_allclose(got, want, rtol=0, atol=2.0**-21 * np.abs(want).max())
            extra += 8 if spec.kind == "dorefa" else 0
        else:
            np.testing.assert_array_equal(got, want)
    assert extra == 16  # pact-w4a4 and dorefa-w2a2
    total = packed_model_bytes(tree)
    assert total == sum(s["packed_bytes"] for s in layer_summaries(model)) + extra


_LEARNED = ("lsq-w4a4", "lsq-w2a2-channel", "gdnsq-w4a4")


@pytest.mark.parametrize(
    "names",
    [
        ("dorefa-w2a2", "dorefa-w2a2"),
        _LEARNED,
        ("pact-w4a4", "pact-w4a4"),  # DoReFa k = 4 weights: a latent kernel, not ŵ
    ],
    ids=["dorefa-w2", "lsq-gdnsq", "dorefa-w4"],
)
def test_import_model_gives_the_same_outputs(names):
    model = _model(names)
    fresh = nnx.clone(_model(names, seed=1))
    import_model(fresh, export_model(model))
    np.testing.assert_allclose(
        np.asarray(_call(fresh, _X)), np.asarray(_call(model, _X)), atol=1e-5
    )


def test_exported_kernel_holds_the_learned_weight_params():
    """What import_model reads back for LSQ / GDNSQ is in the QArray: the step is its scale (LSQ
    exactly; GDNSQ's log-step is log2 of it, capped by min_bits already)."""
    model = _model(_LEARNED)
    tree = export_model(model)
    for path, layer in quant_layers(model):
        node = _node(tree, path)
        q = node["inner"]["kernel"]
        (param,) = dict(layer.param_names)["weight"]
        old = getattr(layer, f"weight_{param}")[...]
        value = q.scale if param == "step" else jnp.log2(q.scale)
        node[f"weight_{param}"] = jnp.reshape(value, old.shape)
        if param == "step":
            np.testing.assert_array_equal(np.asarray(node["weight_step"]), np.asarray(old))
    fresh = nnx.clone(_model(_LEARNED, seed=1))
    import_model(fresh, tree)
    np.testing.assert_allclose(
        np.asarray(_call(fresh, _X)), np.asarray(_call(model, _X)), atol=1e-5
    )


def test_import_model_refuses_dbssq_before_writing_anything():
    """DBSSQ (and CoDeQ) re-derive their grid from the kernel (σ, ε / the quantile a), so the
    exported ŵ would import as other codes: refused, naming the layer, before any write."""
    model = _model(("dbssq-w2", "dbssq-w2"))
    fresh = nnx.clone(_model(("dbssq-w2", "dbssq-w2"), seed=1))
    before = jax.tree.leaves(nnx.state(fresh))
    with pytest.raises(ValueError, match=r"layer '.*' has dbssq weights.*cannot restore"):
        import_model(fresh, export_model(model))
    for a, b in zip(before, jax.tree.leaves(nnx.state(fresh)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
