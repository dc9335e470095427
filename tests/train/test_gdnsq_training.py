"""Learned bit-widths in the training loop: the GDNSQ done-when run on digits, the penalty's
presence and schedule, the learning-rate decay after convergence, early stopping, fine-tuning from
the teacher, PACT's clip decay, and the config keys that drive them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import models, runs
from qflax.train import default_config, make_optimizer, train_and_evaluate
from qflax.train._loop import EarlyStopping
from tests.train.test_loop import read_metrics, tiny_config


def test_gdnsq_done_when_digits_ends_at_or_below_two_bits(tmp_path):
    # The command: gdnsq.py --config.target_bits=2 --config.dataset=digits
    # --config.epochs=5 (a float teacher is trained first in WORKDIR/teacher).
    config = runs.load_config_file("experiments/mnist5k/gdnsq.py")
    config = runs.apply_overrides(
        config,
        [("target_bits", "2"), ("dataset", "digits"), ("epochs", "5"), ("progress_bar", "false")],
    )
    assert (config.quant.weight_bits, config.quant.act_bits) == (2, 2)  # the shorthand
    state, summary = train_and_evaluate(config, tmp_path)
    assert summary["avg_weight_bits"] <= 2 and summary["avg_act_bits"] <= 2
    assert summary["converged"] and summary["within_target"]
    for name, row in summary["learned_bits"].items():
        assert row["used"]["weight"] <= 2 and row["used"]["act"] <= 2, name
    assert set(summary["learned_bits"]) == {"conv2", "dense"}  # stem and head float
    assert summary["test_accuracy"] > 0.9  # the float teacher gets ~0.98
    assert json.loads((tmp_path / "config.json").read_text())["target_bits"] == 2

    steps = [r for r in read_metrics(tmp_path) if r["kind"] == "step"]
    # penalty weight 0 through the half-epoch warm-up, then growing
    first, last = steps[0], steps[-1]
    assert first["train_penalty_weight"] == 0.0
    assert last["train_penalty_weight"] > 1.0
    assert last["train_weight_bits"] < first["train_weight_bits"] - 4  # started at 8
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert epochs[-1]["converged"] and epochs[-1]["within_target"]
    # after convergence the learning rates decay by 0.9985 per step
    steps_after = int(state.step) - summary["converged_epoch"] * (1437 // 32)
    assert float(state.lr_scale) == pytest.approx(0.9985**steps_after, rel=1e-3)


def test_fixed_bit_recipes_train_without_penalty(tmp_path):
    state, summary = train_and_evaluate(tiny_config("mlp", quant__recipe="lsq"), tmp_path)
    steps = [r for r in read_metrics(tmp_path) if r["kind"] == "step"]
    assert "train_penalty" not in steps[0]
    assert "converged" not in summary
    assert float(state.lr_scale) == 1.0
    assert summary["avg_weight_bits"] == 4.0


@pytest.mark.parametrize("recipe", ["pact", "dorefa"])
def test_pact_and_dorefa_train_and_learn(recipe, tmp_path):
    config = tiny_config("mlp", quant__recipe=recipe, epochs=6)
    _, summary = train_and_evaluate(config, tmp_path)
    assert summary["test_accuracy"] > 0.5  # 0.70-0.72 (the float tiny MLP: 0.20 at 2 epochs)
    assert summary["avg_weight_bits"] == summary["avg_act_bits"] == 4.0


@pytest.mark.parametrize("recipe", ["gdnsq", "none"])
def test_student_starts_from_the_teacher(recipe, tmp_path):
    """Also a float student (the fine-tuned float reference), whose arrays must not be the
    teacher's: the train step donates both (XLA refuses the same buffer donated twice)."""
    teacher_dir = tmp_path / "fp"
    train_and_evaluate(tiny_config("mlp"), teacher_dir)
    config = tiny_config(
        "mlp",
        quant__recipe=recipe,
        teacher__mode="checkpoint",
        teacher__path=str(teacher_dir),
        teacher__init_student=True,
        optimizer__learning_rate=1e-12,  # weights stay where they started
        quant__learning_rate=1e-12,
        optimizer__schedule="constant",
    )
    state, summary = train_and_evaluate(config, tmp_path / "q")
    teacher_state = json.loads((teacher_dir / "summary.json").read_text())
    assert summary["fp_test_accuracy"] == teacher_state["test_accuracy"]
    from qflax.train import load_model

    teacher, _, _ = load_model(teacher_dir)
    student, _, _ = load_model(tmp_path / "q")
    flat_t = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(teacher, nnx.Param))
    }
    flat_s = {
        jax.tree_util.keystr(p).replace("['inner']", ""): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(student, nnx.Param))
        if not isinstance(v, ql.QuantParam)
    }
    assert set(flat_t) <= set(flat_s)
    for key, value in flat_t.items():
        np.testing.assert_allclose(flat_s[key], value, atol=1e-6, err_msg=key)


def test_init_student_needs_a_teacher(tmp_path):
    config = tiny_config("mlp", quant__recipe="gdnsq", teacher__init_student=True)
    with pytest.raises(ValueError, match="init_student=True needs a teacher"):
        train_and_evaluate(config, tmp_path)


def test_clip_decay_pulls_pact_alpha_down_and_leaves_weights():
    model = models.build_model("mlp", input_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0))
    model, _ = ql.quantize_model(model, [ql.Rule(".*", ql.recipes.pact(4, 4))])
    params = nnx.state(model, nnx.Param)
    config = default_config()
    config.quant.clip_decay = 0.1
    tx = make_optimizer(config, params, steps_per_epoch=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, value in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        if "['act_alpha']" in name:
            assert float(value) < 0, name  # α = 10 > 0 decays
        else:
            assert not np.any(np.asarray(value)), name


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(2)
    assert [stopper.update(v) for v in (1.0, 0.5, 0.6, 0.7)] == [False, False, False, True]
    never = EarlyStopping(0)
    assert not any(never.update(v) for v in (1.0, 2.0, 3.0, 4.0))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("target_bits", 0, "target_bits=0 is out of range"),
        ("penalty.lr_decay", 1.5, "penalty.lr_decay=1.5"),
        ("penalty.patience", -1, "penalty.patience=-1"),
        ("quant.clip_decay", -0.1, "quant.clip_decay=-0.1"),
    ],
)
def test_new_config_keys_are_checked(key, value, match):
    config = default_config()
    if key == "target_bits":
        with config.unlocked():
            config.target_bits = value
    else:
        group, leaf = key.split(".")
        with config[group].unlocked():
            config[group][leaf] = value
    with pytest.raises(ValueError, match=match):
        runs.validate_config(config)


def test_recipe_kwargs_reach_the_recipe_and_unknown_ones_are_named():
    config = default_config()
    config.quant.recipe = "gdnsq"
    config.recipe_kwargs.backward = "noise"
    runs.validate_config(config)
    recipe = runs.build_recipe("gdnsq", 2, 2, dict(config.recipe_kwargs))
    assert recipe.weight.config.backward == recipe.act.config.backward == "noise"
    config.recipe_kwargs.bogus = 1
    with pytest.raises(ValueError, match=r"recipe_kwargs \['bogus'\].*allowed: .*backward"):
        runs.validate_config(config)


def test_penalty_with_a_cosine_warmup_schedule_under_strict_promotion(tmp_path):
    # optax's schedules mix the int32 step with floats; the conftest's strict promotion caught it
    config = tiny_config(
        "mlp", quant__recipe="gdnsq", optimizer__warmup_epochs=0.5, penalty__warmup_epochs=0.0
    )
    assert config.optimizer.schedule == "cosine"
    _, summary = train_and_evaluate(config, tmp_path)
    assert "learned_bits" in summary
    steps = [r for r in read_metrics(tmp_path) if r["kind"] == "step"]
    assert steps[-1]["train_penalty_weight"] > 0


def test_recipe_kwargs_of_the_float_recipe_are_refused():
    config = default_config()
    assert config.quant.recipe == "none"
    config.recipe_kwargs.bogus = 1
    with pytest.raises(ValueError, match=r"recipe_kwargs \['bogus'\] .* recipe 'none'"):
        runs.validate_config(config)


def test_recipe_kwargs_reach_a_pair_factory():
    recipe = runs.build_recipe("binary", 1, 1, {"pair": "bnn++", "mu": 3.0})
    assert dict(recipe.weight.config.kwargs) == {"mu": 3.0}
    with pytest.raises(ValueError, match="not arguments of pair 'bnn'"):
        runs.build_recipe("binary", 1, 1, {"pair": "bnn", "mu": 3.0})


def test_recipe_kwargs_bits_replace_the_quant_bits():
    # CoDeQ learns its weight bit-width when the recipe gets weight_bits=None
    assert runs.build_recipe("codeq", 4, 8, {}).weight.config.fixed_bits == 4
    recipe = runs.build_recipe("codeq", 4, 8, {"weight_bits": None})
    assert recipe.weight.config.fixed_bits is None
    assert recipe.act.config.bits == 8
    assert runs.build_recipe("lsq", 4, 4, {"act_bits": 2}).act.config.bits == 2
