"""make_optimizer: one chain, weights and QuantParams apart (own rate, no decay), schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import models
from qflax.train import (
    default_config,
    learning_rate_schedules,
    make_optimizer,
    param_labels,
    validate_config,
)
from qflax.train._optimizer import tag_mask

STEPS_PER_EPOCH = 10


def quantized_mlp():
    model = models.MLP((4,), 3, hidden=(8,), rngs=nnx.Rngs(0))
    model, _ = ql.quantize_model(model, [ql.Rule(".*", ql.recipes.learned_step(4, 4))])
    ql.calibrate(model, jnp.linspace(-1.0, 1.0, 8).reshape(2, 4))
    return model


def split(params):
    """(weights, quantizer params) leaves of a param state."""
    weights = nnx.filter_state(params, nnx.All(nnx.Param, nnx.Not(ql.QuantParam)))
    quant = nnx.filter_state(params, ql.QuantParam)
    return jax.tree.leaves(weights), jax.tree.leaves(quant)


def one_update(config, grads_fn):
    params = nnx.state(quantized_mlp(), nnx.Param)
    tx = make_optimizer(config, params, steps_per_epoch=STEPS_PER_EPOCH)
    grads = jax.tree.map(grads_fn, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return params, updates


def plain_sgd(learning_rate: float):
    """A default config with SGD without momentum at a constant ``learning_rate``: one update
    is ``-learning_rate`` times the gradient (plus what is tested)."""
    config = default_config()
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.0
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = learning_rate
    return config


def test_labels_tell_quant_params_apart():
    params = nnx.state(quantized_mlp(), nnx.Param)
    labels = jax.tree.leaves(param_labels(params))
    weights, quant = split(params)
    assert labels.count("quant") == len(quant) > 0
    assert labels.count("weights") == len(weights) > 0


def test_quant_params_have_their_own_learning_rate():
    config = plain_sgd(0.1)
    config.quant.learning_rate = 0.003
    _, updates = one_update(config, jnp.ones_like)
    weights, quant = split(updates)
    for u in weights:
        np.testing.assert_allclose(u, -0.1, rtol=1e-6)
    for u in quant:
        np.testing.assert_allclose(u, -0.003, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_skips_quant_params(name):
    config = default_config()
    config.optimizer.name = name
    config.optimizer.momentum = 0.0
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.5
    params, updates = one_update(config, jnp.zeros_like)
    weights, quant = split(updates)
    for u in quant:  # zero gradient and no decay: no change at all
        np.testing.assert_array_equal(u, 0.0)
    w_params, _ = split(params)
    moved = [np.any(u != 0) for u, p in zip(weights, w_params, strict=True) if np.any(p != 0)]
    assert moved and all(moved)  # weights decay toward zero


def test_sgd_weight_decay_is_l2_times_learning_rate():
    config = plain_sgd(0.1)
    config.optimizer.weight_decay = 0.01
    params, updates = one_update(config, jnp.zeros_like)
    for u, p in zip(*(split(updates)[0], split(params)[0]), strict=True):
        np.testing.assert_allclose(u, -0.1 * 0.01 * p, rtol=1e-6, atol=1e-12)


def test_schedules_warm_up_then_decay_to_zero():
    config = default_config()
    config.epochs = 4
    config.optimizer.learning_rate = 0.2
    config.quant.learning_rate = 0.02
    config.optimizer.warmup_epochs = 1.0
    weights, quant = learning_rate_schedules(config, STEPS_PER_EPOCH)
    assert float(weights(0)) == 0.0
    np.testing.assert_allclose(float(weights(5)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(weights(10)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(weights(25)), 0.1, rtol=1e-5)  # cosine half-way
    assert abs(float(weights(40))) < 1e-9
    np.testing.assert_allclose(float(quant(10)), 0.02, rtol=1e-6)
    config.optimizer.schedule = "constant"
    weights, _ = learning_rate_schedules(config, STEPS_PER_EPOCH)
    assert [float(weights(s)) for s in (5, 10, 39)] == pytest.approx([0.1, 0.2, 0.2])


def test_optimizer_trains_a_quantized_model_under_jit():
    model = quantized_mlp()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    config = default_config()
    tx = make_optimizer(config, params, steps_per_epoch=STEPS_PER_EPOCH)
    opt_state = tx.init(params)
    x = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    y = jnp.array([0, 1, 2, 0], jnp.int32)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            # fresh variables for this trace level (the quantizers record statistics)
            logits = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    _, quant = split(params)
    _, quant0 = split(nnx.state(model, nnx.Param))
    assert any(np.any(a != b) for a, b in zip(quant, quant0, strict=True))  # step sizes learn


def test_warm_up_as_long_as_the_run_is_linear():
    config = default_config()
    config.epochs = 2
    config.optimizer.learning_rate = 0.2
    config.optimizer.warmup_epochs = 2.0
    for schedule in ("cosine", "constant"):
        config.optimizer.schedule = schedule
        weights, _ = learning_rate_schedules(config, STEPS_PER_EPOCH)
        assert [float(weights(s)) for s in (0, 10, 20)] == pytest.approx([0.0, 0.1, 0.2])


def test_relative_steps_scale_only_the_tagged_steps_by_their_size():
    config = plain_sgd(0.1)
    config.quant.learning_rate = 0.003
    config.quant.max_update = 0.0
    config.quant.relative_steps = True
    params, updates = one_update(config, jnp.ones_like)
    tagged = jax.tree.leaves(tag_mask(params, "step"))
    labels = jax.tree.leaves(param_labels(params))
    # learned_step (symmetric): every quantizer param is a step, no weight is
    assert tagged == [label == "quant" for label in labels] and any(tagged)
    weights, quant = split(updates)
    _, steps = split(params)
    for u in weights:
        np.testing.assert_allclose(u, -0.1, rtol=1e-6)
    for u, s in zip(quant, steps, strict=True):
        assert np.all(s > 0)
        np.testing.assert_allclose(u, -0.003 * s, rtol=1e-6)


def test_relative_steps_never_cross_zero_where_absolute_ones_do():
    """Adam under a gradient that always pushes the steps down: absolute updates take a step
    of 1/127 below zero within tens of updates; relative ones shrink it geometrically."""
    ends = {}
    for relative in (False, True):
        config = default_config()
        config.quant.learning_rate = 0.01
        config.optimizer.schedule = "constant"
        config.quant.relative_steps = relative
        validate_config(config)
        params = nnx.state(quantized_mlp(), nnx.Param)
        tx = make_optimizer(config, params, steps_per_epoch=STEPS_PER_EPOCH)
        state = tx.init(params)
        quant = nnx.filter_state(params, ql.QuantParam)
        quant = jax.tree.map(lambda s: jnp.full_like(s, 1.0 / 127), quant)
        params = nnx.merge_state(params, quant)
        grads = jax.tree.map(jnp.ones_like, params)
        for _ in range(50):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        ends[relative] = np.concatenate([np.ravel(s) for s in split(params)[1]])
    assert np.all(ends[False] < 0)
    assert np.all(ends[True] > 0)
    np.testing.assert_allclose(ends[True], (1.0 / 127) * 0.99**50, rtol=1e-3)


def test_relative_steps_need_a_relative_step_below_one():
    config = default_config()
    config.quant.relative_steps = True
    config.quant.max_update = 0.0  # unbounded Adam steps could reach zero
    with pytest.raises(ValueError, match=r"quant.relative_steps=True .* allowed: 0 < learning"):
        validate_config(config)
