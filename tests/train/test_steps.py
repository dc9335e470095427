"""The jitted steps: losses against their formulas, no recompilation, donation, BatchNorm
statistics, determinism, distillation and padded evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import models
from qflax.layers import AuxLoss
from qflax.train import (
    aux_loss,
    create_train_state,
    cross_entropy,
    default_config,
    distillation_divergence,
    jeffreys_divergence,
    kl_divergence,
    make_eval_step,
    make_optimizer,
    make_train_step,
    model_task,
    psnr,
)

KEY = jax.random.key(0)


def log_probs(key, shape):
    return jax.nn.log_softmax(3.0 * jax.random.normal(key, shape), axis=-1)


def test_kl_and_jeffreys_match_their_formulas():
    lp, lq = log_probs(jax.random.key(1), (5, 7)), log_probs(jax.random.key(2), (5, 7))
    p, q = np.exp(np.asarray(lp, np.float64)), np.exp(np.asarray(lq, np.float64))
    kl_pq = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    kl_qp = np.sum(q * (np.log(q) - np.log(p)), axis=-1)
    np.testing.assert_allclose(kl_divergence(lp, lq), kl_pq, rtol=1e-5)
    np.testing.assert_allclose(jeffreys_divergence(lp, lq), kl_pq + kl_qp, rtol=1e-5)
    np.testing.assert_allclose(jeffreys_divergence(lq, lp), jeffreys_divergence(lp, lq), rtol=1e-6)
    np.testing.assert_allclose(kl_divergence(lp, lp), 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "jeffreys"])
def test_distillation_scales_by_t_squared_and_stops_teacher_gradient(kind):
    s = jax.random.normal(jax.random.key(3), (4, 6))
    t = jax.random.normal(jax.random.key(4), (4, 6))
    temperature = 2.5
    got = distillation_divergence(s, t, kind=kind, temperature=temperature)
    ls = jax.nn.log_softmax(s / temperature)
    lt = jax.nn.log_softmax(t / temperature)
    expected = kl_divergence(lt, ls) if kind == "kl" else jeffreys_divergence(ls, lt)
    np.testing.assert_allclose(got, temperature**2 * expected, rtol=1e-5)
    grad_t = jax.grad(
        lambda t: distillation_divergence(s, t, kind=kind, temperature=temperature).sum()
    )(t)
    np.testing.assert_array_equal(grad_t, 0.0)
    grad_s = jax.grad(lambda s: distillation_divergence(s, t, kind=kind, temperature=1.0).sum())(s)
    assert np.all(np.isfinite(grad_s)) and np.any(grad_s != 0)


def small_cnn(seed=0):
    return models.CNN((8, 8, 1), 10, channels=(4, 8), hidden=16, rngs=nnx.Rngs(seed))


def batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), np.float32), rng.integers(0, 10, n).astype(np.int32)


def setup(teacher=None, **step_kwargs):
    model = small_cnn()
    config = default_config()
    tx = make_optimizer(config, nnx.state(model, nnx.Param), steps_per_epoch=10)
    graphdef, state, teacher_graphdef = create_train_state(model, tx, seed=0, teacher=teacher)
    step = make_train_step(graphdef, tx, teacher_graphdef=teacher_graphdef, **step_kwargs)
    return graphdef, state, step


@pytest.fixture(scope="module")
def shared():
    """One compiled step (pure, so tests share it) and a maker of fresh states for it."""
    graphdef, _, step = setup()
    tx = make_optimizer(default_config(), nnx.state(small_cnn(), nnx.Param), steps_per_epoch=10)

    def fresh_state():
        return create_train_state(small_cnn(), tx, seed=0)[1]

    return graphdef, step, fresh_state


def test_second_step_compiles_nothing_new():
    _, state, step = setup()
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, _ = step(state, batch(0))
        first = len(compiles)
        state, metrics = step(state, batch(1))
        jax.block_until_ready(metrics)
        second = len(compiles) - first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1
    assert second == 0
    # At most one compiled entry (seen once at 0 in a full -n 2 run on 2026-12-06, passing
    # alone: JAX's C++ dispatch cache may drop an entry; `second == 0` is the no-retrace test).
    assert step._cache_size() <= 1


def test_state_is_donated_and_batch_stats_update(shared):
    _, step, fresh_state = shared
    state = fresh_state()
    old_leaf = jax.tree.leaves(state.params)[0]
    old_rest = [np.array(x) for x in jax.tree.leaves(state.rest)]
    new_state, metrics = step(state, batch())
    assert old_leaf.is_deleted()  # donated
    assert int(new_state.step) == 1
    assert set(metrics) == {"loss", "accuracy"}
    new_rest = [np.asarray(x) for x in jax.tree.leaves(new_state.rest)]
    assert any(np.any(a != b) for a, b in zip(old_rest, new_rest, strict=True))  # BN running stats


def test_steps_are_deterministic(shared):
    _, step, fresh_state = shared
    results = []
    for _ in range(2):
        state = fresh_state()
        for i in range(3):
            state, _ = step(state, batch(i))
        results.append([np.asarray(x) for x in jax.tree.leaves(state.params)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_lowers_the_loss(shared):
    _, step, fresh_state = shared
    state = fresh_state()
    x, y = batch(0, n=32)
    losses = []
    for _ in range(40):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("divergence", ["kl", "jeffreys"])
def test_distillation_step_keeps_the_teacher_frozen(divergence):
    teacher = small_cnn(seed=7)
    teacher_values = [np.array(x) for x in jax.tree.leaves(nnx.state(teacher))]
    _, state, step = setup(teacher=teacher, divergence=divergence, distill_weight=0.5)
    for i in range(3):
        state, metrics = step(state, batch(i))
    assert set(metrics) == {"loss", "accuracy", "cross_entropy", "divergence"}
    np.testing.assert_allclose(
        metrics["loss"], 0.5 * metrics["cross_entropy"] + 0.5 * metrics["divergence"], rtol=1e-5
    )
    for a, b in zip(teacher_values, jax.tree.leaves(state.teacher), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pure_distillation_ignores_labels():
    _, state_a, step = setup(teacher=small_cnn(seed=7), distill_weight=1.0)
    _, state_b, _ = setup(teacher=small_cnn(seed=7), distill_weight=1.0)
    x, y = batch()
    state_a, _ = step(state_a, (x, y))
    state_b, _ = step(state_b, (x, (y + 1) % 10))
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_step_padding_is_masked(shared):
    graphdef, _, fresh_state = shared
    state = fresh_state()
    eval_step = make_eval_step(graphdef)
    x, y = batch(n=10)
    full = eval_step(state.params, state.rest, (x, y), jnp.ones(10, jnp.float32))
    xp = np.concatenate([x, np.ones((6, 8, 8, 1), np.float32)])
    yp = np.concatenate([y, np.zeros(6, np.int32)])
    weights = jnp.asarray(np.r_[np.ones(10), np.zeros(6)].astype(np.float32))
    padded = eval_step(state.params, state.rest, (xp, yp), weights)
    assert float(padded["count"]) == 10.0
    np.testing.assert_allclose(padded["loss_sum"], full["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(padded["score_sum"], full["score_sum"])


def test_sequence_model_step():
    model = models.CharTransformer(11, 6, dim=8, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    config = default_config()
    tx = make_optimizer(config, nnx.state(model, nnx.Param), steps_per_epoch=10)
    graphdef, state, _ = create_train_state(model, tx, seed=0)
    step = make_train_step(graphdef, tx)
    tokens = np.random.default_rng(0).integers(0, 11, (4, 7)).astype(np.int32)
    state, metrics = step(state, (tokens[:, :-1], tokens[:, 1:]))
    assert np.isfinite(float(metrics["loss"]))
    sums = make_eval_step(graphdef)(
        state.params, state.rest, (tokens[:, :-1], tokens[:, 1:]), jnp.ones(4, jnp.float32)
    )
    assert float(sums["count"]) == 4 * 6  # every position counts


class _WithAuxLoss(nnx.Module):
    """A linear classifier whose forward sets an AuxLoss ``0.5·‖W‖²``."""

    def __init__(self):
        self.dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.penalty = AuxLoss(jnp.zeros((), jnp.float32))

    def __call__(self, x, train=False):
        self.penalty[...] = 0.5 * jnp.sum(self.dense.kernel[...] ** 2)
        return self.dense(x)


def test_aux_losses_are_added_to_the_loss_and_differentiated():
    model = _WithAuxLoss()
    x = jax.random.normal(KEY, (8, 4))
    y = jnp.arange(8) % 3
    kernel, bias = np.array(model.dense.kernel[...]), np.array(model.dense.bias[...])
    assert float(aux_loss(model)) == 0.0  # before any forward: the initial value
    tx = optax.sgd(1.0)
    graphdef, state, _ = create_train_state(model, tx, seed=0)
    step = make_train_step(graphdef, tx)
    new_state, metrics = step(state, (x, y))
    np.testing.assert_allclose(metrics["aux_loss"], 0.5 * np.sum(kernel**2), rtol=1e-6)

    def ce_of(k):
        logits = x @ k + bias
        return jnp.mean(cross_entropy(logits, y))

    expected = kernel - (jax.grad(ce_of)(jnp.asarray(kernel)) + kernel)  # SGD, lr 1
    np.testing.assert_allclose(new_state.params["dense"]["kernel"][...], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ce_of(kernel) + metrics["aux_loss"], rtol=1e-6)
    assert (
        aux_loss(models.build_model("mlp", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0)))
        is None
    )


class _TinyAutoencoder(nnx.Module):
    task = "reconstruct"

    def __init__(self):
        self.down = nnx.Linear(6, 2, rngs=nnx.Rngs(0))
        self.up = nnx.Linear(2, 6, rngs=nnx.Rngs(1))

    def __call__(self, x, train=False):
        return self.up(self.down(x))


def test_reconstruct_task_trains_on_squared_error_and_scores_psnr():
    model = _TinyAutoencoder()
    task = model_task(model)
    assert (task.name, task.metric) == ("reconstruct", "psnr")
    x = jax.random.uniform(KEY, (16, 6))
    x = x.at[:, 3:].set(x[:, :3])  # rank 3: a 2-d code cannot be exact
    y = jnp.zeros(16, jnp.int32)  # labels are ignored
    out = model(x)
    mse = np.mean((np.asarray(out) - np.asarray(x)) ** 2, axis=1)
    np.testing.assert_allclose(task.loss(out, x, y), mse, rtol=1e-5)
    np.testing.assert_allclose(task.score(out, x, y), 10 * np.log10(1 / mse), rtol=1e-5)
    assert float(psnr(jnp.zeros(()))) == 100.0  # a perfect reconstruction, floored
    eval_step = make_eval_step(nnx.split(model, nnx.Param, ...)[0])
    tx = optax.sgd(0.3, momentum=0.9)
    graphdef, state, _ = create_train_state(model, tx, seed=0)
    sums = eval_step(state.params, state.rest, (x, y), jnp.ones(16))
    np.testing.assert_allclose(sums["loss_sum"], mse.sum(), rtol=1e-5)
    step = make_train_step(graphdef, tx)
    first = None
    for _ in range(60):
        state, metrics = step(state, (x, y))
        first = first or float(metrics["loss"])
    assert set(metrics) == {"loss", "psnr"}
    assert float(metrics["loss"]) < 0.5 * first
    assert float(metrics["psnr"]) > 10 * np.log10(1 / first)
    with pytest.raises(ValueError, match="does not match its input"):
        task.loss(out[:, :3], x, y)


def test_unknown_task_is_refused():
    model = _TinyAutoencoder()
    model.task = "segment"
    with pytest.raises(ValueError, match="task='segment' is not allowed; allowed: classify"):
        model_task(model)
