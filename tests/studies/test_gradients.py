"""qflax.studies.gradient_variance: bias and variance of quantized gradients against QAT."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import layers as ql
from qflax import quantizers as qz
from qflax import studies
from qflax.numerics import stochastic_round


@dataclasses.dataclass(frozen=True)
class _Config:
    bits: int = 4
    stochastic: bool = True


class _TestGrad(qz.QuantizerFamily):
    """Per-tensor absmax grid; stochastic (unbiased) or truncating toward zero (biased)."""

    name = "test_grad_sr"
    config_types = (_Config,)

    def roles(self, spec):
        return ("grad",)

    def needs_key(self, spec):
        return spec.config.stochastic

    def _step(self, spec, g):
        s = jnp.max(jnp.abs(g)) / (2 ** (spec.config.bits - 1) - 1)
        return jnp.where(s > 0, s, 1.0)

    def apply(self, spec, x, params, *, key=None, stats=None):
        s = self._step(spec, x)
        q = stochastic_round(x / s, key) if spec.config.stochastic else jnp.trunc(x / s)
        return q * s

    def variance_bound(self, spec, g):
        return g.size * self._step(spec, g) ** 2 / 4


qz.register_family(_TestGrad())


class _MLP(nnx.Module):
    def __init__(self, recipe):
        rngs = nnx.Rngs(0)
        self.a = ql.QuantLinear(12, 16, recipe=recipe, rngs=rngs)
        self.b = ql.QuantLinear(16, 5, recipe=recipe, rngs=rngs)

    def __call__(self, x, train=False):
        return self.b(jax.nn.relu(self.a(x)))


def _data():
    x = jax.random.normal(jax.random.key(1), (32, 12))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 5)
    return x, y


def _recipe(stochastic=True, bits=4):
    base = ql.recipes.absmax(8, 8)
    return ql.with_grad(base, "test_grad_sr", bits, stochastic=stochastic)


def test_unbiased_quantizer_has_z_near_one_and_variance_under_its_bound():
    x, y = _data()
    rows = studies.gradient_variance(_MLP(_recipe()), x, y, keys=16)
    assert [r["path"] for r in rows] == ["a", "b"]
    for r in rows:
        assert r["grad"] == "test_grad_sr4"
        # E‖mean − QAT‖² = tr Var / K for an unbiased estimator: z ≈ 1 (chi-square / dims).
        assert 0.3 < r["bias_z"] < 2.5, r
        assert r["variance"] > 0 and r["rel_variance"] > 0
        assert 0 < r["dy_variance"] <= r["dy_bound"]
        # The ∇Y quantizer's own bias is within the noise of K draws.
        assert r["dy_bias"] ** 2 < 6 * r["dy_variance"] / r["keys"]


def test_a_biased_quantizer_is_flagged():
    x, y = _data()
    rows = studies.gradient_variance(_MLP(_recipe(stochastic=False, bits=3)), x, y, keys=4)
    # Truncation is deterministic: no variance, and a bias the z-score cannot explain.
    assert all(r["variance"] == 0.0 for r in rows)
    assert all(r["bias"] > 1e-3 for r in rows)


def test_cotangent_is_the_layers_output_gradient():
    x, y = _data()
    model = _MLP(ql.recipes.absmax(8, 8))
    from qflax.studies._gradients import _cotangents

    cot = _cotangents(model, x, y)
    logits = model(x)
    # The last layer's output is the logits: ∇Y = (softmax − onehot) / N.
    expected = (jax.nn.softmax(logits) - jax.nn.one_hot(y, 5)) / x.shape[0]
    np.testing.assert_allclose(cot["b"][1], expected, atol=1e-6)
    np.testing.assert_allclose(cot["a"][0], x)


def test_override_compares_quantizers_on_one_model_and_writes_report(tmp_path):
    x, y = _data()
    model = _MLP(ql.recipes.absmax(8, 8))  # no gradient quantizer of its own
    rows = []
    for bits in (3, 6):
        spec = ql.TensorQuant(kind="test_grad_sr", config=_Config(bits=bits))
        for r in studies.gradient_variance(model, x, y, grad=spec, keys=8):
            rows.append({**r, "label": f"{bits} bits"})
    by = {(r["label"], r["path"]): r for r in rows}
    for path in ("a", "b"):  # more bits: less variance
        assert by[("6 bits", path)]["dy_variance"] < by[("3 bits", path)]["dy_variance"]
    paths = studies.write_gradient_report(rows, tmp_path, name="g")
    assert json.loads(paths["json"].read_text())[0]["label"] == "3 bits"
    assert "| 6 bits | a | test_grad_sr6 |" in paths["table"].read_text()
    assert paths["plot"].stat().st_size > 1000
    # The model itself is unchanged (the study works on clones).
    assert model.a.recipe.grad is None


def test_float_gradient_layers_and_refusals():
    x, y = _data()
    rows = studies.gradient_variance(_MLP(ql.recipes.absmax(8, 8)), x, y, keys=2)
    assert all(r["grad"] == "float" and r["variance"] == 0.0 for r in rows)
    assert all(r["bias"] < 1e-6 for r in rows)
    with pytest.raises(ValueError, match="keys=1 is not allowed"):
        studies.gradient_variance(_MLP(ql.recipes.absmax(8, 8)), x, y, keys=1)
    with pytest.raises(ValueError, match="does not quantize gradients"):
        studies.gradient_variance(
            _MLP(ql.recipes.absmax(8, 8)), x, y, grad=ql.TensorQuant(kind="lsq")
        )
    with pytest.raises(ValueError, match="no quant layers"):
        studies.gradient_variance(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), x, y)
