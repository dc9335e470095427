"""Pairs, DBSSQ and CoDeQ in the training loop: the done-when commands of the pair/DBSSQ/CoDeQ
issue (shortened), the ε schedule ending at the exact quantizer, μ annealing, BinaryConnect's
latent clip and CoDeQ's decoupled decay groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import models, runs
from qflax.export import evaluate_integer
from qflax.quantizers import dbssq_epsilon_schedule
from qflax.train import default_config, load_model, make_optimizer, train_and_evaluate
from qflax.train._optimizer import project_to_box
from qflax.train._trainer import _latent_clip_mask
from tests.train.test_loop import read_metrics


def _experiment(name, *overrides):
    config = runs.load_config_file(f"experiments/mnist5k/{name}.py")
    base = [("dataset", "digits"), ("epochs", "2"), ("progress_bar", "false")]
    return runs.apply_overrides(config, base + list(overrides))


def test_pairs_bnnpp_runs_anneals_mu_and_clips_latent_weights(tmp_path):
    config = _experiment("pairs", ("pair", "bnn++"), ("epochs", "3"))
    state, summary = train_and_evaluate(config, tmp_path)
    assert summary["avg_weight_bits"] == summary["avg_act_bits"] == 1.0
    assert summary["test_accuracy"] > 0.2
    model, _, _ = load_model(tmp_path)
    # μ went 5 → 50 geometrically: the last epoch (index 2) used 50
    assert float(model.conv2.weight_mu[...]) == pytest.approx(50.0, rel=1e-5)
    assert float(model.dense.act_mu[...]) == pytest.approx(50.0, rel=1e-5)
    # latent weights of the binary layers stay in [-1, 1]
    for layer in (model.conv2, model.dense):
        assert float(jnp.max(jnp.abs(layer.inner.kernel[...]))) <= 1.0
    # training ends with the exact binary model (sign forward), evaluated after the relaxed one
    assert "blended_test_accuracy" in summary
    assert float(model.conv2.weight_hard[...]) == float(model.dense.act_hard[...]) == 1.0
    kernel = model.conv2.quantized_kernel()
    magnitudes = jnp.abs(kernel).reshape(-1, kernel.shape[-1])
    np.testing.assert_allclose(magnitudes, jnp.broadcast_to(magnitudes[:1], magnitudes.shape))
    # the exact W1A1 model runs as XNOR/popcount (`qflax eval --integer`): same predictions
    result = evaluate_integer(tmp_path)
    assert result["differing_predictions"] == 0
    assert result["test_accuracy"] == result["fake_quant_test_accuracy"]
    # the reference sums ±1 exactly ((x̂ ⊛ sign ŵ)·α); the model's x̂ ⊛ ŵ rounds: near-ties only
    assert result["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=2 / 359)


def test_mu_schedule_is_geometric_and_off_by_default():
    config = default_config()
    config.epochs = 5
    config.anneal.mu_end = 80.0
    tq = ql.recipes.binary("bnn++", mu=5.0).weight
    values = [tq.schedule(epoch=e, epochs=5, anneal=config.anneal)["mu"] for e in range(5)]
    np.testing.assert_allclose(values, [5, 10, 20, 40, 80], rtol=1e-6)
    config.anneal.mu_end = 0.0  # off: μ stays at its start (no schedule)
    assert "mu" not in tq.schedule(epoch=3, epochs=5, anneal=config.anneal)
    assert tq.stats_init(None)["mu"] == 5.0


def test_dbssq_follows_the_schedule_and_ends_exact(tmp_path):
    config = _experiment("dbssq", ("epochs", "3"))
    _, summary = train_and_evaluate(config, tmp_path)
    assert "blended_test_accuracy" in summary
    model, _, _ = load_model(tmp_path)
    assert float(model.conv2.weight_epsilon[...]) == 0.0  # the saved model is the exact one
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert epochs[-1]["test_accuracy"] == summary["test_accuracy"]
    # the schedule the loop used: 1 at the start, stretched over 3 epochs
    assert float(dbssq_epsilon_schedule(0, 3)) == 1.0
    assert summary["avg_weight_bits"] == 3.0  # shift-2: four magnitudes and a sign
    assert summary["test_accuracy"] > 0.8


def test_dbssq_activations_are_evaluated_with_running_statistics(tmp_path):
    """The jitted train step updates the running statistics (nnx training mode); the saved
    model evaluates with them, so its accuracy does not depend on the test batch."""
    config = runs.load_config_file("experiments/mnist5k/dbssq.py:wa")
    config = runs.apply_overrides(
        config, [("dataset", "digits"), ("epochs", "2"), ("progress_bar", "false")]
    )
    _, summary = train_and_evaluate(config, tmp_path)
    model, _, _ = load_model(tmp_path)
    mean = np.asarray(model.dense.act_mean[...])
    var = np.asarray(model.dense.act_var[...])
    assert np.any(mean != 0.0) and np.any(var != 1.0)  # updated by the training steps
    assert summary["test_accuracy"] > 0.5
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
    whole = model(x, train=False)
    np.testing.assert_allclose(model(x[:3], train=False), whole[:3], rtol=1e-5, atol=1e-5)


def test_codeq_runs_and_reports_sparsity_bits_and_sparse_bops(tmp_path):
    # (a θ moves at most quant.learning_rate per step: 25× the config's, for 2 digits epochs)
    config = _experiment(
        "codeq",
        ("quant.deadzone_decay", "4.0"),
        ("quant.bits_decay", "4.0"),
        ("quant.learning_rate", "0.25"),
    )
    _, summary = train_and_evaluate(config, tmp_path)
    assert summary["sparsity"] > 0.0
    assert summary["bops_sparse"] < summary["bops"]
    assert all(2 <= row["weight_bits"] <= 8 for row in summary["layers"])
    assert summary["avg_weight_bits"] < 8  # the bits decay lowered them


def test_codeq_decay_groups_decay_only_their_thetas():
    model = models.build_model("mlp", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    model, _ = ql.quantize_model(model, [ql.Rule(".*", ql.recipes.codeq())])
    params = nnx.state(model, nnx.Param)
    config = default_config()
    config.quant.deadzone_decay = 0.3
    tx = make_optimizer(config, params, steps_per_epoch=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, value in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        if "['weight_theta_d']" in name:
            assert float(value) < 0, name  # θ_d = 3 decays (the dead zone widens)
        else:
            assert not np.any(np.asarray(value)), name
    # the decay is not capped by the ±max_update step clip (in units of lr): −lr·30·θ, θ = 3
    config.quant.deadzone_decay = 30.0
    config.optimizer.warmup_epochs = 0.0
    config.optimizer.schedule = "constant"
    tx = make_optimizer(config, params, steps_per_epoch=10)
    updates, _ = tx.update(zeros, tx.init(params), params)
    theta_d = [v for p, v in jax.tree_util.tree_leaves_with_path(updates) if "theta_d" in str(p)]
    assert theta_d
    for value in theta_d:
        np.testing.assert_allclose(float(value), -config.quant.learning_rate * 30 * 3, rtol=1e-5)


def test_project_to_box_keeps_masked_params_inside():
    params = {"a": jnp.array([0.9, -0.5]), "b": jnp.array([0.9])}
    updates = {"a": jnp.array([0.5, -0.7]), "b": jnp.array([0.5])}
    tx = project_to_box(1.0, {"a": True, "b": False})
    out, _ = tx.update(updates, tx.init(params), params)
    np.testing.assert_allclose(params["a"] + out["a"], [1.0, -1.0])
    np.testing.assert_allclose(out["b"], [0.5])


def test_latent_clip_mask_marks_only_one_bit_kernels():
    model = models.build_model("cnn", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    rules = [ql.Rule("^conv2$", ql.recipes.binary("bnn")), ql.Rule("^dense$", ql.recipes.absmax())]
    model, _ = ql.quantize_model(model, rules)
    marked = [
        jax.tree_util.keystr(p)
        for p, v in jax.tree_util.tree_leaves_with_path(_latent_clip_mask(model))
        if v
    ]
    assert marked == ["['conv2']['inner']['kernel']"]


def test_pair_group_and_shorthand_are_checked():
    config = runs.load_config_file("experiments/mnist5k/pairs.py")
    runs.apply_overrides(config, [("pair", "bc")])  # the shorthand sets pair.name
    assert config.pair.name == "bc"
    assert runs.recipe_kwargs_for(config, "binary")["pair"] == "bc"
    runs.validate_config(config)
    runs.apply_overrides(config, [("pair.forward", "sign"), ("pair.backward", "sign_swish")])
    assert runs.recipe_kwargs_for(config, "binary") | {"scaling": 0} == {
        "pair": None,
        "forward": "sign",
        "backward": "sign_swish",
        "scaling": 0,
    }
    assert str(runs.quantization_rules(config)[-1].recipe) == (
        "w:pair:sign/sign_swish1/channel a:pair:sign/sign_swish1"
    )
    runs.validate_config(config)
    config.pair.name = "xnor"
    with pytest.raises(ValueError, match="pair.name='xnor' is not allowed; allowed: '' or 'bc'"):
        runs.validate_config(config)
    config.pair.name = "bc"
    config.pair.backward = ""
    with pytest.raises(ValueError, match="pair.forward='sign' with pair.backward='' is not"):
        runs.validate_config(config)
    config.pair.backward = "sign"  # not a backward (no gradient)
    with pytest.raises(ValueError, match="pair.backward='sign' is not allowed"):
        runs.validate_config(config)
