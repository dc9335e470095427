"""Mixed precision (``config.compute_dtype``): the weight layers' products take bfloat16
operands and return float32; parameters, quantizers and optimizer state stay float32; a tiny
run trains to about the float32 run's accuracy while its losses differ (the cast took effect)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import runs
from qflax.train import train_and_evaluate
from tests.train.test_loop import tiny_config


def _products(model, x):
    """``(operand dtypes, output dtype)`` of every dot/conv in ``model(x)``'s jaxpr."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append(
                    (tuple(v.aval.dtype.name for v in eqn.invars), eqn.outvars[0].aval.dtype.name)
                )
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("recipe", ["none", "lsq"])
def test_bfloat16_products_with_float32_parameters_and_outputs(recipe):
    config = tiny_config("cnn", quant__recipe=recipe, compute_dtype="bfloat16")
    dataset = runs.load_dataset(config)
    model, _ = runs.build_model(config, dataset)
    x = jnp.asarray(dataset.test_x[:4])
    products = _products(model, x)
    assert len(products) >= 3  # the CNN's convolutions and dense layers
    assert all(ops == ("bfloat16", "bfloat16") and out == "float32" for ops, out in products)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    assert model(x).dtype == jnp.float32

    config.compute_dtype = "float32"
    model32, _ = runs.build_model(config, dataset)
    assert all(ops == ("float32", "float32") for ops, _ in _products(model32, x))
    assert ql.set_compute_dtype(model32, "float32") == 0
    with pytest.raises(ValueError, match=r"compute_dtype='float64' is not allowed; allowed"):
        ql.set_compute_dtype(model32, "float64")
    with pytest.raises(ValueError, match=r"compute_dtype='int8' is not allowed"):
        runs.validate_config(tiny_config(compute_dtype="int8"))


def test_a_bfloat16_run_trains_like_the_float32_run(tmp_path):
    runs32 = train_and_evaluate(tiny_config("cnn", quant__recipe="lsq"), tmp_path / "f32")[1]
    config = tiny_config("cnn", quant__recipe="lsq", compute_dtype="bfloat16")
    state, summary = train_and_evaluate(config, tmp_path / "bf16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert abs(summary["test_accuracy"] - runs32["test_accuracy"]) < 0.05
    assert summary["test_loss"] != runs32["test_loss"]  # bfloat16 products: not the same run
    assert np.isfinite(summary["test_loss"])


def test_a_profile_option_writes_a_trace_of_the_chosen_steps(tmp_path):
    config = tiny_config(profile__start_step=2, profile__num_steps=3)
    train_and_evaluate(config, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list((tmp_path / "profile").rglob("*.trace.json.gz"))
    with pytest.raises(ValueError, match=r"profile.num_steps=-1"):
        runs.validate_config(tiny_config(profile__num_steps=-1))
