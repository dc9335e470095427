"""Reference models: shapes, jitted SGD steps that learn, gradients, factories, paths, causality.

Models are built with an ``rbg`` PRNG key: its initialisers compile about 3x faster on CPU than
threefry's, and compilation dominates these tiny tests. Structure-only checks build abstract
models with ``nnx.eval_shape`` (no compilation at all).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import models
from qflax.models import MODELS, build_model
from qflax.train import model_task


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


class CountedLinear(nnx.Linear):
    """What the counting ``linear`` factory returns, so the model graph shows who built a layer."""


class CountedConv(nnx.Conv):
    """What the counting ``conv`` factory returns."""


class CountingFactories:
    """Factories with exactly the nnx signatures the models promise (every keyword required)."""

    def __init__(self):
        self.linear_calls = 0
        self.conv_calls = 0

    def linear(self, in_features, out_features, *, use_bias, rngs):
        self.linear_calls += 1
        return CountedLinear(in_features, out_features, use_bias=use_bias, rngs=rngs)

    def conv(self, in_features, out_features, kernel_size, *, strides, padding, use_bias, rngs):
        self.conv_calls += 1
        return CountedConv(
            in_features,
            out_features,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            rngs=rngs,
        )


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # registry name
    input_shape: tuple[int, ...]
    num_classes: int
    kwargs: dict[str, Any]
    convs: int  # conv layers the model must build (hand-counted)
    linears: int  # dense layers the model must build (hand-counted)
    lr: float = 0.1


# Tiny models that are trained a few steps (one compiled step each).
TRAINED = {
    # stem 64->16, blocks[0] 16->8, head 8->5
    "mlp": Case("mlp", (8, 8, 1), 5, dict(hidden=(16, 8)), convs=0, linears=3),
    # stem, conv2; dense, head
    "cnn": Case("cnn", (8, 8, 1), 5, dict(channels=(4, 8), hidden=16), convs=2, linears=2),
    # stem + 3 stages x 1 block x 2 convs (option A: no shortcut convs); head
    "resnet20": Case(
        "resnet20", (8, 8, 3), 5, dict(width=0.25, blocks_per_stage=1), convs=7, linears=1
    ),
    # stem + 4 stages x 2 blocks x 2 convs + 3 projections; head
    "resnet18": Case("resnet18", (16, 16, 3), 5, dict(width=0.125), convs=20, linears=1, lr=0.05),
    # patch embedding; 1 block x (query, key, value, out, fc1, fc2) + head
    "vit": Case(
        "vit", (8, 8, 3), 5, dict(patch=4, dim=16, depth=1, num_heads=2), convs=1, linears=7
    ),
    # 2 blocks x 6 + head
    "char_transformer": Case(
        "char_transformer", (6,), 11, dict(dim=16, depth=2, num_heads=2), convs=0, linears=13
    ),
    # stem, enc2, to_latent, from_latent, dec1, head (an autoencoder: no linear layers)
    "conv_autoencoder": Case(
        "conv_autoencoder", (8, 8, 1), 5, dict(channels=(4, 8), latent_dim=2), convs=6, linears=0
    ),
    # stem, conv2; split_down, split_up, dense, head
    "split_cnn": Case(
        "split_cnn", (8, 8, 1), 5, dict(channels=(4, 8), hidden=16, split_dim=3), 2, 4
    ),
}
# More configurations whose structure is checked on abstract models (hand-counted layers).
STRUCTURE_ONLY = {
    "cnn_no_bn_9px": Case(
        "cnn", (9, 9, 1), 5, dict(channels=(4, 8), hidden=16, use_bn=False), convs=2, linears=2
    ),
    # + two 1x1 projections (stages 1 and 2)
    "resnet20_projection": Case(
        "resnet20",
        (8, 8, 3),
        5,
        dict(width=0.25, blocks_per_stage=1, shortcut="projection"),
        convs=9,
        linears=1,
    ),
    "vit_mean": Case(
        "vit", (8, 8, 3), 5, dict(patch=2, dim=8, depth=2, num_heads=2, pooling="mean"), 1, 13
    ),
    # Default sizes.
    "mlp_default": Case("mlp", (28, 28, 1), 10, {}, convs=0, linears=3),
    "cnn_default": Case("cnn", (28, 28, 1), 10, {}, convs=2, linears=2),
    "resnet20_default": Case("resnet20", (32, 32, 3), 10, {}, convs=19, linears=1),
    "resnet18_default": Case("resnet18", (224, 224, 3), 1000, {}, convs=20, linears=1),
    "vit_default": Case("vit", (32, 32, 3), 10, {}, convs=1, linears=37),
    "char_transformer_default": Case("char_transformer", (128,), 96, {}, convs=0, linears=25),
}
ALL_CASES = {**TRAINED, **STRUCTURE_ONLY}
BATCH = 4
STEPS = 4


def build(case: Case, factories: CountingFactories, *, abstract: bool) -> nnx.Module:
    def make():
        return build_model(
            case.name,
            input_shape=case.input_shape,
            num_classes=case.num_classes,
            rngs=rngs(),
            linear=factories.linear,
            conv=factories.conv,
            **case.kwargs,
        )

    return nnx.eval_shape(make) if abstract else make()


def make_batch(case: Case) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(1))
    if case.name == "char_transformer":
        tokens = jax.random.randint(kx, (BATCH, *case.input_shape), 0, case.num_classes)
        return tokens, jnp.roll(tokens, -1, axis=1)  # next-token targets
    x = jax.random.normal(kx, (BATCH, *case.input_shape))
    return x, jax.random.randint(ky, (BATCH,), 0, case.num_classes)


def expected_logits_shape(case: Case, batch: int = BATCH) -> tuple[int, ...]:
    if case.name == "conv_autoencoder":  # the reconstruction
        return (batch, *case.input_shape)
    if case.name == "char_transformer":
        return (batch, *case.input_shape, case.num_classes)
    return (batch, case.num_classes)


def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return model_task(model).loss(model(x, train=True), x, y).mean()


@dataclasses.dataclass
class Run:
    model: nnx.Module
    eval_logits: np.ndarray  # eval-mode logits before training
    losses: list[float]
    first_grads: nnx.State
    batch_stats_before: dict
    traces: int


@functools.cache
def trained(key: str) -> Run:
    """Builds one tiny model and takes ``STEPS`` jitted SGD steps on one repeated batch."""
    case = TRAINED[key]
    model = build(case, CountingFactories(), abstract=False)
    x, y = make_batch(case)
    optimizer = nnx.Optimizer(model, optax.sgd(case.lr), wrt=nnx.Param)
    batch_stats_before = {
        p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    }
    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)
        eval_logits = model(x, train=False)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss, grads, eval_logits

    losses, first_grads, first_logits = [], None, None
    for _ in range(STEPS):
        loss, grads, eval_logits = step(model, optimizer, x, y)
        losses.append(float(loss))
        if first_grads is None:
            first_grads, first_logits = grads, np.asarray(eval_logits)
    return Run(model, first_logits, losses, first_grads, batch_stats_before, len(traces))


@pytest.mark.parametrize("key", list(TRAINED))
def test_jitted_sgd_steps_lower_the_loss(key):
    case, run = TRAINED[key], trained(key)
    assert run.eval_logits.shape == expected_logits_shape(case)
    assert np.isfinite(run.eval_logits).all()
    assert all(math.isfinite(v) for v in run.losses), run.losses
    assert run.losses[-1] < run.losses[0] - 1e-3, run.losses
    assert run.traces == 1  # no recompilation after the first step


@pytest.mark.parametrize("key", list(TRAINED))
def test_every_param_gets_a_finite_nonzero_gradient(key):
    run = trained(key)
    grads = dict(nnx.to_flat_state(run.first_grads))
    params = dict(nnx.to_flat_state(nnx.state(run.model, nnx.Param)))
    assert grads.keys() == params.keys()
    for path, grad in grads.items():
        value = np.asarray(grad[...])
        assert value.shape == params[path][...].shape, path
        assert np.isfinite(value).all(), path
        assert np.abs(value).max() > 0, path


@pytest.mark.parametrize("key", ["cnn", "resnet20", "resnet18"])
def test_train_mode_updates_batch_norm_statistics(key):
    run = trained(key)
    after = dict(nnx.to_flat_state(nnx.state(run.model, nnx.BatchStat)))
    assert run.batch_stats_before.keys() == after.keys() and after
    for path, before in run.batch_stats_before.items():
        assert not np.allclose(before, after[path][...]), path


def test_eval_mode_uses_running_averages():
    model = trained("cnn").model
    x, _ = make_batch(TRAINED["cnn"])
    stats = nnx.state(model, nnx.BatchStat)
    forward = nnx.jit(lambda m, x: m(x, train=False))
    logits = forward(model, x)
    jax.tree.map(np.testing.assert_array_equal, stats, nnx.state(model, nnx.BatchStat))
    # Eval mode is per-example: an example's logits do not depend on the rest of the batch.
    np.testing.assert_allclose(forward(model, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", list(ALL_CASES))
def test_factories_build_every_linear_and_conv(key):
    case = ALL_CASES[key]
    factories = CountingFactories()
    model = build(case, factories, abstract=True)
    assert (factories.linear_calls, factories.conv_calls) == (case.linears, case.convs)
    modules = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]
    linears = [m for m in modules if isinstance(m, nnx.Linear)]
    convs = [m for m in modules if isinstance(m, nnx.Conv)]
    # No nnx.Linear / nnx.Conv was made directly: all of them came from the factories.
    assert all(type(m) is CountedLinear for m in linears)
    assert all(type(m) is CountedConv for m in convs)
    assert (len(linears), len(convs)) == (case.linears, case.convs)


@pytest.mark.parametrize("key", list(ALL_CASES))
def test_stem_head_paths_and_output_shape(key):
    case = ALL_CASES[key]
    model = build(case, CountingFactories(), abstract=True)
    nodes = dict(nnx.iter_graph(model))
    if case.name == "conv_autoencoder":  # its head is the last convolution: the image's channels
        assert type(nodes[("head",)]) is CountedConv
        assert nodes[("head",)].out_features == case.input_shape[-1]
    else:
        assert type(nodes[("head",)]) is CountedLinear
        assert nodes[("head",)].out_features == case.num_classes
    stem_type = {"mlp": CountedLinear, "char_transformer": nnx.Embed}.get(case.name, CountedConv)
    assert type(nodes[("stem",)]) is stem_type
    # "head" names only the classifier: no other module path contains it.
    head_paths = [p for p, n in nodes.items() if isinstance(n, nnx.Module) and "head" in p]
    assert head_paths == [("head",)]
    dtype = jnp.int32 if case.name == "char_transformer" else jnp.float32
    x = jax.ShapeDtypeStruct((2, *case.input_shape), dtype)
    for train in (False, True):
        out = nnx.eval_shape(lambda m, x, train=train: m(x, train=train), model, x)
        assert out.shape == expected_logits_shape(case, batch=2)
        assert out.dtype == jnp.float32


def test_char_transformer_is_causal():
    model = trained("char_transformer").model
    tokens = jnp.array([[1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 0, 1]], jnp.int32)
    changed = tokens.at[:, 3].set(jnp.array([0, 6], jnp.int32))
    forward = nnx.jit(lambda m, t: m(t))
    before, after = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(before[:, :3], after[:, :3], rtol=0, atol=1e-6)
    # Position 3 onwards sees the change (so the check above can fail).
    assert np.abs(np.asarray(before[:, 3:] - after[:, 3:])).max(axis=-1).min() > 1e-4
    # A shorter sequence uses the first positions and gives the same logits.
    np.testing.assert_allclose(forward(model, tokens[:, :4]), before[:, :4], rtol=1e-5, atol=1e-5)


def param_count(model: nnx.Module) -> int:
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_default_sizes_match_the_reference_parameter_counts():
    # akamaster/pytorch_resnet_cifar10 ResNet-20 (option A): 269,722 parameters;
    # torchvision resnet18: 11,689,512.
    resnet20 = nnx.eval_shape(lambda: models.ResNet20(num_classes=10, rngs=rngs()))
    resnet18 = nnx.eval_shape(lambda: models.ResNet18(rngs=rngs()))
    assert param_count(resnet20) == 269_722
    assert param_count(resnet18) == 11_689_512


def test_resnet18_stem_depends_on_input_size():
    def make(size):
        shape = (size, size, 3)
        return nnx.eval_shape(lambda: models.ResNet18(shape, 10, width=0.125, rngs=rngs()))

    small, large = make(63), make(64)
    assert (small.stem.kernel_size, small.stem.strides, small.stem_pool) == ((3, 3), (1, 1), False)
    assert (large.stem.kernel_size, large.stem.strides, large.stem_pool) == ((7, 7), (2, 2), True)


def test_resnet20_pad_shortcut_matches_the_reference_layout():
    # Option A: stride-2 subsampling, channels zero-padded evenly on both sides (planes // 4).
    model = nnx.eval_shape(lambda: models.ResNet20(rngs=rngs()))
    block = model.stages[1][0]
    assert (block.stride, block.channel_pad, block.shortcut) == (2, (8, 8), None)
    assert model.stages[0][0].channel_pad is None


def test_cnn_pools_only_while_the_map_is_large_enough():
    for size, flat in [(28, 7 * 7 * 3), (8, 2 * 2 * 3), (5, 2 * 2 * 3), (3, 3 * 3 * 3)]:
        shape = (size, size, 1)
        model = nnx.eval_shape(
            lambda shape=shape: models.CNN(shape, 10, channels=(2, 3), hidden=4, rngs=rngs())
        )
        assert model.dense.in_features == flat, size


def test_registry_names_and_build_model():
    assert list(MODELS) == [
        "mlp",
        "cnn",
        "resnet20",
        "resnet18",
        "vit",
        "char_transformer",
        "conv_autoencoder",
        "split_cnn",
    ]
    covered = {case.name for case in TRAINED.values()}
    assert covered == set(MODELS)
    model = nnx.eval_shape(
        lambda: build_model("resnet20", input_shape=(32, 32, 3), num_classes=7, rngs=rngs())
    )
    assert type(model) is models.ResNet20 and model.head.out_features == 7


def test_unknown_model_name_raises_naming_the_allowed_names():
    with pytest.raises(ValueError, match=r"'resnet21'.*'resnet20'.*'char_transformer'"):
        build_model("resnet21", input_shape=(32, 32, 3), num_classes=10, rngs=rngs())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: models.MLP((4,), 2, hidden=(), rngs=r), "hidden"),
        (lambda r: models.MLP((4,), 0, rngs=r), "num_classes=0"),
        (lambda r: models.CNN((8, 8), 2, rngs=r), "input_shape"),
        (lambda r: models.CNN(activation="gelu", rngs=r), "activation='gelu'.*'hardtanh'"),
        (lambda r: models.MLP((4,), 2, activation=None, rngs=r), "activation=None"),
        (lambda r: models.ResNet20(shortcut="B", rngs=r), "shortcut='B'.*'pad', 'projection'"),
        (lambda r: models.ResNet18(width=0, rngs=r), "width=0"),
        (lambda r: models.ViT((30, 30, 3), 2, patch=4, rngs=r), "patch=4"),
        (lambda r: models.ViT(dim=6, num_heads=4, rngs=r), "num_heads=4"),
        (lambda r: models.ViT(pooling="max", rngs=r), "pooling='max'"),
        (lambda r: models.CharTransformer(seq_len=4, rngs=r), "vocab_size=None"),
        (
            lambda r: models.CharTransformer(vocab_size=5, num_classes=6, seq_len=4, rngs=r),
            "vocab_size=5.*num_classes=6",
        ),
    ],
)
def test_bad_knobs_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(lambda: make(rngs()))


def test_wrong_input_raises_at_trace_time():
    def call(model, shape, dtype=jnp.float32):
        return nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(shape, dtype))

    mlp = nnx.eval_shape(lambda: models.MLP((8, 8, 1), 2, hidden=(4,), rngs=rngs()))
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 3\)"):
        call(mlp, (2, 8, 8, 3))
    resnet = nnx.eval_shape(lambda: models.ResNet20(width=0.25, rngs=rngs()))
    assert call(resnet, (2, 16, 16, 3)).shape == (2, 10)  # any spatial size
    with pytest.raises(ValueError, match="channels|3"):
        call(resnet, (2, 16, 16, 1))
    lm = nnx.eval_shape(
        lambda: models.CharTransformer(5, 4, dim=4, depth=1, num_heads=1, rngs=rngs())
    )
    with pytest.raises(ValueError, match="seq <= 4"):
        call(lm, (2, 5), jnp.int32)
    with pytest.raises(ValueError, match="integer"):
        call(lm, (2, 4))


class Wrapped(nnx.Module):
    """Stands in for a quantized layer swapped in by path: any module with ``__call__(x)``."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


@pytest.mark.parametrize("key", list(TRAINED))
def test_layers_can_be_replaced_by_path(key):
    case = TRAINED[key]
    model = build(case, CountingFactories(), abstract=True)
    paths = [
        path
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear | nnx.Conv) and not isinstance(node, Wrapped)
    ]
    assert len(paths) == case.linears + case.convs
    for path in paths:
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        last = path[-1]
        if isinstance(last, int):  # an entry of an nnx.List such as MLP.blocks
            parent[last] = Wrapped(parent[last])
        else:
            setattr(parent, last, Wrapped(getattr(parent, last)))
    nodes = dict(nnx.iter_graph(model))
    assert all(type(nodes[path]) is Wrapped for path in paths)
    dtype = jnp.int32 if case.name == "char_transformer" else jnp.float32
    x = jax.ShapeDtypeStruct((2, *case.input_shape), dtype)
    out = nnx.eval_shape(lambda m, x: m(x, train=True), model, x)
    assert out.shape == expected_logits_shape(case, batch=2)


def _dense_inputs(name: str, activation: str, x: jax.Array) -> jax.Array:
    """Every value fed to the dense layers of ``name`` built with ``activation`` (MLP: not the
    stem, which reads the image)."""
    inputs = []

    class Recording(nnx.Linear):
        def __call__(self, y):
            inputs.append(y)
            return super().__call__(y)

    def linear(in_features, out_features, *, use_bias, rngs):
        return Recording(in_features, out_features, use_bias=use_bias, rngs=rngs)

    model = build_model(
        name,
        input_shape=x.shape[1:],
        num_classes=3,
        activation=activation,
        linear=linear,
        rngs=rngs(),
    )
    model(x)
    hidden = inputs[1:] if name == "mlp" else inputs
    return jnp.concatenate([a.ravel() for a in hidden])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hardtanh_activation_bounds_every_hidden_output(name):
    """``activation="hardtanh"`` replaces every ReLU: hidden values lie in [-1, 1] and some are
    negative (after a ReLU all are >= 0, and binary activations of them would all be +1)."""
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    relu = _dense_inputs(name, "relu", x)
    hardtanh = _dense_inputs(name, "hardtanh", x)
    assert float(relu.min()) >= 0.0
    assert float(hardtanh.min()) < 0.0
    assert float(jnp.abs(hardtanh).max()) <= 1.0
